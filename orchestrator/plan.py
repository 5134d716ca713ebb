"""The plan of a run: every check of its input, before Ray starts, and one frozen `Plan` built once.

Bad input (a model folder, a stage that fits no layer, data too short, a run folder held by another
run, memory that cannot fit) raises UserError here, so `orchestrator run` exits 2 before any cluster
work. The plan then travels read-only through the run (driver.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.data import Calibration, calibration_sentences, calibration_windows, eval_sentences, eval_windows
from orchestrator.errors import UserError
from orchestrator.partition import CAUSAL_LM, Partition, partition_model
from orchestrator.planner import Forecast, check_fits, fits, forecast
from orchestrator.recipe import CalibrationDataConfig, Recipe, Stage, as_dict
from orchestrator.store import Fingerprint, RunLock, ShardStore, model_fingerprint, recipe_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    model_dir: Path
    partition: Partition
    run_dir: Path
    calibration: Calibration | None  # token windows, when a stage needs calibration
    recover_ids: torch.Tensor | None  # [num_samples, seq_len] the recover stage's windows, when enabled
    store: ShardStore  # the run's work folder and its committed shards (store.py)
    forecast: Forecast | None = None  # predicted memory and time (planner.py)
    lock: RunLock | None = None  # held while the run writes its folder (make_plan(lock=True))
    seconds: float = 0.0  # spent planning (a reference model's first build included)
    dense_dir: Path | None = None  # the model as given, when model_dir is its rotated copy (rotate.py)

    @property
    def baseline_dir(self) -> Path:
        """The dense model the compressed one is measured against: the model as the user gave it."""
        return self.dense_dir or self.model_dir

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None


def make_plan(recipe: Recipe, overwrite: bool = False, progress: bool = True, lock: bool = False,
              need_weights: bool = True, refuse: bool = True) -> Plan:
    """Every check of the run's input, before Ray starts. lock: hold the run folder against other runs
    of the same name (RunLock) until `plan.lock.release()` or the process ends. need_weights False
    (`orchestrator plan`): a model folder with config.json alone is planned from it (partition.py).
    refuse False (`orchestrator plan`): a plan that cannot fit is returned, for the caller to print and refuse."""
    cfg = recipe.config
    t0 = time.perf_counter()
    model_dir = dense_dir = resolve_model_dir(cfg.model.path, progress)
    if cfg.rotation.enabled:
        from orchestrator.rotate import rotated_model

        model_dir = rotated_model(dense_dir, cfg.rotation.seed, progress)  # UserError for an unknown family
    partition = partition_model(model_dir, cfg.partition.blocks_per_shard, cfg.model.trust_remote_code,
                                cfg.partition.experts_per_shard, need_weights)
    check_stages(recipe.stages, partition)
    check_recover(recipe, partition)
    check_awq(recipe, model_dir)
    calibration, recover_ids = read_data(recipe, model_dir, partition)
    tokens = calibration_tokens(recipe, calibration)
    partition, predicted = split_experts_to_fit(recipe, model_dir, partition, tokens)
    check_asymmetric(recipe, partition)
    run_dir = Path(cfg.output.dir).expanduser().resolve() / recipe.run_name
    overwrite = overwrite or cfg.output.overwrite
    resolved = as_dict(recipe)  # the shards as cut (the planner may have split experts): a store of others is not reused
    resolved["partition"]["experts_per_shard"] = partition.experts_per_shard
    fingerprint = Fingerprint(recipe_fingerprint(resolved), model_fingerprint(model_dir),
                              calibration.sha256 if calibration else None)
    plan = Plan(recipe, model_dir, partition, run_dir, calibration, recover_ids,
                open_output(run_dir, fingerprint, overwrite), predicted,
                dense_dir=dense_dir if dense_dir != model_dir else None)
    if refuse:
        check_fits(plan.forecast, plan)
    check_writable(run_dir.parent)  # last of the checks: the probe touches the folder
    if lock:  # another run of the same name may have changed the folder while this one planned: look again
        held = RunLock.acquire(run_dir)
        try:
            plan = dataclasses.replace(plan, lock=held, store=open_output(run_dir, fingerprint, overwrite))
        except UserError:
            held.release()
            raise
    plan = dataclasses.replace(plan, seconds=time.perf_counter() - t0)
    log.debug("planned %s in %.1f s: %d shards, store %s", recipe.run_name, plan.seconds, len(partition.shards),
              plan.store.folder)
    return plan


def split_experts_to_fit(recipe: Recipe, model_dir: Path, partition: Partition,
                         tokens: int | None) -> tuple[Partition, Forecast]:
    """The partition and its forecast. With `partition.experts_per_shard` unset and whole mixture-of-experts
    blocks too large for the memory (planner.fits), the experts are split: half a block's experts per shard,
    then a quarter, ..., the first split that fits (or the finest, which check_fits then refuses)."""
    cfg = recipe.config
    predicted = forecast(recipe, model_dir, partition, tokens)
    most = max((len({l.expert.expert for l in s.linears if l.expert}) for s in partition.shards), default=0)
    per_shard = most // 2
    while cfg.partition.experts_per_shard is None and not fits(predicted, recipe) and per_shard >= 1:
        partition = partition_model(model_dir, cfg.partition.blocks_per_shard, cfg.model.trust_remote_code, per_shard,
                                    need_weights=partition.key_bytes is None)
        predicted = forecast(recipe, model_dir, partition, tokens)
        log.info("whole blocks do not fit: %d experts per shard predicts a %s worker peak", per_shard,
                 f"{predicted.worker_bytes / 1e9:.2f} GB")
        per_shard //= 2
    return partition, predicted


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
        hits = [layer for layer in layers if stage.applies_to(layer.name, layer.router)]
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


def check_asymmetric(recipe: Recipe, partition: Partition) -> None:
    """Asymmetric calibration (gptq.py) pairs the dense and the compressed model's inputs: only sequential
    calibration has both, and only for whole blocks."""
    for stage in recipe.stages:
        if getattr(stage.params, "asymmetric", 0) > 0:
            where = f"key 'stages.{stage.index}.asymmetric'"
            if recipe.config.partition.calibration != "sequential":
                raise UserError(f"{where}: matches the dense model's outputs from the compressed model's inputs, "
                                "which only sequential calibration has; set partition.calibration=sequential")
            if any(shard.experts is not None for shard in partition.shards):
                raise UserError(f"{where}: not supported with expert-split shards (partition.experts_per_shard)")


def check_awq(recipe: Recipe, model_dir: Path) -> None:
    """AWQ (awq.py) folds its scales into the norms and layers of the families it knows, for one stage."""
    from orchestrator.awq import FAMILIES

    stages = [s for s in recipe.stages if getattr(s.params, "awq", False)]
    if len(stages) > 1:
        raise UserError(f"key 'stages.{stages[1].index}.awq': only one stage may scale the inputs "
                        f"(stage {stages[0].index} does already)")
    family = json.loads((model_dir / "config.json").read_text()).get("model_type") if stages else None
    if stages and family not in FAMILIES:
        raise UserError(f"key 'stages.{stages[0].index}.awq': AWQ folds its scales into the norms and layers of "
                        f"the {', '.join(FAMILIES)} families; this model is {family!r}")


def check_recover(recipe: Recipe, partition: Partition) -> None:
    """The recover stage distils a causal LM's Linear layers; say so before anything runs."""
    if not recipe.config.recover.enabled:
        return
    if partition.task != CAUSAL_LM:
        raise UserError("recover.enabled: recovery distils next-token distributions; "
                        f"{partition.architecture} is not a causal LM")
    if recipe.config.recover.train == "scales" and not any(getattr(st.params, "bits", None) for st in recipe.stages):
        raise UserError("recover.train: 'scales' trains quantization scales, and no stage quantizes "
                        "(use 'weights')")
    transposed = [l.name for s in partition.shards for l in s.linears
                  if l.transposed and any(st.applies_to(l.name, l.router) for st in recipe.stages)]
    experts = [l.name for s in partition.shards for l in s.linears
               if l.expert is not None and any(st.applies_to(l.name, l.router) for st in recipe.stages)]
    if experts:
        raise UserError(f"recover.enabled: experts' weights (e.g. {experts[0]}) are slices of fused parameters, "
                        "which the recover stage does not train; not supported yet")
    if transposed:
        raise UserError(f"recover.enabled: Conv1D layers (e.g. {transposed[0]}) are not packed in the export, "
                        "so their grids cannot be kept through recovery; not supported yet")


