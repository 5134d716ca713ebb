"""The driver: plans, schedules shards on Ray actors, writes the result. It never holds the model.

plan (model folder, partition, checks; all bad input is caught here, before Ray)
  -> Ray actors compress shards (weights travel through the object store)
  -> each result is written as one safetensors file of the output checkpoint
  -> the checkpoint folder is renamed into place when complete
  -> dense and compressed perplexity (Ray tasks) -> report.json / report.md -> MLflow
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayError
from tqdm import tqdm

from orchestrator.checkpoint import (
    copy_non_weight_files,
    fsync_dir,
    shard_file_name,
    write_index,
    write_tensors,
)
from orchestrator.data import Calibration, calibration_windows
from orchestrator.errors import RunFailed, UserError
from orchestrator.export import QuantizedLayer, Scheme, finish_export, linear_modules
from orchestrator.partition import CAUSAL_LM, Partition, Shard, load_config, partition_model, skeleton
from orchestrator.planner import Forecast, check_fits, forecast, peak_rss
from orchestrator.recipe import CalibrationDataConfig, Recipe, Stage, as_dict
from orchestrator.store import Fingerprint, RunLock, ShardStore, model_fingerprint, recipe_fingerprint
from orchestrator.worker import CompressionWorker, ShardFiles, ShardResult


MAX_UNAVAILABLE = 10  # per shard: "actor restarting" answers not counted as attempts, before they are


class ShardFailed(RunFailed):
    """A shard failed on every attempt it was allowed."""


@dataclass
class Plan:
    recipe: Recipe
    model_dir: Path
    partition: Partition
    run_dir: Path
    calibration: Calibration | None  # token windows, when a stage needs calibration
    seconds: float  # spent planning (a reference model's first build included)
    store: ShardStore | None = None  # the run's work folder and its committed shards (store.py)
    forecast: Forecast | None = None  # predicted memory and time (planner.py)
    gpus_per_worker: float | None = None  # cluster.gpus_per_worker resolved against the cluster, once Ray is up
    recover_ids: object = None  # [num_samples, seq_len] token windows for the recover stage, when enabled
    lock: RunLock | None = None  # held while the run writes its folder (make_plan(lock=True))

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None


@dataclass
class Timer:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 3)


def resolve_model_dir(path: str, progress: bool) -> Path:
    from orchestrator.reference import is_reference, reference_name, resolve_reference

    if is_reference(path):
        try:
            return resolve_reference(reference_name(path), progress=progress)
        except KeyError as e:
            raise UserError(f"model.path: {e.args[0]}") from None
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"model.path: folder not found: {model_dir}")
    return model_dir.resolve()


def check_stages(stages: list[Stage], partition: Partition) -> None:
    """Every stage must hit a layer, and every hit layer must fit the stage's groups."""
    layers = [layer for shard in partition.shards for layer in shard.linears]
    for stage in stages:
        hits = [layer for layer in layers if stage.applies_to(layer.name)]
        where = f"stages.{stage.index}"
        if not hits:
            raise UserError(f"key '{where}.targets': matches no Linear layer in the transformer blocks "
                            f"(e.g. {layers[0].name if layers else 'none'})")
        quantizes = getattr(stage.params, "bits", None) is not None  # SparseGPT prunes only without bits
        group = stage.params.group_size if quantizes else -1
        n_m = getattr(stage.params, "n_m", None)
        for layer in hits:
            if group != -1 and layer.in_features % group:
                raise UserError(f"key '{where}.group_size': {group} does not divide the {layer.in_features} "
                                f"input features of {layer.name}")
            if n_m and layer.in_features % n_m[1]:
                raise UserError(f"key '{where}.pattern': M={n_m[1]} does not divide the {layer.in_features} "
                                f"input features of {layer.name}")


