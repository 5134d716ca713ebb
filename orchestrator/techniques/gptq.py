"""GPTQ: weight quantization that corrects the rounding error with the layer's inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022). Per output row, minimise
||w X^T - q X^T||^2 = (w - q) H (w - q)^T / 2 (H from hessian.py): quantize the
columns one after another and, after each, spread its rounding error over the
columns not yet quantized with the optimal (OBS) update

    err = (w_j - q_j) / [H_F^-1]_jj,    w_F -= err * [H_F^-1]_{j,F}

where F are the columns still free. Every row shares the same H, so the update
is one outer product per column. Three tricks of the paper make it fast and
stable, all used here:
- the rows of the upper Cholesky factor U of H^-1 are exactly the updates above
  (row j of U divided by U_jj), so H^-1 is never re-derived column by column;
- lazy batches: W is updated once per block of `block_size` columns, with one
  matmul; inside the block, each column gets the updates of the block's earlier
  columns just before it is quantized (one matrix-vector product);
- damping: lambda = damp * mean(diag(H)) is added to diag(H) before inverting.

Grid parameters (grid.py's signed integers, so export can pack them as is):
- group_size == -1 or act_order=False: a group's scale / zero are fitted when
  the sweep reaches the group's first column, on the weights as updated so far
  (the whole group sees every update from the columns before it, also when the
  group extends past the current block: the pending lazy update is applied to
  a copy first, so the result does not depend on block_size);
- act_order=True: columns are processed by decreasing diag(H), and every
  group's scale / zero are fitted on the original W before any update ("static
  groups"): column c stays in group c // group_size, so the export needs no
  g_idx. With group_size == -1 this is the same as the first rule.

Asymmetric calibration (GPTAQ: Li et al., "GPTQv2: Efficient Finetuning-Free
Quantization with Asymmetric Calibration", 2025), `asymmetric: alpha > 0`: in
sequential calibration a layer's inputs x~ come from the blocks already
compressed, while the dense model saw x. The objective becomes
sum ||W x - Q x~||^2: match the dense layer's outputs from the compressed
model's inputs. With H~ = (2/n) sum x~ x~^T and C = (2/n) sum (x - x~) x~^T,
completing the square gives

    sum ||W x - Q x~||^2 = (W* - Q) H~ (W* - Q)^T + const,   W* = W + W C H~^-1

so it is GPTQ with H~ on the target W* (the least-squares map from x~ to the
dense outputs). alpha scales the correction, W* = W + alpha W C H~^-1, since
the full step fits the calibration tokens' differences too closely (GPTAQ's own
code uses 0.25); H~ is damped as in the sweep.

The arithmetic runs in `precision` (float32 by default, as the paper's code;
float64 on request); the scales are float32, as stored, and the weights are
quantized against exactly those scales, so
dequantize(qweight, scale, zero) reproduces `weight` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.techniques.grid import QuantParams, dequantize, fit_qparams, group_view, int_range
from orchestrator.techniques.hessian import check_hessian, check_sweep, factor, prepared_hessian, prepared_weight
from orchestrator.techniques.registry import register
from orchestrator.techniques.result import LayerResult
from orchestrator.techniques.rtn import QuantizeParams


@dataclass
class GPTQParams(QuantizeParams):
    """QuantizeParams' grid (bits, group_size, symmetric) plus GPTQ's own settings."""

    block_size: int = 128  # columns per lazy batch
    damp: float = 0.01  # added to diag(H), as a fraction of its mean
    act_order: bool = True  # process columns by decreasing diag(H)
    asymmetric: float = 0.0  # > 0: GPTAQ's target shift with this weight (needs partition.calibration: sequential)
    observer: str = "mse"  # as rtn's, here "mse" by default (measured on SmolLM2: see the README)
    precision: str = "float32"  # of the factorisation and the sweep: float32 | float64

    def __post_init__(self):
        super().__post_init__()
        check_sweep(self.block_size, self.damp, self.precision)
        if not 0 <= self.asymmetric <= 1:
            raise ValueError(f"asymmetric: must be in [0, 1] (the weight of the asymmetric target), got {self.asymmetric}")


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """W [out, in], H~ [in, in], C [in, in] -> W* = W + alpha W C (H~ + lambda I)^-1 (see the module docstring)."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())  # H~ + lambda I, symmetric positive definite
    L = torch.linalg.cholesky(Hd)
    shift = torch.cholesky_solve((W @ C).T, L).T  # (W C) (H~ + lambda I)^-1, [out, in]
    return W + alpha * shift


def group_width(in_features: int, group_size: int) -> int:
    """Columns per quantization group: in_features for -1 (per channel)."""
    g = in_features if group_size == -1 else group_size
    if in_features % g:
        raise ValueError(f"group_size {group_size} does not divide the layer's {in_features} input features")
    return g


