"""--arithmetic float32-probabilistic (gamma.bounds.fpprob): the dot products' (and norms' sums') rounding
under a probabilistic model, pooled per CROWN row.  Hand cases for a node's split and
for the pooled charge, the model's scale against float32 sums in several orders, never
wider than the default mode at any node, and sound (samples + PGD against float32 and
float64 engines) on attention, RMSNorm / SwiGLU and LayerNorm / GELU graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, fp, fpprob
from gamma.bounds.interval import Interval
from gamma.graph import Graph
from gamma.ops import evaluate
from draw import rnd, tensor
from soundness import as_dtype, graph_fn, violations
from test_fpmargin import _orders
from test_value_side import attention

U = 2.0 ** -24
PROB = "float32-probabilistic"


def _point(x):
    return Interval(x, x)


def test_split_by_hand():
    """x = (1, 1), W = [[1, -2], [3, 4]], no bias: terms (1, -2) and (3, 4), so S = (3, 7),
    |sum| = (1, 7), M = max(P, N) = (2, 7), sum t^2 = (5, 25), k = 3 terms (the bias slot).
    v = sum t^2 + (k - 1) M^2 + 3 S^2 = (40, 270) to first order in U; E = (1 + 3) U S +
    (k - 1) U M = (16, 42) U.  With two terms the deterministic E is the smaller
    (10 U sqrt(40) = 63 U), so the elementwise margin is E."""
    g = Graph("l", "x", (1, 2))
    g.add("y", "linear", "x", weight=tensor([[1.0, -2.0], [3.0, 4.0]]))
    g.infer_shapes()
    x = tensor([[1.0, 1.0]])
    sp = fpprob.split(g["y"], [_point(x)], _point(tensor([[-1.0, 7.0]])))
    assert sp.var.reshape(-1).tolist() == pytest.approx([40.0, 270.0], rel=1e-5)
    assert (sp.dot / U).reshape(-1).tolist() == pytest.approx([16.0, 42.0], rel=1e-5)
    assert (sp.det / 2.0 ** -149).reshape(-1).tolist() == pytest.approx([3.0, 3.0])    # k underflows
    assert torch.equal(sp.elementwise(), sp.det + sp.dot)
    # 1024 terms equal to one (k = 1025 with the bias slot): S = M = 1024, sum t^2 = 1024,
    # E = (4 * 1024 + 1024 * 1024) U / (1 - 1028 U) = 0.0627 (not negligible next to M here),
    # v = 1024 + 1024 (1024 (1 + U) + E)^2 + 3 (1024 + E)^2: the model's 10 U sqrt(v) is 3.2x below E
    g = Graph("l", "x", (1, 1024))
    g.add("y", "linear", "x", weight=torch.ones(1, 1024, dtype=torch.float64))
    g.infer_shapes()
    sp = fpprob.split(g["y"], [_point(torch.ones(1, 1024, dtype=torch.float64))],
                      _point(tensor([[1024.0]])))
    e = (4 * 1024 + 1024 * 1024) * U / (1 - 1028 * U)
    v = 1024 + 1024 * (1024 * (1 + U) + e) ** 2 + 3 * (1024 + e) ** 2
    # (S and sum t^2 are upper bounds from float32 products, rounded up by about n U = 6e-5)
    assert float(sp.dot) == pytest.approx(e, rel=2e-4)
    assert float(sp.var) == pytest.approx(v, rel=4e-4)
    assert float(sp.elementwise() - sp.det) == pytest.approx(10 * U * math.sqrt(v), rel=2e-4)
    assert float(sp.dot) > 3.2 * 10 * U * math.sqrt(v)


def _two_layers(hidden: int = 1024) -> Graph:
    g = Graph("two", "x", (1, 4))
    a = g.add("a", "linear", "x", weight=rnd(hidden, 4).float().double())
    g.add("b", "linear", a, weight=rnd(2, hidden, scale=hidden ** -0.5).float().double())
    return g.infer_shapes()


def test_pooled_charge_by_hand():
    """y = B (A x) at eps 0 (the rounding alone), float64 transposes: the output's width per row
    is 2 (m_B + min(sum_j |B_ij| E_j, 10 U sqrt(sum_j B_ij^2 v_j))), with A's split and B's
    elementwise margin as the engine computes them; over 1024 hidden units the pooled form is
    several times below the default mode's sum."""
    g = _two_layers()
    x = rnd(1, 4).float().double()
    tun = Tunings(float32_transpose=False)
    got = compute_bounds(g, x, 0.0, "crown", arithmetic=PROB, allow_zero=True, tunings=tun)
    h = evaluate(g, x, keep_all=True)["a"]
    sp_a = fpprob.split(g["a"], [_point(x)], _point(h))
    b = g["b"].params["weight"]
    det = b.abs() @ sp_a.dot.reshape(-1)
    prob = 10 * U * ((b * b) @ sp_a.var.reshape(-1)).sqrt()
    pooled = torch.minimum(det, prob)
    m_b = fpprob.split(g["b"], [got.nodes["a"]], _point(evaluate(g, x))).elementwise().reshape(-1)
    width = got.width().reshape(-1)
    # (sums of |terms| are float32 products rounded up by about n U: equal to 1e-4)
    assert width.tolist() == pytest.approx((2 * (m_b + pooled + b.abs() @ sp_a.det.reshape(-1))).tolist(), rel=1e-4)
    assert bool((prob < det / 5).all())
    default = compute_bounds(g, x, 0.0, "crown", allow_zero=True, tunings=tun)
    assert bool((width < default.width().reshape(-1) / 3).all())
    assert got.stats["rounding_failure"] == pytest.approx(2 * got.stats["rounding_events"] * math.exp(-50))
    assert got.stats["rounding_events"] >= 1024 + 2 + 4          # a's and b's elements, the output's rows
    assert "rounding_failure" not in default.stats