def check_recover(recipe: Recipe, partition: Partition) -> None:
    """The recover stage distils a causal LM's Linear layers; say so before anything runs."""
    if not recipe.config.recover.enabled:
        return
    if partition.task != CAUSAL_LM:
        raise UserError("recover.enabled: recovery distils next-token distributions; "
                        f"{partition.architecture} is not a causal LM")
    transposed = [l.name for s in partition.shards for l in s.linears
                  if l.transposed and any(st.applies_to(l.name) for st in recipe.stages)]
    if transposed:
        raise UserError(f"recover.enabled: Conv1D layers (e.g. {transposed[0]}) are not packed in the export, "
                        "so their grids cannot be kept through recovery; not supported yet")


def recover_data(cfg) -> CalibrationDataConfig:
    """The recover stage's training windows: the calibration source, its own count, length and seed."""
    r = cfg.recover
    return CalibrationDataConfig(source=cfg.data.calibration.source, num_samples=r.num_samples, seq_len=r.seq_len,
                                 seed=cfg.data.calibration.seed + 1, batch_size=r.batch_size)


def make_plan(recipe: Recipe, overwrite: bool = False, progress: bool = True, lock: bool = False) -> Plan:
    """Every check of the run's input, before Ray starts. lock: hold the run folder against other runs
    of the same name (RunLock) until `plan.lock.release()` or the process ends."""
    cfg = recipe.config
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model.path, progress)
    partition = partition_model(model_dir, cfg.partition.blocks_per_shard, cfg.model.trust_remote_code)
    check_stages(recipe.stages, partition)
    calibration = None
    needs_calibration = any(s.technique.needs_calibration for s in recipe.stages)
    measures_perplexity = partition.task == CAUSAL_LM and cfg.data.eval.enabled
    if partition.task != CAUSAL_LM and cfg.data.eval.enabled:
        from orchestrator.evaluate import eval_sentences

        eval_sentences(cfg.data.eval)
    check_recover(recipe, partition)
    recover_ids = None
    if needs_calibration or measures_perplexity or cfg.recover.enabled:  # data problems surface now
        from transformers import AutoTokenizer

        from orchestrator.evaluate import eval_windows

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        if needs_calibration:
            calibration = calibration_windows(tokenizer, cfg.data.calibration)
        if measures_perplexity:
            eval_windows(tokenizer, cfg.data.eval)
        if cfg.recover.enabled:
            recover_ids = calibration_windows(tokenizer, recover_data(cfg)).input_ids
    out_root = Path(cfg.output.dir).expanduser().resolve()
    run_dir = out_root / recipe.run_name
    overwrite = overwrite or cfg.output.overwrite
    plan = Plan(recipe, model_dir, partition, run_dir, calibration, 0.0, recover_ids=recover_ids)
    fingerprint = Fingerprint(recipe_fingerprint(as_dict(recipe)), model_fingerprint(model_dir),
                              calibration.sha256 if calibration else None)
    plan.store = open_output(run_dir, fingerprint, overwrite)
    plan.forecast = forecast(plan)
    check_fits(plan.forecast, plan)
    try:  # last of the checks: the probe touches the folder
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir: cannot write to {out_root} ({e.strerror})") from None
    if lock:  # another run of the same name may have changed the folder while this one planned: look again
        plan.lock = RunLock.acquire(run_dir)
        try:
            plan.store = open_output(run_dir, fingerprint, overwrite)
        except UserError:
            plan.lock.release()
            raise
    plan.seconds = time.perf_counter() - t0
    return plan


def open_output(run_dir: Path, fingerprint: Fingerprint, overwrite: bool) -> ShardStore:
    """The run's store, unless the run folder already holds a complete run (replaced only with --overwrite)
    or unfinished shards of a different compression (ShardStore.open refuses those)."""
    if (run_dir / "report.json").exists() and not overwrite:
        raise UserError(f"output: {run_dir} already holds a complete run; pass --overwrite to replace it")
    return ShardStore.open(partial_dir(run_dir), fingerprint, overwrite)


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler's kill) stops the run as Ctrl-C does: the committed shards
    are on disk already; the exception unwinds the actors and the progress bar and logs the stop."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def partial_dir(run_dir: Path) -> Path:
    """Where a run works (and keeps its committed shards) until it completes."""
    return run_dir.with_name(f".{run_dir.name}.partial")


