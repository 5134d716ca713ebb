"""Round-to-nearest (RTN) weight quantization: the data-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.techniques.grid import (OBSERVERS, SCALE_DTYPES, QuantParams, dequantize, fit_qparams, group_view,
                                           quantize)
from orchestrator.techniques.registry import register
from orchestrator.techniques.result import LayerResult


def check_scale_dtype(scale_dtype: str) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype: must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")


def check_observer(observer: str) -> None:
    if observer not in OBSERVERS:
        raise ValueError(f"observer: must be one of {', '.join(OBSERVERS)}, got {observer!r}")


@dataclass
class QuantizeParams:
    """Weight quantization settings shared by RTN and GPTQ (and SparseGPT's optional quantization)."""

    bits: int = 4
    group_size: int = 128  # columns sharing one scale; -1 = one scale per output channel
    symmetric: bool = True
    scale_dtype: str = "auto"  # scales stored as: auto (the checkpoint's dtype), float32, bfloat16, float16
    observer: str = "minmax"  # each group's range: minmax (all of it) or mse (the clipping with least error)
    awq: bool = False  # scale input channels by their activations first, folded into norms / layers (awq.py)
    awq_points: int = 20  # AWQ's search: exponents 0, 1/points, ..., (points - 1)/points

    def __post_init__(self):
        check_scale_dtype(self.scale_dtype)
        check_observer(self.observer)
        if not 1 <= self.awq_points <= 100:
            raise ValueError(f"awq_points: must be an integer in 1..100, got {self.awq_points}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits: must be an integer in 2..8, got {self.bits}")
        g = self.group_size
        if g != -1 and (g < 8 or g & (g - 1)):
            raise ValueError(f"group_size: must be -1 (per channel) or a power of two >= 8, got {g}")


@register("rtn", "quantize", QuantizeParams)
def rtn(W: torch.Tensor, p: QuantizeParams, H: torch.Tensor | None = None) -> LayerResult:
    """W [out, in] -> the nearest grid point of every weight, group by group. H is ignored (data-free)."""
    group_size = W.shape[1] if p.group_size == -1 else p.group_size
    Wg = group_view(W, group_size)  # [out, n_groups, g]
    scale, zero = fit_qparams(Wg, p.bits, p.symmetric, p.scale_dtype, p.observer)  # [out, n_groups] each
    q = quantize(Wg, scale[..., None], zero[..., None], p.bits)  # [out, n_groups, g]
    W_hat = dequantize(q, scale[..., None], zero[..., None]).reshape(W.shape)
    return LayerResult(
        weight=W_hat,
        quant=QuantParams(scale, zero, p.bits, group_size, p.symmetric),
        qweight=q.reshape(W.shape),
    )
