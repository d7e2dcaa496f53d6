"""Soundness of every op under every method, plus exact cases and ordering.

Each op is wrapped in a tiny graph; boxes of several kinds (narrow, wide,
straddling zero, large magnitudes) are checked with 1,000 samples and a PGD
attack, evaluated both in float64 (the real function) and in float32 (what a
reference engine computes).  Zero violations allowed.
"""

import math

import pytest
import torch

from gamma.bounds import METHODS, compute_bounds
from gamma.errors import GammaError, UnsupportedOp
from gamma.graph import Graph
from gamma.models.common import causal_mask
from gamma.models.llama import rope_tables
from soundness import graph_fn, violations

G = torch.Generator()            # reseeded before every test (below)


@pytest.fixture(autouse=True)
def _seed_per_test(test_seed):
    """Each test draws its own values, whichever tests ran before it."""
    G.manual_seed(test_seed)


def rnd(*shape, scale=1.0):
    return torch.randn(shape, generator=G, dtype=torch.float64) * scale


def g_linear():
    g = Graph("linear", "x", (3, 8))
    g.add("y", "linear", "x", weight=rnd(5, 8), bias=rnd(5))
    return g


def g_conv1d():
    g = Graph("conv1d", "x", (4, 10))
    g.add("y", "conv1d", "x", weight=rnd(6, 4, 3), bias=rnd(6), stride=2, padding=1)
    return g


def g_elementwise(op):
    def build():
        g = Graph(op, "x", (4, 6))
        g.add("y", op, "x")
        return g
    return build


def g_add_mul(op):
    def build():
        g = Graph(op, "x", (3, 6))
        a = g.add("a", "linear", "x", weight=rnd(6, 6, scale=0.5), bias=rnd(6))
        b = g.add("b", "linear", "x", weight=rnd(6, 6, scale=0.5), bias=rnd(6))
        g.add("y", op, a, b)
        return g
    return build


def g_matmul():
    g = Graph("matmul", "x", (4, 8))
    q = g.add("q", "split_heads", g.add("qp", "linear", "x", weight=rnd(8, 8, scale=0.5)), heads=2)
    k = g.add("k", "split_heads", g.add("kp", "linear", "x", weight=rnd(8, 8, scale=0.5)), heads=2)
    g.add("y", "matmul", q, k)
    return g


