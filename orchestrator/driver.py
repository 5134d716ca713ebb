"""The driver: plans, schedules shards on Ray actors, writes the result. It never holds the model.

plan (model folder, partition, checks; all bad input is caught here, before Ray)
  -> Ray actors compress shards (weights travel through the object store)
  -> each result is written as one safetensors file of the output checkpoint
  -> the checkpoint folder is renamed into place when complete
  -> dense and compressed perplexity (Ray tasks) -> report.json / report.md -> MLflow
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from tqdm import tqdm

from orchestrator.checkpoint import (
    copy_non_weight_files,
    fsync_dir,
    read_keys,
    shard_file_name,
    write_index,
    write_tensors,
)
from orchestrator.data import Calibration, calibration_windows
from orchestrator.errors import UserError
from orchestrator.export import QuantizedLayer, export, linear_modules, quant_tensors, scheme_of, write_manifest
from orchestrator.partition import CAUSAL_LM, Partition, Shard, load_config, partition_model, skeleton
from orchestrator.recipe import Recipe, Stage
from orchestrator.worker import CompressionWorker, ShardResult


class ShardFailed(RuntimeError):
    """A shard failed on every attempt it was allowed."""


@dataclass
class Plan:
    recipe: Recipe
    model_dir: Path
    partition: Partition
    run_dir: Path
    calibration: Calibration | None  # token windows, when a stage needs calibration
    seconds: float  # spent planning (a reference model's first build included)

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
        group = getattr(stage.params, "group_size", -1)
        n_m = getattr(stage.params, "n_m", None)
        for layer in hits:
            if group != -1 and layer.in_features % group:
                raise UserError(f"key '{where}.group_size': {group} does not divide the {layer.in_features} "
                                f"input features of {layer.name}")
            if n_m and layer.in_features % n_m[1]:
                raise UserError(f"key '{where}.pattern': M={n_m[1]} does not divide the {layer.in_features} "
                                f"input features of {layer.name}")


def make_plan(recipe: Recipe, overwrite: bool = False, progress: bool = True) -> Plan:
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
    if needs_calibration or measures_perplexity:  # data problems surface now, not inside a Ray task
        from transformers import AutoTokenizer

        from orchestrator.evaluate import eval_windows

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        if needs_calibration:
            calibration = calibration_windows(tokenizer, cfg.data.calibration)
        if measures_perplexity:
            eval_windows(tokenizer, cfg.data.eval)
    out_root = Path(cfg.output.dir).expanduser().resolve()
    run_dir = out_root / recipe.run_name
    if (run_dir / "report.json").exists() and not (overwrite or cfg.output.overwrite):
        raise UserError(f"output: {run_dir} already holds a complete run; pass --overwrite to replace it")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir: cannot write to {out_root} ({e.strerror})") from None
    return Plan(recipe, model_dir, partition, run_dir, calibration, time.perf_counter() - t0)


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
        ray.init(num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False, logging_level="WARNING")
    return True


class ShardScheduler:
    """Submits each shard's work to an actor; chains activations from shard to shard.

    Calibrated runs: shard k's input activations are an object ref known when
    shard k-1 is submitted (its dense outputs in parallel mode, its compressed
    outputs in sequential mode), so Ray starts shard k as soon as they exist,
    while earlier shards are still compressing. Activations never pass through
    the driver.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        recipe, cluster = plan.recipe, plan.recipe.config.cluster
        self.stages = recipe.stages
        self.sequential = recipe.config.partition.calibration == "sequential"
        config = load_config(plan.model_dir, recipe.config.model.trust_remote_code) if plan.calibrated else None
        self.actors = [
            CompressionWorker.options(
                num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker, max_restarts=cluster.max_restarts
            ).remote(int(max(1, cluster.cpus_per_worker)), str(plan.model_dir), plan.partition.key_to_file, config)
            for _ in range(min(cluster.workers, len(plan.partition.shards)))
        ]
        self.inputs: dict[int, ray.ObjectRef] = {}  # shard index -> its input hidden states
        self.block_kwargs = None
        if plan.calibrated:  # the first block's inputs, computed by the first worker before its first shard
            self.inputs[0], self.block_kwargs = self.actors[0].embed.options(num_returns=2).remote(
                list(plan.partition.rest_keys), plan.calibration.input_ids, recipe.config.data.calibration.batch_size)

    def submit(self, shard: Shard, actor) -> ray.ObjectRef:
        """Queue a shard on an actor; returns the ref of its ShardResult."""
        k = shard.index
        if not self.plan.calibrated:
            result, _ = actor.compress.options(num_returns=2).remote(shard, self.stages)
            return result
        dense_out = actor.calibrate.remote(shard, self.inputs[k], self.block_kwargs, self.stages)
        if self.sequential:
            result, self.inputs[k + 1] = actor.compress.options(num_returns=2).remote(
                shard, self.stages, self.inputs[k], self.block_kwargs)
        else:
            self.inputs[k + 1] = dense_out
            result, _ = actor.compress.options(num_returns=2).remote(shard, self.stages)
        return result

    def done(self, shard: Shard) -> None:
        """Shard k's inputs are needed by nobody now (a retry would need them): free them."""
        self.inputs.pop(shard.index, None)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@dataclass