def start_ray(recipe: Recipe) -> bool:
    """Join `cluster.address`, or start an embedded local Ray. Returns True if we started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = recipe.config.cluster
    if cluster.address:
        ray.init(address=cluster.address, logging_level="WARNING")
    else:
        # Logical CPUs: the workers plus room for the loader and evaluation tasks.
        wanted = math.ceil(cluster.workers * cluster.cpus_per_worker) + 1
        # address="local": a Ray of our own, even where a Ray node runs on this machine or RAY_ADDRESS is
        # set (ray.init() would join those, and then refuse num_cpus). The dashboard serves Ray's state
        # API, which Ray Train's controller polls (the recover stage).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, wanted),
                 include_dashboard=recipe.config.recover.enabled, dashboard_host="127.0.0.1",
                 logging_level="WARNING")
    return True


def gpus_per_worker(setting: str, workers: int, cluster_gpus: float) -> float:
    """`cluster.gpus_per_worker` -> the GPUs each actor asks Ray for. auto: one each when the cluster has
    a GPU per worker, an equal share each when it has fewer (so every worker can start), none without."""
    if setting != "auto":
        return float(setting)
    if cluster_gpus <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= workers else math.floor(cluster_gpus / workers * 1e4) / 1e4


class ShardScheduler:
    """Submits each shard's work to an actor; chains activations from shard to shard.

    Calibrated runs: shard k's input activations are an object ref known when
    shard k-1 is submitted (its dense outputs in parallel mode, its compressed
    outputs in sequential mode), so Ray starts shard k as soon as they exist,
    while earlier shards are still compressing. Activations never pass through
    the driver.

    Where a chain link is missing (shards reused from the store, or refs
    forgotten after a failure, since a lost node takes its objects with it),
    `input_of` rebuilds it: the embedding, then each earlier shard's blocks run
    forward (dense in parallel mode, the committed compressed shard in sequential
    mode). The same code on the same inputs gives the same activations, so the
    output bytes do not depend on faults.
    """

    def __init__(self, plan: Plan, evaluated_dir: Path, export_dir: Path):
        self.plan, self.evaluated_dir, self.export_dir = plan, evaluated_dir, export_dir
        recipe, cluster = plan.recipe, plan.recipe.config.cluster
        self.stages = recipe.stages
        self.sequential = recipe.config.partition.calibration == "sequential"
        config = load_config(plan.model_dir, recipe.config.model.trust_remote_code) if plan.calibrated else None
        workers = min(cluster.workers, len(plan.partition.shards))
        plan.gpus_per_worker = gpus_per_worker(cluster.gpus_per_worker, workers, ray.cluster_resources().get("GPU", 0))
        self.actors = [
            CompressionWorker.options(  # SPREAD: one worker per node first, so shards use every node
                num_cpus=cluster.cpus_per_worker, num_gpus=plan.gpus_per_worker, max_restarts=cluster.max_restarts,
                scheduling_strategy="SPREAD",
            ).remote(int(max(1, cluster.cpus_per_worker)), str(plan.model_dir), plan.partition.key_to_file, config)
            for _ in range(workers)
        ]
        self.inputs: dict[int, ray.ObjectRef] = {}  # shard index -> its input hidden states
        self.block_kwargs: ray.ObjectRef | None = None  # what every block is called with besides them

    def files(self, shard: Shard) -> ShardFiles:
        fname = shard_file_name(shard.index + 1, len(self.plan.partition.shards) + 1)
        return ShardFiles(str(self.evaluated_dir / fname), str(self.export_dir / fname))

    def input_of(self, k: int, actor) -> ray.ObjectRef:
        """Shard k's input activations, rebuilt on `actor` from the last known link if missing."""
        if k not in self.inputs:
            if k == 0:  # the first block's inputs, from the embedding
                self.inputs[0], self.block_kwargs = actor.embed.options(num_returns=2).remote(
                    list(self.plan.partition.rest_keys), self.plan.calibration.input_ids,
                    self.plan.recipe.config.data.calibration.batch_size)
            else:
                previous = self.plan.partition.shards[k - 1]
                hidden = self.input_of(k - 1, actor)
                source = self.files(previous).evaluated if self.sequential else None
                self.inputs[k] = actor.forward.remote(previous, hidden, self.block_kwargs, source)
        return self.inputs[k]

    def submit(self, shard: Shard, actor) -> ray.ObjectRef:
        """Queue a shard on an actor; returns the ref of its ShardResult."""
        k = shard.index
        compress = actor.compress.options(num_returns=2)
        if not self.plan.calibrated:
            return compress.remote(shard, self.stages, self.files(shard))[0]
        hidden = self.input_of(k, actor)
        dense_out = actor.calibrate.remote(shard, hidden, self.block_kwargs, self.stages)
        if self.sequential:
            result, self.inputs[k + 1] = compress.remote(shard, self.stages, self.files(shard), hidden,
                                                         self.block_kwargs)
        else:
            self.inputs[k + 1] = dense_out
            result, _ = compress.remote(shard, self.stages, self.files(shard))
        return result

    def done(self, shard: Shard) -> None:
        """Shard k's inputs are needed by nobody now: free them."""
        self.inputs.pop(shard.index, None)

    def forget_inputs(self) -> None:
        """After a failure: the refs may have died with a node; later shards rebuild them."""
        self.inputs.clear()
        self.block_kwargs = None

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@dataclass
class Checkpoint:
    """A checkpoint the workers are writing file by file: which key is in which file, and its bytes."""

    folder: Path
    weight_map: dict[str, str] = field(default_factory=dict)
    tensor_bytes: int = 0

    def add(self, fname: str, keys: list[str], nbytes: int) -> None:
        self.weight_map.update({k: fname for k in keys})
        self.tensor_bytes += nbytes


