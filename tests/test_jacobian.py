"""The linear forms of LayerNorm / RMSNorm that CROWN and zonotopes use
(gamma/bounds/norm.py, softmax.py, linearization.py):

* the decomposed relaxation (formula ``w (c s) + b`` relaxed step by step)
  and the per-row choice between it and the mean-value form contain
  ``f(x)`` for every x in the box: samples + PGD on the remainder, zero
  violations, from tiny to wide boxes and with a massive activation;
* the one-slope line of ``(q + eps)^-1/2`` holds on a dense grid;
* as the box shrinks the decomposed slopes tend to the exact Jacobian
  (autograd) and ``jvp`` / ``vjp`` are transposes of each other;
* the decomposed remainder is smaller than the mean-value one at wide boxes
  (the measured gap that made CROWN 11x looser than auto_LiRPA at eps 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds
from gamma.bounds.interval import Interval
from gamma.bounds.jacobian import linearize
from gamma.bounds.norm import _inv_sqrt_line, _norm_decomposed, _norm_mv
from gamma.graph import Graph
from gamma.ops import evaluate

from soundness import violations

GEN = torch.Generator()            # reseeded before every test (below)


@pytest.fixture(autouse=True)
def _seed_per_test(test_seed):
    """Each test draws its own values, whichever tests ran before it."""
    GEN.manual_seed(test_seed)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale


def norm_graph(op, d, rows=3, eps=1e-5):
    g = Graph(op, "x", (rows, d))
    kw = dict(weight=rnd(d, scale=0.5) + 1, eps=eps)
    if op == "layernorm":
        kw["bias"] = rnd(d, scale=0.1)
    g.add("y", op, "x", **kw)
    return g.infer_shapes()


# (scale of x0, box radius, d)
BOXES = {"tiny": (1.0, 1e-6, 16), "narrow": (1.0, 1e-3, 16), "medium": (1.0, 1e-2, 64), "wide": (1.0, 0.3, 16),
         "small_scale": (0.01, 0.05, 16), "large": (30.0, 1e-3, 16), "massive": (1.0, 1e-2, 64)}


def _x0(box):
    scale, eps, d = BOXES[box]
    x0 = rnd(3, d, scale=scale)
    if box == "massive":
        x0[:, 3] = 2000.0                               # a massive activation (SmolLM2 reaches 26335)
    return x0, eps


@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_linearization_sound(op, box):
    """f(x) in y0 + J (x - x0) +- err for every x in the box (the form CROWN uses)."""
    x0, eps = _x0(box)
    g = norm_graph(op, x0.shape[-1])
    lin = linearize(g["y"], Interval(x0 - eps, x0 + eps))

    def remainder(xs):
        return evaluate(g, xs) - lin.y0 - lin.jvp(xs - x0)

    bad = violations(remainder, x0, eps, -lin.err, lin.err, targets=torch.arange(48), steps=20)
    assert bad == 0
    assert _row_remainder_violations(remainder, lin.even_at(), x0, eps, lin.err) == 0


@pytest.mark.parametrize("box", ["narrow", "wide", "small_scale", "massive"])
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_decomposed_form_sound_on_its_own(op, box):
    """The decomposed relaxation alone (whatever the per-row choice picks)."""
    x0, eps = _x0(box)
    g = norm_graph(op, x0.shape[-1])
    a, u, v, k, e, rem, _ = _norm_decomposed(g["y"], Interval(x0 - eps, x0 + eps))
    P = (lambda t: t - t.mean(-1, keepdim=True)) if op == "layernorm" else (lambda t: t)

    def remainder(xs):
        c = P(xs)
        return evaluate(g, xs) - (a * c + u * (v * c).sum(-1, keepdim=True) + k)

    bad = violations(remainder, x0, eps, -e, e, targets=torch.arange(48), steps=20)
    assert bad == 0
    assert torch.allclose(rem.elementwise(), e, rtol=1e-12, atol=0)
    assert _row_remainder_violations(remainder, rem.at(), x0, eps, e) == 0


def _cotangents(shape, n=12):
    """Spec rows as CROWN meets them: one-hot, dense of mixed sign (W^T of a
    next linear layer), one-signed, and confined to one row."""
    numel = 1
    for s_ in shape:
        numel *= s_
    lam = rnd(n, numel)
    lam[0].zero_()
    lam[0, 1] = 1.0
    lam[1] = lam[1].abs()
    lam[2].zero_()
    lam[2, :shape[-1]] = rnd(shape[-1])
    return lam.reshape(n, *shape)


def _row_remainder_violations(remainder, even, x0, eps, e) -> int:
    """``lam . remainder(x)`` within ``+- even(lam)`` for every x (samples + PGD
    per cotangent row), and that bound never above the elementwise ``|lam| . e``."""
    lam = _cotangents(x0.shape)
    bound = even(lam)                                              # (S,)
    assert torch.allclose(bound, even(-lam), rtol=1e-14, atol=0)   # even in lam (the shared halves need it)
    assert torch.all(bound <= (lam.abs() * e).reshape(len(lam), -1).sum(1) * (1 + 1e-12))
    assert torch.all(bound >= 0)
    flat = lam.reshape(len(lam), -1)

    def spec(xs):
        return remainder(xs).reshape(len(xs), -1) @ flat.T         # (B, S)

    return violations(spec, x0, eps, -bound, bound, targets=torch.arange(len(lam)), steps=30)


@pytest.mark.parametrize("ql,qu,eps", [(0.0, 4.0, 1e-5), (1.0, 1.0 + 1e-13, 1e-6), (0.5, 0.7, 1e-5),
                                       (1e-8, 1e-3, 1e-6), (100.0, 3000.0, 1e-5), (2.0, 2.0, 1e-5)])
def test_inv_sqrt_line_holds_on_a_grid(ql, qu, eps):
    lo, hi = torch.tensor([[ql]], dtype=torch.float64), torch.tensor([[qu]], dtype=torch.float64)
    beta, k_lo, k_hi = _inv_sqrt_line(lo, hi, eps)
    q = torch.linspace(ql, qu, 20001, dtype=torch.float64)
    g = torch.rsqrt(q + eps) - beta[0, 0] * q
    assert float(g.min()) >= float(k_lo) and float(g.max()) <= float(k_hi)
    assert float(k_hi - k_lo) <= 1.01 * float(g.max() - g.min()) + 1e-12     # tight: the chord and its tangent


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_decomposed_slopes_tend_to_the_jacobian(op):
    d = 8
    g = norm_graph(op, d, rows=1)
    x0 = rnd(1, d)
    a, u, v, _, e, _, _ = _norm_decomposed(g["y"], Interval(x0 - 1e-9, x0 + 1e-9))
    P = torch.eye(d, dtype=torch.float64) - (1.0 / d if op == "layernorm" else 0.0)
    J = (torch.diag(a[0]) + u[0][:, None] * v[0][None, :]) @ P
    exact = torch.autograd.functional.jacobian(lambda t: evaluate(g, t[None])[0], x0[0])
    assert torch.allclose(J, exact, atol=1e-6, rtol=1e-6)
    assert float(e.max()) < 1e-10


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_vjp_is_the_transpose_of_jvp(op):
    g = norm_graph(op, 16, rows=3)
    x0 = rnd(3, 16)
    lin = linearize(g["y"], Interval(x0 - 0.2, x0 + 0.2))
    dx, lam = rnd(5, 3, 16), rnd(5, 3, 16)
    lhs = (lin.vjp(lam) * dx).sum((-1, -2))
    rhs = (lam * lin.jvp(dx)).sum((-1, -2))
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_decomposed_remainder_beats_mean_value_on_wide_boxes(op):
    """Measured at d = 64 (sum of remainders): 1.6-2.9x smaller at eps 1e-3 to
    0.1, 8-17x at eps 0.5; the mean-value remainder sums over the row."""
    g = norm_graph(op, 64, rows=4)
    x0 = rnd(4, 64)
    for eps, factor in [(1e-2, 1.4), (0.1, 2.0), (0.5, 6.0)]:
        x = Interval(x0 - eps, x0 + eps)
        mv = _norm_mv(g["y"], x)[-1].sum()
        dec = _norm_decomposed(g["y"], x)[4].sum()
        assert float(dec) * factor <= float(mv), (eps, float(mv), float(dec))


def test_crown_through_layernorm_sound_and_tighter():
    """linear -> LayerNorm -> linear at eps 0.05: CROWN bounds hold (samples
    + PGD) and are tighter than with the mean-value form alone."""
    d = 32
    g = Graph("ln", "x", (4, d))
    g.add("h", "linear", "x", weight=rnd(d, d, scale=0.3), bias=rnd(d, scale=0.1))
    g.add("n", "layernorm", "h", weight=rnd(d, scale=0.3) + 1, bias=rnd(d, scale=0.1), eps=1e-5)
    g.add("y", "linear", "n", weight=rnd(8, d, scale=0.3))
    g.infer_shapes()
    x0, eps = rnd(4, d), 0.05
    res = compute_bounds(g, x0, eps, "crown")
    assert violations(lambda xs: evaluate(g, xs), x0, eps, res.lower, res.upper, targets=torch.arange(32)) == 0
    mv = compute_bounds(g, x0, eps, "crown", tunings=Tunings(norm_decomposed=False))
    assert float((res.upper - res.lower).mean()) < 0.9 * float((mv.upper - mv.lower).mean())


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.3])
def test_mean_value_remainder_lower_bound(op, scale):
    """The O(d) estimate that lets the norm skip the d x d mean-value remainder
    never exceeds that remainder's row sum (so it never hides a tighter form)."""
    from gamma.bounds.norm import _norm_mv_diagonal
    gen = torch.Generator().manual_seed(11)
    d = 48
    g = Graph(op, "x", (6, d))
    kw = dict(weight=torch.randn(d, generator=gen, dtype=torch.float64) * 0.3 + 1, eps=1e-5)
    if op == "layernorm":
        kw["bias"] = torch.randn(d, generator=gen, dtype=torch.float64) * 0.1
    g.add("y", op, "x", **kw)
    g.infer_shapes()
    x0 = torch.randn(6, d, generator=gen, dtype=torch.float64) + 0.5
    r = torch.rand(6, d, generator=gen, dtype=torch.float64) * scale
    x = Interval(x0 - r, x0 + r)
    lb = _norm_mv_diagonal(g["y"], x)
    full = _norm_mv(g["y"], x)[4].sum(-1, keepdim=True)
    assert torch.all(lb <= full) and torch.all(lb >= 0.2 * full)


