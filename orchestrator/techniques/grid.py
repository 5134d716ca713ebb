"""The integer grid shared by every quantizer (RTN now, GPTQ later).

Conventions (kept identical everywhere so export can pack the integers as is):
- integers q live in the signed range [-2^(b-1), 2^(b-1) - 1];
- the real value is (q - zero) * scale;
- symmetric: zero = 0 and scale = absmax / ((2^b - 1) / 2), the convention of
  GPTQ's reference code and compressed-tensors: all 2^b levels are used and the
  positive extreme is clipped by at most half a step (at 3 bits this beats
  absmax / (2^(b-1) - 1), which wastes a level, by a clear margin);
- asymmetric: the range [min(w, 0), max(w, 0)] is spread over all 2^b levels,
  zero is an integer in the range, so 0 is still exact (pruned weights stay 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class QuantParams:
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups] int32 (all 0 when symmetric)
    bits: int
    group_size: int  # columns per group; equals in_features for per-channel
    symmetric: bool


def group_view(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in / group_size, group_size]."""
    out_features, in_features = W.shape
    return W.reshape(out_features, in_features // group_size, group_size)


# dtypes scales can be stored in; "auto" (the checkpoint's dtype) is resolved by the worker before a
# technique runs, and means float32 if it ever reaches here
SCALE_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fit_qparams(Wg: torch.Tensor, bits: int, symmetric: bool,
                scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for groups Wg [..., g] over the last axis -> ([...], [...]).

    The scale is rounded to `scale_dtype` (returned as float32): a checkpoint that
    stores its scales in bfloat16 then dequantizes to exactly the weights the
    technique chose.
    """
    qmin, qmax = int_range(bits)
    if symmetric:
        absmax = Wg.abs().amax(dim=-1)
        scale = absmax / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = Wg.amin(dim=-1).clamp(max=0)
        hi = Wg.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = None
    scale = scale.to(SCALE_DTYPES[scale_dtype]).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group (or underflow)
    if zero is None:
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Real values -> integers on the grid; broadcasting scale/zero over W."""
    qmin, qmax = int_range(bits)
    return torch.clamp(torch.round(W / scale) + zero, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero).to(scale.dtype) * scale
