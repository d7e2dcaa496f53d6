"""The float32 error model (gamma.bounds.fp) against torch's float32 kernels.

Observed errors are measured against a float64 reference whose own error
bound is *added* to the observed error, so the check is one-sided in the
model's disfavour.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from gamma import float32
from gamma.bounds import fp
from gamma.errors import UnsupportedOp

EPS64 = 2.0 ** -52
K_TANH = math.sqrt(2 / math.pi)
SEED = 4321
N_POINTS = 1_000_000

# the actual float32 formulas of the reference engine (torch)
TORCH32 = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "exp": torch.exp,
    "reciprocal": torch.reciprocal,
    "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt,
    "square": lambda x: x * x,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
POSITIVE = {"reciprocal", "rsqrt", "sqrt"}


def ref64(fn: str, x: np.ndarray):
    """(value, error bound) of a float64 reference of fn at float32 points x.

    Stable formulas; the error bound accounts for the rounding of the inner
    argument (condition number x^2 for gelu, |w| for gelu_tanh) and 32 ulp
    for the library calls and outer operations.
    """
    if fn == "gelu":
        v = 0.5 * x * sp.erfc(-x / np.sqrt(2.0))
        cond = np.where(x < 0, 4 * x * x, 4.0)          # erfc(|y|) is ill-conditioned
    elif fn == "gelu_tanh":
        w = 2 * K_TANH * (x + 0.044715 * x ** 3)
        v = x * sp.expit(w)
        cond = 8 * np.abs(w) * sp.expit(-w)             # relative condition of sigmoid(w)
    else:
        v = {"silu": lambda t: t * sp.expit(t), "exp": np.exp, "reciprocal": lambda t: 1.0 / t,
             "rsqrt": lambda t: 1.0 / np.sqrt(t), "sqrt": np.sqrt, "square": lambda t: t * t,
             "sigmoid": sp.expit, "tanh": np.tanh}[fn](x)
        cond = 0.0
    return v, EPS64 * (32 + cond) * np.abs(v) + 1e-300


def sample_points(fn: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    """float32 points across magnitudes: 1e-45 .. 1e4, uniform [-20, 20], specials."""
    k = n // 2
    mag = 10 ** rng.uniform(-45, 4, k)
    sign = np.where(rng.random(k) < 0.5, -1.0, 1.0)
    specials = np.array([0.0, 2.0 ** -149, 2.0 ** -126, 2.0 ** -127, 1e-38, 1e-30, 1e-7, 0.5,
                         1.0, 2.0, math.sqrt(2), 3.0, 5.5, 10.0, 13.2, 20.0, 40.0, 87.0,
                         88.5, 100.0, 1e3, 1e4])
    x = np.concatenate([sign * mag, rng.uniform(-20, 20, n - k), specials, -specials])
    x = x.astype(np.float32)
    if fn in POSITIVE:
        x = np.abs(x)
        x = x[x > 0] if fn != "sqrt" else x
    if fn == "exp":
        x = x[x <= 88.5]
    return torch.from_numpy(x)


@pytest.mark.parametrize("fn", sorted(TORCH32))
def test_elementwise_model_covers_torch_float32(fn):
    rng = np.random.default_rng(SEED + sorted(TORCH32).index(fn))
    x32 = sample_points(fn, N_POINTS, rng)
    got = TORCH32[fn](x32).double().numpy()
    xd = x32.double().numpy()
    v, ref_err = ref64(fn, xd)
    observed = np.abs(got - v) + ref_err
    bound = fp.elementwise_error(fn, x32.double(), x32.double()).numpy()
    bad = ~(observed <= bound)
    i = np.nonzero(bad)[0]
    assert i.size == 0, (f"{fn}: {i.size} points over the model, e.g. x={xd[i[0]]!r}: "
                         f"observed {observed[i[0]]:.3g} > bound {bound[i[0]]:.3g}")
    # the model is not vacuous: on ordinary inputs it is within ~100x of what torch does
    ordinary = (np.abs(xd) > 1e-3) & (np.abs(xd) < 20)
    assert (bound[ordinary] <= 1e-5 * (1 + np.abs(v[ordinary]) + np.abs(xd[ordinary]))).all()


@pytest.mark.parametrize("fn", sorted(TORCH32))
def test_elementwise_model_over_intervals(fn):
    """Points inside [l, u] are covered by the bound of the whole interval."""
    rng = np.random.default_rng(SEED + 50 + sorted(TORCH32).index(fn))
    n, k = 2000, 64
    if fn in POSITIVE:
        l = 10 ** rng.uniform(-6, 3, n)
        u = l * (1 + 10 ** rng.uniform(-6, 1, n))
    else:
        c = rng.uniform(-30, 30, n) if fn != "exp" else rng.uniform(-80, 80, n)
        w = 10 ** rng.uniform(-6, 1, n)
        l, u = c - w, c + w
        if fn == "exp":
            u = np.minimum(u, 88.5)
    l = l.astype(np.float32).astype(np.float64)
    u = np.maximum(u.astype(np.float32).astype(np.float64), l)
    t = rng.random((n, k))
    x32 = (l[:, None] + (u - l)[:, None] * t).astype(np.float32)
    x32 = np.clip(x32, l[:, None].astype(np.float32), u[:, None].astype(np.float32))
    got = TORCH32[fn](torch.from_numpy(x32)).double().numpy()
    v, ref_err = ref64(fn, x32.astype(np.float64))
    bound = fp.elementwise_error(fn, torch.tensor(l), torch.tensor(u)).numpy()
    assert (np.abs(got - v) + ref_err <= bound[:, None]).all()


def test_overflow_gives_inf():
    assert fp.elementwise_error("exp", torch.tensor([0.0]), torch.tensor([89.0])).item() == math.inf
    assert torch.isinf(torch.exp(torch.tensor([89.0]))).all()
    assert fp.elementwise_error("square", torch.tensor([-2e19]), torch.tensor([0.0])).item() == math.inf
    assert fp.elementwise_error("reciprocal", torch.tensor([1e-39]), torch.tensor([1.0])).item() == math.inf
    assert math.isfinite(fp.elementwise_error("reciprocal", torch.tensor([1e-30]), torch.tensor([1.0])).item())
    with pytest.raises(UnsupportedOp):
        fp.elementwise_error("softplus", torch.tensor([0.0]), torch.tensor([1.0]))


def test_floor_and_shapes():
    e = fp.elementwise_error("gelu", torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert e.shape == (2, 3) and e.dtype == torch.float64
    assert (e >= 2.0 ** -126).all()


# ---------------------------------------------------------------- dot products
def test_gamma():
    assert fp.gamma(1) == pytest.approx(2.0 ** -24, rel=1e-6)
    assert fp.gamma(2 ** 24) == math.inf
    g = fp.gamma(torch.tensor([16, 2 ** 25]))
    assert g[0].item() == pytest.approx(16 * 2.0 ** -24, rel=1e-6) and g[1].item() == math.inf


def test_dot_error_formula():
    n = 100
    e = fp.dot_error(torch.tensor([0.0, 1.0, 3.5e38]), n)
    assert e[0].item() >= n * 2.0 ** -149
    assert e[1].item() >= n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    assert e[2].item() == math.inf
    assert fp.dot_error(torch.tensor(1.0), 2 ** 24).item() == math.inf


def _mixed(rng, shape):
    """Random float32 values of mixed sign and magnitude (1e-3 .. 1e3)."""
    return (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3, shape)).astype(np.float32)


@pytest.mark.parametrize("n", [16, 64, 257, 1024, 4096])
def test_dot_error_covers_matmul_and_sum(n):
    rng = np.random.default_rng(SEED + n)
    a, b = _mixed(rng, (64, n)), _mixed(rng, (n, 48))
    # cancellation-heavy rows: a row paired with its negated copy
    a[1, : n // 2] = -a[0, : n // 2]
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    prod_abs = np.abs(ad) @ np.abs(bd)                       # sum |a_i b_i|
    gamma64 = n * EPS64 / (1 - n * EPS64)                    # error of the float64 reference
    checks = []
    got = (torch.from_numpy(a) @ torch.from_numpy(b)).double().numpy()
    checks.append((got, ad @ bd, prod_abs))
    got = (torch.from_numpy(a)[:, :, None] * torch.from_numpy(b)[None]).sum(1).double().numpy()
    checks.append((got, ad @ bd, prod_abs))
    got = torch.from_numpy(a).sum(1).double().numpy()
    checks.append((got, ad.sum(1), np.abs(ad).sum(1)))
    x, y = torch.from_numpy(a[0]), torch.from_numpy(b[:, 0])
    checks.append((np.array([torch.dot(x, y).item()]), np.array([ad[0] @ bd[:, 0]]),
                   np.array([np.abs(ad[0]) @ np.abs(bd[:, 0])])))
    for got, ref, abs_sum in checks:
        bound = fp.dot_error(torch.tensor(abs_sum), n).numpy()
        observed = np.abs(got - ref) + 2 * gamma64 * abs_sum
        assert (observed <= bound).all()
        # not vacuous: observed errors are a sizeable fraction of sqrt(n) u |.|
        assert (bound <= 2 * n * 2.0 ** -24 * abs_sum + 1e-30).all()


def test_dot_error_tiny_values_underflow():
    rng = np.random.default_rng(SEED)
    a = (rng.standard_normal(512) * 1e-23).astype(np.float32)
    b = (rng.standard_normal(512) * 1e-23).astype(np.float32)
    got = torch.dot(torch.from_numpy(a), torch.from_numpy(b)).item()
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    ref, abs_sum = ad @ bd, np.abs(ad) @ np.abs(bd)
    assert abs(got - ref) <= fp.dot_error(torch.tensor(abs_sum), 512).item()


# ------------------------------------------------------------------ float32 products with upward rounding
def _exact_rational_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    from fractions import Fraction
    return float(sum(Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a.tolist(), b.tolist())))


@pytest.mark.parametrize("float32_weights", [True, False])
@pytest.mark.parametrize("n", [1, 7, 384, 1536])
def test_abs_matmul_upper_is_an_upper_bound_and_tight(n, float32_weights):
    """Against the exact (rational) value: float32 weights take the float32
    product, others the float64 one; both are upper bounds within
    2 gamma_n + 2^-21 relative (plus the underflow allowance)."""
    g = torch.Generator().manual_seed(n)
    a = torch.rand(4, n, generator=g, dtype=torch.float64) * 3
    a[0] = a[0] * 1e-40                                  # float32 subnormal range
    a[1, : n // 2] = 0.0
    w = torch.randn(5, n, generator=g, dtype=torch.float64)
    w[1] = w[1] * 1e-30
    w[2] = w[2].to(torch.float16).to(torch.float64)
    if float32_weights:
        w = w.to(torch.float32).to(torch.float64)        # as weights read from a checkpoint are
    up = fp.abs_matmul_upper(a, w)
    assert float32._EXACT32[id(w)][0] is float32_weights
    for i in range(4):
        for j in range(5):
            exact = _exact_rational_dot(a[i], w[j].abs())
            assert float(up[i, j]) >= exact
            assert float(up[i, j]) <= exact * (1 + 2 * fp.gamma(n) + 2 ** -21) + (n + 1) * 2.0 ** -148


def test_matmul_upper_batched_and_overflow():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 6, 16, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 16, 5, generator=g, dtype=torch.float64)
    up = fp.matmul_upper(a, b)
    ref = a @ b
    assert up.shape == ref.shape and torch.all(up >= ref) and torch.all(up <= ref * (1 + 1e-5))
    a[0, 0, 0, 0] = 1e39                                  # beyond float32: the bound is inf, never wrong
    assert math.isinf(float(fp.matmul_upper(a, b)[0, 0, 0, 0]))
    w32 = b[0, 0].T.to(torch.float32).to(torch.float64)
    assert math.isinf(float(fp.abs_matmul_upper(a[0, 0], w32)[0, 0]))


def test_float32_products_fall_back_when_matmuls_may_use_tf32():
    a = torch.rand(3, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        w = w.to(torch.float32).to(torch.float64)
        up, ref = fp.abs_matmul_upper(a, w), a @ w.abs().T
        assert torch.all(up >= ref) and torch.allclose(up, ref, rtol=1e-14, atol=0)    # the float64 path
    finally:
        torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------ CROWN transposes as float32 products
def _exact_transpose_gap(lam: torch.Tensor, w: torch.Tensor, L: torch.Tensor, r: torch.Tensor) -> list:
    """Per row s, exactly: sum_j |(lam W)_sj - L_sj| r_j (Fractions)."""
    from fractions import Fraction
    F_ = lambda v: Fraction(float(v))
    out = []
    for s in range(lam.shape[0]):
        tot = Fraction(0)
        for j in range(w.shape[1]):
            exact = sum(F_(lam[s, k]) * F_(w[k, j]) for k in range(w.shape[0]))
            tot += abs(exact - F_(L[s, j])) * F_(r[j])
        out.append(tot)
    return out


@pytest.mark.parametrize("out", [3, 96])
def test_cotangent_product_error_is_covered_exactly(out):
    """``(lam W - L) . (x - x0) >= -|lam| . err - floor`` on the box, checked
    with exact rationals, for cotangents over 60 decades (float32 subnormals
    and rounding of every entry), cancelling weights and a subnormal radius."""
    from fractions import Fraction
    g = torch.Generator().manual_seed(out)
    n_in = 5
    w = (torch.randn(out, n_in, generator=g, dtype=torch.float64)).to(torch.float32).to(torch.float64)
    w[:, 1] = w[:, 0]                                       # equal columns: cancellations in lam W
    lam = torch.randn(6, out, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(6, 1, generator=g) * 60 - 45)
    lam[2, ::2] = -lam[2, 1::2][: lam[2, ::2].numel()] if out > 3 else lam[2, ::2]
    xl = torch.randn(n_in, generator=g, dtype=torch.float64)
    xu = xl + torch.tensor([1e-3, 0.5, 0.0, 1e-40, 2.0], dtype=torch.float64)
    p = fp.CotangentProduct.build(w, torch.ones(out, dtype=torch.float64), xl, xu)
    assert p is not None and p.w32.dtype == torch.float32
    L = p.product(lam)
    assert L.dtype == torch.float64 and torch.isfinite(L).all()
    r = torch.maximum(xu - p.x0, p.x0 - xl)
    gaps = _exact_transpose_gap(lam, w, L, r)
    charged = (lam.abs() @ p.err) + p.floor
    for s in range(lam.shape[0]):
        assert gaps[s] <= Fraction(float(charged[s])), s
    # the allowance is the float32 error, not a large multiple of the terms themselves
    assert torch.all(p.err <= (fp.gamma(out + 1) * 1.01) * (w.abs() @ r) + 1e-300)


def test_cotangent_product_needs_float32_weights_and_finite_inputs():
    w = torch.randn(4, 3, dtype=torch.float64)
    xl, xu = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert fp.CotangentProduct.build(w, None, xl, xu) is None                 # not float32-valued
    w32 = w.to(torch.float32).to(torch.float64)
    assert fp.CotangentProduct.build(w32, None, xl, xu) is not None
    xu[1] = math.inf
    assert fp.CotangentProduct.build(w32, None, xl, xu) is None               # unbounded input
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert fp.CotangentProduct.build(w32, None, xl, torch.ones(3, dtype=torch.float64)) is None
    finally:
        torch.set_float32_matmul_precision(old)


def test_crown_linear_rule_falls_back_to_float64_on_overflow():
    """A cotangent beyond float32's range makes the float32 product inf/NaN;
    the rule then returns the float64 product and its constant."""
    from gamma.bounds import crown, crown_rules, rows
    from gamma.bounds.interval import Interval
    from gamma.graph import Graph
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    gr = Graph("t", "x", (2, 3))
    gr.add("y", "linear", "x", weight=w, bias=b)
    gr.infer_shapes()
    x = Interval(-torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    ctx = crown.Context(gr, {"x": x}, {"y": None})
    node = gr["y"]
    lam = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    (lin,), odd, even = crown_rules.apply(node, lam, ctx)
    assert not torch.equal(lin, lam @ w) and torch.allclose(lin, lam @ w, rtol=1e-5)     # the float32 path
    assert torch.allclose(odd, crown_rules._dot(lam, b.expand(2, 4)), rtol=1e-5, atol=1e-6)
    assert 0 < even == ctx.linear_product(node).floor < 1e-30
    lam[1, 0, 2] = 1e300
    (lin,), odd, even = crown_rules.apply(node, lam, ctx)
    assert torch.equal(lin, lam @ w) and torch.isfinite(odd).all() and even is None      # float64
    assert torch.equal(odd, crown_rules._dot(lam, b))
    # the compact rule does the same
    r = rows.Rows(lam[:, :1], torch.tensor([0, 1, 1]), 2)
    (lin_r,), odd_r, even_r = crown_rules.apply(node, r, ctx)
    assert torch.equal(lin_r.t, lam[:, :1] @ w) and torch.isfinite(odd_r).all() and even_r is None
    # the walk charges the product's error at the node (on top of its float32 margin)
    assert torch.equal(ctx.margin(node), ctx.linear_product(node).err)


# ------------------------------------------------------------------ IBP of a linear layer from float32 products
def _exact_linear_range(c, r, w):
    """Per (row t, output i), exactly: W c, |W| r and |W| (|c| + r) (Fractions)."""
    from fractions import Fraction
    F_ = lambda v: Fraction(float(v))
    out = []
    for t in range(c.shape[0]):
        row = []
        for i in range(w.shape[0]):
            wc = sum(F_(w[i, j]) * F_(c[t, j]) for j in range(w.shape[1]))
            wr = sum(abs(F_(w[i, j])) * F_(r[t, j]) for j in range(w.shape[1]))
            wa = sum(abs(F_(w[i, j])) * (abs(F_(c[t, j])) + F_(r[t, j])) for j in range(w.shape[1]))
            row.append((wc, wr, wa))
        out.append(row)
    return out


def _linear_case(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, n, generator=g, dtype=torch.float64).to(torch.float32)
    w[1, 1:] = -w[1, : n - 1] if n > 1 else w[1]           # cancelling weights
    w[2] = w[2] * 1e-30
    c = torch.randn(5, n, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(5, 1, generator=g) * 8 - 4)
    c[0] = c[0] * 1e-42                                     # below float32's normal range
    c[1] = c[1] * 1e30
    r = torch.rand(5, n, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(5, 1, generator=g) * 10 - 8)
    r[2] = 0.0
    r[3, ::2] = 1e-45
    return c, r, w


@pytest.mark.parametrize("registered", [True, False])
@pytest.mark.parametrize("n", [1, 9, 200])
def test_linear_image_contains_the_exact_range(n, registered):
    """``p +- rad`` contains ``W c +- |W| r`` exactly (Fractions) and ``sums``
    bounds ``|W| (|c| + r)``, for centres that are not float32 values, over
    80 decades, subnormal, cancelling and zero weights; the extra allowance is
    the float32 centre's rounding, about ``gamma_n |W| |c|``."""
    from fractions import Fraction
    c, r, w32 = _linear_case(n, n)
    w = w32.to(torch.float64)
    if registered:
        float32.register_f32(w, w32)
        assert float32.weight32(w) is w32
    p, rad, sums = fp.linear_image(c, r, w)
    assert p.dtype == rad.dtype == sums.dtype == torch.float64
    assert torch.isfinite(p).all() and torch.isfinite(rad).all()
    exact = _exact_linear_range(c, r, w)
    g = fp.gamma(n)
    for t in range(c.shape[0]):
        for i in range(w.shape[0]):
            wc, wr, wa = exact[t][i]
            lo, hi = Fraction(float(p[t, i] - rad[t, i])), Fraction(float(p[t, i] + rad[t, i]))
            assert lo <= wc - wr and hi >= wc + wr, (t, i)
            assert Fraction(float(sums[t, i])) >= wa, (t, i)
            assert float(rad[t, i]) <= float(wr) * (1 + 2 * g) + 2.1 * g * float(wa) + n * 2.0 ** -140


