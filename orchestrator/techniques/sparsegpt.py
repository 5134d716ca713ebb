"""SparseGPT: one-shot pruning with OBS weight reconstruction, optionally quantizing too.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot" (2023). The same column sweep as GPTQ (gptq.py: upper
Cholesky factor U of the damped H^-1, lazy batches of `block_size` columns),
but the value each weight is fixed to is 0 for the pruned ones and the weight
itself (or, with `bits`, its grid point) for the kept ones; the error is then
spread over the columns not yet fixed:

    err = (w_j - q_j) / U_jj,    w_F -= err * U_{j,F}

Mask selection (adaptive, as in the paper), with score w^2 / U_jj^2 (U_jj^2 is
[H_F^-1]_jj, so the score is the OBS saliency of removing w at that point):
- unstructured: at the start of each block, on the block's weights as updated
  so far, the lowest-scoring weights of the whole block [out, B] are pruned;
- N:M: when the sweep reaches the first column of each group of M inputs, the
  M - N lowest-scoring weights of each row of the group (as updated so far) are
  pruned.

Exact sparsity (unstructured). The paper prunes the fraction `sparsity` of each
block through a threshold, so the layer's count is off by rounding and ties.
Here block [i1, i2) prunes exactly round(s * out * i2) - round(s * out * i1)
weights (its share of the cumulative target), so the counts telescope to
exactly round(s * out * in) = round(sparsity * numel) for the layer, while each
block, and each row within it, still adapts to where the saliency is low (a
per-row quota would take that freedom away). Ties go by position.

Joint quantization (`bits` set): each kept weight is replaced by its grid point
(grid.py) in the same pass, so quantization error is compensated along with
the pruning error. Group scales are fitted as in GPTQ with act_order off: when
the sweep reaches the group's first column, on the group's weights as updated
so far, with the weights already chosen for pruning counted as 0 (the asymmetric
and symmetric grids both hold 0 exactly, so pruned weights stay exactly 0:
their integer is the zero point). A kept weight may still round to 0; `mask`
says what was kept. With sparsity 0 the sweep is GPTQ's, step for step, and
gives the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from orchestrator.techniques.gptq import dequantize_groups, group_width, initial_grid, updated_columns
from orchestrator.techniques.grid import QuantParams, dequantize, fit_qparams, quantize
from orchestrator.techniques.hessian import check_hessian, check_sweep, factor, prepared_weight
from orchestrator.techniques.magnitude import PruneParams
from orchestrator.techniques.registry import register
from orchestrator.techniques.result import LayerResult
from orchestrator.techniques.rtn import QuantizeParams


@dataclass
class SparseGPTParams(PruneParams):
    """PruneParams' sparsity / pattern, the sweep's settings, and optional quantization."""

    block_size: int = 128  # columns per lazy batch (and per unstructured mask selection)
    damp: float = 0.01  # added to diag(H), as a fraction of its mean
    bits: Optional[int] = None  # set: quantize the kept weights in the same pass
    group_size: int = 128  # as QuantizeParams, used when bits is set
    symmetric: bool = True  # as QuantizeParams, used when bits is set
    scale_dtype: str = "auto"  # as QuantizeParams, used when bits is set
    observer: str = "minmax"  # as QuantizeParams, used when bits is set
    precision: str = "float32"  # of the factorisation and the sweep: float32 | float64

    def __post_init__(self):
        super().__post_init__()
        check_sweep(self.block_size, self.damp, self.precision)
        if self.bits is not None:
            QuantizeParams(self.bits, self.group_size, self.symmetric, self.scale_dtype,  # raises "bits: ..." ...
                           self.observer)


def lowest_scores(W1: torch.Tensor, u_diag: torch.Tensor, count: int) -> torch.Tensor:
    """W1 [out, B], u_diag [B] -> [out, B] bool: the `count` weights of lowest OBS score w^2 / U_jj^2 over the
    whole block (ties by position)."""
    score = W1.square() / u_diag.square()[None, :]  # [out, B]
    lowest = torch.sort(score.flatten(), stable=True).indices[:count]
    chosen = torch.zeros(W1.numel(), dtype=torch.bool, device=W1.device)
    chosen[lowest] = True
    return chosen.reshape(W1.shape)


def lowest_per_row(cols: torch.Tensor, u_diag: torch.Tensor, count: int) -> torch.Tensor:
    """cols [out, m], u_diag [m] -> [out, m] bool: in each row, the `count` weights of lowest score (N:M)."""
    score = cols.square() / u_diag.square()[None, :]  # [out, m]
    lowest = torch.sort(score, dim=1, stable=True).indices[:, :count]  # [out, count]
    return torch.zeros_like(cols, dtype=torch.bool).scatter_(1, lowest, True)


@register("sparsegpt", "prune", SparseGPTParams, needs_calibration=True)
def sparsegpt(W: torch.Tensor, p: SparseGPTParams, H: torch.Tensor | None) -> LayerResult:
    """W [out, in] float32, H [in, in] -> W pruned (and quantized) with OBS reconstruction.

    stats: damp, damp_raised, loss, dead_columns, as gptq's.
    """
    out_features, in_features = W.shape
    W_in, nm = W, p.n_m
    if nm is not None and in_features % nm[1]:
        raise ValueError(f"pattern {p.pattern}: M={nm[1]} does not divide the layer's {in_features} input features")
    g = group_width(in_features, p.group_size) if p.bits is not None else None
    check_hessian(W, H, "sparsegpt")
    if nm is None and p.sparsity == 0 and p.bits is None:
        return LayerResult(weight=W_in.clone(), mask=torch.ones_like(W_in, dtype=torch.bool))

    f = factor(H, p.damp, p.precision, False, "sparsegpt", W.device)  # shared by the layers reading this input
    W, U = prepared_weight(W, f.dead, p.precision), f.U  # W: a copy in p.precision, dead inputs zeroed; U [in, in] upper
    pruned = torch.zeros(out_features, in_features, dtype=torch.bool, device=W.device)  # decided so far
    Q = torch.zeros_like(W)  # [out, in] the fixed values
    if g is not None:
        scale, zero = initial_grid(W, g, p, fit=False)  # [out, n_groups] each, fitted as the sweep goes
        qweight = torch.zeros(out_features, in_features, dtype=torch.int32, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)

    prune_upto = lambda c: round(p.sparsity * out_features * c)  # noqa: E731  unstructured: pruned in columns [0, c)
    for i1 in range(0, in_features, p.block_size):
        i2 = min(i1 + p.block_size, in_features)
        W1 = W[:, i1:i2]  # [out, B] the block as it is at its start
        Err1 = torch.zeros(i2 - i1, out_features, dtype=W.dtype, device=W.device)  # [B, out] scaled errors
        U1 = U[i1:i2, i1:i2]  # [B, B]
        if nm is None:
            n_prune = prune_upto(i2) - prune_upto(i1)
            if n_prune:
                pruned[:, i1:i2] = lowest_scores(W1, U1.diagonal(), n_prune)
        for i in range(i2 - i1):
            j = i1 + i
            if nm is not None and j % nm[1] == 0:  # first column of an N:M group
                cols = updated_columns(W, Err1, U, i1, i2, j, j + nm[1])  # [out, m]
                pruned[:, j:j + nm[1]] = lowest_per_row(cols, U.diagonal()[j:j + nm[1]], nm[1] - nm[0])
            if g is not None and j % g == 0:  # first column of a quantization group
                cols = updated_columns(W, Err1, U, i1, i2, j, j + g).masked_fill(pruned[:, j:j + g], 0)
                scale[:, j // g], zero[:, j // g] = fit_qparams(cols.float(), p.bits, p.symmetric, p.scale_dtype,
                                                                p.observer)
            w = W[:, j] - U1[:i, i] @ Err1[:i]  # [out] column j with the block's updates so far
            q = w.masked_fill(pruned[:, j], 0)  # [out]
            if g is not None:
                s, z = scale[:, j // g].to(W.dtype), zero[:, j // g]
                qi = quantize(q, s, z, p.bits)  # pruned -> the zero point
                qweight[:, j] = qi
                q = dequantize(qi, s, z)
            Q[:, j] = q
            err = (w - q) / U1[i, i]  # [out]
            loss += err.square().sum() / 2
            Err1[i] = err
        W[:, i2:] -= Err1.T @ U[i1:i2, i2:]  # the lazy update of everything after the block

    stats = {"damp": f.damp, "damp_raised": f.raised, "loss": loss.item(), "dead_columns": int(f.dead.sum())}
    if g is None:
        return LayerResult(weight=Q.to(W_in.dtype), mask=~pruned, stats=stats)
    quant = QuantParams(scale, zero, p.bits, g, p.symmetric)
    return LayerResult(dequantize_groups(qweight, quant), mask=~pruned, quant=quant, qweight=qweight, stats=stats)
