"""The layer-input statistics the calibration-aware techniques need.

For a Linear layer y = W x with W [out, in], the GPTQ / SparseGPT objective
||W X^T - W_hat X^T||^2 over the n calibration tokens x_k (the rows of X
[n, in]) has, per output row, the Hessian

    H = (2/n) * sum_k x_k x_k^T    [in, in], float32 (float64 for float64 inputs)

(the 1/n keeps it on the scale of one token, so damping relative to its mean
diagonal does not depend on how much data was seen). Wanda's per-feature norm
is read off its diagonal: ||X_j||_2^2 = diag(H)_j * n / 2.

`accumulate_hessian` builds H batch by batch; `inverse_hessian_cholesky` is the
damped factorisation GPTQ and SparseGPT both start from, and `factor` the part of
their work that depends on H alone, done once per input under `shared_factors`.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch


def accumulate_hessian(H: torch.Tensor | None, n: int, X: torch.Tensor,
                       left: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fold the tokens X [..., in] into H [in, in] (the mean over n tokens so far) -> (H, n + tokens).

    A running mean, updated in place: H <- H * n / (n + t) + (2 / (n + t)) X^T X,
    so the result is (2 / N) sum x x^T over all N tokens seen, whatever the
    batching. It is kept in float32 (float64 when X is float64): one symmetric
    matmul-accumulate per batch (`add_gram`), which is most of the cost of
    calibration for the widest layers. No randomness, so it is deterministic on a device.

    left [..., in] (same tokens): the cross term (2/N) sum l x^T = (2/N) L^T X instead (asymmetric
    calibration's C, gptq.py).
    """
    X = X.reshape(-1, X.shape[-1])  # [t, in]
    if X.dtype != torch.float64:
        X = X.to(torch.float32)
    t = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
    elif H.shape != (X.shape[1], X.shape[1]):
        raise ValueError(f"H is {tuple(H.shape)} but the inputs have {X.shape[1]} features")
    if t == 0:
        return H, n
    H.mul_(n / (n + t))
    X = X.to(H.dtype)
    if left is None:
        add_gram(H, X, alpha=2.0 / (n + t))
    else:  # [in, in], not symmetric: one whole product
        H.addmm_(left.reshape(X.shape).to(X.dtype).T, X, alpha=2.0 / (n + t))
    return H, n + t


GRAM_BLOCK = 384  # columns per block of add_gram: narrower blocks run below the matmul rate on this CPU