# ---------------------------------------------------------------- softmax, decomposed
SOFTMAX_BOXES = {"tiny": (2.0, 1e-6), "narrow": (2.0, 1e-3), "medium": (3.0, 1e-2), "wide": (2.0, 0.5),
                 "very_wide": (1.0, 3.0), "peaked": (20.0, 0.05)}


def softmax_graph(T=6, causal=False):
    g = Graph("softmax", "x", (2, T, T))
    kw = {"mask": torch.tril(torch.ones(T, T, dtype=torch.bool))} if causal else {}
    g.add("y", "softmax", "x", **kw)
    return g.infer_shapes()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("box", list(SOFTMAX_BOXES))
def test_softmax_decomposed_form_sound_on_its_own(box, causal):
    """``softmax(x) in a*x + u (v . x) + k +- e`` on the box: samples + PGD."""
    from gamma.bounds.softmax import _softmax_decomposed
    scale, eps = SOFTMAX_BOXES[box]
    g = softmax_graph(causal=causal)
    x0 = rnd(2, 6, 6, scale=scale)
    a, u, v, k, e, rem = _softmax_decomposed(g["y"], Interval(x0 - eps, x0 + eps))
    assert torch.isfinite(e).all() and torch.all(e >= 0)
    if causal:
        masked = ~g["y"].params["mask"].expand(x0.shape)
        assert torch.all(a[masked] == 0) and torch.all(v[masked] == 0) and torch.all(e[masked] == 0)

    def remainder(xs):
        return evaluate(g, xs) - (a * xs + u * (v * xs).sum(-1, keepdim=True) + k)

    assert violations(remainder, x0, eps, -e, e, targets=torch.arange(72), steps=20) == 0
    assert torch.allclose(rem.elementwise(), e, rtol=1e-12, atol=1e-300)
    assert _row_remainder_violations(remainder, rem.at(), x0, eps, e) == 0