def g_attention():
    """Softmax attention, so that CROWN meets attention @ V (rows_sum_to_one:
    sign-chosen McCormick planes, gamma.bounds.crown_rules._matmul_planes)."""
    g = Graph("attention", "x", (4, 8))
    heads = lambda n: g.add(n + "h", "split_heads", g.add(n, "linear", "x", weight=rnd(8, 8, scale=0.5)), heads=2)
    q, k, v = heads("q"), heads("k"), heads("v")
    p = g.add("p", "softmax", g.add("s", "matmul", q, k), mask=causal_mask(4))
    g.add("y", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    return g


def g_softmax(masked):
    def build():
        g = Graph("softmax", "x", (2, 5, 5))
        g.add("y", "softmax", "x", mask=causal_mask(5) if masked else None)
        return g
    return build


def g_norm(op):
    def build():
        g = Graph(op, "x", (3, 16))
        kw = dict(weight=rnd(16, scale=0.5) + 1, eps=1e-5)
        if op == "layernorm":
            kw["bias"] = rnd(16, scale=0.1)
        g.add("y", op, "x", **kw)
        return g
    return build


def g_structural():
    """rope, repeat_kv, transpose, merge, add_const, mul_const, matmul_const in one chain."""
    cos, sin = rope_tables(4, 8, 10000.0)
    g = Graph("structural", "x", (4, 16))
    h = g.add("h", "split_heads", "x", heads=2)                # (2, 4, 8)
    h = g.add("r", "rope", h, cos=cos, sin=sin)
    h = g.add("rep", "repeat_kv", h, n_rep=2)                  # (4, 4, 8)
    h = g.add("t", "transpose", h)                             # (4, 8, 4)
    h = g.add("mc", "matmul_const", h, c=rnd(4, 4, 3))         # (4, 8, 3)
    h = g.add("s", "mul_const", h, c=0.125)
    h = g.add("ac", "add_const", h, c=rnd(4, 8, 3))
    g.add("y", "merge_heads", h)                               # (8, 12)
    return g


OPS = {
    "linear": g_linear, "conv1d": g_conv1d,
    "gelu": g_elementwise("gelu"), "gelu_tanh": g_elementwise("gelu_tanh"), "silu": g_elementwise("silu"),
    "add": g_add_mul("add"), "mul": g_add_mul("mul"), "matmul": g_matmul, "attention": g_attention,
    "softmax": g_softmax(False), "softmax_causal": g_softmax(True),
    "layernorm": g_norm("layernorm"), "rmsnorm": g_norm("rmsnorm"), "structural": g_structural,
}

# (centre scale, centre offset, epsilon)
BOXES = {
    "narrow": (1.0, 0.0, 1e-6),
    "medium": (1.0, 0.0, 1e-2),
    "wide": (1.0, 0.0, 0.5),
    "straddle_zero": (0.01, 0.0, 0.05),
    "large": (30.0, 20.0, 1e-3),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("op", list(OPS))
def test_op_sound(op, box, method):
    g = OPS[op]().infer_shapes()
    scale, offset, eps = BOXES[box]
    x0 = rnd(*g.input_shape, scale=scale) + offset
    if op.startswith("softmax") and box == "large":
        x0 = rnd(*g.input_shape, scale=10.0)
    r = compute_bounds(g, x0, eps, method, alpha_iters=3)
    assert torch.all(r.lower <= r.upper)
    for dtype in (torch.float64, torch.float32):
        bad = violations(graph_fn(g, dtype), x0, eps, r.lower, r.upper, steps=10)
        assert bad == 0, f"{op}/{box}/{method}/{dtype}: {bad} violations"


@pytest.mark.parametrize("intermediate", ["crown", "cut"])
def test_attention_planes_sound_and_used(intermediate, monkeypatch):
    """attention @ V: sign-chosen planes with ``Tunings(matmul_planes=True)`` and --intermediate
    crown (in the output's pass), never with cut (its cheap mode) nor by default (the half-sums
    with the value-side remainder, tests/test_value_side.py); all sound (samples + PGD, float64
    and float32), and at eps 0.05 the planes are tighter here than the half-sums alone."""
    from gamma.bounds import Tunings, crown_rules
    used = []
    orig = crown_rules._matmul_planes
    monkeypatch.setattr(crown_rules, "_matmul_planes", lambda n, l, c: (used.append(n.name), orig(n, l, c))[1])
    g = g_attention().infer_shapes()
    x0 = rnd(*g.input_shape)
    default = compute_bounds(g, x0, 0.05, "crown", intermediate=intermediate)
    assert not used
    r = compute_bounds(g, x0, 0.05, "crown", intermediate=intermediate,
                       tunings=Tunings(matmul_planes=True, value_side=False))
    assert (set(used) == {"y"}) is (intermediate == "crown") and (not used) is (intermediate == "cut")
    for b in (default, r):
        for dtype in (torch.float64, torch.float32):
            assert violations(graph_fn(g, dtype), x0, 0.05, b.lower, b.upper, steps=20) == 0
    if intermediate == "crown":
        half = compute_bounds(g, x0, 0.05, "crown", tunings=Tunings(matmul_planes=False, value_side=False))
        assert float(r.width().sum()) < float(half.width().sum())


def test_shift_constant_by_hand():
    """``m^T - cx m'^T`` for the shifted attention @ V product: cx = (0.5, 0.25), m = (2, 3)
    gives (1 - 0.75) (2, 3) = (0.5, 0.75); equal to the matmul form on random data."""
    from gamma.bounds.bilinear import shift_constant
    cx = torch.tensor([[0.5, 0.25]], dtype=torch.float64)                 # (T=1, S'=2)
    m = torch.tensor([[2.0], [3.0]], dtype=torch.float64)                 # (a=2, 1)
    assert shift_constant(cx, m).tolist() == [[0.5, 0.75]]
    cx, m = rnd(3, 4, 5).softmax(-1), rnd(3, 6, 1)                         # (heads, T, S'), (heads, a, 1)
    ref = m.transpose(-1, -2) - cx @ m.expand(3, 6, 5).transpose(-1, -2)
    assert torch.allclose(shift_constant(cx, m), ref, rtol=0, atol=1e-14)


def test_linear_exact_by_hand():
    """y = 2 x0 - 3 x1 + 1 on x = (1, 2) +- 0.1: y in [-3.5 - m, -2.5 + m] with a tiny float32 margin."""
    g = Graph("hand", "x", (2,))
    g.add("y", "linear", "x", weight=torch.tensor([[2.0, -3.0]], dtype=torch.float64),
          bias=torch.tensor([1.0], dtype=torch.float64))
    g.infer_shapes()
    for method in METHODS:
        r = compute_bounds(g, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.1, method)
        assert r.lower.item() == pytest.approx(-3.5, abs=1e-5) and r.lower.item() <= -3.5
        assert r.upper.item() == pytest.approx(-2.5, abs=1e-5) and r.upper.item() >= -2.5


def test_softmax_interval_by_hand():
    """x0 in [0, 1], x1 in [-0.5, 0.5]: p0 = 1/(1 + e^(x1 - x0)) spans [1/(1+e^0.5), 1/(1+e^-1.5)]."""
    g = Graph("sm", "x", (2,))
    g.add("y", "softmax", "x")
    g.infer_shapes()
    r = compute_bounds(g, torch.tensor([0.5, 0.0], dtype=torch.float64), 0.5, "ibp")
    lo, hi = 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-1.5))
    # the only slack is the float32 rounding margin of softmax (a few ulp-relative terms)
    assert lo - 1e-5 < r.lower[0].item() <= lo
    assert hi <= r.upper[0].item() < hi + 1e-5


