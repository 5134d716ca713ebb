"""What a technique returns for one layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from orchestrator.techniques.grid import QuantParams


def weight_error(W_hat: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """-> (relative error ||W_hat - W||_F / ||W||_F, SQNR 10 log10(||W||^2 / ||W_hat - W||^2) in dB; inf when
    exact): how far a compressed weight is from the dense one (float32 in, sums in float64)."""
    err2 = (W_hat - W).pow(2).sum().item()
    ref2 = W.pow(2).sum().item()
    return ((err2 / ref2) ** 0.5 if ref2 > 0 else 0.0), (10 * math.log10(ref2 / err2) if err2 > 0 else math.inf)


@dataclass
class LayerResult:
    weight: torch.Tensor  # [out, in] float32: the compressed weight, as the model will compute with it
    mask: torch.Tensor | None = None  # [out, in] bool, True = kept (pruning)
    quant: QuantParams | None = None  # scales and zeros (quantization)
    qweight: torch.Tensor | None = None  # [out, in] int32 integers on the grid (quantization)
    stats: dict = field(default_factory=dict)  # per-layer numbers, e.g. GPTQ's damping and loss