def recover_data(cfg) -> CalibrationDataConfig:
    """The recover stage's training windows: the calibration source, its own count, length and seed."""
    r = cfg.recover
    return CalibrationDataConfig(source=cfg.data.calibration.source, num_samples=r.num_samples, seq_len=r.seq_len,
                                 seed=cfg.data.calibration.seed + 1, batch_size=r.batch_size)


def read_data(recipe: Recipe, model_dir: Path, partition: Partition) -> tuple[Calibration | None, torch.Tensor | None]:
    """The token windows the run needs, read now so that data problems surface before Ray starts:
    -> (calibration windows if a stage needs them, the recover stage's windows if enabled). The
    evaluation data is only checked here; the evaluation task reads it again in its own process.
    A folder planned from config.json alone reads no data (its tokenizer, if any, is not trusted: a
    config-only Qwen folder loads an empty one); calibration_tokens counts the windows instead."""
    cfg = recipe.config
    if partition.key_bytes is not None:
        return None, None
    needs_calibration = any(s.needs_calibration for s in recipe.stages)
    measures_perplexity = partition.task == CAUSAL_LM and cfg.data.eval.enabled
    if partition.task != CAUSAL_LM and cfg.data.eval.enabled:
        eval_sentences(cfg.data.eval)
    if not (needs_calibration or measures_perplexity or cfg.recover.enabled):
        return None, None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    except (ValueError, OSError) as e:  # no tokenizer files, or none transformers can build
        raise UserError(f"model.path: cannot load a tokenizer from {model_dir} (calibration and perplexity "
                        f"need one): {str(e).strip().splitlines()[0]}") from None
    shape = cfg.data.calibration.shape
    if shape == "auto":  # encoders calibrated as they are used: whole sentences
        shape = "windows" if partition.task == CAUSAL_LM else "sentences"
    build = calibration_sentences if shape == "sentences" else calibration_windows
    calibration = build(tokenizer, cfg.data.calibration) if needs_calibration else None
    if measures_perplexity:
        eval_windows(tokenizer, cfg.data.eval)
    recover_ids = calibration_windows(tokenizer, recover_data(cfg)).input_ids if cfg.recover.enabled else None
    return calibration, recover_ids


def calibration_tokens(recipe: Recipe, calibration: Calibration | None) -> int | None:
    """The calibration's token count for the forecast (None: no stage calibrates); without the windows (a
    folder planned from config.json alone), data.calibration.num_samples x seq_len."""
    if calibration is not None:
        return int(calibration.input_ids.numel())
    if any(s.needs_calibration for s in recipe.stages):
        return recipe.config.data.calibration.num_samples * recipe.config.data.calibration.seq_len
    return None


def open_output(run_dir: Path, fingerprint: Fingerprint, overwrite: bool) -> ShardStore:
    """The run's store, unless the run folder already holds a complete run (replaced only with --overwrite)
    or unfinished shards of a different compression (ShardStore.open refuses those)."""
    if (run_dir / "report.json").exists() and not overwrite:
        raise UserError(f"output: {run_dir} already holds a complete run; pass --overwrite to replace it")
    return ShardStore.open(partial_dir(run_dir), fingerprint, overwrite)


def check_writable(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir: cannot write to {out_root} ({e.strerror})") from None


def partial_dir(run_dir: Path) -> Path:
    """Where a run works (and keeps its committed shards) until it completes."""
    return run_dir.with_name(f".{run_dir.name}.partial")