def updated_columns(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, i1: int, i2: int,
                    start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of W with every update so far applied -> [out, stop - start].

    W holds every column as it was when the current block [i1, i2) began (the
    lazy update of earlier blocks applied); Err1 [B, out] the scaled errors of
    the block's columns processed so far (the rest are 0, so they add nothing).
    Column c's pending update is -sum_i Err1[i] U[i1 + i, c].
    """
    return W[:, start:stop] - Err1.T @ U[i1:i2, start:stop]


def dequantize_groups(qweight: torch.Tensor, quant: QuantParams) -> torch.Tensor:
    """qweight [out, in] int32 -> [out, in] in the scales' dtype (float32)."""
    q = group_view(qweight, quant.group_size)  # [out, n_groups, g]
    return dequantize(q, quant.scale[..., None], quant.zero[..., None]).reshape(qweight.shape)


def initial_grid(W: torch.Tensor, g: int, p, fit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (scale, zero), [out, in // g] each: fitted on W as it is (fit), or placeholders
    (scale 1, zero 0) that the sweep fits group by group as it reaches them."""
    if fit:
        return fit_qparams(group_view(W, g).float(), p.bits, p.symmetric, p.scale_dtype, p.observer)
    n_groups = W.shape[1] // g
    return (torch.ones(W.shape[0], n_groups, dtype=torch.float32, device=W.device),
            torch.zeros(W.shape[0], n_groups, dtype=torch.int32, device=W.device))


@register("gptq", "quantize", GPTQParams, needs_calibration=True)
def gptq(W: torch.Tensor, p: GPTQParams, H: torch.Tensor | None, C: torch.Tensor | None = None) -> LayerResult:
    """W [out, in] float32, H [in, in] -> W quantized on the grid with GPTQ's error feedback; C [in, in] the
    asymmetric cross term (used when p.asymmetric > 0; None: the layer had no dense inputs, plain GPTQ).

    stats: damp (the relative damping that made H invertible), damp_raised (it
    had to be raised above p.damp), loss (the paper's sum over columns of
    (w - q)^2 / [H_F^-1]_jj / 2: the objective (W - W_hat) H (W - W_hat)^T / 2
    summed over rows, with H damped, i.e. the mean over calibration tokens of
    ||(W - W_hat) x||^2 plus the damping term), dead_columns (inputs that were 0
    on every calibration token; their weights are set to 0).
    """
    out_features, in_features = W.shape
    g = group_width(in_features, p.group_size)
    check_hessian(W, H, "gptq")
    if p.asymmetric > 0 and C is not None:  # before the factor, so as not to hold it too; dead columns stay 0
        H_target, dead = prepared_hessian(H, p.precision, W.device)
        W = asymmetric_target(prepared_weight(W, dead, p.precision), H_target, C.to(W.dtype), p.asymmetric, p.damp)
        del H_target
    f = factor(H, p.damp, p.precision, p.act_order, "gptq", W.device)  # shared by the layers reading this input
    W = prepared_weight(W, f.dead, p.precision)  # a copy in p.precision, dead inputs zeroed

    static = p.act_order  # fit every group up front, on W before any update
    scale, zero = initial_grid(W, g, p, static)  # [out, n_groups] each
    perm, U = f.perm, f.U  # U [in, in] upper, in the sweep's (perm's) order
    if perm is not None:
        W = W[:, perm]
    column = perm.tolist() if perm is not None else list(range(in_features))  # position -> original column

    qweight = torch.zeros(out_features, in_features, dtype=torch.int32, device=W.device)  # by position
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    qmin, qmax = int_range(p.bits)
    grid = scale.to(W.dtype), zero.to(W.dtype)  # the same reals and integers, in W's dtype
    for i1 in range(0, in_features, p.block_size):
        i2 = min(i1 + p.block_size, in_features)
        Err1 = torch.zeros(i2 - i1, out_features, dtype=W.dtype, device=W.device)  # [B, out] scaled errors
        Q1 = torch.empty(i2 - i1, out_features, dtype=W.dtype, device=W.device)  # [B, out] the integers, as reals
        U1 = U[i1:i2, i1:i2]  # [B, B]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:  # first column of a group: fit it as it is now
                cols = updated_columns(W, Err1, U, i1, i2, j, j + g)  # [out, g]
                scale[:, j // g], zero[:, j // g] = fit_qparams(cols.float(), p.bits, p.symmetric, p.scale_dtype,
                                                                p.observer)
                grid = scale.to(W.dtype), zero.to(W.dtype)
            k = column[j] // g  # the column's group (its original index, also under act_order)
            s, z = grid[0][:, k], grid[1][:, k]  # [out] each
            w = W[:, j] - U1[:i, i] @ Err1[:i]  # [out] column j with the OBS updates of the block's columns before it
            Q1[i] = q = torch.round(w / s).add_(z).clamp_(qmin, qmax)  # [out] grid.quantize's integers, as reals
            torch.div(w.sub_(q.sub_(z).mul_(s)), U1[i, i], out=Err1[i])  # [out] (w - dequantized) / U_jj
        qweight[:, i1:i2] = Q1.T.to(torch.int32)
        loss += Err1.square().sum(dim=1, dtype=torch.float64).sum() / 2
        W[:, i2:] -= Err1.T @ U[i1:i2, i2:]  # the lazy update of everything after the block

    if perm is not None:
        qweight = qweight[:, torch.argsort(perm)]  # back to the original column order
    quant = QuantParams(scale, zero, p.bits, g, p.symmetric)
    return LayerResult(
        weight=dequantize_groups(qweight, quant), quant=quant, qweight=qweight,
        stats={"damp": f.damp, "damp_raised": f.raised, "loss": loss.item(), "dead_columns": int(f.dead.sum())},
    )
