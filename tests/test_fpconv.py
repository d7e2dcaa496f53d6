"""The conv1d transpose as a GEMM (ops._conv1d_T) and its float32 form in CROWN
(fpconv.ConvCotangent): exact adjoints, the rounding charge checked with exact
rationals, the fallbacks, and the walk's use of it."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from gamma import ops
from gamma.bounds import crown, crown_rules, fp
from gamma.bounds.fpconv import ConvCotangent
from gamma.bounds.interval import Interval
from gamma.graph import Graph
from soundness import graph_fn, violations

CONFIGS = [  # (C_in, C_out, L_in, K, stride, padding)
    (3, 5, 7, 3, 1, 1), (4, 6, 9, 3, 2, 1), (2, 3, 10, 5, 3, 2), (3, 2, 8, 1, 1, 0), (3, 4, 11, 4, 2, 0),
    (2, 2, 3, 3, 2, 1),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv1d_transpose_is_the_adjoint(cfg):
    """<lam, conv(x)> = <conv^T(lam), x> and the GEMM form equals conv_transpose1d,
    for strides that do and do not divide the padded length."""
    c_in, c_out, n, k, stride, pad = cfg
    g = torch.Generator().manual_seed(sum(cfg))
    w = torch.randn(c_out, c_in, k, generator=g, dtype=torch.float64)
    x = torch.randn(2, c_in, n, generator=g, dtype=torch.float64)
    y = ops._conv1d(x, w, None, stride, pad)
    lam = torch.randn(5, 2, *y.shape[-2:], generator=g, dtype=torch.float64)
    t = ops._conv1d_T(lam, w, stride, pad, n)
    assert t.shape == (5, 2, c_in, n)
    lhs = (lam * y).sum((-1, -2, -3))
    rhs = (t * x).sum((-1, -2, -3))
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-12)
    natural = (y.shape[-1] - 1) * stride - 2 * pad + k
    ref = F.conv_transpose1d(lam.reshape(10, c_out, -1), w, stride=stride, padding=pad, output_padding=n - natural)
    assert torch.allclose(t.reshape(10, c_in, n), ref, rtol=0, atol=1e-12)


def _conv_matrix(w, stride, pad, n):
    """The conv's linear part as a dense (C_out L', C_in n) matrix (its entries are W's)."""
    c_in = w.shape[1]
    eye = torch.eye(c_in * n, dtype=torch.float64).reshape(c_in * n, c_in, n)
    cols = ops._conv1d(eye, w, None, stride, pad)               # (C_in n, C_out, L')
    return cols.reshape(c_in * n, -1).T


@pytest.mark.parametrize("c_out", [3, 40])
def test_conv_cotangent_error_is_covered_exactly(c_out):
    """``(lam conv^T - L) . (x - x0) >= -|lam| . err - floor`` on the box, with exact
    rationals, for cotangents over 60 decades (float32 subnormals and rounding)."""
    c_in, n, k, stride, pad = 2, 6, 3, 2, 1
    g = torch.Generator().manual_seed(c_out)
    w = torch.randn(c_out, c_in, k, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
    w[:, 1] = w[:, 0]                                           # equal channels: cancellations
    xl = torch.randn(c_in, n, generator=g, dtype=torch.float64)
    xu = xl + torch.rand(c_in, n, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 2.0])[:, None]
    xu[0, 2] = xl[0, 2] + 1e-40
    p = ConvCotangent.build(w, torch.ones(c_out, dtype=torch.float64), stride, pad, xl, xu)
    assert p is not None and p.w32.dtype == torch.float32
    out_len = p.y0.shape[-1]
    lam = torch.randn(6, c_out, out_len, generator=g, dtype=torch.float64)
    lam = lam * 10.0 ** (torch.rand(6, 1, 1, generator=g, dtype=torch.float64) * 60 - 45)
    L = p.product(lam, n)
    assert L.dtype == torch.float64 and L.shape == (6, c_in, n) and bool(torch.isfinite(L).all())
    M = _conv_matrix(w, stride, pad, n)                         # (C_out L', C_in n)
    r = torch.maximum(xu - p.x0, p.x0 - xl).reshape(-1)
    lam_f, L_f = lam.reshape(6, -1), L.reshape(6, -1)
    charged = (lam.abs() * p.err).sum((-1, -2)) + p.floor
    fr = lambda v: Fraction(float(v))
    for s in range(6):
        gap = Fraction(0)
        for j in range(M.shape[1]):
            exact = sum(fr(lam_f[s, i]) * fr(M[i, j]) for i in range(M.shape[0]) if M[i, j] != 0)
            gap += abs(exact - fr(L_f[s, j])) * fr(r[j])
        assert gap <= fr(charged[s]), s
    # the allowance is float32's error, not a multiple of the terms themselves
    absconv = ops._conv1d(torch.maximum(xu - p.x0, p.x0 - xl), w.abs(), None, stride, pad)
    assert bool(torch.all(p.err <= fp.gamma(c_out + 1) * 1.01 * absconv + 1e-300))
    # the bracket's constant: y0 is the float64 conv of the centre plus the bias
    assert torch.allclose(p.y0, ops._conv1d(p.x0, w, torch.ones(c_out, dtype=torch.float64), stride, pad))


def test_conv_cotangent_needs_float32_weights_ieee_matmuls_and_finite_inputs():
    w = torch.randn(4, 2, 3, dtype=torch.float64)
    xl, xu = torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, 5, dtype=torch.float64)
    assert ConvCotangent.build(w, None, 1, 1, xl, xu) is None                  # not float32-valued
    w32 = w.to(torch.float32).to(torch.float64)
    assert ConvCotangent.build(w32, None, 1, 1, xl, xu) is not None
    bad = xu.clone()
    bad[1, 3] = math.inf
    assert ConvCotangent.build(w32, None, 1, 1, xl, bad) is None               # unbounded input
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")                             # TF32 / bf16 allowed
        assert ConvCotangent.build(w32, None, 1, 1, xl, xu) is None
    finally:
        torch.set_float32_matmul_precision(old)


