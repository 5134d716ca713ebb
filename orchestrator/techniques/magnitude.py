"""Magnitude pruning: drop the weights of smallest absolute value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.techniques.registry import register
from orchestrator.techniques.result import LayerResult


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M), N weights kept in every M consecutive."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern: must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern: N:M needs 0 < N < M, got {pattern!r}")
    return n, m


@dataclass
class PruneParams:
    """Pruning settings shared by magnitude, Wanda and SparseGPT.

    `sparsity` is the fraction of weights set to zero (unstructured). With an
    N:M pattern the sparsity is fixed by the pattern, 1 - N/M.
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity: must be in [0, 1), got {self.sparsity}")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            self.sparsity = 1.0 - nm[0] / nm[1]

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def keep_mask_unstructured(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) entries of lowest score; ties go by position."""
    n_prune = round(sparsity * score.numel())
    order = torch.sort(score.flatten(), stable=True).indices
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    keep[order[:n_prune]] = False
    return keep.reshape(score.shape)


def keep_mask_n_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [out, in] -> keep the N highest of every M consecutive inputs."""
    out_features, in_features = score.shape
    groups = score.reshape(out_features, in_features // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices  # [out, in/m, m]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(out_features, in_features)


@register("magnitude", "prune", PruneParams)
def magnitude(W: torch.Tensor, p: PruneParams, H: torch.Tensor | None = None) -> LayerResult:
    """W [out, in] -> W with its smallest |w| zeroed, over the whole layer or per N:M group. H is ignored."""
    score = W.abs()
    keep = keep_mask_n_m(score, *p.n_m) if p.n_m else keep_mask_unstructured(score, p.sparsity)
    return LayerResult(weight=W * keep, mask=keep)