@pytest.mark.parametrize("box", list(SOFTMAX_BOXES))
def test_softmax_linearization_sound(box):
    """The per-row choice (mean value or decomposed) as CROWN uses it:
    ``y0 + J (x - x0) +- err``, and the vjp is the transpose of the jvp."""
    scale, eps = SOFTMAX_BOXES[box]
    g = softmax_graph(causal=True)
    x0 = rnd(2, 6, 6, scale=scale)
    lin = linearize(g["y"], Interval(x0 - eps, x0 + eps))

    def remainder(xs):
        return evaluate(g, xs) - lin.y0 - lin.jvp(xs - x0)

    assert violations(remainder, x0, eps, -lin.err, lin.err, targets=torch.arange(72), steps=20) == 0
    assert _row_remainder_violations(remainder, lin.even_at(), x0, eps, lin.err) == 0
    dx, lam = rnd(2, 6, 6), rnd(2, 6, 6)
    assert torch.allclose((lam * lin.jvp(dx)).sum(), (lin.vjp(lam) * dx).sum(), rtol=1e-12)


@pytest.mark.parametrize("lo,hi", [(-3.0, 1.0), (0.5, 0.5 + 1e-12), (-40.0, -39.0), (-700.0, 0.0), (2.0, 2.0)])
def test_convex_intercepts_hold_on_a_grid(lo, hi):
    """exp (shifted) and 1/z: the line ``beta x + [k_lo, k_hi]`` contains f on a dense grid, tightly."""
    from gamma.bounds.linearization import convex_intercepts
    l, u = torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64)
    f = torch.exp
    beta = (f(u) - f(l)) / (u - l) if hi > lo else f(l)
    k_lo, k_hi = convex_intercepts(f, f, l, u, beta, torch.log(beta))
    xs = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    gx = f(xs) - beta * xs
    assert float(gx.min()) >= float(k_lo) and float(gx.max()) <= float(k_hi)
    assert float(k_hi - k_lo) <= 1.01 * float(gx.max() - gx.min()) + 1e-12
    zl, zu = l.exp() + 0.5, u.exp() + 0.5                 # 1/z on z > 0
    g = (1 / zu - 1 / zl) / (zu - zl) if float(zu) > float(zl) else -1 / zl ** 2
    k_lo, k_hi = convex_intercepts(lambda z: 1 / z, lambda z: -1 / z ** 2, zl, zu, g, torch.rsqrt(-g))
    zs = torch.linspace(float(zl), float(zu), 20001, dtype=torch.float64)
    gz = 1 / zs - g * zs
    assert float(gz.min()) >= float(k_lo) and float(gz.max()) <= float(k_hi)


