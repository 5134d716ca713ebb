"""Mixture-of-experts blocks: checkpoint layouts, experts as compressible units, and their calibration.

transformers 5 keeps a block's experts as fused 3D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) while checkpoints keep one 2D tensor per
expert and projection (`block_sparse_moe.experts.3.w1.weight` [I, H]); transformers
converts one into the other when it loads and saves (its conversion_mapping.py). This
module goes through that machinery, never through a rename table of its own:

- `CheckpointLayout.to_checkpoint`: module-tree tensors -> checkpoint tensors (what
  save_pretrained writes); it works on meta tensors, so the planner reads names and
  shapes without weights. `to_module` is the way back (what from_pretrained does).
- `expert_slices`: which checkpoint tensor holds which rows of which expert of a
  fused parameter, found by converting a probe tensor whose entries are their own
  row numbers (so nothing about the families' names is assumed).
- `capture_experts`: an experts implementation registered with transformers'
  ExpertsInterface. It computes what the eager loop computes, expert by expert,
  and, when a `ExpertRecorder` is attached to the module, hands each expert's inputs
  (the tokens the router sent to it) to the recorder: Hessians and token counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.integrations.moe import ExpertsInterface

from orchestrator.errors import UserError

IMPLEMENTATION = "orchestrator"  # the name our experts forward is registered under


@dataclass(frozen=True)
class ExpertSlice:
    """Where a 2D checkpoint tensor lives in the module tree: rows [start, stop) of param[expert]."""

    param: str  # the fused parameter's full name, e.g. model.layers.0.mlp.experts.gate_up_proj
    expert: int
    start: int
    stop: int

    @property
    def module(self) -> str:  # the experts module, e.g. model.layers.0.mlp.experts
        return self.param.rsplit(".", 1)[0]

    @property
    def input_of(self) -> str:  # which of the module's inputs this projection reads: its fused parameter's name
        return self.param.rsplit(".", 1)[1]


class CheckpointLayout:
    """A model's tensor names in its checkpoint versus its module tree (transformers' conversion mapping).

    `model` is the skeleton on the meta device: only its classes and config are read."""

    def __init__(self, model: nn.Module):
        self.model = model
        # the transforms from_pretrained would apply, as revert_weight_conversion chooses them for a model
        # not loaded by from_pretrained (no legacy renames, no prefix changes)
        transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    @property
    def converts(self) -> bool:
        return bool(self.renamings or self.converters)

    def to_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module-tree names -> checkpoint names (fused experts split per expert), as save_pretrained does."""
        return revert_weight_conversion(self.model, dict(state)) if self.converts else dict(state)

    def to_module(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names -> module-tree names (per-expert tensors stacked), as from_pretrained does.

        Tensors go in the order from_pretrained adds them (natural order of their names), so the experts
        stack as 0, 1, ..., 10, not 0, 1, 10."""
        if not self.converts:
            return dict(tensors)
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, WeightConverter] = {}
        for key in sorted(tensors, key=dot_natural_key):
            target, pattern = rename_source_key(key, self.renamings, self.converters)
            if pattern is None:
                out[target] = tensors[key]
                continue
            if target not in pending:
                pending[target] = copy.deepcopy(next(c for c in self.converters if pattern in c.source_patterns))
            pending[target].add_tensor(target, key, pattern, tensors[key])
        for target, converter in pending.items():
            out.update(converter.convert(target, model=self.model, config=self.model.config))
        return out


def expert_slices(layout: CheckpointLayout, name: str, param: torch.Tensor) -> dict[str, ExpertSlice]:
    """A fused expert parameter [E, R, C] -> {checkpoint key: the expert and rows it holds}; {} when the
    parameter is stored whole (it is not a stack of experts).

    A probe [E, R, 1] holding e * R + r at [e, r] goes through the same conversion: each tensor it
    becomes tells which rows of which expert that checkpoint tensor is."""
    if param.dim() != 3:
        return {}
    E, R = param.shape[0], param.shape[1]
    probe = torch.arange(E * R, dtype=torch.float64).reshape(E, R, 1)
    parts = layout.to_checkpoint({name: probe})
    if len(parts) <= 1:
        return {}
    slices = {}
    for key, part in parts.items():
        if part.dim() != 2 or part.shape[1] != 1:
            raise UserError(f"model: the checkpoint stores {name} as {key} in a layout this tool does not read "
                            f"yet (probe shape {tuple(part.shape)}; expected [rows, 1])")
        ids = part[:, 0].long()
        expert, start = divmod(ids[0].item(), R)
        if not torch.equal(ids, torch.arange(ids[0].item(), ids[0].item() + len(ids))) or (start + len(ids)) > R:
            raise UserError(f"model: {key} is not a run of rows of one expert of {name}; this layout is not supported")
        slices[key] = ExpertSlice(name, expert, start, start + len(ids))
    return slices


def is_experts_module(module: nn.Module) -> bool:
    """transformers' fused experts (classes decorated with @use_experts_implementation)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "num_experts") and hasattr(module, "down_proj")


def check_supported(name: str, module: nn.Module) -> None:
    """The fused layouts `capture_experts` computes: gated, [gate; up] concatenated, [E, out, in], no bias."""
    unsupported = [what for what, bad in (("without a gate", not module.has_gate),
                                           ("with interleaved gate/up rows", not module.is_concatenated),
                                           ("transposed ([E, in, out])", module.is_transposed),
                                           ("with biases", module.has_bias),
                                           ("with a norm after each expert", module.has_post_expert_norm)) if bad]
    if unsupported:
        raise UserError(f"model: the experts in {name} are stored {', '.join(unsupported)}; "
                        "this tool compresses gated [E, out, in] experts without bias only")


def routers(block: nn.Module, prefix: str) -> set[str]:
    """Full names of the modules that weigh the experts of a block: siblings of an experts module holding a
    [num_experts, hidden] or [1, hidden] weight (Mixtral's and DeepSeek's `gate`, Qwen's `shared_expert_gate`)."""
    names = set()
    for parent_name, parent in block.named_modules():
        experts = [m for m in parent.children() if is_experts_module(m)]
        if not experts:
            continue
        for child_name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if (not is_experts_module(child) and isinstance(weight, nn.Parameter) and weight.dim() == 2
                    and weight.shape[0] in (experts[0].num_experts, 1)):
                names.add(".".join(p for p in (prefix, parent_name, child_name) if p))
    return names


RECORDER = "_orchestrator_recorder"  # the attribute of an experts module that holds its ExpertRecorder


class ExpertRecorder:
    """What the calibration keeps of one experts module while it runs: each expert's inputs, handed to
    `on_input(expert, input_name, x [tokens, features])` (input_name: the fused parameter that reads x),
    and the calibration tokens the router sent to each expert.

    all_tokens None: the inputs are the tokens the router sent (zero rows for an expert it never chose).
    A set of experts: only theirs are handed over, computed on every token of the batch, as if the router
    had sent all of them there (the block's output still follows the router)."""

    def __init__(self, on_input: Callable[[int, str, torch.Tensor], None], all_tokens: frozenset[int] | None = None):
        self.on_input, self.all_tokens = on_input, all_tokens
        self.tokens: dict[int, int] = {}

    def record(self, module: nn.Module, expert: int, hidden: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> None:
        self.tokens[expert] = self.tokens.get(expert, 0) + len(x)
        if self.all_tokens is None:
            self.on_input(expert, "gate_up_proj", x)
            self.on_input(expert, "down_proj", h)
        elif expert in self.all_tokens:
            self.on_input(expert, "gate_up_proj", hidden)
            local = expert - getattr(module, FIRST_EXPERT, 0)
            self.on_input(expert, "down_proj", module._apply_gate(nn.functional.linear(hidden, module.gate_up_proj[local])))


def capture_experts(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output for hidden_states [T, H] routed by top_k_index [T, k] with top_k_weights [T, k]:
    the eager loop's arithmetic, expert by expert, tokens in its order. Each expert's inputs go to the
    module's ExpertRecorder when one is attached.

    A module may hold only a range of its experts (a shard of an expert-split block: `FIRST_EXPERT`
    is the first one's index). With `ExpertOutputs` attached, the held experts' weighted outputs are kept,
    and the others' are replayed from outputs kept elsewhere: the sum runs in the same order over the same
    terms, so the block's output has the same bits however its experts were split."""
    recorder: ExpertRecorder | None = getattr(self, RECORDER, None)
    outputs: ExpertOutputs | None = getattr(self, OUTPUTS, None)
    replay = outputs.next_replay() if outputs is not None else None
    first = getattr(self, FIRST_EXPERT, 0)
    held = range(first, first + len(self.gate_up_proj))
    out = torch.zeros_like(hidden_states)  # [T, H]
    for e in range(self.num_experts):
        slot, token = torch.where(top_k_index.T == e)  # the tokens sent to expert e, and their top-k slot
        if e in held:
            x = hidden_states[token]  # [t, H]
            h = self._apply_gate(nn.functional.linear(x, self.gate_up_proj[e - first]))  # [t, I]
            if recorder is not None:
                recorder.record(self, e, hidden_states, x, h)
            if not len(token):
                continue
            y = (nn.functional.linear(h, self.down_proj[e - first]) * top_k_weights[token, slot, None]).to(out.dtype)
            if outputs is not None:
                outputs.keep(e, y)  # [t, H]
        elif replay is not None and len(token):
            y = replay[e].to(out.device)
        else:
            continue  # an expert this module does not hold, with nothing to replay: left out
        out.index_add_(0, token, y)
    return out


OUTPUTS = "_orchestrator_outputs"  # the attribute of an experts module that holds its ExpertOutputs
FIRST_EXPERT = "_orchestrator_first_expert"  # ... and the index of the first expert it holds (default 0)


class ExpertOutputs:
    """One experts module's routed outputs, call by call (one call per calibration batch): each held
    expert's weighted output y [t, H] is kept (on the CPU, for the object store), and `replay[call]`
    gives the outputs of the experts the module does not hold."""

    def __init__(self, replay: list[dict[int, torch.Tensor]] | None = None):
        self.kept: list[dict[int, torch.Tensor]] = []
        self.replay, self.calls = replay, 0

    def next_replay(self) -> dict[int, torch.Tensor] | None:
        self.kept.append({})
        self.calls += 1
        return None if self.replay is None else self.replay[self.calls - 1]

    def keep(self, expert: int, y: torch.Tensor) -> None:
        self.kept[-1][expert] = y.cpu()


ExpertsInterface.register(IMPLEMENTATION, capture_experts)


def with_capture(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of config whose experts modules run `capture_experts`."""
    config = copy.deepcopy(config)
    config._experts_implementation = IMPLEMENTATION
    return config
