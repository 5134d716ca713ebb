"""RTN and magnitude pruning: the grid, the levels, the exact sparsity patterns."""

import pytest
import torch

from orchestrator.techniques.grid import int_range
from orchestrator.techniques.magnitude import PruneParams, magnitude
from orchestrator.techniques.rtn import QuantizeParams, rtn


def random_weight(out_f=64, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_uses_at_most_2_pow_bits_levels_per_group(bits, group_size, symmetric):
    W = random_weight()
    r = rtn(W, QuantizeParams(bits=bits, group_size=group_size, symmetric=symmetric))
    g = W.shape[1] if group_size == -1 else group_size
    groups = r.weight.reshape(W.shape[0], -1, g)
    for row in groups.flatten(0, 1):
        assert row.unique().numel() <= 2**bits
    qmin, qmax = int_range(bits)
    assert r.qweight.min() >= qmin and r.qweight.max() <= qmax
    # the integers and scales reproduce the weight exactly
    rebuilt = (r.qweight.reshape(W.shape[0], -1, g) - r.quant.zero[..., None]) * r.quant.scale[..., None]
    assert torch.equal(rebuilt.reshape(W.shape), r.weight)
    # and it is close to the original: the error is bounded by half a step
    step = r.quant.scale.repeat_interleave(g, dim=1)
    assert ((r.weight - W).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_round_trips_exactly_on_grid_values(bits):
    """Values on an asymmetric grid (both extremes present) come back bit for bit.

    (The symmetric grid, absmax / ((2^b - 1) / 2) as in GPTQ and compressed-tensors,
    clips the positive extreme by half a step by design, so it has no such fixed point.)
    """
    qmin, qmax = int_range(bits)
    g = torch.Generator().manual_seed(1)
    out_f, in_f, group = 8, 64, 32
    scale = 2.0 ** torch.randint(-6, 0, (out_f, in_f // group), generator=g).float()  # exact in float
    zero = torch.randint(qmin + 1, qmax, scale.shape, generator=g).to(torch.int32)
    q = torch.randint(qmin, qmax + 1, (out_f, in_f // group, group), generator=g)
    q[..., 0], q[..., 1] = qmin, qmax
    W = ((q - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)
    r = rtn(W, QuantizeParams(bits=bits, group_size=group, symmetric=False))
    assert torch.equal(r.weight, W)
    again = rtn(r.weight, QuantizeParams(bits=bits, group_size=group, symmetric=False))
    assert torch.equal(again.weight, r.weight)


def test_rtn_symmetric_grid_is_the_standard_one():
    """absmax maps to the ends of [-2^(b-1), 2^(b-1) - 1]: -absmax exactly, +absmax clipped by half a step."""
    W = torch.tensor([[-7.0, 0.0, 1.0, 7.0]])
    r = rtn(W, QuantizeParams(bits=4, group_size=-1, symmetric=True))
    assert r.quant.scale.item() == pytest.approx(7.0 / 7.5)
    assert r.qweight.tolist() == [[-8, 0, 1, 7]]
    assert r.weight[0, 0].item() == pytest.approx(-7.0 * 8 / 7.5)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scales_for_a_16_bit_checkpoint_are_representable_in_it(scale_dtype):
    """A bf16 checkpoint stores bf16 scales: dequantizing with them must give the weights RTN chose."""
    W = torch.randn(16, 256) * 0.02
    r = rtn(W, QuantizeParams(bits=4, group_size=128, scale_dtype=str(scale_dtype).removeprefix("torch.")))
    assert torch.equal(r.quant.scale.to(scale_dtype).float(), r.quant.scale)
    stored = r.weight.to(scale_dtype)
    rebuilt = (r.qweight.reshape(16, 2, 128) - r.quant.zero[..., None]).to(scale_dtype) * r.quant.scale.to(scale_dtype)[..., None]
    assert torch.equal(rebuilt.reshape(16, 256), stored)


def test_rtn_keeps_zeros_zero():
    W = random_weight()
    W[:, ::3] = 0
    for symmetric in (True, False):
        r = rtn(W, QuantizeParams(bits=3, group_size=64, symmetric=symmetric))
        assert (r.weight[:, ::3] == 0).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9])
def test_magnitude_hits_requested_sparsity_exactly(sparsity):
    W = random_weight(48, 128)
    r = magnitude(W, PruneParams(sparsity=sparsity))
    assert int((r.weight == 0).sum()) == round(sparsity * W.numel())
    assert torch.equal(r.mask, r.weight != 0)
    kept, dropped = W.abs()[r.mask], W.abs()[~r.mask]
    if dropped.numel():
        assert dropped.max() <= kept.min()  # it dropped the smallest


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_magnitude_n_m_keeps_exactly_n_per_group(pattern, n, m):
    W = random_weight(32, 128)
    r = magnitude(W, PruneParams(pattern=pattern))
    groups = (r.weight != 0).reshape(32, -1, m)
    assert (groups.sum(-1) == n).all()
    assert abs((r.weight == 0).float().mean().item() - (1 - n / m)) < 1e-9
    # within each group the kept ones are the largest
    Wg, keep = W.abs().reshape(32, -1, m), groups
    assert (Wg.masked_fill(~keep, float("inf")).amin(-1) >= Wg.masked_fill(keep, -1).amax(-1)).all()


def test_magnitude_then_rtn_keeps_the_pattern():
    from orchestrator.recipe import build_recipe
    from orchestrator.worker import compress_layer

    recipe = build_recipe({"model": {"path": "x"}, "stages": [
        {"method": "magnitude", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}]})
    W = random_weight(16, 64)
    W_hat, metrics, _ = compress_layer(W, "layers.0.q_proj", recipe.stages)
    assert ((W_hat != 0).reshape(16, -1, 4).sum(-1) <= 2).all()
    assert metrics.methods == ["magnitude", "rtn"] and metrics.bits == 4
    assert 0 < metrics.relative_error < 1


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_mse_observer_clips_heavy_tails_for_less_error_than_minmax(bits, symmetric):
    """Heavy-tailed weights (a normal over the root of a uniform, as trained LLM weights have outliers):
    searching the clipping ratio lowers the rounding error at every bit width; never a worse group in its
    own norm."""
    from orchestrator.techniques.grid import MSE_NORM, group_view

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g) / torch.rand(64, 256, generator=g).clamp(min=0.05).sqrt()  # heavy tails
    results = {o: rtn(W, QuantizeParams(bits=bits, group_size=64, symmetric=symmetric, observer=o))
               for o in ("minmax", "mse")}
    mse = {o: (r.weight - W).square().mean().item() for o, r in results.items()}
    assert mse["mse"] < 0.95 * mse["minmax"], mse
    per_group = {o: group_view((r.weight - W).abs().pow(MSE_NORM), 64).sum(-1) for o, r in results.items()}
    assert (per_group["mse"] <= per_group["minmax"] + 1e-6).all()
    levels = group_view(results["mse"].qweight, 64)
    lo, hi = int_range(bits)
    assert levels.min() >= lo and levels.max() <= hi


def every_shrink(Wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str):
    """Groups Wg [G, g] -> the grid of each of the MSE observer's shrunk ranges (scale, zero [S, G])."""
    from orchestrator.techniques.grid import MSE_SHRINKS, range_qparams

    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    shrinks = torch.tensor(MSE_SHRINKS)[:, None]  # [S, 1]
    if symmetric:
        return range_qparams(None, torch.maximum(-lo, hi) * shrinks, bits, scale_dtype)
    return range_qparams(lo * shrinks, hi * shrinks, bits, scale_dtype)


@pytest.mark.parametrize("bits, symmetric, scale_dtype", [(3, True, "float32"), (3, False, "float32"),
                                                         (2, False, "bfloat16")])
def test_the_mse_observer_picks_the_shrink_with_the_least_error_in_its_norm(bits, symmetric, scale_dtype):
    """Against a brute force in float64: every group's grid has the least sum |w - w_hat|^MSE_NORM of all
    the shrunk ranges it may choose from (up to float32's rounding of near ties), although the search
    stops early. With bfloat16 scales and a zero point, a narrower range may reach further on one side
    (the zero moves): the search must not stop on the bounds of the next shrink alone (a few of these
    2-bit groups then lose their best grid)."""
    from orchestrator.techniques.grid import MSE_NORM, fit_qparams

    g = torch.Generator().manual_seed(1)
    Wg = torch.randn(4000, 16, generator=g) / torch.rand(4000, 16, generator=g).clamp(min=0.05).sqrt()  # [G, g]
    Wg += torch.randn(4000, 1, generator=g)  # off-centre groups: zero points away from the middle
    scale, zero = fit_qparams(Wg, bits, symmetric, scale_dtype, observer="mse")  # [G] each
    qmin, qmax = int_range(bits)

    def error(s, z):  # [S, G] grids -> [S, G] sums in float64
        q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(qmin, qmax)
        return ((q - z[..., None]) * s[..., None] - Wg).double().abs().pow(MSE_NORM).sum(-1)

    s, z = every_shrink(Wg, bits, symmetric, scale_dtype)
    least = error(s, z.float()).min(0).values  # [G]
    chosen = error(scale[None], zero[None].float())[0]
    assert (chosen <= least * (1 + 1e-5)).all(), (chosen / least).max()


@pytest.mark.parametrize("bits, symmetric, scale_dtype, g", [(2, False, "float32", 64), (4, True, "float32", 128),
                                                          (3, False, "bfloat16", 16), (8, True, "float16", 32)])
def test_the_mse_observer_picks_the_grids_that_pow_over_every_shrink_picks(bits, symmetric, scale_dtype, g):
    """The search scores shrinks with a cheaper norm (exp of log) and only its near-best ones with pow: its
    grids must be, bit for bit, those of pow (grid.rounding_error) over all 80 shrinks, the widest of
    equals, also for groups that are all zero or so small that their errors underflow. (In the 2-bit
    case two groups' least under the cheaper norm is not pow's.)"""
    from orchestrator.techniques.grid import fit_qparams, rounding_error

    gen = torch.Generator().manual_seed(1)
    Wg = torch.randn(20000, g, generator=gen) / torch.rand(20000, g, generator=gen).clamp(min=0.05).sqrt()  # [G, g]
    Wg[0], Wg[1], Wg[2, ::3], Wg[3] = 0, Wg[1] * 1e-18, 0, Wg[3] * 3e-15  # all zero, underflowing errors,
    # pruned weights, errors about the screening floor
    scale, zero = fit_qparams(Wg, bits, symmetric, scale_dtype, observer="mse")

    s, z = every_shrink(Wg, bits, symmetric, scale_dtype)
    error = torch.stack([rounding_error(Wg, s[i], z[i], bits) for i in range(len(s))])  # [S, G]
    widest = error.min(0).indices  # [G]: the first of the least
    columns = torch.arange(len(Wg))
    assert torch.equal(scale, s[widest, columns]) and torch.equal(zero, z[widest, columns])


def test_the_mse_observer_keeps_zeros_and_finite_scales():
    W = random_weight()
    W[:4] = 0  # all-zero groups
    W[10, ::2] = 0
    result = rtn(W, QuantizeParams(bits=4, group_size=32, observer="mse"))
    assert torch.isfinite(result.quant.scale).all() and (result.quant.scale > 0).all()
    assert (result.weight[W == 0] == 0).all()


def test_an_unknown_observer_is_refused():
    with pytest.raises(ValueError, match="observer: must be one of minmax, mse"):
        QuantizeParams(observer="percentile")