def test_softmax_decomposed_slopes_tend_to_the_jacobian_and_win_on_wide_boxes():
    from gamma.bounds.softmax import _softmax_decomposed
    g = softmax_graph(T=5)
    x0 = rnd(2, 5, 5, scale=2.0)
    a, u, v, _, e, _ = _softmax_decomposed(g["y"], Interval(x0 - 1e-9, x0 + 1e-9))
    J = torch.diag(a[0, 1]) + u[0, 1][:, None] * v[0, 1][None, :]
    exact = torch.autograd.functional.jacobian(lambda t: torch.softmax(t, -1), x0[0, 1])
    assert torch.allclose(J, exact, atol=1e-6, rtol=1e-6) and float(e.max()) < 1e-10
    wide = Interval(x0 - 0.5, x0 + 0.5)
    e_dc = _softmax_decomposed(g["y"], wide)[4].sum(-1)
    lin = linearize(g["y"], wide)
    assert torch.all(lin.err.sum(-1) <= e_dc * (1 + 1e-12))          # the choice never loses
    plain = Tunings(softmax_decomposed=False, softmax_stages=1, softmax_taylor=False)
    mv = linearize(g["y"], wide, plain).err.sum(-1)                  # the plain mean value form
    assert float(lin.err.sum()) < 0.8 * float(mv.sum())


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm", "softmax"])
def test_ibp_rule_on_partly_unbounded_rows(op):
    """A row with an unbounded entry gets the direct enclosure (finite: |n| <=
    sqrt(d), softmax in [0, 1]), never the NaN of an infinite mean-value radius;
    bounded rows are as without it (to float64 rounding); all rows unbounded skips the
    mean-value work and gives the direct enclosure everywhere."""
    from gamma.bounds.ibp import ibp_node
    d = 16
    if op == "softmax":
        g = Graph(op, "x", (3, d))
        g.add("y", "softmax", "x", mask=None)
        g.infer_shapes()
    else:
        g = norm_graph(op, d)
    node = g["y"]
    x0 = rnd(3, d)
    box = Interval(x0 - 1e-2, x0 + 1e-2)
    ref = ibp_node(node, box)
    lo, hi = box.lower.clone(), box.upper.clone()
    lo[1, 5], hi[1, 5] = -float("inf"), float("inf")
    part = ibp_node(node, Interval(lo, hi))
    assert torch.isfinite(part.lower).all() and torch.isfinite(part.upper).all()
    for a, b in ((part.lower, ref.lower), (part.upper, ref.upper)):     # up to float64 rounding slack
        assert torch.allclose(a[[0, 2]], b[[0, 2]], rtol=1e-10, atol=0)
    samples = x0[1] + (torch.rand(2000, d, generator=GEN, dtype=torch.float64) * 2 - 1) * 1e-2
    samples[:, 5] = rnd(2000, scale=1e3)
    y = evaluate(g, torch.stack([x0[0].expand(2000, d), samples, x0[2].expand(2000, d)], 1))[:, 1]
    assert torch.all(y >= part.lower[1] - 1e-12) and torch.all(y <= part.upper[1] + 1e-12)
    full = ibp_node(node, Interval(torch.full_like(lo, -float("inf")), torch.full_like(hi, float("inf"))))
    assert torch.isfinite(full.lower).all() and torch.isfinite(full.upper).all()
