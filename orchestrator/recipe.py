"""Recipes: typed OmegaConf structured configs, loaded from YAML plus key=value overrides.

Everything is checked here, before any cluster work: unknown keys, wrong types, out-of-range values and
unknown methods raise `UserError` naming the offending key. A resolved recipe is saved with each run and hashed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator import defaults
from orchestrator.cluster_config import ClusterConfig
from orchestrator.errors import RecipeValueError, UserError, require  # noqa: F401  (RecipeValueError: cli.py)
from orchestrator.recipe_yaml import parse_yaml
from orchestrator.techniques import TECHNIQUES, Technique

DTYPES = ("auto", "float32", "bfloat16", "float16")
NAME_PATTERN = r"[\w.-]+"  # run and output names: letters, digits, '_', '-' and '.'


@dataclass
class ModelConfig:
    path: str = MISSING  # a Hugging Face model folder, or "reference:<name>" (built on first use)
    dtype: str = "auto"  # auto (the checkpoint's) | float32 | bfloat16 | float16
    trust_remote_code: bool = False

    def __post_init__(self):
        require("model", (self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"))


@dataclass
class EvalDataConfig:
    enabled: bool = True  # false: no quality or speed measurement (e.g. when timing compression alone)
    source: str = defaults.EVAL_SOURCE  # "reference" (held-out split of the reference corpus) or a .txt file
    seq_len: int = defaults.EVAL_SEQ_LEN  # tokens per non-overlapping window (causal LMs); max tokens per sentence (encoders)
    max_windows: int = defaults.EVAL_MAX_WINDOWS  # causal LMs: cap on windows evaluated (0 = all)
    batch_size: int = defaults.EVAL_BATCH_SIZE
    sentences: int = 256  # encoders: held-out sentences embedded
    top_k: int = 10  # encoders: neighbours compared for top-k agreement
    speed: bool = True  # measure forward latency / throughput of the dense and compressed models
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    speed_repeats: int = 5  # timed forward passes per batch size (after one warm-up)

    def __post_init__(self):
        require("data.eval",
                (self.seq_len >= 8, "seq_len", "must be >= 8"),
                (self.max_windows >= 0, "max_windows", "must be >= 0"),
                (self.batch_size >= 1, "batch_size", "must be >= 1"),
                (self.sentences >= 2, "sentences", "must be >= 2"),
                (1 <= self.top_k < self.sentences, "top_k", "must be in 1..sentences-1"),
                (bool(self.speed_batch_sizes) and min(self.speed_batch_sizes) >= 1, "speed_batch_sizes",
                 "must be a non-empty list of integers >= 1"),
                (self.speed_repeats >= 1, "speed_repeats", "must be >= 1"))


@dataclass
class CalibrationDataConfig:
    source: str = "reference"  # "reference" (train split) or a .txt / .jsonl file
    num_samples: int = 128
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8  # windows per forward pass while capturing activations
    # windows: seq_len tokens cut from the concatenated text; sentences: whole lines (at most seq_len tokens)
    # with the tokenizer's special tokens, padded, padding left out of the statistics; auto: sentences for
    # encoders (as they are used), windows for causal LMs
    shape: str = "auto"

    def __post_init__(self):
        require("data.calibration",
                (self.num_samples >= 1, "num_samples", "must be >= 1"),
                (self.seq_len >= 8, "seq_len", "must be >= 8"),
                (self.batch_size >= 1, "batch_size", "must be >= 1"),
                (self.shape in ("auto", "windows", "sentences"), "shape", "must be auto, windows or sentences"))


@dataclass
class DataConfig:
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    calibration: CalibrationDataConfig = field(default_factory=CalibrationDataConfig)


@dataclass
class PartitionConfig:
    blocks_per_shard: int = 1  # consecutive transformer blocks per shard
    calibration: str = "parallel"  # parallel | sequential (used by calibration-aware methods)
    experts_per_shard: Optional[int] = None  # MoE blocks cut in shards of this many experts; None: planner's pick
    chunks: int = 4  # parallel mode: calibration batches pass from shard to shard in this many chunks (shard_pool)

    def __post_init__(self):
        require("partition",
                (self.blocks_per_shard >= 1, "blocks_per_shard", "must be >= 1"), (self.chunks >= 1, "chunks", "must be >= 1"),
                (self.experts_per_shard is None or self.experts_per_shard >= 1, "experts_per_shard", "must be >= 1"),
                (self.calibration in ("parallel", "sequential"), "calibration", "must be parallel or sequential"))


UNDER_CALIBRATED = ("all-tokens", "identity")


@dataclass
class ExpertsConfig:
    """Mixture-of-experts blocks (experts.py). An expert the router sent fewer than `min_tokens`
    calibration tokens is under-calibrated: its Hessian from those few tokens is singular (rank <= tokens).
    all-tokens: its Hessians are computed from every calibration token, as if the router had sent them all
    (the block's output still follows the router); identity: H = I, so GPTQ rounds to nearest and
    SparseGPT / Wanda prune by magnitude. An expert that got no token at all is never left with H = 0."""

    min_tokens: Optional[int] = None  # None: the block's hidden size (the width of the experts' input)
    under_calibrated: str = "all-tokens"  # all-tokens | identity

    def __post_init__(self):
        require("experts",
                (self.min_tokens is None or self.min_tokens >= 0, "min_tokens", "must be >= 0 (or null: the hidden size)"),
                (self.under_calibrated in UNDER_CALIBRATED, "under_calibrated",
                 f"must be one of {', '.join(UNDER_CALIBRATED)}"))


@dataclass
class RotationConfig:
    """Rotation of the residual stream before the stages (rotate.py); seed: of Q's random signs."""

    enabled: bool = False
    seed: int = 0


@dataclass
class RecoverConfig:
    """The recover stage: distillation of the compressed model against the dense one (recover.py)."""

    enabled: bool = False
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    batch_size: int = 4  # sequences per worker per step
    seq_len: int = 128
    num_samples: int = 256  # training windows, drawn (seeded) from data.calibration.source's train split
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters) partitioned
    offload: bool = False  # optimizer state and step on the CPU (DeepSpeedCPUAdam)
    workers: int = 2  # Ray Train workers, one process each
    cpus_per_worker: float = 1.0
    hidden_mse: float = 0.0  # weight of the last-hidden-state MSE term (0: KL only)
    train: str = "weights"  # weights: latent weights on the fixed grid (STE); scales: the scales, integers fixed
    checkpoint_every: int = 25  # steps between Ray Train checkpoints (a restarted worker resumes there)
    max_failures: int = 2  # worker-group restarts Ray Train may make

    def __post_init__(self):
        require("recover", (self.steps >= 1, "steps", "must be >= 1"),
                (self.lr > 0, "lr", "must be > 0"),
                (self.batch_size >= 1, "batch_size", "must be >= 1"),
                (self.seq_len >= 8, "seq_len", "must be >= 8"),
                (self.num_samples >= 1, "num_samples", "must be >= 1"),
                (self.zero_stage in (1, 2, 3), "zero_stage", "must be 1, 2 or 3"),
                (self.workers >= 1, "workers", "must be >= 1"),
                (self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0"),
                (self.hidden_mse >= 0, "hidden_mse", "must be >= 0"),
                (self.train in ("weights", "scales"), "train", "must be weights or scales"),
                (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
                (self.max_failures >= 0, "max_failures", "must be >= 0"))


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = defaults.TRACKING_URI  # relative to the working directory
    experiment: str = defaults.EXPERIMENT


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: Optional[str] = None  # run folder name; default <recipe name>-<recipe hash[:8]>
    overwrite: bool = False

    def __post_init__(self):
        require("output",
                (bool(self.dir), "dir", "must not be empty"),
                (self.name is None or re.fullmatch(NAME_PATTERN, self.name) is not None, "name",
                 "may hold only letters, digits, '_', '-' and '.'"))


@dataclass
class RecipeConfig:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)  # mixture-of-experts blocks only
    rotation: RotationConfig = field(default_factory=RotationConfig)  # applied to the model before the stages
    stages: list[Any] = field(default_factory=list)  # checked by `parse_stage`
    recover: RecoverConfig = field(default_factory=RecoverConfig)  # distillation after the stages (recover.py)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        require("", (re.fullmatch(NAME_PATTERN, self.name) is not None, "name",
                     "may hold only letters, digits, '_', '-' and '.'"))


