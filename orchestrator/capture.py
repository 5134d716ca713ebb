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
  the architecture (input_stats.py holds them, and predicts the sharing from
  layer names for the planner, which has no model to run).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights

from orchestrator.experts import (FIRST_EXPERT, OUTPUTS, RECORDER, CheckpointLayout, ExpertOutputs, ExpertRecorder,
                                  is_experts_module, with_capture)
from orchestrator.partition import CAUSAL_LM, LinearLayer, Shard, find_blocks, task_of
from orchestrator.input_stats import HessianSet


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # per calibration batch: [batch, seq, hidden]
    kwargs: list[dict]  # per batch: the keyword arguments every block is called with
    token_masks: list[torch.Tensor] | None = None  # per batch [batch, seq] bool, False = padding (left out of H)


def token_masks(attention_mask: torch.Tensor | None, batch_size: int) -> list[torch.Tensor] | None:
    """The calibration's attention mask [n, seq] -> per batch the tokens that count: [batch, seq] bool."""
    return None if attention_mask is None else [m.bool() for m in attention_mask.split(batch_size)]


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
                         batch_size: int, attention_mask: torch.Tensor | None = None) -> BlockInputs:
    """Embed the calibration ids [n, seq] (padded sentences: with their attention mask [n, seq]) -> the
    first block's inputs, batch by batch; the blocks' keyword arguments carry the mask as the model
    built it."""
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
    names = list(inspect.signature(blocks[0].forward).parameters)  # positional arguments by name (BERT's mask)
    catcher = _Catcher()
    blocks[0] = catcher
    inputs = BlockInputs([], [], token_masks(attention_mask, batch_size))
    batches = input_ids.split(batch_size)
    masks = [None] * len(batches) if attention_mask is None else attention_mask.split(batch_size)
    for batch, mask in zip(batches, masks):
        try:
            model(input_ids=batch, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        args, kwargs = catcher.calls.pop()
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {**dict(zip(names[1:], args[1:])), **{k: v for k, v in kwargs.items() if k != "hidden_states"}}
        inputs.hidden.append(hidden.detach().clone())
        inputs.kwargs.append(kwargs)
    return inputs


@dataclass(frozen=True)
class BlockKind:
    """What building a model's blocks on their own takes, made once per worker."""

    config: PretrainedConfig  # the model's, its experts running experts.capture_experts
    block_class: type
    layout: CheckpointLayout  # checkpoint names -> the block's own


def block_kind(config: PretrainedConfig) -> BlockKind:
    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    return BlockKind(with_capture(config), type(find_blocks(model)[1][0]), CheckpointLayout(model))


def build_blocks(kind: BlockKind, shard: Shard, tensors: dict[str, torch.Tensor]) -> nn.ModuleList:
    """The shard's blocks as real modules holding the given tensors (checkpoint keys). A part of an
    expert-split block holds only its range of experts: its fused expert parameters are that range."""
    blocks = nn.ModuleList()
    module_state = kind.layout.to_module(tensors)
    for b in shard.blocks:
        with no_init_weights():
            block = kind.block_class(kind.config, layer_idx=b)
        marker = f"{shard.block_prefix}.{b}."
        state = {k.split(marker, 1)[1]: t for k, t in module_state.items() if marker in k}
        held = _held_experts(block, state, shard.experts) if shard.experts is not None else {}
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        params = {name for name, _ in block.named_parameters()}
        missing = [k for k in missing if k in params and k not in held]  # a buffer may keep its own value
        if missing or unexpected:
            raise RuntimeError(f"block {b}: the shard's tensors do not fit {kind.block_class.__name__} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, tensor in held.items():
            module_name, param = name.rsplit(".", 1)
            setattr(block.get_submodule(module_name), param, nn.Parameter(tensor, requires_grad=False))
        blocks.append(block.eval())
    return blocks


def _held_experts(block: nn.Module, state: dict[str, torch.Tensor], experts: tuple[int, int]) -> dict:
    """The fused expert parameters of a part holding `experts` [start, stop), taken out of `state` (their
    first dimension is the range, not every expert): -> name -> tensor ([0, ...] where it holds none)."""
    held = {}
    dtype = next(iter(state.values())).dtype
    for mname, module in block.named_modules():
        if is_experts_module(module):
            for pname, param in module.named_parameters(recurse=False):
                name = f"{mname}.{pname}"
                held[name] = state.pop(name, None)
                if held[name] is None:
                    held[name] = torch.empty((0, *param.shape[1:]), dtype=dtype)
            setattr(module, FIRST_EXPERT, experts[0])
    return held


@contextlib.contextmanager
def expert_outputs(blocks: nn.ModuleList, shard: Shard, replay: dict[str, list[dict]] | None = None):
    """While the blocks run: every experts module keeps its held experts' routed outputs, and replays
    `replay`'s (experts module -> per batch: expert -> y) for the others; yields experts module -> its
    ExpertOutputs."""
    attached = {}
    if shard.experts is None and replay is None:  # whole blocks: every expert is here, nothing to keep
        yield attached
        return
    for name, module in _experts_modules(blocks, shard):
        attached[name] = ExpertOutputs(replay.get(name) if replay else None)
        setattr(module, OUTPUTS, attached[name])
    try:
        yield attached
    finally:
        for name, module in _experts_modules(blocks, shard):
            delattr(module, OUTPUTS)


def replay_of(parts: tuple[dict[str, list[dict]], ...], batches: int) -> dict[str, list[dict]]:
    """The parts' kept expert outputs (each: experts module -> per batch: expert -> y) as one replay."""
    return {module: [{e: y for part in parts for e, y in part[module][batch].items()} for batch in range(batches)]
            for module in parts[0]}


def _experts_modules(blocks: nn.ModuleList, shard: Shard) -> list[tuple[str, nn.Module]]:
    return [(f"{shard.block_prefix}.{b}.{mname}", module) for b, block in zip(shard.blocks, blocks)
            for mname, module in block.named_modules() if is_experts_module(module)]


def _hooked_modules(blocks: nn.ModuleList, shard: Shard, names: set[str]) -> dict[str, nn.Module]:
    """The modules of `names` (Linear layers, routers) in the built blocks."""
    by_name = {}
    for b, block in zip(shard.blocks, blocks):
        for mname, module in block.named_modules():
            full = f"{shard.block_prefix}.{b}.{mname}"
            if full in names:
                by_name[full] = module
    return by_name


def _attach_recorders(blocks: nn.ModuleList, shard: Shard, experts: list[LinearLayer], hessians: HessianSet,
                      all_tokens: dict[str, frozenset[int]] | None) -> list[tuple[str, nn.Module]]:
    """An ExpertRecorder on every experts module of the blocks, folding the inputs of the wanted experts'
    projections into `hessians`; -> (name, module) of each (to detach them afterwards)."""
    wanted: dict[tuple[str, int, str], list[str]] = {}  # (module, expert, input) -> layer names
    for layer in experts:
        wanted.setdefault((layer.expert.module, layer.expert.expert, layer.expert.input_of), []).append(layer.name)
    modules = []
    for full, module in _experts_modules(blocks, shard):

        def on_input(expert: int, input_name: str, x: torch.Tensor, full=full) -> None:
            members = wanted.get((full, expert, input_name))
            if members:
                hessians.fold(members[0], members, x)

        chosen = None if all_tokens is None else all_tokens.get(full, frozenset())
        setattr(module, RECORDER, ExpertRecorder(on_input, chosen))
        modules.append((full, module))
    return modules


def to_device(value, device: torch.device):
    """Every tensor inside nested dicts, lists and tuples moved to `device` (block kwargs: masks, rotary tables)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _forward(blocks: nn.ModuleList, x: torch.Tensor, kwargs: dict, seen: dict) -> torch.Tensor:
    """x [batch, seq, hidden] through the blocks -> their output (seen: the hooks' inputs of one block)."""
    for block in blocks:
        seen.clear()
        out = block(x, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    return x


@contextlib.contextmanager
def _recorders_off(recorded: list[tuple[str, nn.Module]]):
    """The experts modules' recorders detached while a dense reference pass runs (it counts no tokens)."""
    saved = [(module, getattr(module, RECORDER)) for _, module in recorded]
    for module, _ in saved:
        delattr(module, RECORDER)
    try:
        yield
    finally:
        for module, recorder in saved:
            setattr(module, RECORDER, recorder)


class _InputHooks:
    """Forward hooks that fold each Linear's input into `hessians`, once per tensor (layers reading the
    same tensor join the first one's group)."""

    def __init__(self, hessians: HessianSet):
        self.hessians = hessians
        # id of an input tensor in the current block's forward -> (the tensor, kept alive so its id
        # cannot be reused, and the first layer that read it)
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}
        self.reference: dict[str, torch.Tensor] = {}  # layer -> its dense input in this batch (asymmetric)
        self.dense_pass = False  # the dense reference pass is running: record inputs, fold nothing
        self.mask: torch.Tensor | None = None  # this batch's token mask [batch, seq] bool, False = padding

    def hook(self, name: str):
        def record(module, args, output):
            x = args[0]
            if self.dense_pass:
                self.reference[name] = x
                return
            leader = self.seen.setdefault(id(x), (x, name))[1]
            if leader != name:
                self.hessians.join(leader, name)
                return
            dense_x = self.reference.get(name)
            if self.mask is not None:  # padding tokens are not calibration data
                x, dense_x = x[self.mask], None if dense_x is None else dense_x[self.mask]
            self.hessians.fold(name, [name], x, dense_x)
        return record


@torch.no_grad()
def run_blocks(blocks: nn.ModuleList, inputs: BlockInputs, shard: Shard | None = None,
               collect: list[LinearLayer] = (), device: torch.device = torch.device("cpu"),
               all_tokens: dict[str, frozenset[int]] | None = None,
               dense: list[torch.Tensor] | None = None,
               hessians: HessianSet | None = None) -> tuple[list[torch.Tensor], HessianSet]:
    """Hidden states through the blocks (which are on `device`); H for every layer in `collect` (shared
    where inputs are shared), kept on `device`, folded into `hessians` when given (the running means of
    earlier batches: a later chunk of the calibration set). The outputs come back on the CPU, for the
    object store.

    Experts: each expert's H is accumulated over the tokens the router sent to it, and the counts are in
    `expert_tokens`; `all_tokens` (experts module -> experts) computes those experts' H over every token
    instead (the outputs still follow the router).

    dense (asymmetric calibration): the dense model's hidden states of the same batches. Each batch runs
    on them first, recording every layer's dense input, so that C (HessianSet) pairs each token's dense
    and given inputs; the outputs returned are then the dense ones (the next shard's dense inputs).
    Experts get no C: the two passes may route a token to different experts.

    inputs.token_masks (padded sentences): the padding tokens are left out of every H and C."""
    hessians = HessianSet() if hessians is None else hessians
    modules = _hooked_modules(blocks, shard, {l.name for l in collect if l.expert is None}) if collect else {}
    experts = [l for l in collect if l.expert is not None]
    recorded = _attach_recorders(blocks, shard, experts, hessians, all_tokens) if experts else []
    hooks = _InputHooks(hessians)
    handles = [m.register_forward_hook(hooks.hook(name)) for name, m in sorted(modules.items())]
    outputs = []
    try:
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            kwargs = to_device(kwargs, device)
            hooks.mask = None if inputs.token_masks is None else inputs.token_masks[b].to(device)
            if dense is not None:
                hooks.dense_pass = True
                with _recorders_off(recorded):
                    outputs.append(_forward(blocks, dense[b].to(device), kwargs, hooks.seen).cpu())
                hooks.dense_pass = False
            x = _forward(blocks, hidden.to(device), kwargs, hooks.seen)
            hooks.reference.clear()
            if dense is None:
                outputs.append(x.cpu())
    finally:
        for h in handles:
            h.remove()
        for name, module in recorded:
            hessians.expert_tokens[name] = dict(sorted(getattr(module, RECORDER).tokens.items()))
            delattr(module, RECORDER)
    return outputs, hessians


def recalibrate_experts(blocks: nn.ModuleList, inputs: BlockInputs, shard: Shard, collected: list[LinearLayer],
                        hessians: HessianSet, min_tokens: int | None, policy: str,
                        device: torch.device = torch.device("cpu")) -> dict[str, dict]:
    """The experts the router sent fewer than `min_tokens` calibration tokens (None: the width of their
    input, below which H is singular) get other Hessians: `all-tokens` runs the blocks once more with
    every token through those experts; `identity` uses H = I (recipe.ExpertsConfig says why).
    -> experts module -> {"tokens": per expert, "min_tokens": the threshold, "under_calibrated": [experts]}."""
    width = {l.expert.module: l.in_features for l in collected if l.expert and l.expert.input_of == "gate_up_proj"}
    routing = {}
    for module, counts in hessians.expert_tokens.items():
        threshold = width.get(module, 0) if min_tokens is None else min_tokens
        routing[module] = {"tokens": list(counts.values()), "min_tokens": threshold,
                           "under_calibrated": [e for e, n in counts.items() if n < threshold]}
    under = {m: frozenset(r["under_calibrated"]) for m, r in routing.items() if r["under_calibrated"]}
    redo = [l for l in collected if l.expert and l.expert.expert in under.get(l.expert.module, ())]
    if redo and policy == "all-tokens":
        _, again = run_blocks(blocks, inputs, shard, redo, device, all_tokens=under)
    for leader in {hessians.leader(l.name) for l in redo}:
        if policy == "all-tokens":
            hessians.H[leader], hessians.n[leader] = again.H[leader], again.n[leader]
        else:
            hessians.H[leader] = torch.eye(len(hessians.H[leader]), dtype=hessians.H[leader].dtype, device=device)
    return routing
