"""The O(d) LayerNorm/RMSNorm and softmax rules IBP uses (gamma.bounds.norm, gamma.bounds.softmax).

* ``norm_abs_jvp`` (|J0| r through sorting and prefix sums) equals the dense
  product with |M| to float64 rounding, ties and zeros included.
* ``norm_err_separable`` bounds the mean-value remainder
  ``f(x) - f(x0) - J0 (x - x0)`` on every sampled and attacked point.
* the IBP interval of a norm node contains every sampled/attacked output,
  and costs far less than the dense rule it replaces.
* softmax: the O(S) direct interval equals the O(S^2) one; the O(S) IBP rule
  is sound and as tight as the dense mean-value rule at small epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch

from gamma.bounds.interval import Interval
from gamma.bounds.jacobian import linearize
from gamma.bounds.norm import _norm_mv, norm_abs_jvp, norm_err_separable, norm_interval, norm_naive, norm_stats
from gamma.bounds.softmax import softmax_ibp, softmax_interval
from gamma.graph import Graph
from gamma.models.common import causal_mask
from gamma.ops import evaluate

from gamma.bounds import compute_bounds

from soundness import graph_fn, violations

GEN = torch.Generator()            # reseeded before every test (below)


@pytest.fixture(autouse=True)
def _seed_per_test(test_seed):
    """Each test draws its own values, whichever tests ran before it."""
    GEN.manual_seed(test_seed)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale


def dense_abs_jvp(n0, r, centered):
    d = n0.shape[-1]
    M = torch.eye(d, dtype=n0.dtype) - (1.0 / d if centered else 0.0) - n0.unsqueeze(-1) * n0.unsqueeze(-2) / d
    return (M.abs() @ r.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("d", [1, 2, 3, 16, 384])
def test_abs_jvp_equals_dense(centered, d):
    n0 = rnd(6, d, scale=2.0)
    n0[0] = 0.0                                         # all zero
    if d >= 2:
        n0[1, 0], n0[1, 1] = 2.0, -0.5                  # 1 + n_i n_j = 0 exactly (a tie at the sign change)
        n0[2, 1] = n0[2, 0]                             # repeated values
    r = rnd(6, d).abs()
    r[3] = 0.0
    got, ref = norm_abs_jvp(n0, r, centered), dense_abs_jvp(n0, r, centered)
    assert torch.all(got >= ref)                        # the slack is on the safe side
    assert torch.allclose(got, ref, rtol=1e-11, atol=1e-12 * float(r.max()))


def test_abs_jvp_by_hand():
    """LayerNorm, d = 2, n0 = (1, 0): M = I - 1/2 - n0 n0^T / 2 = [[0, -1/2], [-1/2, 1/2]],
    so |M| (2, 4) = (2, 3)."""
    n0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    got = norm_abs_jvp(n0, r, True)
    assert torch.allclose(got, torch.tensor([[2.0, 3.0]], dtype=torch.float64), rtol=1e-13)


def norm_graph(op, d, rows=3):
    g = Graph(op, "x", (rows, d))
    kw = dict(weight=rnd(d, scale=0.5) + 1, eps=1e-5)
    if op == "layernorm":
        kw["bias"] = rnd(d, scale=0.1)
    g.add("y", op, "x", **kw)
    return g.infer_shapes()


BOXES = {"narrow": (1.0, 1e-6), "medium": (1.0, 1e-2), "wide": (1.0, 0.5), "small_scale": (0.01, 0.05),
         "large": (30.0, 1e-3)}


@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_separable_remainder_sound(op, box):
    scale, eps = BOXES[box]
    g = norm_graph(op, 16)
    node = g["y"]
    x0 = rnd(3, 16, scale=scale) + (5.0 if box == "large" else 0.0)
    x = Interval(x0 - eps, x0 + eps)
    (nl, nu), (sl, su), _, _ = norm_stats(x, node.params["eps"], op == "layernorm")
    P = (lambda t: t - t.mean(-1, keepdim=True)) if op == "layernorm" else (lambda t: t)
    c0 = P(x0)
    s0 = torch.rsqrt((c0 * c0).mean(-1, keepdim=True) + node.params["eps"])
    n0, ws0 = c0 * s0, node.params["weight"] * s0
    bound = norm_err_separable(n0, s0, nl, nu, sl, su, x.radius, op == "layernorm") \
        * node.params["weight"].abs()
    y0 = evaluate(g, x0)

    def remainder(xs):                                  # f(x) - f(x0) - J0 (x - x0), J0 = w s0 (P - n0 n0^T P / d)
        g_ = P(xs - x0)
        return evaluate(g, xs) - y0 - ws0 * (g_ - n0 * (n0 * g_).sum(-1, keepdim=True) / 16)

    bad = violations(remainder, x0, eps, -bound, bound, targets=torch.arange(48), steps=20)
    assert bad == 0


@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_norm_interval_sound(op, box):
    scale, eps = BOXES[box]
    g = norm_graph(op, 16)
    x0 = rnd(3, 16, scale=scale)
    iv = norm_interval(g["y"], Interval(x0 - eps, x0 + eps))
    assert violations(lambda xs: evaluate(g, xs), x0, eps, iv.lower, iv.upper, targets=torch.arange(48)) == 0


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_norm_interval_no_looser_than_dense_at_small_eps(op):
    """The O(d) rule gives up nothing measurable where IBP is used in practice
    (widths within 1% of the dense mean-value rule at eps 1e-3, d = 384)."""
    g = norm_graph(op, 384, rows=8)
    node = g["y"]
    x0 = rnd(8, 384, scale=3.0) + 1.0
    x = Interval(x0 - 1e-3, x0 + 1e-3)
    y0, a, _, n0, err = _norm_mv(node, x)               # the dense mean-value form
    rad = norm_abs_jvp(n0, x.radius, op == "layernorm") * a.abs() + err
    dense = norm_naive(node, x).intersect(Interval(y0 - rad, y0 + rad))
    fast = norm_interval(node, x)
    assert float((fast.width() / dense.width()).max()) <= 1.01


def dense_softmax_interval(l, u, mask):
    """Reference in O(S^2) per row: y_i in [1 / (1 + sum_{j!=i} e^{u_j - l_i}), 1 / (1 + sum_{j!=i} e^{l_j - u_i})]."""
    a = u.unsqueeze(-2) - l.unsqueeze(-1)                  # (.., i, j): u_j - l_i
    b = l.unsqueeze(-2) - u.unsqueeze(-1)
    eye = torch.eye(l.shape[-1], dtype=torch.bool)
    a, b = a.masked_fill(eye, 0.0), b.masked_fill(eye, 0.0)
    if mask is not None:
        a, b = a.masked_fill(~mask.unsqueeze(-2), float("-inf")), b.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    lo, hi = torch.exp(-torch.logsumexp(a, -1)), torch.exp(-torch.logsumexp(b, -1))
    if mask is not None:
        lo, hi = lo.masked_fill(~mask, 0.0), hi.masked_fill(~mask, 0.0)
    return Interval(lo, hi)


def softmax_graph(masked, rows=5, heads=2):
    g = Graph("softmax", "x", (heads, rows, rows))
    g.add("y", "softmax", "x", mask=causal_mask(rows) if masked else None)
    return g.infer_shapes()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale,eps", [(1.0, 1e-3), (1.0, 0.5), (30.0, 1e-2), (300.0, 1.0)])
def test_softmax_interval_equals_dense(masked, scale, eps):
    x0 = rnd(2, 7, 7, scale=scale)
    mask = causal_mask(7) if masked else None
    fast = softmax_interval(x0 - eps, x0 + eps, mask)
    dense = dense_softmax_interval(x0 - eps, x0 + eps, mask)
    # both are float64 evaluations; the fast one is widened by its own rounding bound (below 1e-11 relative here)
    for a, b in ((fast.lower, dense.lower), (fast.upper, dense.upper)):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-300)


SOFTMAX_BOXES = {"narrow": (1.0, 1e-6), "medium": (1.0, 1e-2), "wide": (1.0, 0.5), "peaked": (10.0, 1e-2),
                 "saturated": (60.0, 1e-1)}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("box", list(SOFTMAX_BOXES))
def test_softmax_ibp_sound(masked, box):
    scale, eps = SOFTMAX_BOXES[box]
    g = softmax_graph(masked)
    x0 = rnd(2, 5, 5, scale=scale)
    iv = softmax_ibp(g["y"], Interval(x0 - eps, x0 + eps))
    assert torch.all(iv.lower <= iv.upper)
    # the direct interval is attained at a corner: allow the float64 rounding
    # of the reference evaluation there (1e-15 on values in [0, 1])
    wide = iv.widen(1e-15)
    assert violations(lambda xs: evaluate(g, xs), x0, eps, wide.lower, wide.upper, targets=torch.arange(50)) == 0
    # with the float32 margins, as every method reports: no slack at all, float64 and float32 engines
    r = compute_bounds(g, x0, eps, "ibp")
    for dtype in (torch.float64, torch.float32):
        fn = graph_fn(g, dtype)
        assert violations(fn, x0, eps, r.lower, r.upper, targets=torch.arange(50)) == 0


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_ibp_as_tight_as_dense_at_small_eps(masked):
    g = softmax_graph(masked, rows=32, heads=3)
    node = g["y"]
    x0 = rnd(3, 32, 32, scale=2.0)
    x = Interval(x0 - 1e-3, x0 + 1e-3)
    lin = linearize(node, x)
    rad = lin.abs_jvp(x.radius) + lin.err
    dense = lin.naive.intersect(Interval(lin.y0 - rad, lin.y0 + rad))
    fast = softmax_ibp(node, x)
    ok = dense.width() > 0
    assert float((fast.width()[ok] / dense.width()[ok]).max()) <= 1.01


def _exact_corner(l, u, i, lower):
    """e^{a_i} / (e^{a_i} + sum_{j != i} e^{b_j}) at 60 digits (mpmath)."""
    import mpmath
    mpmath.mp.dps = 60
    a, b = (l, u) if lower else (u, l)
    num = mpmath.exp(mpmath.mpf(float(a[i])))
    rest = mpmath.fsum(mpmath.exp(mpmath.mpf(float(b[j]))) for j in range(len(b)) if j != i and b[j] > -math.inf)
    return num / (num + rest)


@pytest.mark.parametrize("case", ["plain", "dominant", "near_700", "beyond_700", "causal"])
def test_softmax_interval_sums_and_log_space_agree_and_contain_the_corners(case):
    """The sums form (exponents within +-700) and the log-space form (beyond)
    both contain the exact corner values (60 digits) and sit within 1e-12 of
    them: one dominant entry (its rest summed directly, no cancellation),
    spans near the switch, a causal mask."""
    S = 6
    g = torch.Generator().manual_seed(len(case))
    x0 = torch.randn(S, S, generator=g, dtype=torch.float64)
    r = torch.full((S, S), 0.3, dtype=torch.float64)
    mask = None
    if case == "dominant":
        x0[:, 2] += 40.0
    elif case == "near_700":
        x0[:, 0] += 690.0
    elif case == "beyond_700":
        x0[:, 0] += 720.0
    elif case == "causal":
        mask = causal_mask(S)
    l, u = x0 - r, x0 + r
    iv = softmax_interval(l, u, mask)
    if mask is not None:
        l, u = l.masked_fill(~mask, -math.inf), u.masked_fill(~mask, -math.inf)
    from gamma.bounds import softmax as sm
    fast = sm._corner_ratio(l, u) is not None
    assert fast == (case != "beyond_700")
    for row in range(S):
        for i in range(S):
            if mask is not None and not mask[row, i]:
                assert iv.lower[row, i] == 0 and iv.upper[row, i] == 0
                continue
            lo, hi = _exact_corner(l[row], u[row], i, True), _exact_corner(l[row], u[row], i, False)
            assert float(iv.lower[row, i]) <= lo and float(iv.upper[row, i]) >= hi, (row, i)
            assert float(iv.lower[row, i]) >= float(lo) * (1 - 1e-12) - 1e-300
            assert float(iv.upper[row, i]) <= float(hi) * (1 + 1e-12) + 1e-300


def test_bounded_rows_and_unbounded_everywhere():
    """The one-reduction fast paths give the same answers as the per-entry checks:
    all rows bounded -> True; an inf row -> its mask; every row unbounded -> None;
    a bound that is (-inf, inf) at every entry (and only then) counts as unbounded."""
    from gamma.bounds.engine import _unbounded_everywhere
    from gamma.bounds.linearization import bounded_rows
    inf = math.inf
    lo = torch.zeros(3, 4, dtype=torch.float64)
    assert bounded_rows(Interval(lo, lo + 1)) is True
    hi = (lo + 1).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(inf, dtype=torch.float64))
    assert bounded_rows(Interval(lo, hi)).squeeze(-1).tolist() == [True, False, True]
    assert bounded_rows(Interval(lo - inf, lo + inf)) is None
    assert _unbounded_everywhere(Interval(lo - inf, lo + inf))
    assert not _unbounded_everywhere(Interval(lo - inf, hi))          # finite uppers remain
    assert not _unbounded_everywhere(Interval(lo, lo + inf))          # finite lowers
    empty = torch.zeros(0, 4, dtype=torch.float64)
    assert _unbounded_everywhere(Interval(empty, empty)) and bounded_rows(Interval(empty, empty)) is True


def test_unbounded_row_takes_the_direct_enclosure():
    """A row with an unbounded entry: LayerNorm's IBP rule is its direct enclosure
    there (the mean-value radius would be inf), which stays finite (|n_i| <= sqrt(d))."""
    x = Interval(torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64),
                 torch.tensor([[0.5, math.inf, 2.0]], dtype=torch.float64))
    g = norm_graph("layernorm", 3, rows=1)
    out, naive = norm_interval(g["y"], x), norm_naive(g["y"], x)
    assert torch.equal(out.lower, naive.lower) and torch.equal(out.upper, naive.upper)
    assert bool(torch.isfinite(out.lower).all()) and bool(torch.isfinite(out.upper).all())
