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


# How a group's scale (and zero) are chosen: "minmax" spans the group's whole range; "mse" searches
# ranges shrunk from the whole range (1.00, 0.99, ..., 0.21 of it) for the one whose rounding error
# sum |w - w_hat|^MSE_NORM is least (clipping a few outliers buys finer steps for the rest).
OBSERVERS = ("minmax", "mse")
MSE_SHRINKS = [1 - i / 100 for i in range(80)]
MSE_NORM = 2.4  # between the mean-square error and the max error: penalises large errors a little more


MSE_SLICE_ELEMENTS = 2 ** 16  # weights searched at once: groups in slices of about this many (256 KB)
MSE_CHUNK_ELEMENTS = 2 ** 18  # and shrinks tried at once: buffers of about this many weights (1 MB), so the
# search stays in the core's cache (one 6 MB buffer per shrink, as before, took twice the time)
# The search scores |e|^MSE_NORM as exp(MSE_NORM log max(|e|, SCREEN_FLOOR)) (screened_error): within 2e-5
# of pow's float32 value, plus at most g x 1e-36 (the floor keeps log off 0 and subnormals, which take
# torch's slow path: 15 ns an element against 0.5). The shrinks within SCREEN_TOLERANCE of a group's least,
# or SCREEN_SLACK above it, are then scored with pow (rounding_error), exactly.
SCREEN_FLOOR = 1e-15
SCREEN_TOLERANCE = 1e-4
SCREEN_SLACK = 1e-30
MSE_PRUNE_MARGIN = 1e-3  # a group stops when its clipped weights' error exceeds its best by this fraction
# (more than SCREEN_TOLERANCE and both norms' rounding: no shrink that may be the least is left unscored)