@pytest.mark.parametrize("n", [100, 1000])
def test_model_scale_against_float32_sums(n):
    """Float32 sums of random terms in four orders (given, reversed, positives first, torch's):
    every error is within 3 U sqrt(v) (the model allows 10), while the deterministic bound E is
    at least 10x the largest error seen: v is the right scale, and the gap is what the model buys."""
    rng = np.random.default_rng(5 + n)
    t = (rng.standard_normal((128, n)) * 10 ** rng.uniform(-1, 1, (128, n))).astype(np.float32)
    exact = t.astype(np.float64).sum(1)
    s = np.abs(t).astype(np.float64).sum(1)
    sq = (t.astype(np.float64) ** 2).sum(1)
    tt = torch.from_numpy
    sp = fpprob._parts(tt(s), tt(sq), tt(np.abs(exact)), n, torch.zeros(128, dtype=torch.float64))
    worst = np.zeros(128)
    for got in _orders(t):
        worst = np.maximum(worst, np.abs(got.astype(np.float64) - exact))
    assert bool((torch.from_numpy(worst) <= 3 * U * sp.var.sqrt()).all())
    assert bool((sp.dot >= 10 * torch.from_numpy(worst)).all())


def _swiglu(d: int = 32, T: int = 3, f: int = 96) -> Graph:
    g = Graph("swiglu", "x", (T, d))
    n = g.add("n", "rmsnorm", "x", weight=(1 + rnd(d, scale=0.1)).float().double(), eps=1e-6)
    gate = g.add("gate", "linear", n, weight=rnd(f, d, scale=d ** -0.5).float().double())
    up = g.add("up", "linear", n, weight=rnd(f, d, scale=d ** -0.5).float().double())
    p = g.add("p", "mul", g.add("act", "silu", gate), up)
    g.add("y", "add", "x", g.add("down", "linear", p, weight=rnd(d, f, scale=f ** -0.5).float().double()))
    return g.infer_shapes()


def _ln_gelu(d: int = 32, T: int = 3, f: int = 128) -> Graph:
    g = Graph("mlp", "x", (T, d))
    n = g.add("n", "layernorm", "x", weight=(1 + rnd(d, scale=0.1)).float().double(),
              bias=rnd(d, scale=0.1).float().double(), eps=1e-5)
    h = g.add("h", "gelu", g.add("fc1", "linear", n, weight=rnd(f, d, scale=d ** -0.5).float().double(),
                                 bias=rnd(f, scale=0.1).float().double()))
    g.add("y", "add", "x", g.add("fc2", "linear", h, weight=rnd(d, f, scale=f ** -0.5).float().double()))
    return g.infer_shapes()


GRAPHS = {"attention": lambda: attention(rep=2, heads=4), "swiglu": _swiglu, "layernorm-gelu": _ln_gelu}


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_sound_and_never_wider_than_the_default(name, eps):
    """Every node's bounds at most the default mode's; zero violations under samples + PGD
    against float32 and float64 engines (at eps 0: the float32 engine's value at the point)."""
    g = GRAPHS[name]()
    x0 = rnd(*g.input_shape).float().double()
    prob = compute_bounds(g, x0, eps, "crown", arithmetic=PROB, allow_zero=True)
    default = compute_bounds(g, x0, eps, "crown", allow_zero=True)
    for node in prob.nodes:
        assert bool((prob.nodes[node].width() <= default.nodes[node].width() * (1 + 1e-9) + 1e-15).all()), node
    assert float(prob.width().sum()) < float(default.width().sum())
    if eps == 0:
        y32 = evaluate(as_dtype(g, torch.float32), x0.float()).double()
        assert bool(((prob.lower <= y32) & (y32 <= prob.upper)).all())
        assert bool(((prob.lower <= evaluate(g, x0)) & (evaluate(g, x0) <= prob.upper)).all())
        return
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, prob.lower, prob.upper, steps=20) == 0