def gram_edges(width: int) -> list[int]:
    """Where add_gram's column blocks start, and `width`: one block under 2 x GRAM_BLOCK columns."""
    blocks = max(1, width // GRAM_BLOCK)
    return [round(i * width / blocks / 32) * 32 for i in range(blocks)] + [width]  # 32-column aligned


def gram_flop(tokens: int, width: int) -> float:
    """The flop `add_gram` spends folding `tokens` inputs of `width` features."""
    edges = gram_edges(width)
    return float(sum(2 * tokens * (b - a) * (width - a) for a, b in zip(edges, edges[1:])))


def add_gram(H: torch.Tensor, X: torch.Tensor, alpha: float) -> None:
    """H [in, in] += alpha X^T X for X [t, in], in place, computing only the blocks on and above the
    diagonal and mirroring the rest: t * in^2 * (1 + 1 / blocks) flop instead of 2 * t * in^2 (in = 2048:
    5 blocks, 40% fewer). The blocks' products round differently from one whole product, so an H of
    more than one block is not bit-equal to `H.addmm_(X.T, X)` (inputs narrower than 2 x GRAM_BLOCK:
    one block, the whole product). Deterministic for a given shape and thread count, as the whole one is."""
    edges = gram_edges(H.shape[0])
    for a, b in zip(edges, edges[1:]):
        H[a:b, a:].addmm_(X[:, a:b].T, X[:, a:], alpha=alpha)  # [b - a, in - a]: the block row from the diagonal
        H[b:, a:b] = H[a:b, b:].T  # the block column under the diagonal, mirrored


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def check_sweep(block_size: int, damp: float, precision: str) -> None:
    """The settings GPTQ and SparseGPT share beyond the grid's."""
    if block_size <= 0:
        raise ValueError(f"block_size: must be > 0, got {block_size}")
    if not damp > 0:
        raise ValueError(f"damp: must be > 0 (a fraction of the mean diagonal of H), got {damp}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def check_hessian(W: torch.Tensor, H: torch.Tensor | None, method: str) -> None:
    """H [in, in] fits W [out, in] and is finite (ValueError / RuntimeError naming `method` otherwise)."""
    if H is None:
        raise ValueError(f"{method} needs calibration statistics: H (the layer's input Hessian) is None")
    out_features, in_features = W.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"{method}: H is {tuple(H.shape)}, expected [{in_features}, {in_features}] for W {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise RuntimeError(f"{method}: H has NaN or infinite entries; the calibration statistics are broken")


def prepared_hessian(H: torch.Tensor, precision: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of H [in, in] in `precision` on `device`, dead inputs handled -> (H, dead [in] bool).

    float32 (GPTQ's and SparseGPT's default, as in the papers' code) halves the
    cost of the factorisation and the sweep; float64 is there for exactness checks.
    A dead input (diag(H) == 0: the feature was 0 on every calibration token)
    cannot be measured: H gets 1 on that diagonal entry so it stays invertible
    (and `prepared_weight` sets its weights to 0: they never contributed on the
    calibration data). The caller's H is not modified.
    """
    H = H.to(device=device, dtype=PRECISIONS[precision]).clone()  # [in, in]
    dead = H.diagonal() == 0  # [in]
    H.diagonal()[dead] = 1
    return H, dead


def prepared_weight(W: torch.Tensor, dead: torch.Tensor, precision: str) -> torch.Tensor:
    """A copy of W [out, in] in `precision`, the dead inputs' columns set to 0."""
    W = W.to(PRECISIONS[precision]).clone()  # [out, in]
    W[:, dead] = 0
    return W


@dataclass(frozen=True)
class Factor:
    """What a sweep takes from H alone: the same for every layer reading the input H belongs to."""

    U: torch.Tensor  # [in, in] upper: inverse_hessian_cholesky's, rows and columns in the sweep's order
    perm: torch.Tensor | None  # [in] sweep position -> column (act-order: by decreasing diag(H)); None: in order
    dead: torch.Tensor  # [in] bool: inputs that were 0 on every calibration token
    damp: float  # the relative damping that made H invertible
    raised: bool  # damp had to be raised above the one asked for


_SHARED: ContextVar[dict | None] = ContextVar("shared_factors", default=None)


@contextlib.contextmanager
def shared_factors():
    """Inside, `factor` computes each H's factor once: q/k/v (and gate/up) read one input, so they are
    handed one H tensor and get its factor from the first of them (the same bits: the same computation
    on the same H). Holds only the last H's factor (the layers of a group come one after another)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def factor(H: torch.Tensor, damp: float, precision: str, act_order: bool, method: str,
           device: torch.device) -> Factor:
    """H [in, in] (checked: check_hessian) -> its Factor, in `precision` on `device`; shared between the
    layers that are handed the same H tensor inside `shared_factors`."""
    shared = _SHARED.get()
    key = (id(H), damp, precision, act_order, device)
    if shared is not None and key in shared:
        return shared[key][1]
    if shared is not None:
        shared.clear()  # the previous input's factor goes before this one is computed
    H_sweep, dead = prepared_hessian(H, precision, device)
    perm = None
    if act_order:
        perm = torch.argsort(H_sweep.diagonal(), descending=True, stable=True)  # [in]: position -> column
        H_sweep = H_sweep[perm]  # (in two steps: two [in, in] copies at once, not three)
        H_sweep = H_sweep[:, perm]
    U, used, raised = inverse_hessian_cholesky(H_sweep, damp, method)
    result = Factor(U, perm, dead, used, raised)
    if shared is not None:
        shared[key] = (H, result)  # H kept alive with its factor, so its id names no other tensor meanwhile
    return result


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, method: str, tries: int = 7) -> tuple[torch.Tensor, float, bool]:
    """H [in, in] -> (U [in, in] upper, in H's dtype; damp used; damp raised).

    U is the upper Cholesky factor of (H + lambda I)^-1, lambda = damp * mean(diag(H)):
    row j of U, divided by U[j, j], is the OBS update direction for column j once
    columns 0..j-1 have been fixed, and U[j, j]^2 is that step's [H^-1]_jj. This is
    what lets GPTQ / SparseGPT process columns in order without re-inverting H.

    H from real inputs is positive semi-definite, but rank deficiency and float
    error can still make the factorisation fail. Then the relative damping is
    multiplied by 10 and the factorisation retried, up to `tries` attempts in all.
    """
    mean_diag = H.diagonal().mean().item()
    if not mean_diag > 0:
        raise RuntimeError(
            f"{method}: the Hessian's mean diagonal is {mean_diag}; H = 2/n sum x x^T cannot have that, "
            "the calibration statistics are broken"
        )
    rel = damp
    for attempt in range(tries):
        Hd = H.clone()
        Hd.diagonal().add_(rel * mean_diag)  # H + lambda I
        L, info = torch.linalg.cholesky_ex(Hd)  # H + lambda I = L L^T
        del Hd  # each intermediate [in, in] goes as soon as the next exists: at most two beside H
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)  # (H + lambda I)^-1
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # Hinv = U^T U
            del Hinv
            if info.item() == 0 and torch.isfinite(U).all():
                return U, rel, attempt > 0
        rel *= 10
    raise RuntimeError(
        f"{method}: the Hessian is not positive definite even with damping {rel / 10:g} x mean(diag(H)) "
        f"(started at {damp:g}, raised x10 {tries - 1} times); the calibration statistics are broken"
    )
