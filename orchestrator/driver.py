"""The driver: runs a plan (plan.py) on Ray and finishes the run folder. It never holds the model.

    start Ray (embedded, or join cluster.address)
    -> compress: every shard the store lacks, on a pool of actors (shard_pool.py); each finished shard
       is committed to the store (store.py); the checkpoints are assembled from the commits (assemble.py)
    -> recover: distillation, when the recipe enables it (recover_stage.py)
    -> export: index, config and manifest; proven to load in transformers (on a compression actor
       still up, else in a fresh process)
    -> evaluate: dense and compressed quality and speed in a fresh process (evaluate.py)
    -> report.json / report.md (report.py), MLflow (tracking.py); the finished folder renamed into place,
       while Ray stops
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from tqdm import tqdm

from orchestrator.assemble import Compressed, Layout, assemble, finish_evaluated, finish_export_folder, shard_commit
from orchestrator.errors import RunFailed
from orchestrator.files import fsync_dir, write_text_atomic
from orchestrator.partition import CAUSAL_LM
from orchestrator.plan import Plan
from orchestrator.planner import peak_rss
from orchestrator.recipe import Recipe
from orchestrator.shard_pool import Retries, ShardFailed, ShardPool
from orchestrator.store import shard_key

log = logging.getLogger(__name__)


@dataclass
class Timer:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


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
        # no idle task workers started ahead, one per CPU, before ray.init returns: the run starts the
        # processes it uses (timed by hand on 2 cores: ray.init 9 s with them, 3.4 s without)
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # address="local": a Ray of our own, even where a Ray node runs on this machine or RAY_ADDRESS is
        # set (ray.init() would join those, and then refuse num_cpus). The dashboard serves Ray's state
        # API, which Ray Train's controller polls (the recover stage).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, wanted),
                 include_dashboard=recipe.config.recover.enabled, dashboard_host="127.0.0.1",
                 logging_level="WARNING")
    return True


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler's kill) stops the run as Ctrl-C does: the committed shards
    are on disk already; the exception unwinds the actors and the progress bar and logs the stop."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def gpus_per_worker(setting: str, workers: int, cluster_gpus: float) -> float:
    """`cluster.gpus_per_worker` -> the GPUs each actor asks Ray for. auto: one each when the cluster has
    a GPU per worker, an equal share each when it has fewer (so every worker can start), none without."""
    if setting != "auto":
        return float(setting)
    if cluster_gpus <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= workers else math.floor(cluster_gpus / workers * 1e4) / 1e4


def compress_all(plan: Plan, gpus: float, progress: bool, keep_actor: bool) -> tuple[Compressed, object | None]:
    """Compress every shard the store lacks, on the actors, which write each shard twice: evaluated/
    (as the run evaluates it) and model/ (packed, the export). The driver commits each finished shard
    to the store and keeps only records. Committed shards of an interrupted run are reused.
    -> (the checkpoints, with keep_actor one live actor for the export's check, or None)"""
    partition, store = plan.partition, plan.store
    layout = Layout(store.folder, len(partition.shards))
    commits = store.committed()
    todo = [s for s in partition.shards if shard_key(s.index) not in commits]
    kept = None
    if todo or "rest" not in commits:
        pool, done = ShardPool(plan, gpus, layout), False
        try:
            # (if this worker dies before copying them, the copy is retried on another after the shards)
            rest = None if "rest" in commits else pool.copy_rest(sorted(partition.rest_keys), layout.rest)
            compress_shards(plan, pool, layout, todo, commits, progress)
            if rest is not None:
                commits["rest"] = {"bytes": copy_rest(plan, pool, rest, layout)}
                store.commit("rest", commits["rest"], [Path(f) for f in vars(layout.rest).values()])
            done = True
        finally:
            kept = pool.close(keep_one=keep_actor and done)
    return assemble(partition, layout, commits, {s.index for s in todo}), kept


def compress_shards(plan: Plan, pool: ShardPool, layout: Layout, todo: list, commits: dict, progress: bool) -> None:
    """Keep every actor busy with the earliest shard it may take, commit each one that finishes, and
    retry a failed one on another actor (shard_pool.Retries) until it is out of attempts."""
    partition, store = plan.partition, plan.store
    retries = Retries(partition.shards, plan.recipe.config.cluster.max_restarts + 1)
    chained = plan.calibrated and pool.sequential

    def ready(shard) -> bool:  # sequential mode: shard k needs the shards before it compressed and committed
        return not chained or all(shard_key(k) in commits for k in partition.after(shard))

    pending = list(todo)  # in index order: earlier shards first
    with tqdm(total=len(partition.shards), initial=len(partition.shards) - len(todo), desc="compress",
              unit="shard", disable=not progress) as bar:
        while pending or pool.busy():
            while pool.has_idle() and (shard := next((s for s in pending if ready(s)), None)):
                pending.remove(shard)
                retries.started(shard)
                pool.submit(shard)
            finished = pool.get_next(timeout=1.0)  # wakes for signals
            if finished is None:
                continue
            shard, outcome = finished
            if isinstance(outcome, RayError):
                reason = f"{type(outcome).__name__}: {str(outcome).splitlines()[0]}"
                store.event("failure", shard=shard.index, attempt=retries.attempts[shard.index], error=reason)
                retries.failed(shard, outcome, reason)
                log.warning("shard %d: attempt failed (%s); retrying", shard.index, type(outcome).__name__)
                pending = sorted([*pending, shard], key=lambda s: s.index)
                continue
            key = shard_key(shard.index)
            commits[key] = shard_commit(shard, outcome, retries.attempts[shard.index])
            store.commit(key, commits[key], [Path(f) for f in vars(layout.of_shard(shard)).values()])
            log.debug("shard %d committed: %.1f s on %s", shard.index, outcome.seconds, outcome.worker)
            bar.update(1)


def copy_rest(plan: Plan, pool: ShardPool, rest: ray.ObjectRef, layout: Layout) -> int:
    """Wait for the copy of the tensors outside the blocks, retried on another actor; -> its bytes."""
    max_attempts = plan.recipe.config.cluster.max_restarts + 1
    for attempt in range(1, max_attempts + 1):
        try:
            return ray.get(rest)
        except RayError as e:
            if attempt == max_attempts:
                raise ShardFailed(f"the tensors outside the blocks (embeddings, norms, head) failed "
                                  f"{attempt} times; last error: {type(e).__name__}") from e
            rest = pool.copy_rest(sorted(plan.partition.rest_keys), layout.rest, attempt)


class ExportUnloadable(RunFailed):
    """The exported checkpoint does not load in transformers, or loads into other outputs."""


def check_export_loads(plan: Plan, compressed: Compressed, actor=None) -> dict:
    """export.check_loads on a compression actor that is still up (its libraries are imported: seconds
    saved on every run), else in a fresh process (a Ray task): the run succeeds only with an export that
    transformers loads and that computes what the run evaluated. The driver holds no weights. A kept actor
    that has died or is restarting (a fault late in the run) hands the check to a fresh process."""
    from orchestrator.export import check_loads

    threads = int(max(1, plan.recipe.config.cluster.cpus_per_worker))
    args = (str(compressed.export.folder), str(compressed.evaluated.folder), plan.partition.block_prefix,
            plan.partition.first_expert_block() + 1, plan.partition.task != CAUSAL_LM,
            plan.recipe.config.model.trust_remote_code, threads)
    try:
        if actor is not None:
            try:
                return ray.get(actor.check_loads.remote(*args))
            except (RayActorError, ActorUnavailableError) as e:
                log.warning("the export's check moves to a fresh process: its worker is gone (%s)", type(e).__name__)
        return ray.get(ray.remote(num_cpus=threads)(check_loads).remote(*args))
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
    result = ray.get(task.remote(str(compressed_dir), str(plan.baseline_dir), causal, cfg, threads))
    if causal:
        report.save_sample_logits(eval_dir, result["samples"]["dense"], result["samples"]["compressed"])
    return result["quality"], result["speed"]


def execute(plan: Plan, timer: Timer, progress: bool) -> dict:
    """The run's work on Ray, phase by phase; -> what the report needs of it (report.RunResult's fields)."""
    from orchestrator.recover_stage import recover_stage

    partial, cfg = plan.store.folder, plan.recipe.config
    workers = min(cfg.cluster.workers, len(plan.partition.shards))
    gpus = gpus_per_worker(cfg.cluster.gpus_per_worker, workers, ray.cluster_resources().get("GPU", 0))
    actor = None  # one compression actor stays up for the export's check, unless recovery needs its CPUs / GPUs
    try:
        with timer.phase("compress"):
            compressed, actor = compress_all(plan, gpus, progress, keep_actor=not cfg.recover.enabled)
            finish_evaluated(plan, compressed)
        recovery = None
        if cfg.recover.enabled:
            with timer.phase("recover"):
                recovery = recover_stage(plan, compressed)
        with timer.phase("export"):
            sizes = finish_export_folder(plan, compressed)
            if recovery:  # the recovered export replaces the compressed one
                shutil.rmtree(partial / "model")
                compressed.export.folder.rename(partial / "model")
                compressed.export.folder = partial / "model"
            sizes["load_check"] = check_export_loads(plan, compressed, actor)
    finally:
        if actor is not None:
            ray.kill(actor)
    with timer.phase("evaluate"):
        quality, speed = measure(plan, compressed.evaluated.folder, partial / "eval")
    return {"compressed": compressed, "quality": quality, "speed": speed, "sizes": sizes, "recovery": recovery,
            "gpus_per_worker": gpus}


def run(plan: Plan, progress: bool = True) -> dict:
    """Execute a plan; returns the report (also written to the run folder)."""
    from orchestrator import plots, report, tracking

    timer, started = Timer(), time.time()
    timer.add("plan", plan.seconds)
    t0 = time.perf_counter() - plan.seconds
    partial = plan.store.folder
    plan.store.prepare()  # evaluated/ (what the run evaluates; removed at the end), model/ (the export)
    write_text_atomic(partial / "recipe.yaml", plan.recipe.yaml)
    with timer.phase("ray_start"):
        owns_ray = start_ray(plan.recipe)
        stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler (sys.exit)
    try:
        outcome = execute(plan, timer, progress)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM from `ray job stop` (cli.py): committed shards stay
            plan.store.event("stopped", committed=len(plan.store.committed()))
        if owns_ray:
            ray.shutdown()
        raise
    # Ray's shutdown (about 1.4 s here, mostly waiting for its processes) runs beside the report, the plots
    # and MLflow's logging, none of which use Ray
    stopping = threading.Thread(target=ray.shutdown, name="ray-stop") if owns_ray else None
    if stopping is not None:
        stopping.start()
    try:
        result = report.RunResult(plan=plan, phases=timer.phases, started=started, driver_peak_rss=peak_rss(),
                                  retries=len(plan.store.events("failure")), **outcome)
        data = report.build(result)
        plots.run_plots(data, partial / "plots")
        data["timing"]["total_s"] = round(time.perf_counter() - t0, 3)  # up to the report; MLflow's logging after
        data["mlflow"] = tracking.log_run(plan.recipe, data, partial)
        report.write(partial, data)
        finalize(partial, plan.run_dir)
    finally:
        if stopping is not None:
            stopping.join()
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
