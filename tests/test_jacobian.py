"""The linear forms of LayerNorm / RMSNorm that CROWN and zonotopes use
(gamma/bounds/jacobian.py):

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

from gamma.bounds import compute_bounds
from gamma.bounds.interval import Interval
from gamma.bounds.jacobian import _inv_sqrt_line, _norm_decomposed, _norm_mv, linearize
from gamma.graph import Graph
from gamma.ops import evaluate

from soundness import violations

GEN = torch.Generator().manual_seed(11)


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


@pytest.mark.parametrize("box", ["narrow", "wide", "small_scale", "massive"])
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_decomposed_form_sound_on_its_own(op, box):
    """The decomposed relaxation alone (whatever the per-row choice picks)."""
    x0, eps = _x0(box)
    g = norm_graph(op, x0.shape[-1])
    a, u, v, k, e = _norm_decomposed(g["y"], Interval(x0 - eps, x0 + eps))
    P = (lambda t: t - t.mean(-1, keepdim=True)) if op == "layernorm" else (lambda t: t)

    def remainder(xs):
        c = P(xs)
        return evaluate(g, xs) - (a * c + u * (v * c).sum(-1, keepdim=True) + k)

    bad = violations(remainder, x0, eps, -e, e, targets=torch.arange(48), steps=20)
    assert bad == 0


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
    a, u, v, _, e = _norm_decomposed(g["y"], Interval(x0 - 1e-9, x0 + 1e-9))
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
        dec = _norm_decomposed(g["y"], x)[-1].sum()
        assert float(dec) * factor <= float(mv), (eps, float(mv), float(dec))


def test_crown_through_layernorm_sound_and_tighter():
    """linear -> LayerNorm -> linear at eps 0.05: CROWN bounds hold (samples
    + PGD) and are tighter than with the mean-value form alone."""
    from gamma.bounds import jacobian
    d = 32
    g = Graph("ln", "x", (4, d))
    g.add("h", "linear", "x", weight=rnd(d, d, scale=0.3), bias=rnd(d, scale=0.1))
    g.add("n", "layernorm", "h", weight=rnd(d, scale=0.3) + 1, bias=rnd(d, scale=0.1), eps=1e-5)
    g.add("y", "linear", "n", weight=rnd(8, d, scale=0.3))
    g.infer_shapes()
    x0, eps = rnd(4, d), 0.05
    res = compute_bounds(g, x0, eps, "crown")
    assert violations(lambda xs: evaluate(g, xs), x0, eps, res.lower, res.upper, targets=torch.arange(32)) == 0
    jacobian.NORM_DECOMPOSED = False
    try:
        mv = compute_bounds(g, x0, eps, "crown")
    finally:
        jacobian.NORM_DECOMPOSED = True
    assert float((res.upper - res.lower).mean()) < 0.9 * float((mv.upper - mv.lower).mean())


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.3])
def test_mean_value_remainder_lower_bound(op, scale):
    """The O(d) estimate that lets the norm skip the d x d mean-value remainder
    never exceeds that remainder's row sum (so it never hides a tighter form)."""
    from gamma.bounds.jacobian import _norm_mv, _norm_mv_diagonal
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