@dataclass
class Stage:
    """One compression step: a technique with its parameters, on the layers it targets."""

    index: int
    technique: Technique
    params: Any  # the technique's parameter dataclass
    targets: list[str]  # regexes searched in each Linear's full module name
    ignore: list[str]

    @property
    def needs_calibration(self) -> bool:
        """The technique needs its layers' input Hessians, or the stage's AWQ search does (awq.py)."""
        return self.technique.needs_calibration or getattr(self.params, "awq", False)

    def applies_to(self, module_name: str, router: bool = False) -> bool:
        """A target matches and no ignore does. A router (the weights that choose a token's experts) only
        when a target names it: a pattern that matches any name, as the default '.*' does, does not."""
        targets = [t for t in self.targets if not (router and re.search(t, "") is not None)]
        return any(re.search(t, module_name) for t in targets) and not any(
            re.search(i, module_name) for i in self.ignore
        )


@dataclass
class Recipe:
    config: RecipeConfig
    stages: list[Stage]
    yaml: str  # the fully resolved recipe
    hash: str  # sha256 of the resolved recipe, canonical JSON

    @property
    def run_name(self) -> str:
        return self.config.output.name or f"{self.config.name}-{self.hash[:8]}"


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """YAML file + `key=value` overrides -> a validated Recipe, or UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys (model, stages, ...)")
    return build_recipe(raw, overrides, origin=str(path))


def build_recipe(raw: dict, overrides: list[str] = (), origin: str = "recipe") -> Recipe:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.create(raw))
        for item in overrides:
            key, value = parse_override(item)
            OmegaConf.update(cfg, key, value, merge=True)
        config: RecipeConfig = OmegaConf.to_object(cfg)  # each section checks its values (__post_init__)
    except OmegaConfBaseException as e:
        raise UserError(f"{origin}: {omegaconf_message(e)}") from None
    except RecipeValueError as e:
        raise UserError(str(e)) from None
    stages = [parse_stage(i, s) for i, s in enumerate(config.stages)]
    if not stages:
        raise UserError("stages: the recipe has no stages; add at least one (e.g. method: rtn)")
    resolved = OmegaConf.to_container(OmegaConf.structured(config))
    resolved["stages"] = [stage_dict(s) for s in stages]
    text = yaml.safe_dump(resolved, sort_keys=False)
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()
    return Recipe(config=config, stages=stages, yaml=text, hash=digest)


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: expected key=value, e.g. cluster.workers=4")
    try:
        return key.strip(), parse_yaml(value)
    except yaml.YAMLError:
        raise UserError(f"override {item!r}: the value is not valid YAML") from None


def omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0]
    if "missing mandatory value" in first.lower():
        first = "is required"
    return f"key '{key}': {first}" if key else first


def parse_stage(index: int, raw: Any) -> Stage:
    where = f"stages.{index}"
    if not isinstance(raw, dict):
        raise UserError(f"key '{where}': a stage must be a mapping with a 'method'")
    raw = dict(raw)
    method = raw.pop("method", None)
    if method is None:
        raise UserError(f"key '{where}.method': is required ({', '.join(sorted(TECHNIQUES))})")
    technique = TECHNIQUES.get(method)
    if technique is None:
        raise UserError(f"key '{where}.method': unknown method {method!r}; known: {', '.join(sorted(TECHNIQUES))}")
    targets = as_patterns(raw.pop("targets", [".*"]), f"{where}.targets")
    ignore = as_patterns(raw.pop("ignore", []), f"{where}.ignore")
    known = {f.name for f in fields(technique.params)}
    for key in raw:
        if key not in known:
            raise UserError(f"key '{where}.{key}': not a parameter of {method} (known: {', '.join(sorted(known))})")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(technique.params), raw))
    except OmegaConfBaseException as e:
        raise UserError(f"key '{where}.{getattr(e, 'full_key', '')}': {str(e).splitlines()[0]}") from None
    except ValueError as e:  # from the params' __post_init__: "<field>: <why>"
        field_name, _, why = str(e).partition(": ")
        raise UserError(f"key '{where}.{field_name}': {why}") from None
    return Stage(index, technique, typed, targets, ignore)


def as_patterns(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"key '{key}': must be a list of regular expressions")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"key '{key}': {pattern!r} is not a valid regular expression ({e})") from None
    return value


def stage_dict(stage: Stage) -> dict:
    params = {f.name: getattr(stage.params, f.name) for f in fields(stage.params)}
    return {"method": stage.technique.name, **params, "targets": stage.targets, "ignore": stage.ignore}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'l': [x]} -> {'a.b': 1, 'l.0...': x}: stable names for MLflow params."""
    out: dict[str, Any] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def as_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data."""
    return yaml.safe_load(recipe.yaml)
