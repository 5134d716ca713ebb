"""Find the transformer blocks of any Hugging Face model and cut them into shards.

Works on a skeleton on the meta device (no weights are read): the blocks are
the longest `nn.ModuleList` of same-class modules; their Linear (and GPT-2
Conv1D) layers, and in mixture-of-experts blocks each expert's projections, are
what the stages compress. Everything else (embeddings, final norm, head) stays
apart and is copied through unchanged. Names are read through transformers'
conversion mapping (experts.py), so checkpoints whose tensor names differ from
the module tree (one tensor per expert on disk, fused in memory) plan the same.
A folder with config.json alone (no weights) can be planned too: the checkpoint
save_pretrained would write is counted from the skeleton (`config_checkpoint`).
"""

from __future__ import annotations

import dataclasses
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
DEFAULT_DTYPE = torch.bfloat16  # a config.json that names no dtype: what large checkpoints are stored in


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
    tensor_keys: tuple[str, ...]  # the checkpoint keys this shard writes (every key of its blocks, unless split)
    linears: tuple[LinearLayer, ...]
    # An expert-split block is cut into parts, one shard each, over a range of its experts: part 0 holds the
    # rest of the block too (attention, norms, routers, shared experts); the others read those as context.
    experts: tuple[int, int] | None = None  # [start, stop): the experts of its one block; None: whole blocks
    context_keys: tuple[str, ...] = ()  # the block's tensors another part writes, read to run the block

    @property
    def modules(self) -> list[str]:
        return [f"{self.block_prefix}.{b}" for b in self.blocks]

    @property
    def label(self) -> str:
        """Its blocks, and its experts when it is a part of a block, e.g. model.layers.1 experts 4-7."""
        span = f" experts {self.experts[0]}-{self.experts[1] - 1}" if self.experts else ""
        return ", ".join(self.modules) + span


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
    experts_per_shard: int | None = None  # mixture-of-experts blocks with more are split in shards of this many
    # planned from config.json alone (a folder without weights): each checkpoint key's bytes (key_to_file is
    # empty), and the dtype they were counted in, with where it came from
    key_bytes: dict[str, int] | None = None
    dtype: str | None = None  # e.g. "bfloat16 (config.json's dtype)"

    def parts_of(self, shard: Shard) -> list[Shard]:
        """The shards of an expert-split block, part 0 first; [shard] for a shard of whole blocks."""
        if shard.experts is None:
            return [shard]
        return [s for s in self.shards if s.experts is not None and s.blocks == shard.blocks]

    def after(self, shard: Shard) -> list[int]:
        """The shards whose compressed tensors a shard needs in sequential mode: the previous block's
        (every part of it, if split) and, for parts after the first, their block's part 0 (attention)."""
        parts = self.parts_of(shard)
        if parts[0] is not shard:
            return [parts[0].index]
        if shard.index == 0:
            return []
        return [s.index for s in self.parts_of(self.shards[shard.index - 1])]

    def head_of(self, shard: Shard) -> Shard:
        """An expert-split block without its experts (attention, norms, routers, shared experts): what
        runs to add up its parts' expert outputs into the block's output."""
        part = self.parts_of(shard)[-1]
        return dataclasses.replace(part, experts=(0, 0), tensor_keys=part.context_keys, context_keys=(), linears=())

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
    """The weight matrices inside the transformer blocks, by full name: the Linear (and Conv1D) modules,
    and each expert of a fused experts parameter as `<parameter>[<expert>]` (e.g.
    model.layers.0.mlp.experts.gate_up_proj[3]: expert 3's gate and up projections, [2I, H])."""
    prefix, blocks = find_blocks(model)
    names = []
    for b, block in enumerate(blocks):
        for name, m in block.named_modules():
            if isinstance(m, (nn.Linear, Conv1D)):
                names.append(f"{prefix}.{b}.{name}")
            elif is_experts_module(m):
                names += [f"{prefix}.{b}.{name}.{p}[{e}]" for p, param in m.named_parameters(recurse=False)
                          if param.dim() == 3 for e in range(param.shape[0])]
    return names


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


def has_weights(model_dir: Path) -> bool:
    """Whether the folder holds a safetensors checkpoint (whole or indexed), readable or not."""
    return (model_dir / "model.safetensors.index.json").is_file() or (model_dir / "model.safetensors").is_file()


def config_dtype(config: PretrainedConfig) -> tuple[torch.dtype, str]:
    """The dtype a checkpoint of this config stores its weights in (config.json's `dtype` or `torch_dtype`,
    else DEFAULT_DTYPE), and a description, e.g. "bfloat16 (config.json's dtype)"."""
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    named = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    dtype = dtype if named else DEFAULT_DTYPE
    source = "config.json's dtype" if named else "config.json names no dtype: the default"
    return dtype, f"{str(dtype).removeprefix('torch.')} ({source})"