def test_linear_image_unbounded_and_overflowing_inputs():
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(4, 8, generator=g)
    w = w32.to(torch.float64)
    c = torch.randn(3, 8, generator=g, dtype=torch.float64)
    r = torch.full((3, 8), 0.1, dtype=torch.float64)
    # every input unbounded: every output unbounded, at no product's cost
    p, rad, sums = fp.linear_image(c, torch.full_like(r, math.inf), w)
    assert torch.all(rad == math.inf) and torch.all(sums == math.inf) and torch.all(p == 0)
    # one unbounded entry: only the rows it reaches are unbounded, never NaN
    r2 = r.clone()
    r2[1, 3] = math.inf
    c2 = c.clone()
    c2[1, 3] = math.nan                                     # the centre of (-inf, inf)
    p, rad, sums = fp.linear_image(c2, r2, w)
    assert torch.all(rad[1] == math.inf) and torch.isfinite(rad[[0, 2]]).all()
    assert not torch.isnan(p).any() and not torch.isnan(rad).any() and not torch.isnan(sums).any()
    # a centre beyond float32: the product overflows, the radius must be inf there
    c3 = c.clone()
    c3[2] = 3e38 * torch.sign(w32[0].to(torch.float64))
    p, rad, _ = fp.linear_image(c3, r, w)
    assert math.isinf(float(rad[2, 0])) or float(p[2, 0] - rad[2, 0]) <= float((c3[2] - r[2]) @ w[0].clamp_min(0)
                                                                               + (c3[2] + r[2]) @ w[0].clamp_max(0))