def test_softmax_of_unbounded_scores_is_unbounded():
    """Softmax clamps its bounds to [0, 1] only where the float32 margin is
    finite: an unbounded score may be inf in float32, and softmax of inf is
    NaN, which no interval contains.  Bounded rows keep the clamp."""
    g = Graph("sm", "x", (2, 3))
    g.add("h", "linear", "x", weight=torch.tensor([[1e30, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64))
    g.add("y", "softmax", "h")
    g.infer_shapes()
    x = torch.tensor([[1e10, 0.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    r = compute_bounds(g, x, 1e9, "ibp")      # row 0: scores up to 1e40, beyond float32
    assert math.isinf(float(r.nodes["h"].upper[0, 0]))
    assert torch.all(r.lower[0] == -math.inf) and torch.all(r.upper[0] == math.inf)
    r = compute_bounds(g, x, 0.1, "ibp")
    assert torch.all(r.lower[1] >= 0) and torch.all(r.upper[1] <= 1) and torch.isfinite(r.lower[1]).all()


def test_alpha_never_looser_than_crown():
    g = OPS["gelu"]().infer_shapes()
    x0 = rnd(*g.input_shape)
    c = compute_bounds(g, x0, 0.3, "crown")
    a = compute_bounds(g, x0, 0.3, "alpha", alpha_iters=5)
    assert torch.all(a.lower >= c.lower) and torch.all(a.upper <= c.upper)


def test_crown_tighter_than_ibp_on_cancellation():
    """y = x - x through two paths: CROWN keeps the input symbolic and gets ~0 width."""
    g = Graph("cancel", "x", (4,))
    a = g.add("a", "linear", "x", weight=torch.eye(4, dtype=torch.float64))
    b = g.add("b", "mul_const", "x", c=-1.0)
    g.add("y", "add", a, b)
    g.infer_shapes()
    x0 = rnd(4)
    ibp = compute_bounds(g, x0, 0.1, "ibp").width().max().item()
    for m in ("crown", "zonotope"):
        w = compute_bounds(g, x0, 0.1, m).width().max().item()
        assert w < 1e-5 < ibp


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon(eps):
    g = g_linear().infer_shapes()
    with pytest.raises(GammaError, match=r"--epsilon must be a finite number > 0"):
        compute_bounds(g, torch.zeros(g.input_shape, dtype=torch.float64), eps, "crown")


def test_unknown_op_names_op_and_method():
    g = g_linear().infer_shapes()
    g.nodes["y"].op = "mystery"
    with pytest.raises(UnsupportedOp, match="method 'ibp' has no rule for op 'mystery' \\(node y\\)"):
        compute_bounds(g, torch.zeros(g.input_shape, dtype=torch.float64), 0.1, "ibp")


def test_bounds_do_not_depend_on_the_centre_layout():
    """A block input sliced out of a forward pass can be a transposed view; float32
    products pick their GEMM path from the layout, so the engine makes the centre
    contiguous (block-wise workers, which receive contiguous copies, then equal the
    serial run bit for bit).  Before, this pre-LN MLP differed by ~1e-13."""
    d, T = 384, 8
    f32 = lambda *s: (torch.randn(*s, generator=G) * 0.05).float().double()   # float32-valued: float32 products
    g = Graph("mlp", "x", (T, d))
    n = g.add("n", "layernorm", "x", weight=f32(d) + 1, bias=f32(d), eps=1e-5)
    h = g.add("h", "gelu", g.add("fc1", "linear", n, weight=f32(4 * d, d), bias=f32(4 * d)))
    g.add("y", "add", "x", g.add("fc2", "linear", h, weight=f32(d, 4 * d), bias=f32(d)))
    g.infer_shapes()
    x = rnd(d, T).T                                                       # (T, d), strides (1, T)
    assert not x.is_contiguous()
    for method, inter in (("ibp", "crown"), ("crown", "crown"), ("crown", "cut")):
        a = compute_bounds(g, x, 1e-3, method, intermediate=inter)
        b = compute_bounds(g, x.contiguous(), 1e-3, method, intermediate=inter)
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), (method, inter)