def config_checkpoint(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """The checkpoint save_pretrained would write for this skeleton, without weights: key -> bytes, as on disk
    (tied copies left out, fused experts one tensor per expert), floating-point tensors in `dtype`."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    state = {k: t for k, t in model.state_dict().items() if k not in tied}
    return {k: t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
            for k, t in CheckpointLayout(model).to_checkpoint(state).items()}


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
        raise UserError(f"model.path: {model_dir} has no model.safetensors: compressing needs the weights (only "
                        "safetensors checkpoints are read; `orchestrator plan` forecasts from config.json alone)")
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


def partition_model(model_dir: Path, blocks_per_shard: int, trust_remote_code: bool = False,
                    experts_per_shard: int | None = None, need_weights: bool = True) -> Partition:
    """The model's blocks in shards of `blocks_per_shard`; with `experts_per_shard`, a block with more
    experts than that is cut into parts of that many experts (and its shard's other blocks stand alone).
    need_weights False: a folder with config.json alone is planned from its config (Partition.key_bytes)."""
    config = load_config(model_dir, trust_remote_code)
    model = skeleton(config, trust_remote_code)
    key_bytes = dtype = None
    if need_weights or has_weights(model_dir):
        key_to_file = checkpoint_files(model_dir)
    else:
        weights_dtype, dtype = config_dtype(config)
        key_to_file, key_bytes = {}, config_checkpoint(model, weights_dtype)
    stored = key_bytes if key_bytes is not None else key_to_file  # the checkpoint's keys
    block_prefix, blocks = find_blocks(model)
    prefix = getattr(model, "base_model_prefix", "")
    layout = CheckpointLayout(model)

    def key_of(name: str, required: bool = True) -> str | None:
        key = checkpoint_key(name, stored, prefix)
        if key is None and required:
            raise UserError(f"model.path: the checkpoint has no tensor for {name}")
        return key

    block_keys: set[str] = set()
    shards: list[Shard] = []
    for start in range(0, len(blocks), blocks_per_shard):
        ids = tuple(range(start, min(start + blocks_per_shard, len(blocks))))
        layers = {b: block_layers(blocks[b], f"{block_prefix}.{b}", layout, key_of) for b in ids}
        for keys, _, _ in layers.values():
            block_keys.update(keys)
        split = experts_per_shard is not None and any(len(set(e.values())) > experts_per_shard
                                                       for _, _, e in layers.values())
        if not split:
            shards.append(Shard(len(shards), ids, block_prefix, tuple(k for b in ids for k in layers[b][0]),
                                tuple(l for b in ids for l in layers[b][1])))
            continue
        for b in ids:  # each block a shard of its own; those with more experts than experts_per_shard cut
            shards += block_parts(len(shards), b, block_prefix, *layers[b], experts_per_shard)
    rest = tuple(sorted(k for k in stored if k not in block_keys))
    return Partition(
        task=task_of(config),
        architecture=(config.architectures or [type(model).__name__])[0],
        block_prefix=block_prefix,
        num_blocks=len(blocks),
        shards=tuple(shards),
        rest_keys=rest,
        key_to_file=key_to_file,
        num_params=sum(p.numel() for p in model.parameters()),
        experts_per_shard=experts_per_shard,
        key_bytes=key_bytes,
        dtype=dtype,
    )


def block_layers(block: nn.Module, block_name: str, layout: CheckpointLayout,
                 key_of) -> tuple[list[str], list[LinearLayer], dict[str, int]]:
    """One block -> (its checkpoint keys, its compressible layers in module order, the expert each expert's
    key belongs to). Layers: the Linear (Conv1D) modules, every expert's projections (2D tensors in the
    checkpoint, slices of a fused parameter in the module tree; expert by expert), and the routers (flagged,
    so the default targets leave them alone)."""
    keys, weight_key, experts = [], {}, {}  # weight_key: parameters stored whole -> their checkpoint key
    expert_of: dict[str, int] = {}
    params = dict(block.named_parameters())
    for pname, param in block.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        full = f"{block_name}.{pname}"
        slices = expert_slices(layout, full, param)
        names = list(slices) or list(layout.to_checkpoint({full: param}))
        if pname not in params and not all(key_of(n, required=False) for n in names):
            continue  # a buffer the checkpoint does not store keeps the value the block is built with
        keys += [key_of(n) for n in names]
        expert_of.update({key_of(n): s.expert for n, s in slices.items()})
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
    return keys, linears, expert_of


def block_parts(index: int, block: int, block_prefix: str, keys: list[str], linears: list[LinearLayer],
                expert_of: dict[str, int], experts_per_shard: int) -> list[Shard]:
    """One block's shards, numbered from `index`: the whole block, or (more experts than experts_per_shard)
    a part per range of experts, part 0 with the rest of the block, the others reading it as context."""
    num_experts = len(set(expert_of.values()))
    if num_experts <= experts_per_shard:
        return [Shard(index, (block,), block_prefix, tuple(keys), tuple(linears))]
    head = tuple(k for k in keys if k not in expert_of)
    parts = []
    for start in range(0, num_experts, experts_per_shard):
        stop = min(start + experts_per_shard, num_experts)
        first = start == 0
        part_keys = [k for k in keys if (k in head and first) or start <= expert_of.get(k, -1) < stop]
        part_linears = [l for l in linears if (l.expert is None and first)
                        or (l.expert is not None and start <= l.expert.expert < stop)]
        parts.append(Shard(index + len(parts), (block,), block_prefix, tuple(part_keys), tuple(part_linears),
                           experts=(start, stop), context_keys=() if first else head))
    return parts
