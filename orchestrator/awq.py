"""AWQ: activation-aware scaling of input channels before quantization, folded so the model stays the same.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (2023). A few input channels carry much larger activations than
the rest, and their weights matter most. For a layer y = W x and any s > 0,
y = (W diag(s)) (x / s): scaling the salient columns up before quantizing
gives them finer steps relative to their size, while the division by s is
folded into whatever produced x, so no new operation appears:

- after an RMSNorm (q/k/v; gate/up): the norm's scale gamma <- gamma / s;
- after up_proj (down_proj): up_proj's output rows (and bias) <- / s, exact
  because act(gate) * up is elementwise;
- after v_proj (o_proj), only when v's outputs are o's inputs one to one (no
  grouped-query attention): v_proj's rows <- / s.

s = r^alpha, r each channel's RMS on the calibration tokens (sqrt of diag(H),
H the layer's input Hessian, already collected; the paper uses the mean |x|),
normalised by sqrt(max(s) min(s)). alpha is searched on a grid of `points`
values in [0, 1) for the least output error of the layers that read x,

    sum_i tr(E_i H E_i^T),   E_i = Q(W_i diag(s)) diag(1/s) - W_i,

which is sum over the calibration tokens of ||W_i x - Q(W_i s)(x / s)||^2, Q
the stage's grid (bits, groups, symmetry) with a min/max range (the search
tries every alpha; the stage's own observer quantizes the result). alpha = 0
is s = 1, the model unchanged, so the search never does worse than the plain
grid on this objective. The layers that read x then see H' = H / (s s^T).

Applies to the llama, mistral and qwen2 families (plan.py refuses others).
"""

from __future__ import annotations

import dataclasses

import torch

from orchestrator.partition import Shard
from orchestrator.recipe import Stage
from orchestrator.rotate import FAMILIES
from orchestrator.techniques.rtn import QuantizeParams, rtn

__all__ = ["FAMILIES", "awq_stage", "scale_shard", "search_scale"]

# (what produced the input, the layers that read it), local names in a block, in the order they are scaled
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
)
READERS = tuple(r for _, readers in SCALE_GROUPS for r in readers)
MIN_SCALE = 1e-4  # of a channel's scale before normalisation, relative to the largest (a channel never seen)


def awq_stage(stages: list[Stage]) -> Stage | None:
    """The stage that asks for AWQ (`awq: true`; plan.py allows one)."""
    return next((s for s in stages if getattr(s.params, "awq", False)), None)


def output_error(W: torch.Tensor, s: torch.Tensor, H: torch.Tensor, grid: QuantizeParams) -> torch.Tensor:
    """W [out, in], s [in], H [in, in] -> tr(E H E^T), E = Q(W diag(s)) diag(1/s) - W."""
    E = rtn(W * s, grid).weight / s - W  # [out, in]
    return ((E @ H) * E).sum()


def search_scale(weights: list[torch.Tensor], H: torch.Tensor, grid: QuantizeParams,
                 points: int) -> tuple[torch.Tensor, float]:
    """Layers reading one input (W_i [out_i, in] float32) and its Hessian H [in, in] -> (s [in], alpha)."""
    rms = H.diagonal().clamp_min(0).sqrt()
    relative = rms / rms.max().clamp_min(torch.finfo(rms.dtype).tiny)
    search_grid = dataclasses.replace(grid, observer="minmax", scale_dtype="float32")
    best = (float("inf"), torch.ones_like(rms), 0.0)
    for i in range(points):
        alpha = i / points
        s = relative.pow(alpha).clamp_min(MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(output_error(W, s, H, search_grid) for W in weights).item()
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]


def scale_shard(shard: Shard, tensors: dict[str, torch.Tensor], stage: Stage, hessian_of) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict]]:
    """The shard's tensors with AWQ's scales applied -> (tensors, layer -> the s its input was divided by,
    layer -> {"alpha", "fold"}: the chosen exponent and the tensor the division was folded into)."""
    out, scales, stats = dict(tensors), {}, {}
    layers = {layer.name: layer for layer in shard.linears}
    for prefix in block_prefixes(shard):
        for producer, readers in SCALE_GROUPS:
            names = [prefix + r for r in readers]
            if not all(n in layers for n in names) or not any(stage.applies_to(n) for n in names):
                continue
            H = hessian_of(names[0])  # one input: the readers share H
            keys = [layers[n].weight_key for n in names]
            fold = prefix + producer + ".weight"
            if H is None or fold not in out or out[fold].shape[0] != H.shape[0]:  # v -> o under GQA
                continue
            weights = [out[k].float() for k in keys]
            s, alpha = search_scale(weights, H.float(), stage.params, stage.params.awq_points)
            for k, W in zip(keys, weights):
                out[k] = (W * s).to(tensors[k].dtype)
            for key in (fold, prefix + producer + ".bias"):  # a norm's scale, or a Linear's rows and bias
                if key in out:
                    divided = out[key].float() / (s if out[key].dim() == 1 else s[:, None])
                    out[key] = divided.to(tensors[key].dtype)
            for n in names:
                scales[n] = s
                stats[n] = {"alpha": alpha, "fold": fold}
    return out, scales, stats


def block_prefixes(shard: Shard) -> list[str]:
    """'model.layers.3.' for each block of the shard, in order (from its layers' names)."""
    prefixes: dict[str, None] = {}  # ordered set
    for layer in shard.linears:
        local = next((r for r in READERS if layer.name.endswith("." + r)), None)
        if local:
            prefixes.setdefault(layer.name[: -len(local)])
    return list(prefixes)


def scaled_input(statistic_of, scales: dict[str, torch.Tensor]):
    """A layer's H (or C) -> the same for its scaled input x / s: divided by s s^T."""
    def of(name: str) -> torch.Tensor | None:
        M, s = statistic_of(name), scales.get(name)
        return M if M is None or s is None else M / torch.outer(s, s).to(M.device, M.dtype)
    return of