def test_floor_of_a_deep_stack_shrinks():
    """Six wide LayerNorm + GELU MLP blocks at eps 0: the pooled dot margins make the rounding
    floor at least 3x narrower than the default mode's (which charges every element's worst
    case), and the float32 engine stays inside."""
    d, T, f = 64, 2, 256
    g = Graph("deep", "x", (T, d))
    h = "x"
    for i in range(6):
        n = g.add(f"n{i}", "layernorm", h, weight=torch.ones(d, dtype=torch.float64),
                  bias=torch.zeros(d, dtype=torch.float64), eps=1e-5)
        u = g.add(f"g{i}", "gelu", g.add(f"fc1_{i}", "linear", n, weight=rnd(f, d, scale=d ** -0.5).float().double()))
        h = g.add(f"r{i}", "add", h, g.add(f"fc2_{i}", "linear", u, weight=rnd(d, f, scale=0.3 * f ** -0.5).float().double()))
    g.infer_shapes()
    x0 = rnd(T, d).float().double()
    prob = compute_bounds(g, x0, 0.0, "crown", arithmetic=PROB, allow_zero=True)
    default = compute_bounds(g, x0, 0.0, "crown", allow_zero=True)
    assert float(prob.width().max()) * 3 < float(default.width().max())
    y32 = evaluate(as_dtype(g, torch.float32), x0.float()).double()
    assert bool(((prob.lower <= y32) & (y32 <= prob.upper)).all())
    assert prob.stats["rounding_failure"] < 1e-15


def test_norm_sums_by_hand_and_against_float32_sums():
    """A norm's row sums: 10 U sqrt(n) (1 + gamma_n) where that is below gamma_n (n = 388:
    about 197 U against 388 U), gamma_n where not (n = 16: 16 U against 40 U); float32 sums of
    squares of 384 random terms in four orders stay within it, at most 3 U sqrt(n) of S."""
    g388 = float(fp.gamma(388))
    assert fpprob.norm_sums(388) == pytest.approx(10 * U * math.sqrt(388) * (1 + g388), rel=1e-9)
    assert fpprob.norm_sums(388) / U == pytest.approx(197.0, abs=0.1) and g388 / U == pytest.approx(388.0, abs=0.1)
    assert fpprob.norm_sums(16) == float(fp.gamma(16))
    # the model's bound alone (for two sums joined in quadrature): no minimum with gamma_n
    assert fpprob.norm_sums_model(388) == fpprob.norm_sums(388) == fpprob.NORM_SUMS.relative(388)
    assert fpprob.NORM_SUMS.model(16) == pytest.approx(40 * U * (1 + float(fp.gamma(16))), rel=1e-9)
    assert fpprob.NORM_SUMS.model(16) > fpprob.NORM_SUMS.relative(16)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((256, 384)) * 10 ** rng.uniform(-1, 1, (256, 1))).astype(np.float32)
    sq = (x * x).astype(np.float32)                     # the squares, rounded as an engine rounds them
    exact = (x.astype(np.float64) ** 2).sum(1)
    for got in _orders(sq):
        err = np.abs(got.astype(np.float64) - exact)
        assert bool((err <= fpprob.norm_sums(384) * exact).all())
        assert bool((err <= 3 * U * math.sqrt(384) * exact).all())


@pytest.mark.parametrize("method", ["ibp", "zonotope", "alpha"])
def test_other_methods_sound_and_never_wider(method):
    """IBP and zonotopes widen each node's box by the model's elementwise margin, alpha-CROWN
    optimises through the pooled charge: zero violations under samples + PGD against float32 and
    float64 engines, never wider than the default mode's output, a failure probability reported."""
    g = _ln_gelu()
    x0 = rnd(*g.input_shape).float().double()
    prob = compute_bounds(g, x0, 1e-3, method, arithmetic=PROB, alpha_iters=3)
    default = compute_bounds(g, x0, 1e-3, method, alpha_iters=3)
    assert bool((prob.width() <= default.width() * (1 + 1e-9) + 1e-15).all())
    assert 0 < prob.stats["rounding_failure"] < 1e-15
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, 1e-3, prob.lower, prob.upper, steps=20) == 0