class Compressed:
    """What compress_all leaves behind: the dense checkpoint's pieces and what export needs."""

    shards: list[dict]  # shard records for the report
    weight_map: dict[str, str]  # checkpoint key -> file in the dense staging folder
    tensor_bytes: int
    quantized: list[QuantizedLayer]  # layers export packs (their scales are in the quant folder)


def compress_all(plan: Plan, staging: Path, quant_dir: Path, progress: bool) -> Compressed:
    """Run every shard on the actors; write each result as it arrives (dense tensors to `staging`,
    the quantized layers' scales and zeros to `quant_dir`, same file name)."""
    partition = plan.partition
    max_attempts = plan.recipe.config.cluster.max_restarts + 1
    total_files = len(partition.shards) + 1  # the shards, and one file for everything outside the blocks
    scheduler = ShardScheduler(plan)
    pending = deque(partition.shards)
    attempts = {s.index: 0 for s in partition.shards}
    in_flight: dict = {}
    idle = list(scheduler.actors)
    records: dict[int, dict] = {}
    weight_map: dict[str, str] = {}
    tensor_bytes = 0
    quantized: list[QuantizedLayer] = []
    bar = tqdm(total=len(partition.shards), desc="compress", unit="shard", file=sys.stderr, disable=not progress)
    try:
        while pending or in_flight:
            while pending and idle:
                shard, actor = pending.popleft(), idle.pop(0)
                attempts[shard.index] += 1
                in_flight[scheduler.submit(shard, actor)] = (shard, actor)
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            shard, actor = in_flight.pop(done)
            idle.append(actor)
            try:
                result: ShardResult = ray.get(done)
            except (RayActorError, WorkerCrashedError, RayTaskError) as e:
                if attempts[shard.index] >= max_attempts:
                    raise ShardFailed(f"shard {shard.index} ({', '.join(shard.modules)}) failed "
                                      f"{attempts[shard.index]} times; last error: {str(e).splitlines()[0]}") from e
                bar.write(f"shard {shard.index}: attempt {attempts[shard.index]} failed "
                          f"({type(e).__name__}); retrying")
                pending.appendleft(shard)
                continue
            scheduler.done(shard)
            fname = shard_file_name(shard.index + 1, total_files)
            tensor_bytes += write_tensors(staging / fname, result.tensors)
            weight_map.update({k: fname for k in result.tensors})
            quantized += save_quant(shard, result, quant_dir / fname)
            records[shard.index] = shard_record(shard, result, attempts[shard.index])
            bar.update(1)
    finally:
        bar.close()
        scheduler.close()
    return Compressed([records[i] for i in sorted(records)], weight_map, tensor_bytes, quantized)


