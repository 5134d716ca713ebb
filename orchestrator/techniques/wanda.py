"""Wanda: prune by weight magnitude times input activation norm.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
(2023). Score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input
feature j over the calibration tokens; weights are compared within each output
row (the paper's "per output" comparison group), and nothing is updated.

||X_j||_2 comes from the Hessian's diagonal: diag(H)_j = (2/n) ||X_j||_2^2, so
||X_j||_2 = sqrt(diag(H)_j * n / 2). The factor sqrt(n / 2) is the same for
every weight of the layer and cannot change any ranking, so sqrt(diag(H)) is
used as is and n is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.techniques.magnitude import PruneParams, keep_mask_n_m
from orchestrator.techniques.registry import register
from orchestrator.techniques.result import LayerResult


@dataclass
class WandaParams(PruneParams):
    """PruneParams: sparsity / pattern.

    Unstructured: every output row loses exactly round(sparsity * in_features)
    weights, so the layer's total is out * round(sparsity * in), which equals
    round(sparsity * numel) whenever sparsity * in_features is an integer (and is
    within out / 2 of it otherwise): an exact per-row count is Wanda's rule.
    """


@register("wanda", "prune", WandaParams, needs_calibration=True)
def wanda(W: torch.Tensor, p: WandaParams, H: torch.Tensor | None) -> LayerResult:
    """W [out, in] float32, H [in, in] -> W with its lowest |W_ij| * ||X_j|| zeroed, row by row or per N:M group."""
    out_features, in_features = W.shape
    if H is None:
        raise ValueError("wanda needs calibration statistics: H (the layer's input Hessian) is None")
    if H.shape != (in_features, in_features):
        raise ValueError(f"wanda: H is {tuple(H.shape)}, expected [{in_features}, {in_features}] for W {tuple(W.shape)}")
    if not torch.isfinite(H.diagonal()).all():
        raise RuntimeError("wanda: diag(H) has NaN or infinite entries; the calibration statistics are broken")
    X_norm = H.diagonal().to(device=W.device, dtype=torch.float64).clamp(min=0).sqrt()  # [in], ∝ ||X_j||_2
    S = W.to(torch.float64).abs() * X_norm[None, :]  # [out, in]
    if p.n_m:
        keep = keep_mask_n_m(S, *p.n_m)  # [out, in] N highest of every M consecutive inputs
    else:
        n_prune = round(p.sparsity * in_features)  # per row
        lowest = torch.sort(S, dim=1, stable=True).indices[:, :n_prune]  # [out, n_prune], ties by position
        keep = torch.ones(out_features, in_features, dtype=torch.bool, device=W.device)
        keep.scatter_(1, lowest, False)
    return LayerResult(weight=W * keep, mask=keep)