def _conv_graph(w, b, stride, pad, n):
    gr = Graph("t", "x", (w.shape[1], n))
    gr.add("y", "conv1d", "x", weight=w, bias=b, stride=stride, padding=pad)
    gr.infer_shapes()
    return gr


def test_conv_rule_uses_float32_and_falls_back_to_float64_on_overflow():
    """The rule returns the float32 GEMM's transpose and the bracket's constant; a
    cotangent beyond float32's range makes it non-finite, and the rule then
    returns the float64 transpose; the walk charges the error at the node."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    gr = _conv_graph(w, b, 2, 1, 7)
    x = Interval(-torch.ones(3, 7, dtype=torch.float64), torch.ones(3, 7, dtype=torch.float64))
    ctx = crown.Context(gr, {"x": x}, {"y": None})
    node = gr["y"]
    lam = torch.randn(3, *node.shape, generator=g, dtype=torch.float64)
    exact = ops._conv1d_T(lam, w, 2, 1, 7)
    (lin,), odd, even = crown_rules.apply(node, lam, ctx)
    assert not torch.equal(lin, exact) and torch.allclose(lin, exact, rtol=1e-5)
    assert torch.allclose(odd, (lam * b[:, None]).sum((-1, -2)), rtol=1e-5, atol=1e-6)   # x0 = 0: lam . b
    assert 0 < even == ctx.linear_product(node).floor < 1e-30
    assert torch.equal(ctx.margin(node), ctx.linear_product(node).err)
    lam[1, 0, 2] = 1e300
    (lin,), odd, even = crown_rules.apply(node, lam, ctx)
    assert torch.equal(lin, ops._conv1d_T(lam, w, 2, 1, 7)) and even is None


def test_crown_through_a_conv_contains_float32_engines_and_matches_float64():
    """CROWN bounds of conv -> GELU -> conv with the float32 transposes contain the
    float32 and float64 outputs at sampled and corner inputs, and agree with the
    float64 transposes' bounds to float32's error."""
    from gamma.bounds import Tunings, compute_bounds
    g = torch.Generator().manual_seed(5)
    w1 = (torch.randn(8, 3, 3, generator=g, dtype=torch.float64) * 0.5).to(torch.float32).to(torch.float64)
    w2 = (torch.randn(6, 8, 3, generator=g, dtype=torch.float64) * 0.3).to(torch.float32).to(torch.float64)
    gr = Graph("t", "x", (3, 10))
    gr.add("c1", "conv1d", "x", weight=w1, bias=None, stride=1, padding=1)
    gr.add("a", "gelu", "c1")
    gr.add("c2", "conv1d", "a", weight=w2, bias=None, stride=2, padding=1)
    gr.infer_shapes()
    x0 = torch.randn(3, 10, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
    eps = 0.05
    got = {f32: compute_bounds(gr, x0, eps, "crown", tunings=Tunings(float32_transpose=f32)) for f32 in (True, False)}
    a, b = got[True], got[False]
    assert not torch.equal(a.lower, b.lower)
    assert torch.allclose(a.lower, b.lower, rtol=0, atol=1e-4) and torch.allclose(a.upper, b.upper, rtol=0, atol=1e-4)
    xs = x0 + eps * (2 * torch.rand(400, 3, 10, generator=g, dtype=torch.float64) - 1)
    xs[:200] = x0 + eps * torch.sign(xs[:200] - x0)                                       # corners
    for dt in (torch.float32, torch.float64):
        xx = xs.to(dt)
        y = F.conv1d(F.gelu(F.conv1d(xx, w1.to(dt), padding=1)), w2.to(dt), stride=2, padding=1).double()
        assert bool((y >= a.lower).all()) and bool((y <= a.upper).all())
        assert violations(graph_fn(gr, dt), x0, eps, a.lower, a.upper, n_samples=200, steps=20, restarts=2) == 0