def save_quant(shard: Shard, result: ShardResult, path: Path) -> list[QuantizedLayer]:
    """Write the shard's scales and zeros beside it; -> the layers export will pack.

    GPT-2's Conv1D layers stay dense in the export: compressed-tensors only
    quantizes nn.Linear (and nn.Embedding) modules when it loads a checkpoint.
    """
    layers = {layer.name: layer for layer in shard.linears}
    packable = {name: q for name, q in result.quant.items() if not layers[name].transposed}
    if not packable:
        return []
    tensors = {}
    for name, quant in packable.items():
        tensors.update(quant_tensors(name, quant))
    write_tensors(path, tensors)
    return [QuantizedLayer(name, layers[name].weight_key, scheme_of(quant, layers[name].in_features))
            for name, quant in sorted(packable.items())]


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


def write_rest(plan: Plan, staging: Path, compressed: Compressed) -> None:
    """Everything outside the blocks (embeddings, norms, head) is copied as it was; then the index."""
    partition = plan.partition
    fname = shard_file_name(0, len(partition.shards) + 1)
    rest = read_keys(plan.model_dir, list(partition.rest_keys), partition.key_to_file)
    tensor_bytes = compressed.tensor_bytes + write_tensors(staging / fname, rest)
    compressed.weight_map.update({k: fname for k in rest})
    write_index(staging, compressed.weight_map, tensor_bytes)
    copy_non_weight_files(plan.model_dir, staging)
    (staging / "recipe.yaml").write_text(plan.recipe.yaml)


def export_model(plan: Plan, partial: Path, compressed: Compressed) -> dict:
    """The evaluated dense checkpoint -> partial/model in compressed-tensors format; the dense copy goes."""
    dense, quant_dir, model_dir = partial / "dense", partial / "quant", partial / "model"
    config = load_config(plan.model_dir, plan.recipe.config.model.trust_remote_code)
    all_linears = linear_modules(skeleton(config, plan.recipe.config.model.trust_remote_code))
    sizes = export(dense, quant_dir, model_dir, compressed.quantized, all_linears)
    write_manifest(model_dir)
    fsync_dir(model_dir)
    shutil.rmtree(dense)
    shutil.rmtree(quant_dir)
    return sizes


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
    partial = plan.run_dir.with_name(f".{plan.run_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    staging, quant_dir = partial / "dense", partial / "quant"  # the evaluated checkpoint; its scales and zeros
    staging.mkdir(parents=True)
    quant_dir.mkdir()
    (partial / "recipe.yaml").write_text(recipe.yaml)

    t = time.perf_counter()
    owns_ray = start_ray(recipe)
    timer.add("ray_start", time.perf_counter() - t)
    try:
        t = time.perf_counter()
        compressed = compress_all(plan, staging, quant_dir, progress)
        write_rest(plan, staging, compressed)
        timer.add("compress", time.perf_counter() - t)

        t = time.perf_counter()
        quality, speed = measure(plan, staging, partial / "eval")
        timer.add("evaluate", time.perf_counter() - t)
    finally:
        if owns_ray:
            ray.shutdown()

    t = time.perf_counter()
    sizes = export_model(plan, partial, compressed)
    timer.add("export", time.perf_counter() - t)
    data = report.build(plan, compressed.shards, quality, speed, timer.phases, started, partial / "model", sizes)
    plots.run_plots(data, partial / "plots")

    def write_report(d: dict) -> None:
        d["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
        report.write(partial, d)

    tracking.log_run(recipe, data, partial, write_report)
    finalize(partial, plan.run_dir)
    return data


def finalize(partial: Path, run_dir: Path) -> None:
    """Swap the finished folder into place; an older run there (with --overwrite) goes last."""
    old = run_dir.with_name(f".{run_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        run_dir.rename(old)
    partial.rename(run_dir)
    fsync_dir(run_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
