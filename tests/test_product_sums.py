"""The product x * y by polarization, (s^2 - d^2) / 4 with CROWN bounds of s = x + y and
d = x - y (gamma.bounds.bilinear.polar_band, refine.product_sums): a hand case of the
band, and SwiGLU-shaped graphs whose gate and up move together, bounded soundly
(samples + PGD, real arithmetic and against a float32 engine) and tighter than by the
half-sum of the McCormick planes alone."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds
from gamma.bounds.bilinear import polar_band
from gamma.bounds.interval import Interval
from gamma.graph import Graph
from soundness import graph_fn, violations


def test_polar_band_by_hand():
    # x in [0, 2], y in [0, 2], and x - y in [-0.5, 0.5], x + y in [0, 4] (x and y move together)
    x = Interval(torch.tensor([0.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
    y = Interval(torch.tensor([0.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
    s = (torch.tensor([0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64))
    d = (torch.tensor([-0.5], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    a, b, c, h = polar_band(x, y, s, d)
    # s0 = 2, d0 = 0: slopes 1, 1; lower (dl du - s0^2) / 4 = (-0.25 - 4) / 4 = -1.0625,
    # upper (d0^2 - sl su) / 4 = 0: c = -0.53125, h = 0.53125 (the half-sum's h = rx ry = 1)
    assert a.item() == 1.0 and b.item() == 1.0
    assert c.item() == pytest.approx(-0.53125, abs=1e-12) and h.item() == pytest.approx(0.53125, rel=1e-9)
    assert h.item() >= 0.53125
    # every (x, y) of the region lies in the band
    g = torch.Generator().manual_seed(3)
    xs = 2 * torch.rand(20000, generator=g, dtype=torch.float64)
    ys = (xs + torch.rand(20000, generator=g, dtype=torch.float64) - 0.5).clamp(0, 2)
    ok = (xs - ys).abs() <= 0.5
    xs, ys = xs[ok], ys[ok]
    lin = a * xs + b * ys + c
    assert ((xs * ys >= lin - h) & (xs * ys <= lin + h)).all()
    # s, d no tighter than the boxes' sums: the half-sum stays (its h is never above the polarization's)
    a2, b2, c2, h2 = polar_band(x, y, (x.lower + y.lower, x.upper + y.upper), (x.lower - y.upper, x.upper - y.lower))
    assert (a2.item(), b2.item(), c2.item(), h2.item()) == (1.0, 1.0, -1.0, 1.0)


def test_balanced_scale_by_hand():
    """y = 10 x, x in [0, 2]: with k = 1, s = 11 x and d = -9 x give h = (11^2 + 9^2) / 8 = 25.25,
    above the half-sum's rx ry = 10; with k = sqrt(ry / rx) = sqrt(10), s = 2 sqrt(10) x and d = 0
    give h = (2 sqrt(10))^2 / 8 = 5, and the band holds on the line."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    x, y = Interval(t(0.0), t(2.0)), Interval(t(0.0), t(20.0))
    *_, h1 = polar_band(x, y, (t(0.0), t(22.0)), (t(-18.0), t(0.0)))
    assert h1.item() == 10.0                                         # the half-sum wins at k = 1
    k = t(10.0).sqrt()
    r = 2 * k * 2
    a, b, c, h = polar_band(x, y, (t(0.0), r), (t(0.0), t(0.0)), k)
    assert h.item() == pytest.approx(5.0, rel=1e-9)
    xs = torch.linspace(0, 2, 101, dtype=torch.float64)
    lin = a * xs + b * (10 * xs) + c
    assert ((10 * xs * xs >= lin - h) & (10 * xs * xs <= lin + h)).all()


def _swiglu(d: int = 12, f: int = 20, T: int = 3, shared: float = 0.8):
    """x -> RMSNorm -> gate, up (rows of up close to rows of gate: they move together) ->
    silu(gate) * up -> down."""
    gen = torch.Generator().manual_seed(17)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    g = Graph("swiglu", "x", (T, d))
    g.add("n", "rmsnorm", "x", weight=(1 + 0.1 * r(d)).float().double(), eps=1e-6)
    wg = r(f, d) * 0.5
    wu = shared * wg + (1 - shared) * r(f, d) * 0.5
    g.add("gate", "linear", "n", weight=wg.float().double())
    g.add("up", "linear", "n", weight=wu.float().double())
    g.add("act", "silu", "gate")
    g.add("prod", "mul", "act", "up")
    g.add("out", "linear", "prod", weight=(r(d, f) * 0.3).float().double())
    g.infer_shapes()
    return g, r(T, d)


@pytest.mark.parametrize("arithmetic", ["real", "float32"])
@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_swiglu_by_polarization_is_sound_and_tighter(arithmetic, eps):
    g, x0 = _swiglu()
    new = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    old = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=Tunings(product_sums=False))
    assert (new.width() <= old.width() * (1 + 1e-9)).all()
    assert float(new.width().sum()) < 0.97 * float(old.width().sum())      # measured: 0.95 (eps 0.02), less at 0.2
    ref = graph_fn(g, torch.float32 if arithmetic == "float32" else torch.float64)
    assert violations(ref, x0, eps, new.lower, new.upper, n_samples=2000, steps=30, seed=4) == 0


def test_token_compact_and_dense_walks_agree_on_the_polarized_product():
    g, x0 = _swiglu()
    a = compute_bounds(g, x0, 0.1, "crown")
    b = compute_bounds(g, x0, 0.1, "crown", tunings=Tunings(compact_rows=False))
    assert torch.allclose(a.lower, b.lower, rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.upper, b.upper, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method,intermediate", [("crown", "cut"), ("alpha", "crown")])
def test_polarized_product_under_cut_and_alpha_is_sound(method, intermediate):
    """--intermediate cut (the passes for s and d stop where the others do) and alpha-CROWN
    (whose product planes start from CROWN's bounds and keep the best) on top of it."""
    g, x0 = _swiglu()
    eps = 0.1
    r = compute_bounds(g, x0, eps, method, intermediate=intermediate, alpha_iters=5)
    assert torch.isfinite(r.width()).all()
    assert violations(graph_fn(g, torch.float32), x0, eps, r.lower, r.upper, n_samples=1000, steps=20, seed=6) == 0