def test_linear_image_chunked_abs_matches_and_the_cache_is_bounded():
    """A weight over the cache budget gets |W| in row chunks (same bounds up to
    float32 rounding, still sound); the cache never holds more than its
    budget, forgets dead weights and weights modified in place."""
    g = torch.Generator().manual_seed(1)
    w32 = torch.randn(40, 16, generator=g)
    w = w32.to(torch.float64)
    c = torch.randn(3, 16, generator=g, dtype=torch.float64)
    r = torch.rand(3, 16, generator=g, dtype=torch.float64) * 1e-2
    whole = fp.linear_image(c, r, w)
    chunked = fp.linear_image(c, r, w, cache=fp.AbsCache(100), chunk=48)   # |W| over the budget: 3 rows at a time
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    lo, hi = chunked[0] - chunked[1], chunked[0] + chunked[1]
    ref_lo, ref_hi = c @ w.T - r @ w.abs().T, c @ w.T + r @ w.abs().T
    assert torch.all(lo <= ref_lo) and torch.all(hi >= ref_hi)
    cache = fp.AbsCache(3000)                                # room for one 16x16 |W| (1 KiB), not three
    ws = [torch.randn(16, 16, generator=g).to(torch.float64) for _ in range(3)]
    for v in ws:
        fp.linear_image(c, r, v, cache=cache)
        assert cache.bytes <= 3000
    assert ws[-1] in cache and ws[0] not in cache
    before = fp.linear_image(c, r, ws[-1], cache=cache)
    ws[-1].mul_(-2.0)                                        # in place: the cached |W| must not be reused
    after = fp.linear_image(c, r, ws[-1], cache=cache)
    assert torch.allclose(after[1] - r @ ws[-1].abs().T, before[1] * 2 - r @ ws[-1].abs().T, rtol=1e-4, atol=1e-9)
    # the centre is a float32 product: within the radius, which also covers that rounding
    assert bool(((after[0] - c @ ws[-1].T).abs() <= after[1] - r @ ws[-1].abs().T).all())
    assert torch.allclose(after[0], c @ ws[-1].T, rtol=1e-5, atol=1e-5)
    keys = set(cache._store)
    assert keys
    del ws, v
    assert not cache._store and cache.bytes == 0 and keys


def test_registered_float32_source_lapses_when_modified():
    w32 = torch.randn(3, 4)
    w = w32.to(torch.float64)
    float32.register_f32(w, w32)
    assert float32.weight32(w) is w32
    w.mul_(2.0)                                              # the float64 copy changed: convert instead
    got = float32.weight32(w)
    assert got is not w32 and torch.equal(got.to(torch.float64), w)
    w.add_(1e-12)                                            # no longer float32-valued: no float32 product
    assert float32.weight32(w) is None and not float32.is_exact32(w)
    w2 = w32.to(torch.float64)
    float32.register_f32(w2, w32)
    w32.mul_(3.0)                                            # the source changed: convert the float64 copy
    assert torch.equal(float32.weight32(w2).to(torch.float64), w2)
