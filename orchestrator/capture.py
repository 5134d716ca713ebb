"""Calibration activations: the inputs of the first block, running blocks alone, and layer statistics.

- `capture_block_inputs` runs the model's stem (embeddings, rotary tables,
  masks) on the calibration ids and stops at the first block, keeping what the
  block was called with: hidden states [batch, seq, hidden] plus keyword
  arguments (position embeddings, masks) that every block receives alike.
- `build_blocks` materialises a shard's blocks on their own from the config
  and the shard's tensors; no other part of the model is ever built.
- `run_blocks` feeds hidden states through them, optionally accumulating the
  GPTQ Hessian H = 2/n sum x x^T of every Linear's input. Linears that read the
  very same tensor (q/k/v, gate/up) share one H, computed once: the hooks see
  which tensor each Linear reads, so the sharing is found at run time, whatever
  the architecture. `expected_input_groups` predicts it from the layer names,
  for the planner, which has no model to run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from orchestrator.partition import CAUSAL_LM, LinearLayer, Shard, find_blocks, task_of
from orchestrator.techniques.hessian import accumulate_hessian


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # per calibration batch: [batch, seq, hidden]
    kwargs: list[dict]  # per batch: the keyword arguments every block is called with


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its call, then stops the forward pass."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _StopForward


def _auto_class(config: PretrainedConfig):
    return AutoModelForCausalLM if task_of(config) == CAUSAL_LM else AutoModel


@torch.no_grad()
def capture_block_inputs(config: PretrainedConfig, stem_tensors: dict[str, torch.Tensor], input_ids: torch.Tensor,
                         batch_size: int) -> BlockInputs:
    """Embed the calibration ids [n, seq] -> the first block's inputs, batch by batch."""
    one_block = copy.deepcopy(config)
    one_block.num_hidden_layers = 1
    with no_init_weights():
        model = _auto_class(config).from_config(one_block)
    prefix = getattr(model, "base_model_prefix", "")
    own = set(model.state_dict())
    state = {}
    for key, tensor in stem_tensors.items():  # checkpoint names may carry or lack the base-model prefix
        name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(prefix + ".")) if n in own), None)
        if name is not None:
            state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.eval()
    _, blocks = find_blocks(model)
    catcher = _Catcher()
    blocks[0] = catcher
    inputs = BlockInputs([], [])
    for batch in input_ids.split(batch_size):
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForward:
            pass
        args, kwargs = catcher.calls.pop()
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        inputs.hidden.append(hidden.detach().clone())
        inputs.kwargs.append(kwargs)
    return inputs


def build_blocks(config: PretrainedConfig, shard: Shard, tensors: dict[str, torch.Tensor],
                 block_class: type) -> nn.ModuleList:
    """The shard's blocks as real modules holding the given tensors (checkpoint keys)."""
    blocks = nn.ModuleList()
    for b in shard.blocks:
        with no_init_weights():
            block = block_class(config, layer_idx=b)
        marker = f"{shard.block_prefix}.{b}."
        state = {k.split(marker, 1)[1]: t for k, t in tensors.items() if marker in k}
        block.load_state_dict(state, strict=True, assign=True)
        blocks.append(block.eval())
    return blocks


def block_class_of(config: PretrainedConfig) -> type:
    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    return type(find_blocks(model)[1][0])


# Layer names whose inputs are one tensor in the architectures we know (q/k/v or query/key/value; gate/up)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query": "qkv", "key": "qkv", "value": "qkv",
                "gate_proj": "gate_up", "up_proj": "gate_up"}


def expected_input_groups(layers: list[LinearLayer]) -> dict[tuple[str, str], list[LinearLayer]]:
    """The groups of layers `run_blocks` will find reading one input (one H each), predicted from names:
    (parent module, shared-input name) -> its layers."""
    groups: dict[tuple[str, str], list[LinearLayer]] = {}
    for layer in layers:
        parent, leaf = layer.name.rsplit(".", 1)
        groups.setdefault((parent, SHARED_INPUT.get(leaf, leaf)), []).append(layer)
    return groups


@dataclass
class HessianSet:
    """Running H per group of Linears that share an input."""

    groups: dict[str, list[str]] = field(default_factory=dict)  # group leader -> member layer names
    H: dict[str, torch.Tensor] = field(default_factory=dict)  # leader -> [in, in] float32
    n: dict[str, int] = field(default_factory=dict)

    def of(self, layer_name: str) -> torch.Tensor | None:
        for leader, members in self.groups.items():
            if layer_name in members:
                return self.H.get(leader)
        return None


def _linear_modules(blocks: nn.ModuleList, shard: Shard, names: set[str]) -> dict[str, nn.Module]:
    by_name = {}
    for b, block in zip(shard.blocks, blocks):
        for mname, module in block.named_modules():
            full = f"{shard.block_prefix}.{b}.{mname}"
            if full in names and isinstance(module, (nn.Linear, Conv1D)):
                by_name[full] = module
    return by_name


def to_device(value, device: torch.device):
    """Every tensor inside nested dicts, lists and tuples moved to `device` (block kwargs: masks, rotary tables)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


@torch.no_grad()
def run_blocks(blocks: nn.ModuleList, inputs: BlockInputs, shard: Shard | None = None,
               collect: list[LinearLayer] = (), device: torch.device = torch.device("cpu"),
               ) -> tuple[list[torch.Tensor], HessianSet]:
    """Hidden states through the blocks (which are on `device`); H for every layer in `collect` (shared
    where inputs are shared), kept on `device`. The outputs come back on the CPU, for the object store."""
    hessians = HessianSet()
    modules = _linear_modules(blocks, shard, {l.name for l in collect}) if collect else {}
    # id of an input tensor in the current block's forward -> (the tensor, kept alive so its id
    # cannot be reused, and the first layer that read it)
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0]
            leader = seen.setdefault(id(x), (x, name))[1]
            hessians.groups.setdefault(leader, [])
            if name not in hessians.groups[leader]:
                hessians.groups[leader].append(name)
            if leader == name:
                hessians.H[name], hessians.n[name] = accumulate_hessian(hessians.H.get(name), hessians.n.get(name, 0), x)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in sorted(modules.items())]
    outputs = []
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            x, kwargs = hidden.to(device), to_device(kwargs, device)
            for block in blocks:
                seen.clear()
                out = block(x, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
            outputs.append(x.cpu())
    finally:
        for h in handles:
            h.remove()
    return outputs, hessians