def fit_qparams(Wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str = "float32",
                observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for groups Wg [..., g] over the last axis -> ([...], [...]).

    The scale is rounded to `scale_dtype` (returned as float32): a checkpoint that
    stores its scales in bfloat16 then dequantizes to exactly the weights the
    technique chose.
    """
    lo, hi = Wg.amin(dim=-1).clamp(max=0), Wg.amax(dim=-1).clamp(min=0)  # [...] each
    if symmetric:
        lo, hi = None, torch.maximum(-lo, hi)  # absmax
    scale, zero = range_qparams(lo, hi, bits, scale_dtype)
    if observer == "minmax":
        return scale, zero
    groups, g = Wg.reshape(-1, Wg.shape[-1]), Wg.shape[-1]  # [G, g]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731  [...] -> [G]
    lo, hi, scale, zero = flat(lo), flat(hi), flat(scale), flat(zero)
    step = max(1, MSE_SLICE_ELEMENTS // g)  # groups per slice; each group's search is its own
    for a in range(0, len(groups), step):
        b = a + step
        scale[a:b], zero[a:b] = mse_search(groups[a:b], None if lo is None else lo[a:b], hi[a:b], bits, scale_dtype)
    return scale.reshape(Wg.shape[:-1]), zero.reshape(Wg.shape[:-1])


def mse_search(Wg: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor, bits: int,
               scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups Wg [G, g] with their range (lo, hi [G]; lo None: symmetric, hi the absmax) -> the grid of the
    shrunk range (MSE_SHRINKS) with the least rounding error, the widest of equals ([G] each).

    The shrinks are tried from the widest down, a few at a time, scored with the cheap norm
    (screened_error), and a group stops searching once the weights that every shrink left must clip
    already cost more than its best: a narrower range clips each of them at least as far. The few
    shrinks that came within SCREEN_TOLERANCE of a group's best are then scored exactly (least_exact):
    the same grids as scoring every shrink with rounding_error, in a fraction of the time (RESULTS.md
    section 16 times both)."""
    qmin, qmax = int_range(bits)
    shrinks = torch.tensor(MSE_SHRINKS, device=Wg.device).view(-1, 1)  # [S, 1]
    s, z = range_qparams(None if lo is None else lo * shrinks, hi * shrinks, bits, scale_dtype)  # [S, G]
    top, bottom = (qmax - z) * s, (qmin - z) * s  # [S, G]: a weight beyond is clipped to the bound it passes
    # [S, G]: the widest bounds of shrink i and every narrower one (a zero point moved by a scale rounded
    # to bfloat16 can take one side further out)
    reach_top, reach_bottom = top.flip(0).cummax(0).values.flip(0), bottom.flip(0).cummin(0).values.flip(0)
    screened = torch.full_like(s, torch.inf)  # [S, G]: each scored shrink's screened error
    best = torch.full_like(hi, torch.inf)  # [G]
    live = torch.arange(len(Wg), device=Wg.device)  # the groups still searching
    first = 0
    while first < len(MSE_SHRINKS) and len(live):
        W = Wg[live]  # [L, g]
        stop = min(len(MSE_SHRINKS), first + max(1, MSE_CHUNK_ELEMENTS // W.numel()))
        err = screened_error(W, s[first:stop, live], z[first:stop, live], bits)  # [stop - first, L]
        screened[first:stop, live] = err
        best[live] = torch.minimum(best[live], err.amin(0))
        if stop < len(MSE_SHRINKS):  # every shrink left clips the weights beyond its reach at least as far
            clipped = clipping_error(W, reach_top[stop, live], reach_bottom[stop, live])  # [L]
            live = live[clipped <= best[live] * (1 + MSE_PRUNE_MARGIN) + SCREEN_SLACK]
        first = stop
    return least_exact(Wg, s, z, screened, best, bits)


def least_exact(Wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, screened: torch.Tensor, best: torch.Tensor,
                bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups Wg [G, g], every shrink's grid (s, z [S, G]) and screened error (inf: not scored), each group's
    least (best [G]) -> the grid with the least rounding_error among the shrinks screened within
    SCREEN_TOLERANCE (or SCREEN_SLACK) of the least, the widest of equals ([G] each)."""
    near = screened.T <= best[:, None] * (1 + SCREEN_TOLERANCE) + SCREEN_SLACK  # [G, S]
    group, shrink = near.nonzero(as_tuple=True)  # [K] each
    exact = rounding_error(Wg[group], s[shrink, group], z[shrink, group], bits)  # [K]
    least = torch.full_like(best, torch.inf).scatter_reduce(0, group, exact, "amin")  # [G]
    at_least = exact == least[group]
    columns = torch.arange(len(Wg), device=Wg.device)
    widest = torch.full_like(columns, len(s)).scatter_reduce(0, group[at_least], shrink[at_least], "amin")  # [G]
    return s[widest, columns], z[widest, columns]


def clipping_error(Wg: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """sum over each group Wg [G, g] of |w - bound|^MSE_NORM (screened) for its weights beyond [bottom, top]
    ([G] each) -> [G]: the clipped weights' share of screened_error (the others are 0 here)."""
    beyond = (Wg - top[:, None]).clamp_(min=0).add_((bottom[:, None] - Wg).clamp_(min=0))  # [G, g]
    return screened_norm(beyond)


def range_qparams(lo: torch.Tensor | None, hi: torch.Tensor, bits: int,
                  scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid spanning [lo, hi] (lo <= 0 <= hi; symmetric when lo is None and hi the absmax)."""
    qmin, qmax = int_range(bits)
    scale = hi / ((qmax - qmin) / 2) if lo is None else (hi - lo) / (qmax - qmin)
    scale = scale.to(SCALE_DTYPES[scale_dtype]).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group (or underflow)
    if lo is None:
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)


def rounding_error(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """sum over each group of |w - w_hat|^MSE_NORM for the grid (scale, zero) -> [...]."""
    return rounding_residual(Wg, scale, zero, bits).abs_().pow_(MSE_NORM).sum(-1)


def screened_error(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """rounding_error with the screening norm (SCREEN_FLOOR), whose kernels take about a third of pow's
    time on this CPU."""
    return screened_norm(rounding_residual(Wg, scale, zero, bits).abs_())


def screened_norm(e: torch.Tensor) -> torch.Tensor:
    """|e| [..., g] -> sum of exp(MSE_NORM log max(|e|, SCREEN_FLOOR)) over the last axis, in place."""
    return e.clamp_(min=SCREEN_FLOOR).log_().mul_(MSE_NORM).exp_().sum(-1)


def rounding_residual(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w_hat - w for the grid (scale, zero) -> [..., g]: quantize then dequantize, in place on one buffer
    (a fresh tensor per step cost 3.7x the time)."""
    qmin, qmax = int_range(bits)
    s, z = scale[..., None], zero[..., None].to(Wg.dtype)
    return torch.round(Wg / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(Wg)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Real values -> integers on the grid; broadcasting scale/zero over W."""
    qmin, qmax = int_range(bits)
    return torch.clamp(torch.round(W / scale) + zero, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero).to(scale.dtype) * scale