@dataclass
class Compressed:
    """What compress_all leaves behind."""

    shards: list[dict]  # shard records for the report
    evaluated: Checkpoint  # every weight on its grid, dense dtype: what the run evaluates
    export: Checkpoint  # the same, packed: what the run delivers
    quantized: list[QuantizedLayer]  # the layers packed in the export
    packed_bytes: int  # their bytes there
    quantized_weights: int  # their weight count
    reused: int = 0  # shards taken from the store (committed by an earlier, interrupted run)
    computed: int = 0  # shards compressed by this run


def shard_commit(shard: Shard, result: ShardResult, attempts: int) -> dict:
    """What the store keeps of a finished shard: enough to assemble the checkpoint and the report."""
    return {"record": shard_record(shard, result, attempts), "evaluated_keys": result.evaluated_keys,
            "export_keys": result.export_keys, "evaluated_bytes": result.evaluated_bytes,
            "export_bytes": result.export_bytes, "packed_bytes": result.packed_bytes,
            "quantized": [dataclasses.asdict(q) for q in result.quantized]}


def compress_all(plan: Plan, progress: bool) -> Compressed:
    """Compress every shard the store lacks, on the actors, which write each shard twice: evaluated/
    (as the run evaluates it) and model/ (packed, the export). The driver commits each finished shard
    to the store and keeps only records. Committed shards of an interrupted run are reused."""
    partition, store = plan.partition, plan.store
    max_attempts = plan.recipe.config.cluster.max_restarts + 1
    total_files = len(partition.shards) + 1  # the shards, and one file for everything outside the blocks
    evaluated, export = Checkpoint(store.folder / "evaluated"), Checkpoint(store.folder / "model")
    commits = store.committed()
    todo = [s for s in partition.shards if f"{s.index:05d}" not in commits]
    rest_file = shard_file_name(0, total_files)  # everything outside the blocks, copied by a worker
    rest_files = ShardFiles(str(evaluated.folder / rest_file), str(export.folder / rest_file))
    rest_keys = sorted(partition.rest_keys)
    if not todo and "rest" in commits:
        scheduler, rest = None, None
    else:
        scheduler = ShardScheduler(plan, evaluated.folder, export.folder)
        # (if this worker dies before copying them, the copy is retried on another after the shards)
        rest = None if "rest" in commits else scheduler.actors[0].write_rest.remote(rest_keys, rest_files)
    attempts = {s.index: 0 for s in partition.shards}
    unavailable = {s.index: 0 for s in partition.shards}
    pending = list(todo)  # in index order: earlier shards first
    in_flight: dict = {}
    idle = list(scheduler.actors) if scheduler else []
    bar = tqdm(total=len(partition.shards), initial=len(partition.shards) - len(todo), desc="compress",
               unit="shard", file=sys.stderr, disable=not progress)

    def committed(shard: Shard) -> bool:
        return f"{shard.index:05d}" in commits

    def ready(shard: Shard) -> bool:  # sequential mode: shard k needs shard k-1 compressed and committed
        return not (plan.calibrated and scheduler.sequential and shard.index > 0
                    and not committed(partition.shards[shard.index - 1]))

    try:
        while pending or in_flight:
            while idle and (shard := next((s for s in pending if ready(s)), None)):
                pending.remove(shard)
                actor = idle.pop(0)
                attempts[shard.index] += 1
                in_flight[scheduler.submit(shard, actor)] = (shard, actor)
            ready_refs, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)  # wakes for signals
            if not ready_refs:
                continue
            done = ready_refs[0]
            shard, actor = in_flight.pop(done)
            idle.append(actor)
            try:
                result: ShardResult = ray.get(done)
            except RayError as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                store.event("failure", shard=shard.index, attempt=attempts[shard.index], error=reason)
                if isinstance(e, ActorUnavailableError) and unavailable[shard.index] < MAX_UNAVAILABLE:
                    unavailable[shard.index] += 1  # the actor is restarting: not counted as an attempt
                    attempts[shard.index] -= 1
                    time.sleep(0.5)
                elif attempts[shard.index] >= max_attempts:
                    raise ShardFailed(f"shard {shard.index} ({', '.join(shard.modules)}) failed "
                                      f"{attempts[shard.index]} times; last error: {reason}") from e
                tqdm.write(f"shard {shard.index}: attempt failed ({type(e).__name__}); retrying", file=sys.stderr)
                idle.remove(actor)
                idle.append(actor)  # the retry goes to another worker first
                scheduler.forget_inputs()
                pending = sorted([*pending, shard], key=lambda s: s.index)
                continue
            scheduler.done(shard)
            key = f"{shard.index:05d}"
            files = [Path(f) for f in vars(scheduler.files(shard)).values()]
            commits[key] = shard_commit(shard, result, attempts[shard.index])
            store.commit(key, commits[key], files)
            bar.update(1)
        if rest is not None:
            for attempt in range(1, max_attempts + 1):
                try:
                    rest_bytes = ray.get(rest)
                    break
                except RayError as e:
                    if attempt == max_attempts:
                        raise ShardFailed(f"the tensors outside the blocks (embeddings, norms, head) failed "
                                          f"{attempt} times; last error: {type(e).__name__}") from e
                    actor = scheduler.actors[attempt % len(scheduler.actors)]
                    rest = actor.write_rest.remote(rest_keys, rest_files)
            commits["rest"] = {"bytes": rest_bytes}
            store.commit("rest", commits["rest"], [Path(f) for f in vars(rest_files).values()])
    finally:
        bar.close()
        if scheduler:
            scheduler.close()
    records, quantized, packed_bytes = [], [], 0
    for shard in partition.shards:
        commit = commits[f"{shard.index:05d}"]
        fname = shard_file_name(shard.index + 1, total_files)
        evaluated.add(fname, commit["evaluated_keys"], commit["evaluated_bytes"])
        export.add(fname, commit["export_keys"], commit["export_bytes"])
        quantized += [QuantizedLayer(q["module"], q["weight_key"], Scheme(**q["scheme"])) for q in commit["quantized"]]
        packed_bytes += commit["packed_bytes"]
        records.append({**commit["record"], "reused": shard not in todo})
    rest_bytes = commits["rest"]["bytes"]
    evaluated.add(rest_file, rest_keys, rest_bytes)
    export.add(rest_file, rest_keys, rest_bytes)
    weights = {l.weight_key: l.in_features * l.out_features for s in partition.shards for l in s.linears}
    return Compressed(records, evaluated, export, quantized, packed_bytes,
                      sum(weights[l.weight_key] for l in quantized),
                      reused=len(partition.shards) - len(todo), computed=len(todo))


