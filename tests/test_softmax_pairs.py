"""Softmax refined by CROWN bounds of its score differences (gamma.bounds.softmax_pairs):
exact by hand where the differences are constant, never looser than the box rule,
and sound (samples + PGD, float32 and float64 engines) on attention with and
without a causal mask, in every arithmetic mode."""

from __future__ import annotations

import math

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds
from gamma.bounds.interval import Interval
from gamma.bounds.softmax import shifted_radius
from gamma.bounds.softmax_pairs import pairwise_interval
from gamma.graph import Graph
from gamma.models.common import causal_mask
from soundness import graph_fn, violations

OFF = Tunings(softmax_pairs=False)


def _shifted_scores() -> Graph:
    """z = (x, x + 1, x + 2): every difference is constant, so softmax is constant."""
    g = Graph("shift", "x", (1, 1))
    g.add("z", "linear", "x", weight=torch.ones(3, 1, dtype=torch.float64),
          bias=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    g.add("y", "softmax", "z")
    return g.infer_shapes()


def test_constant_differences_give_the_exact_softmax_by_hand():
    g = _shifted_scores()
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    want = torch.tensor([1.0, math.e, math.e ** 2], dtype=torch.float64) / (1 + math.e + math.e ** 2)
    r = compute_bounds(g, x0, 0.5, "crown", arithmetic="real")
    y = r.nodes["y"]
    assert (y.lower <= want).all() and (want <= y.upper).all()
    assert float(y.width().max()) < 1e-6                    # the float32 transposes' own rounding
    plain = compute_bounds(g, x0, 0.5, "crown", arithmetic="real", tunings=OFF).nodes["y"]
    assert float(plain.width().min()) > 0.05                 # the box rule sees scores moving apart


def test_pairwise_interval_by_hand_and_with_a_mask():
    # two keys, z_2 - z_1 in [0, 1]: y_1 in [1 / (1 + e), 1 / 2], y_2 in [1 / 2, e / (1 + e)]
    x = Interval(torch.tensor([[-5.0, -5.0]], dtype=torch.float64), torch.tensor([[5.0, 5.0]], dtype=torch.float64))
    d_lo = torch.tensor([[[0.0, 0.0], [-1.0, 0.0]]], dtype=torch.float64)
    d_hi = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    y = pairwise_interval(x, d_lo, d_hi)
    e = math.e
    assert torch.allclose(y.lower, torch.tensor([[1 / (1 + e), 0.5]], dtype=torch.float64), rtol=1e-14)
    assert torch.allclose(y.upper, torch.tensor([[0.5, e / (1 + e)]], dtype=torch.float64), rtol=1e-14)
    # a masked key: y = 0 there and out of the other's sum (y_1 = 1)
    y = pairwise_interval(x, d_lo, d_hi, mask=torch.tensor([[True, False]]))
    assert float(y.lower[0, 0]) <= 1.0 <= float(y.upper[0, 0]) and float(y.lower[0, 0]) > 1 - 1e-12
    assert float(y.lower[0, 1]) == 0.0 == float(y.upper[0, 1])


def _attention(masked: bool, seed: int) -> Graph:
    """x (T, d) -> q, k (linear) -> softmax(q k^T [causal]) (T, T)."""
    gen = torch.Generator().manual_seed(seed)
    T, d = 5, 6
    g = Graph("att", "x", (T, d))
    w = lambda: (torch.randn(d, d, generator=gen) / math.sqrt(d)).float().double()
    g.add("q", "linear", "x", weight=w())
    g.add("k", "linear", "x", weight=w())
    g.add("s", "matmul", "q", "k")
    g.add("p", "softmax", "s", mask=causal_mask(T) if masked else None)
    return g.infer_shapes()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("arithmetic", ["float32", "real"])
def test_refined_softmax_is_sound_and_never_looser(masked, arithmetic):
    g = _attention(masked, seed=7)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(*g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.05
    r = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    plain = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=OFF)
    assert (r.lower >= plain.lower).all() and (r.upper <= plain.upper).all()
    assert float(r.width().sum()) < 0.9 * float(plain.width().sum())
    rp, pp = r.nodes["p"], plain.nodes["p"]
    assert (rp.lower >= pp.lower).all() and (rp.upper <= pp.upper).all()
    dtypes = (torch.float32, torch.float64) if arithmetic == "float32" else (torch.float64,)
    for dtype in dtypes:
        assert violations(graph_fn(g, dtype), x0, eps, r.lower, r.upper, n_samples=1000, seed=9) == 0


def test_long_rows_are_left_to_the_box_rule():
    """Beyond MAX_KEYS keys the pass (S^2 rows per softmax row) is skipped: same bounds as without."""
    gen = torch.Generator().manual_seed(12)
    g = Graph("long", "x", (40, 3))
    g.add("q", "linear", "x", weight=torch.randn(3, 3, generator=gen).float().double())
    g.add("s", "matmul", "q", "x")
    g.add("p", "softmax", "s")
    g = g.infer_shapes()
    x0 = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    a = compute_bounds(g, x0, 0.01, "crown")
    b = compute_bounds(g, x0, 0.01, "crown", tunings=OFF)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)


