"""Find the transformer blocks of any Hugging Face model and cut them into shards.

Works on a skeleton on the meta device (no weights are read): the blocks are
the longest `nn.ModuleList` of same-class modules; their Linear (and GPT-2
Conv1D) layers, and in mixture-of-experts blocks each expert's projections, are
what the stages compress. Everything else (embeddings, final norm, head) stays
apart and is copied through unchanged. Names are read through transformers'
conversion mapping (experts.py), so checkpoints whose tensor names differ from
the module tree (one tensor per expert on disk, fused in memory) plan the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from orchestrator.errors import UserError
from orchestrator.experts import CheckpointLayout, ExpertSlice, check_supported, expert_slices, is_experts_module, routers

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass(frozen=True)
class LinearLayer:
    """A weight matrix the stages can compress: a Linear module, one projection of one expert, or a router."""

    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj; an expert's: its checkpoint name
    weight_key: str  # its weight's key in the checkpoint
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 Conv1D stores weight as [in, out]
    expert: ExpertSlice | None = None  # where an expert's matrix lives in its fused parameter
    router: bool = False  # weighs the experts (left dense unless a stage's targets name it)


@dataclass(frozen=True)
class Shard:
    index: int
    blocks: tuple[int, ...]
    block_prefix: str  # e.g. model.layers
    tensor_keys: tuple[str, ...]  # every checkpoint key of these blocks
    linears: tuple[LinearLayer, ...]

    @property
    def modules(self) -> list[str]:
        return [f"{self.block_prefix}.{b}" for b in self.blocks]


@dataclass(frozen=True)
class Partition:
    task: str  # causal-lm | encoder
    architecture: str
    block_prefix: str
    num_blocks: int
    shards: tuple[Shard, ...]
    rest_keys: tuple[str, ...]  # checkpoint keys outside the blocks (embeddings, norms, head)
    key_to_file: dict[str, str]  # checkpoint key -> safetensors file name
    num_params: int

    def first_expert_block(self) -> int:
        """The first block that holds experts (0 when none does)."""
        return next((b for shard in self.shards for b in shard.blocks
                     for layer in shard.linears if layer.expert and layer.name.startswith(f"{self.block_prefix}.{b}.")), 0)


def load_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model.path: {model_dir} has no config.json (not a Hugging Face model folder)")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"model.path: cannot read {model_dir / 'config.json'}: {str(e).splitlines()[0]}") from None


def task_of(config: PretrainedConfig) -> str:
    """causal-lm when config.architectures names a causal LM head, else encoder."""
    archs = config.architectures or []
    return CAUSAL_LM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else ENCODER


def skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory."""
    auto = AutoModelForCausalLM if task_of(config) == CAUSAL_LM else AutoModel
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def block_linears(model: nn.Module) -> list[str]:
    """Full names of the Linear (and Conv1D) modules inside the transformer blocks."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{b}.{name}" for b, block in enumerate(blocks)
            for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList whose children all share one class: the transformer blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise UserError(f"model: no transformer blocks found in {type(model).__name__} (no ModuleList of layers)")
    return best


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Checkpoint key -> file, from model.safetensors or its index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"model.path: {index} is not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise UserError(f"model.path: {index} names missing file(s): {', '.join(missing)}")
        return dict(weight_map)
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"model.path: {model_dir} has no model.safetensors (only safetensors checkpoints are read)")
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single.name for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"model.path: {single} is not a readable safetensors file ({e})") from None


def checkpoint_key(param_name: str, keys: dict[str, str], prefix: str) -> str | None:
    """The checkpoint's name for a parameter, allowing for the base-model prefix (e.g. 'bert.')."""
    candidates = [param_name, f"{prefix}.{param_name}" if prefix else None]
    if prefix and param_name.startswith(prefix + "."):
        candidates.append(param_name[len(prefix) + 1 :])
    return next((c for c in candidates if c and c in keys), None)


def partition_model(model_dir: Path, blocks_per_shard: int, trust_remote_code: bool = False) -> Partition:
    config = load_config(model_dir, trust_remote_code)
    key_to_file = checkpoint_files(model_dir)
    model = skeleton(config, trust_remote_code)
    block_prefix, blocks = find_blocks(model)
    prefix = getattr(model, "base_model_prefix", "")
    layout = CheckpointLayout(model)

    def key_of(name: str, required: bool = True) -> str | None:
        key = checkpoint_key(name, key_to_file, prefix)
        if key is None and required:
            raise UserError(f"model.path: the checkpoint has no tensor for {name}")
        return key

    block_keys: set[str] = set()
    shards = []
    for index, start in enumerate(range(0, len(blocks), blocks_per_shard)):
        ids = tuple(range(start, min(start + blocks_per_shard, len(blocks))))
        keys, linears = [], []
        for b in ids:
            block_keys_b, linears_b = block_layers(blocks[b], f"{block_prefix}.{b}", layout, key_of)
            keys += block_keys_b
            linears += linears_b
        block_keys.update(keys)
        shards.append(Shard(index, ids, block_prefix, tuple(keys), tuple(linears)))
    rest = tuple(sorted(k for k in key_to_file if k not in block_keys))
    return Partition(
        task=task_of(config),
        architecture=(config.architectures or [type(model).__name__])[0],
        block_prefix=block_prefix,
        num_blocks=len(blocks),
        shards=tuple(shards),
        rest_keys=rest,
        key_to_file=key_to_file,
        num_params=sum(p.numel() for p in model.parameters()),
    )


def block_layers(block: nn.Module, block_name: str, layout: CheckpointLayout,
                 key_of) -> tuple[list[str], list[LinearLayer]]:
    """One block -> (its checkpoint keys, its compressible layers in module order): the Linear (Conv1D)
    modules, every expert's projections (2D tensors in the checkpoint, slices of a fused parameter in the
    module tree; expert by expert), and the routers (flagged, so the default targets leave them alone)."""
    keys, weight_key, experts = [], {}, {}  # weight_key: parameters stored whole -> their checkpoint key
    params = dict(block.named_parameters())
    for pname, param in block.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        full = f"{block_name}.{pname}"
        slices = expert_slices(layout, full, param)
        names = list(slices) or list(layout.to_checkpoint({full: param}))
        if pname not in params and not all(key_of(n, required=False) for n in names):
            continue  # a buffer the checkpoint does not store keeps the value the block is built with
        keys += [key_of(n) for n in names]
        if slices:
            experts[full] = [LinearLayer(n.removesuffix(".weight"), key_of(n), param.shape[2], s.stop - s.start,
                                         False, expert=s) for n, s in slices.items()]
        elif len(names) == 1:
            weight_key[full] = key_of(names[0])
    gates = routers(block, block_name)
    linears = []
    for mname, module in block.named_modules():
        full = f"{block_name}.{mname}"
        if is_experts_module(module):
            check_supported(full, module)
            params = [f"{full}.{p}" for p, _ in module.named_parameters()]
            own = [layer for p in params for layer in experts.get(p, [])]
            linears += sorted(own, key=lambda l: (l.expert.expert, params.index(l.expert.param), l.expert.start))
        elif (isinstance(module, (nn.Linear, Conv1D)) or full in gates) and f"{full}.weight" in weight_key:
            transposed = isinstance(module, Conv1D)
            out_f, in_f = module.weight.shape[::-1] if transposed else module.weight.shape
            linears.append(LinearLayer(full, weight_key[f"{full}.weight"], in_f, out_f, transposed,
                                       router=full in gates))
    return keys, linears