def shard_record(shard, result: ShardResult, attempts: int) -> dict:
    return {
        "index": shard.index,
        "modules": shard.modules,
        "seconds": round(result.seconds, 3),
        "capture_seconds": round(result.capture_seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "attempts": attempts,
        "worker": result.worker,
        "error": {m.name: m.relative_error for m in result.layers},
        "layers": [vars(m) for m in result.layers],
    }


def trained_layers(plan: Plan, compressed: Compressed) -> list:
    """Every compressed Linear, as the recover stage trains it (its grid, and its mask if pruned)."""
    from orchestrator.recover import TrainedLayer
    from orchestrator.techniques import TECHNIQUES

    keys = {l.name: l.weight_key for s in plan.partition.shards for l in s.linears}
    return [TrainedLayer(l["name"], keys[l["name"]], l["bits"], l["group_size"],
                         any(TECHNIQUES[m].kind == "prune" for m in l["methods"]))
            for record in compressed.shards for l in record["layers"] if l["methods"]]


def write_recovered(compressed: Compressed, recovered: dict, grids: dict, out: Path) -> None:
    """The checkpoint with the recovered weights, file for file: out/evaluated (on the grid, dense dtype)
    and out/model (packed with the unchanged scales and zeros)."""
    from safetensors.torch import load_file

    from orchestrator.export import pack_shard
    from orchestrator.techniques.grid import QuantParams

    evaluated = compressed.evaluated
    for sub in ("evaluated", "model"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for fname in sorted(set(evaluated.weight_map.values())):
        tensors = load_file(evaluated.folder / fname)
        for key in tensors.keys() & recovered.keys():
            tensors[key] = recovered[key].to(tensors[key].dtype)
        here = [q for q in compressed.quantized if evaluated.weight_map[q.weight_key] == fname]
        grid = {q.module: QuantParams(grids[f"{q.module}.scale"], grids[f"{q.module}.zero"].to(torch.int32),
                                      q.scheme.bits, tensors[q.weight_key].shape[1] if q.scheme.group_size == -1
                                      else q.scheme.group_size, q.scheme.symmetric) for q in here}
        packed, _ = pack_shard(tensors, here, grid)
        write_tensors(out / "evaluated" / fname, tensors)
        write_tensors(out / "model" / fname, packed)


def recover_stage(plan: Plan, compressed: Compressed) -> dict | None:
    """The recipe's recover stage (recover.py): distil the compressed model against the dense one on Ray
    Train, write the recovered checkpoint to recovered/ and point `compressed` at it. Committed to the
    store with its settings, so a rerun with the same settings reuses it."""
    from orchestrator import evaluate, recover

    cfg = plan.recipe.config
    if not cfg.recover.enabled:
        return None
    store, out = plan.store, plan.store.folder / "recovered"
    settings = dataclasses.asdict(cfg.recover)
    commit = store.committed().get("recovered")
    if commit is None or commit["settings"] != settings:
        store.commit_path("recovered").unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        before = None
        if cfg.data.eval.enabled:
            task = ray.remote(num_cpus=1, max_calls=1)(evaluate.perplexity)
            before = ray.get(task.remote(str(compressed.evaluated.folder), cfg.data.eval,
                                         int(max(1, cfg.cluster.cpus_per_worker)))).summary()["perplexity"]
        layers = trained_layers(plan, compressed)
        grids = recover.read_grids(compressed.export.folder, compressed.export.weight_map, layers)
        result = recover.train(cfg.recover, plan.model_dir, compressed.evaluated.folder, grids, layers,
                               plan.recover_ids, out / "work", cfg.seed)
        write_recovered(compressed, result["tensors"], grids, out)
        commit = {"settings": settings, "losses": result["losses"], "seconds": result["seconds"],
                  "perplexity_before": before, "layers": len(layers), "nodes": result["nodes"],
                  "zero_stage": result["zero_stage"], "start_steps": result["start_steps"]}
        files = [out / sub / f for sub in ("evaluated", "model") for f in sorted(set(compressed.evaluated.weight_map.values()))]
        store.commit("recovered", commit, files)
    compressed.evaluated.folder, compressed.export.folder = out / "evaluated", out / "model"
    finish_checkpoints(plan, compressed)
    return {k: commit[k] for k in ("settings", "losses", "seconds", "perplexity_before", "layers", "nodes",
                                   "zero_stage", "start_steps")}


def finish_checkpoints(plan: Plan, compressed: Compressed) -> None:
    """The evaluated checkpoint's index, config, tokenizer and recipe, beside the files the workers wrote."""
    evaluated = compressed.evaluated
    write_index(evaluated.folder, evaluated.weight_map, evaluated.tensor_bytes)
    copy_non_weight_files(plan.model_dir, evaluated.folder)
    (evaluated.folder / "recipe.yaml").write_text(plan.recipe.yaml)


def complete_export(plan: Plan, compressed: Compressed) -> dict:
    """partial/model: index, config with the quantization_config, manifest."""
    config = load_config(plan.model_dir, plan.recipe.config.model.trust_remote_code)
    all_linears = linear_modules(skeleton(config, plan.recipe.config.model.trust_remote_code))
    export = compressed.export
    fmt = finish_export(compressed.evaluated.folder, export.folder, export.weight_map, export.tensor_bytes,
                        compressed.quantized, all_linears)
    fsync_dir(export.folder)
    return {"format": fmt, "tensor_bytes": export.tensor_bytes, "quantized_layer_bytes": compressed.packed_bytes,
            "quantized_weights": compressed.quantized_weights}


class ExportUnloadable(RunFailed):
    """The exported checkpoint does not load in transformers, or loads into other outputs."""


def check_export_loads(plan: Plan, compressed: Compressed) -> dict:
    """export.check_loads in a fresh process (a Ray task): the run succeeds only with an export that
    transformers loads and that computes what the run evaluated."""
    from orchestrator.export import check_loads

    threads = int(max(1, plan.recipe.config.cluster.cpus_per_worker))
    task = ray.remote(num_cpus=threads)(check_loads)  # its process, libraries imported, then serves `measure`
    try:
        return ray.get(task.remote(str(compressed.export.folder), str(compressed.evaluated.folder),
                                   plan.partition.shards[0].modules[0], plan.partition.task != CAUSAL_LM,
                                   plan.recipe.config.model.trust_remote_code, threads))
    except RayError as e:
        cause = getattr(e, "cause", None) or e
        raise ExportUnloadable(
            f"the export of this {plan.partition.architecture} does not work: {str(cause).splitlines()[0]}. "
            "The run is not complete. Asymmetric grids (`symmetric: false` in the stages) export "
            "naive-quantized int8 weights, a layout more model families load") from None


def measure(plan: Plan, compressed_dir: Path, eval_dir: Path) -> tuple[dict, dict | None]:
    """Quality of the compressed checkpoint against the dense one, and the speed of each: one Ray task
    in a fresh process. -> (quality, speed). Causal LMs: perplexity of both and the KL divergence (the
    first window's logits saved to eval_dir); encoders: embedding fidelity."""
    from orchestrator import evaluate, report

    cfg = plan.recipe.config.data.eval
    if not cfg.enabled:
        return {"dense": None, "compressed": None}, None
    threads = int(max(1, plan.recipe.config.cluster.cpus_per_worker))
    causal = plan.partition.task == CAUSAL_LM
    task = ray.remote(num_cpus=threads, max_calls=1)(evaluate.evaluate_folders)
    result = ray.get(task.remote(str(compressed_dir), str(plan.model_dir), causal, cfg, threads))
    if causal:
        report.save_sample_logits(eval_dir, result["samples"]["dense"], result["samples"]["compressed"])
    return result["quality"], result["speed"]


def run(plan: Plan, progress: bool = True) -> dict:
    """Execute a plan; returns the report (also written to the run folder)."""
    from orchestrator import plots, report, tracking

    recipe, timer, started = plan.recipe, Timer(), time.time()
    timer.add("plan", plan.seconds)
    t0 = time.perf_counter() - plan.seconds
    partial = plan.store.folder
    plan.store.prepare()  # evaluated/ (what the run evaluates; removed at the end), model/ (the export)
    (partial / "recipe.yaml").write_text(recipe.yaml)

    t = time.perf_counter()
    owns_ray = start_ray(recipe)
    stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler (sys.exit)
    timer.add("ray_start", time.perf_counter() - t)
    try:
        t = time.perf_counter()
        compressed = compress_all(plan, progress)
        finish_checkpoints(plan, compressed)
        timer.add("compress", time.perf_counter() - t)

        t = time.perf_counter()
        recovery = recover_stage(plan, compressed)
        if recovery:
            timer.add("recover", time.perf_counter() - t)

        t = time.perf_counter()
        sizes = complete_export(plan, compressed)
        if recovery:  # the recovered export replaces the compressed one
            shutil.rmtree(partial / "model")
            compressed.export.folder.rename(partial / "model")
            compressed.export.folder = partial / "model"
        sizes["load_check"] = check_export_loads(plan, compressed)
        timer.add("export", time.perf_counter() - t)

        t = time.perf_counter()
        quality, speed = measure(plan, compressed.evaluated.folder, partial / "eval")
        timer.add("evaluate", time.perf_counter() - t)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop` (cli.py): committed shards stay
        plan.store.event("stopped", committed=len(plan.store.committed()))
        raise
    finally:
        if owns_ray:
            ray.shutdown()
    data = report.build(plan, compressed.shards, quality, speed, timer.phases, started, partial / "model", sizes,
                        peak_rss())
    data["store"] = {"shards_reused": compressed.reused, "shards_computed": compressed.computed,
                     "retries": len(plan.store.events("failure"))}
    if recovery:
        data["recover"] = recovery | {"perplexity_after": (quality.get("compressed") or {}).get("perplexity")}
    plots.run_plots(data, partial / "plots")

    def write_report(d: dict) -> None:
        d["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
        report.write(partial, d)

    tracking.log_run(recipe, data, partial, write_report)
    finalize(partial, plan.run_dir)
    return data


def finalize(partial: Path, run_dir: Path) -> None:
    """Swap the finished folder into place; an older run there (with --overwrite) goes last. The store's
    bookkeeping and the evaluated copy go; events.jsonl (commits, retries, stops) stays with the run."""
    for name in ("evaluated", "shards", "recovered"):
        shutil.rmtree(partial / name, ignore_errors=True)
    (partial / "store.json").unlink(missing_ok=True)
    old = run_dir.with_name(f".{run_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        run_dir.rename(old)
    partial.rename(run_dir)
    fsync_dir(run_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