def test_dense_and_token_compact_passes_agree_and_alpha_stays_sound():
    """The pair pass in both cotangent layouts gives the same bounds (to float64 rounding);
    alpha-CROWN and --intermediate cut on top of it stay sound against a float32 engine."""
    g = _attention(True, seed=7)
    x0 = torch.randn(*g.input_shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a = compute_bounds(g, x0, 0.05, "crown")
    b = compute_bounds(g, x0, 0.05, "crown", tunings=Tunings(compact_rows=False))
    assert torch.allclose(a.lower, b.lower, rtol=0, atol=1e-12) and torch.allclose(a.upper, b.upper, rtol=0, atol=1e-12)
    for r in (compute_bounds(g, x0, 0.05, "alpha", alpha_iters=5),
              compute_bounds(g, x0, 0.05, "crown", intermediate="cut")):
        assert violations(graph_fn(g, torch.float32), x0, 0.05, r.lower, r.upper, n_samples=500, seed=1) == 0


# ---- the mean-value remainder on score differences (softmax's shift invariance) ----

NO_SHIFT = Tunings(softmax_shift=False, softmax_simplex=False)
SHIFT = Tunings(softmax_simplex=False)


def test_shifted_radius_by_hand():
    """Scores box [0, 2] x [1, 3] (centres 1, 2); z_2 - z_1 in [0.5, 1.5] (centre difference 1):
    with key 1 as reference |d_2 - d_1| <= 0.5, key 2's row likewise; the last row is the box's."""
    x = Interval(torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    d_lo = torch.tensor([[[0.0, 0.5], [-1.5, 0.0]]], dtype=torch.float64)
    d_hi = torch.tensor([[[0.0, 1.5], [-0.5, 0.0]]], dtype=torch.float64)
    rho = shifted_radius(x, d_lo, d_hi)
    want = torch.tensor([[[0.0, 0.5], [0.5, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    assert torch.allclose(rho, want, rtol=0, atol=1e-14) and (rho >= want).all()
    # differences no tighter than the boxes' (r_j + r_k = 2): the box's reach is kept
    wide = shifted_radius(x, d_lo - 10, d_hi + 10)
    assert torch.allclose(wide[:, :2], torch.tensor([[[2.0, 2.0], [2.0, 2.0]]], dtype=torch.float64))


def test_scores_moving_together_leave_no_mean_value_remainder():
    """z = (x, x + 1, x + 2) with x in [-0.5, 0.5]: by the box the mean-value remainder is
    D r > 0; on the differences (all constant) it is 0 up to rounding."""
    from gamma.bounds.softmax import softmax_lin
    g = _shifted_scores()
    z = Interval(torch.tensor([[-0.5, 0.5, 1.5]], dtype=torch.float64), torch.tensor([[0.5, 1.5, 2.5]], dtype=torch.float64))
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    c0 = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    d = (c0.unsqueeze(-2) - c0.unsqueeze(-1)) + zero                     # z_j - z_k exactly
    off = softmax_lin(g["y"], z)                                         # the Jacobian's range from the box
    on = softmax_lin(g["y"], z, d=(d, d))
    assert float(on.err.max()) < 1e-13 < 1e-3 < float(off.err.min())


def _segment_points(g: Graph, x0: torch.Tensor, eps: float, n: int, t: float, seed: int):
    """CROWN's bounds, and scores at points ``c + s (z - c)``, ``s <= t``, of segments from
    the score box's centre c to scores z of the region."""
    from gamma.ops import evaluate
    res = compute_bounds(g, x0, eps, "crown", arithmetic="real")
    s_box = res.nodes["s"]
    gen = torch.Generator().manual_seed(seed)
    xs = x0 + eps * (2 * torch.rand(n, *x0.shape, generator=gen, dtype=torch.float64) - 1)
    xs[: n // 4] = x0 + eps * torch.sign(torch.randn(n // 4, *x0.shape, generator=gen, dtype=torch.float64))
    z = torch.stack([evaluate(g, xi, keep_all=True)["s"] for xi in xs])
    s = t * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    s[: n // 8] = t                                                     # the stage's far end
    return res, s_box.center + s * (z - s_box.center)


@pytest.mark.parametrize("t", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_stage_intervals_hold_on_segments_from_the_centre(masked, t):
    """The mean-value form takes its Jacobians on points of segments from the box centre
    to the region, a stage at a time: the stage's interval (from the box scaled by t and
    the score differences widened to the centre's) contains softmax there."""
    from gamma.bounds.crown import Context
    from gamma.bounds.refine import REFINE
    from gamma.bounds.softmax import _segment_interval
    g = _attention(masked, seed=3)
    x0 = torch.randn(*g.input_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res, pts = _segment_points(g, x0, 0.05, 400, t, seed=5)
    ctx = Context(g, dict(res.nodes), {n.name: None for n in g}, refine=REFINE)
    mask = g["p"].params.get("mask")
    iv = _segment_interval(res.nodes["s"], t, mask, ctx.refinement(g["p"])["d"])
    y = torch.softmax(pts if mask is None else pts.masked_fill(~mask, float("-inf")), -1)
    assert (y >= iv.lower).all() and (y <= iv.upper).all()


def test_stages_and_the_taylor_form_narrow_the_remainder():
    """More stages: a remainder never wider (t = k / K nests), and half the plain mean-value one
    at 16 stages on a wide box (J moves about in proportion to s); the Taylor form's interval
    (one-signed Hessian terms) narrower again."""
    from gamma.bounds.softmax import softmax_lin
    g = _shifted_scores()
    gen = torch.Generator().manual_seed(21)
    c = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    z = Interval(c - 0.3, c + 0.3)
    for taylor in (False, True):
        errs = [softmax_lin(g["y"], z, Tunings(softmax_stages=k, softmax_decomposed=False, softmax_taylor=taylor)).err
                for k in (1, 2, 4, 8, 16)]
        for a, b in zip(errs, errs[1:]):
            assert (b <= a * (1 + 1e-12)).all()
        if not taylor:
            plain, staged = errs[0], errs[-1]
            assert 0.45 < float((staged / plain).max()) < 0.55                # J moves about in proportion to s
    assert float((errs[-1] / staged).max()) < 0.9 and float((errs[-1] / plain).max()) < 0.45


def _softmax_node(S: int, masked: bool):
    """A softmax node over (S, S) scores, causal where ``masked``, and its mask."""
    mask = causal_mask(S) if masked else None
    g = Graph("one", "z", (S, S))
    g.add("y", "softmax", "z", mask=mask)
    return g.infer_shapes()["y"], mask


@pytest.mark.parametrize("stages", [1, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_mean_value_form_contains_softmax_on_the_box(masked, stages):
    """The form ``y0c + J0 (z - x0) +- err`` (centred on the Taylor interval) holds at every
    sampled point and corner of a wide score box, with the box alone and with exact score
    differences (every score moving with the first)."""
    from gamma.bounds.softmax import softmax_lin
    gen = torch.Generator().manual_seed(31 + stages)
    S = 6
    node, mask = _softmax_node(S, masked)
    c = 2 * torch.randn(S, S, generator=gen, dtype=torch.float64)
    rad = 0.4 * torch.rand(S, S, generator=gen, dtype=torch.float64)
    box = Interval(c - rad, c + rad)
    tun = Tunings(softmax_stages=stages, softmax_decomposed=False)
    pts = c + rad * (2 * torch.rand(2000, S, S, generator=gen, dtype=torch.float64) - 1)
    pts[:500] = c + rad * torch.sign(torch.randn(500, S, S, generator=gen, dtype=torch.float64))
    # the same box, and points where every score moves by one amount t (exact differences)
    t = 0.4 * (2 * torch.rand(2000, S, 1, generator=gen, dtype=torch.float64) - 1)
    moved = c + t
    diff = (c.unsqueeze(-2) - c.unsqueeze(-1))
    sm = lambda v: torch.softmax(v if mask is None else v.masked_fill(~mask, float("-inf")), -1)
    lin = softmax_lin(node, box, tun)
    gap = (sm(pts) - (lin.y0 + lin.jvp(pts - lin.x0))).abs()
    assert (gap <= lin.err).all()
    assert float((gap / lin.err).max()) > 0.05                           # not vacuous
    lin = softmax_lin(node, Interval(c - 0.4, c + 0.4), tun, d=(diff, diff))
    gap = (sm(moved) - (lin.y0 + lin.jvp(moved - lin.x0))).abs()
    assert (gap <= lin.err).all() and float(lin.err.max()) < 1e-12      # the differences do not move


@pytest.mark.parametrize("masked", [False, True])
def test_form_with_score_differences_contains_softmax(masked):
    """Scores z = c + A u (u in a cube: rows that move partly together), the box and the
    differences' bounds exact over the samples: the form (shift, stages, Taylor with the
    pairwise terms) contains softmax at every sample, and is narrower than from the box alone."""
    from gamma.bounds.softmax import softmax_lin
    gen = torch.Generator().manual_seed(51)
    S = 6
    node, mask = _softmax_node(S, masked)
    c = 2 * torch.randn(S, S, generator=gen, dtype=torch.float64)
    common = torch.randn(S, 1, 2, generator=gen, dtype=torch.float64)      # shared by a row's scores
    own = 0.2 * torch.randn(S, S, 2, generator=gen, dtype=torch.float64)
    u = 2 * torch.rand(4000, 1, 1, 2, generator=gen, dtype=torch.float64) - 1
    u[:1000] = torch.sign(u[:1000])
    z = c + 0.3 * ((common + own) * u).sum(-1)                               # (N, S, S)
    box = Interval(z.amin(0), z.amax(0))
    diff = z.unsqueeze(-2) - z.unsqueeze(-1)                                 # z_j - z_k at [.., k, j]
    lin = softmax_lin(node, box, d=(diff.amin(0), diff.amax(0)))
    plain = softmax_lin(node, box)
    sm = torch.softmax(z if mask is None else z.masked_fill(~mask, float("-inf")), -1)
    gap = (sm - (lin.y0 + lin.jvp(z - lin.x0))).abs()
    assert (gap <= lin.err).all()
    assert float(lin.err.sum()) < 0.7 * float(plain.err.sum())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("arithmetic", ["float32", "real"])
def test_shifted_remainder_is_sound_and_never_looser(masked, arithmetic):
    """Attention scores -> softmax -> a linear read-out: with the remainder on score
    differences, never looser than without, tighter somewhere, and sound (samples + PGD,
    float32 and float64 engines)."""
    gen = torch.Generator().manual_seed(11)
    T, d = 5, 6
    g = Graph("att", "x", (T, d))
    w = lambda: (torch.randn(d, d, generator=gen) / math.sqrt(d)).float().double()
    g.add("q", "linear", "x", weight=w())
    # keys sharing a common part: a row's scores move together with its query
    g.add("k", "linear", "x", weight=w(), bias=(3 * torch.randn(d, generator=gen)).float().double())
    g.add("s", "matmul", "q", "k")
    g.add("p", "softmax", "s", mask=causal_mask(T) if masked else None)
    g.add("o", "linear", "p", weight=torch.randn(4, T, generator=gen).float().double())
    g = g.infer_shapes()
    x0 = torch.randn(T, d, generator=gen, dtype=torch.float64)
    eps = 0.01
    r = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=SHIFT)
    plain = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=NO_SHIFT)
    slack = 1e-12 * (1 + plain.upper.abs())
    assert (r.lower >= plain.lower - slack).all() and (r.upper <= plain.upper + slack).all()
    assert float(r.width().sum()) < 0.95 * float(plain.width().sum())
    simplex = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)          # the default: and the row sums
    assert float(simplex.width().sum()) < float(r.width().sum())
    dtypes = (torch.float32, torch.float64) if arithmetic == "float32" else (torch.float64,)
    for dtype in dtypes:
        for b in (r, simplex):
            assert violations(graph_fn(g, dtype), x0, eps, b.lower, b.upper, n_samples=1000, seed=13) == 0


def test_simplex_remainder_by_hand():
    """H = (1, 2, 1), E = 0.1 each, M = 0.5: a cotangent constant over the row pays only
    |mu M| + sum |lam| E; (1, 0, -1) pays with mu = 0 (the weighted median) 1 + 1 + 0.2."""
    from gamma.bounds.softmax import SimplexRemainder
    rem = SimplexRemainder(torch.tensor([[1.0, 2.0, 1.0]], dtype=torch.float64),
                           torch.full((1, 3), 0.1, dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64))
    lam = torch.tensor([[[3.0, 3.0, 3.0]], [[1.0, 0.0, -1.0]], [[-3.0, -3.0, -3.0]]], dtype=torch.float64)
    got = rem.at()(lam)
    want = torch.tensor([1.5 + 0.9, 2.0 + 0.2, 1.5 + 0.9], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-14)
    # never above the elementwise charge plus |mu M|, and sound for every rho with |rho| <= H, sum = -M
    gen = torch.Generator().manual_seed(41)
    for _ in range(200):
        lam = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64)
        rho = (2 * torch.rand(1, 3, generator=gen, dtype=torch.float64) - 1) * rem.H
        rho[0, 2] = -0.5 - rho[0, :2].sum()                        # the row sums to -M
        if rho[0, 2].abs() > rem.H[0, 2]:
            continue
        s = (2 * torch.rand(1, 3, generator=gen, dtype=torch.float64) - 1) * rem.E
        assert float((lam[0] * (rho + s)).sum().abs()) <= float(rem.at()(lam)) + 1e-14
