"""Recipes: typed OmegaConf structured configs, loaded from YAML plus key=value overrides.

Everything is checked here, before any cluster work: unknown keys, wrong
types, out-of-range values and unknown methods raise `UserError` naming the
offending key. A resolved recipe is saved with each run and hashed.
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

from orchestrator.errors import UserError
from orchestrator.recover import RecoverConfig
from orchestrator.techniques import TECHNIQUES, Technique


@dataclass
class ModelConfig:
    path: str = MISSING  # a Hugging Face model folder, or "reference:<name>" (built on first use)
    dtype: str = "auto"  # auto (the checkpoint's) | float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass
class EvalDataConfig:
    enabled: bool = True  # false: no quality or speed measurement (e.g. when timing compression alone)
    source: str = "reference"  # "reference" (held-out split of the reference corpus) or a .txt file
    seq_len: int = 128  # tokens per non-overlapping window (causal LMs); max tokens per sentence (encoders)
    max_windows: int = 64  # causal LMs: cap on windows evaluated (0 = all)
    batch_size: int = 8
    sentences: int = 256  # encoders: held-out sentences embedded
    top_k: int = 10  # encoders: neighbours compared for top-k agreement
    speed: bool = True  # measure forward latency / throughput of the dense and compressed models
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    speed_repeats: int = 5  # timed forward passes per batch size (after one warm-up)


@dataclass
class CalibrationDataConfig:
    source: str = "reference"  # "reference" (train split) or a .txt / .jsonl file
    num_samples: int = 128
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 8  # windows per forward pass while capturing activations


@dataclass
class DataConfig:
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    calibration: CalibrationDataConfig = field(default_factory=CalibrationDataConfig)


@dataclass
class PartitionConfig:
    blocks_per_shard: int = 1  # consecutive transformer blocks per shard
    calibration: str = "parallel"  # parallel | sequential (used by calibration-aware methods)


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: an embedded local Ray; "auto" or ray://host:port: join one
    workers: int = 2  # compression actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: str = "auto"  # auto: 1 per worker when Ray has GPUs (shared when fewer than workers), else 0; or a number (fractions allowed)
    max_restarts: int = 2  # per actor; also the retries a shard gets
    memory_gb: float = 0.0  # memory the planner may plan for on this machine; 0 = what is available now


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # relative to the working directory
    experiment: str = "orchestrator"


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: Optional[str] = None  # run folder name; default <recipe name>-<recipe hash[:8]>
    overwrite: bool = False


@dataclass
class RecipeConfig:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    stages: list[Any] = field(default_factory=list)  # checked by `parse_stage`
    recover: RecoverConfig = field(default_factory=RecoverConfig)  # distillation after the stages (recover.py)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class Stage:
    """One compression step: a technique with its parameters, on the layers it targets."""

    index: int
    technique: Technique
    params: Any  # the technique's parameter dataclass
    targets: list[str]  # regexes searched in each Linear's full module name
    ignore: list[str]

    def applies_to(self, module_name: str) -> bool:
        return any(re.search(t, module_name) for t in self.targets) and not any(
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


DTYPES = ("auto", "float32", "bfloat16", "float16")


class RecipeLoader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 integers (an N:M pattern like 2:4 stays a string) and without its
    yes/no/on/off booleans (output.name=off stays the name "off")."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"), list("-+0123456789")
)
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)
STAGE_KEYS = ("method", "targets", "ignore")


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
        config: RecipeConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"{origin}: {omegaconf_message(e)}") from None
    check_values(config)
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


def check_values(c: RecipeConfig) -> None:
    """Range checks OmegaConf's types cannot express."""
    checks = [
        (c.model.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}"),
        (c.data.eval.seq_len >= 8, "data.eval.seq_len", "must be >= 8"),
        (c.data.eval.max_windows >= 0, "data.eval.max_windows", "must be >= 0"),
        (c.data.eval.batch_size >= 1, "data.eval.batch_size", "must be >= 1"),
        (c.data.eval.sentences >= 2, "data.eval.sentences", "must be >= 2"),
        (1 <= c.data.eval.top_k < c.data.eval.sentences, "data.eval.top_k", "must be in 1..sentences-1"),
        (bool(c.data.eval.speed_batch_sizes) and min(c.data.eval.speed_batch_sizes) >= 1,
         "data.eval.speed_batch_sizes", "must be a non-empty list of integers >= 1"),
        (c.data.eval.speed_repeats >= 1, "data.eval.speed_repeats", "must be >= 1"),
        (c.data.calibration.num_samples >= 1, "data.calibration.num_samples", "must be >= 1"),
        (c.data.calibration.seq_len >= 8, "data.calibration.seq_len", "must be >= 8"),
        (c.data.calibration.batch_size >= 1, "data.calibration.batch_size", "must be >= 1"),
        (c.partition.blocks_per_shard >= 1, "partition.blocks_per_shard", "must be >= 1"),
        (c.partition.calibration in ("parallel", "sequential"), "partition.calibration",
         "must be parallel or sequential"),
        (c.cluster.workers >= 1, "cluster.workers", "must be >= 1"),
        (c.cluster.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0"),
        (valid_gpus(c.cluster.gpus_per_worker), "cluster.gpus_per_worker",
         f"must be auto or a number >= 0 (fractions below 1 allowed), not {c.cluster.gpus_per_worker!r}"),
        (c.cluster.max_restarts >= 0, "cluster.max_restarts", "must be >= 0"),
        (c.cluster.memory_gb >= 0, "cluster.memory_gb", "must be >= 0 (0: this machine's available memory)"),
        (c.recover.steps >= 1, "recover.steps", "must be >= 1"),
        (c.recover.lr > 0, "recover.lr", "must be > 0"),
        (c.recover.batch_size >= 1, "recover.batch_size", "must be >= 1"),
        (c.recover.seq_len >= 8, "recover.seq_len", "must be >= 8"),
        (c.recover.num_samples >= 1, "recover.num_samples", "must be >= 1"),
        (c.recover.zero_stage in (1, 2, 3), "recover.zero_stage", "must be 1, 2 or 3"),
        (c.recover.workers >= 1, "recover.workers", "must be >= 1"),
        (c.recover.cpus_per_worker > 0, "recover.cpus_per_worker", "must be > 0"),
        (c.recover.hidden_mse >= 0, "recover.hidden_mse", "must be >= 0"),
        (c.recover.checkpoint_every >= 1, "recover.checkpoint_every", "must be >= 1"),
        (c.recover.max_failures >= 0, "recover.max_failures", "must be >= 0"),
        (bool(c.output.dir), "output.dir", "must not be empty"),
        (c.output.name is None or re.fullmatch(r"[\w.-]+", c.output.name) is not None, "output.name",
         "may hold only letters, digits, '_', '-' and '.'"),
        (re.fullmatch(r"[\w.-]+", c.name) is not None, "name", "may hold only letters, digits, '_', '-' and '.'"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise UserError(f"key '{key}': {why}")


def valid_gpus(value: str) -> bool:
    if value == "auto":
        return True
    try:
        gpus = float(value)
    except ValueError:
        return False
    return gpus >= 0 and (gpus <= 1 or gpus.is_integer())  # Ray: above 1, whole GPUs only


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
