"""The per-node float32 margins (gamma.bounds.fpmargin): the cancellation-aware
dot-product bound against float32 sums in several orders, and the attention @ V
row-sum term, each against a float64 reference whose own error is added."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gamma.bounds import compute_bounds, fp, fpmargin
from gamma.bounds.interval import Interval
from gamma.graph import Graph
from soundness import graph_fn, violations

U = 2.0 ** -24
EPS64 = 2.0 ** -52


def _orders(t32: np.ndarray):
    """float32 sums of each row of ``t32`` (rows of float32 terms) in orders that
    make the partial sums large: given, reversed, positives first, and torch's."""
    def seq(rows):
        acc = np.zeros(rows.shape[0], dtype=np.float32)
        for j in range(rows.shape[1]):
            acc = (acc + rows[:, j]).astype(np.float32)
        return acc
    pos_first = np.take_along_axis(t32, np.argsort(-t32, axis=1), axis=1)
    return [seq(t32), seq(t32[:, ::-1]), seq(pos_first), torch.from_numpy(t32).sum(1).numpy()]


@pytest.mark.parametrize("n", [8, 100, 1000])
def test_signed_dot_error_covers_float32_sums_in_adversarial_orders(n):
    rng = np.random.default_rng(11 + n)
    t = (rng.standard_normal((64, n)) * 10 ** rng.uniform(-2, 2, (64, n))).astype(np.float32)
    t[:8] = np.abs(t[:8])                                    # one-signed rows: no cancellation to use
    td = t.astype(np.float64)
    exact, s = td.sum(1), np.abs(td).sum(1)
    bound = fp.dot_error_signed(torch.tensor(s), torch.tensor(np.abs(exact)), n, extra=0).numpy()
    for got in _orders(t):
        observed = np.abs(got.astype(np.float64) - exact) + 2 * n * EPS64 * s
        assert (observed <= bound).all()
    old = fp.dot_error(torch.tensor(s), n).numpy()
    assert (bound <= old * (1 + 1e-6)).all()                 # never looser than gamma_n S
    mixed = np.abs(exact[8:]) < 0.2 * s[8:]
    # M = (S + |sum|) / 2 < 0.6 S: about (1 + 0.6 (n - 1)) / n of gamma_n S
    assert mixed.any() and (bound[8:][mixed] <= (1 + 0.6 * (n - 1)) / n * 1.001 * old[8:][mixed]).all()


def test_signed_dot_error_covers_float32_matmul_products():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((32, 384)).astype(np.float32)
    w = (rng.standard_normal((48, 384)) * 0.05).astype(np.float32)
    got = (torch.from_numpy(a) @ torch.from_numpy(w).T).double().numpy()
    ad, wd = a.astype(np.float64), w.astype(np.float64)
    exact, s = ad @ wd.T, np.abs(ad) @ np.abs(wd).T
    bound = fp.dot_error_signed(torch.tensor(s), torch.tensor(np.abs(exact)), 384).numpy()
    assert (np.abs(got - exact) + 2 * 384 * EPS64 * s <= bound).all()


def test_signed_dot_error_by_hand():
    # S = 4, |sum| = 0, 3 terms, no extra rounding: M = 2, E = (U*4 + 2*U*(1+U)*2) / (1 - 3U) + 3 * 2^-149
    e = fp.dot_error_signed(torch.tensor([4.0]), torch.tensor([0.0]), 3, extra=0).item()
    want = (4 * U + 2 * U * (1 + U) * 2) / (1 - 3 * U) + 3 * 2.0 ** -149
    assert e == pytest.approx(want * (1 + 2.0 ** -40), rel=1e-12)
    assert fp.dot_error_signed(torch.tensor([3.5e38]), torch.tensor([0.0]), 3).item() == float("inf")
    assert fp.dot_error_signed(torch.tensor([1.0]), torch.tensor([1.0]), 2 ** 24).item() == float("inf")


def _value_offset_attention(offset: float) -> Graph:
    """softmax(x x^T) (x + offset): value rows far from zero, so the attention @ V
    rules' ``rows sum to one`` shift carries a large constant."""
    g = Graph("attn_offset", "x", (6, 4))
    p = g.add("p", "softmax", g.add("s", "matmul", "x", "x"))
    v = g.add("v", "add_const", "x", c=torch.full((4,), offset, dtype=torch.float64))
    g.add("y", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    return g.infer_shapes()


def test_attention_value_margin_charges_the_row_sum_gap_by_hand():
    g = _value_offset_attention(1000.0)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    r = compute_bounds(g, x0, 1e-6, "ibp")
    node, ins = g["y"], [r.nodes["p"], r.nodes["vt"]]
    out = Interval(r.nodes["y"].lower, r.nodes["y"].upper)
    prev = {"p": torch.full((6, 6), 1e-7, dtype=torch.float64)}
    with_gap = fpmargin.margin(node, ins, out, prev)
    no_gap = fpmargin.margin(node, ins, out, {"p": torch.zeros(6, 6, dtype=torch.float64)})
    # the gap term is sum_j 1e-7 (= 6e-7 per row) times mean_s |v|max per output column
    vmean = ins[1].abs_max().mean(-1)                        # (4,)
    want = 6e-7 * (1 + 2.0 ** -40) * vmean.expand(6, 4)
    assert torch.allclose(with_gap - no_gap, want, rtol=1e-9)


@pytest.mark.parametrize("method", ["ibp", "crown", "zonotope"])
def test_attention_with_offset_values_contains_float32_engine(method):
    g = _value_offset_attention(3000.0)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    for eps in (1e-7, 1e-3):
        r = compute_bounds(g, x0, eps, method)
        assert torch.isfinite(r.width()).all()
        bad = violations(graph_fn(g, torch.float32), x0, eps, r.lower, r.upper, steps=10)
        assert bad == 0, f"{method} eps {eps}: {bad} violations"


def test_proven_rules_are_not_doubled_and_hedged_ones_are():
    g = Graph("lin", "x", (2, 8))
    gen = torch.Generator().manual_seed(6)
    g.add("y", "linear", "x", weight=torch.randn(3, 8, generator=gen).double())     # float32 values
    g.infer_shapes()
    x = Interval(torch.ones(2, 8, dtype=torch.float64), torch.ones(2, 8, dtype=torch.float64) * 2)
    out = Interval(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    s = x.abs_max() @ g["y"].params["weight"].abs().T
    want = fp.dot_error_signed(s, out.abs_max(), 9)
    assert torch.equal(fpmargin.margin(g["y"], [x], out), want)
    assert {"gelu", "silu", "softmax", "layernorm"} <= fpmargin.HEDGED
    # RMSNorm: derived but for the library's rsqrt, whose allowance alone is doubled
    assert not {"linear", "matmul", "conv1d", "add", "mul", "rope", "rmsnorm"} & fpmargin.HEDGED


def test_constants_that_are_not_float32_values_are_charged_their_rounding():
    """A float32 engine rounds a float64 constant on load: add_const, mul_const,
    matmul_const and linear charge |c - fl32(c)| (times |x|); float32-valued
    constants (checkpoints) cost nothing more."""
    gen = torch.Generator().manual_seed(8)
    c64 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    c32 = c64.to(torch.float32).to(torch.float64)
    x = Interval(torch.full((2, 3), -2.0, dtype=torch.float64), torch.full((2, 3), 1.0, dtype=torch.float64))
    out = Interval(torch.full((2, 4), -1.0, dtype=torch.float64), torch.full((2, 4), 1.0, dtype=torch.float64))

    def mm(c):
        g = Graph("mc", "x", (2, 3))
        g.add("y", "matmul_const", "x", c=c)
        return fpmargin.margin(g.infer_shapes()["y"], [x], out)
    extra = torch.full((2, 3), 2.0, dtype=torch.float64) @ (c64 - c32).abs()
    assert torch.all(mm(c64) >= mm(c32) + extra)
    assert torch.equal(mm(c32), fp.dot_error_signed(x.abs_max() @ c32.abs(), out.abs_max(), 3))

    def add(c):
        g = Graph("ac", "x", (2, 4))
        g.add("y", "add_const", "x", c=c)
        return fpmargin.margin(g.infer_shapes()["y"], [out], out)
    assert torch.allclose(add(c64[0]) - add(c32[0]), 2 * (c64[0] - c32[0]).abs().expand(2, 4), rtol=1e-12)
    assert torch.equal(add(c32[0]), U * out.abs_max())


def test_rmsnorm_float32_output_cap_holds_for_adversarial_rows():
    """Every float32 RMSNorm output obeys ``output_cap`` whatever the input: one
    dominant entry (the largest |n_i| = sqrt(d)), tiny and subnormal rows, zeros."""
    d = 64
    gen = torch.Generator().manual_seed(9)
    g = Graph("rms", "x", (6, d))
    w = torch.randn(d, generator=gen).double()
    g.add("y", "rmsnorm", "x", weight=w, eps=1e-6)
    g = g.infer_shapes()
    cap = fpmargin.output_cap(g["y"])
    rows = torch.zeros(6, d, dtype=torch.float64)
    rows[0, 3] = 1e3                                          # one entry carries the whole mean square
    rows[1] = 1e-20 * torch.randn(d, generator=gen, dtype=torch.float64)
    rows[1, 5] = 1e-18
    rows[2, 7] = 3e-3                                         # comparable to sqrt(eps)
    rows[3] = torch.randn(d, generator=gen, dtype=torch.float64) * 1e4
    rows[4, 0], rows[4, 1] = 1e30, -1e30
    y = graph_fn(g, torch.float32)(rows[None])[0].double()
    assert torch.isfinite(y).all()
    assert (y.abs() <= cap).all()
    assert (y[0].abs().max() >= 0.999 * (w.abs()[3] * d ** 0.5))   # the cap is reached up to rounding
    assert fpmargin.output_cap(_value_offset_attention(0.0)["p"]) is None


def test_layernorm_margin_is_unbounded_where_the_float32_variance_may_vanish():
    """The rsqrt's relative error is (1 - q)^-1/2 - 1 with q = e_var / (v_lo + eps):
    finite and about q / 2 for small q, inf once the float32 variance may reach 0."""
    d = 16
    g = Graph("ln", "x", (1, d))
    g.add("y", "layernorm", "x", weight=torch.ones(d, dtype=torch.float64),
          bias=torch.zeros(d, dtype=torch.float64), eps=0.0)
    g = g.infer_shapes()
    gen = torch.Generator().manual_seed(10)
    x0 = torch.randn(1, d, generator=gen, dtype=torch.float64) + 10.0     # unit variance
    narrow = compute_bounds(g, x0, 1e-3, "ibp")
    m = fpmargin.margin(g["y"], [Interval(x0 - 1e-3, x0 + 1e-3)], narrow.nodes["y"])
    assert torch.isfinite(m).all()
    flat = torch.full((1, d), 1e4, dtype=torch.float64)                   # zero variance in the box
    wide = Interval(flat - 1e-3, flat + 1e-3)
    out = compute_bounds(g, flat, 1e-3, "ibp", arithmetic="real").nodes["y"]
    assert torch.isinf(fpmargin.margin(g["y"], [wide], out)).all()


def _common_mode_ln(d: int = 32):
    """x (1, 1) -> linear to (1, d) -> LayerNorm: each element's box straddles the others'
    (the box admits zero variance) while every input gives variance t^2 var(w) > 0."""
    gen = torch.Generator().manual_seed(21)
    g = Graph("cm", "x", (1, 1))
    w = (torch.randn(d, 1, generator=gen) * 0.2 + 1.0).float().double()       # float32 values
    g.add("h", "linear", "x", weight=w)
    g.add("y", "layernorm", "h", weight=torch.ones(d, dtype=torch.float64),
          bias=torch.zeros(d, dtype=torch.float64), eps=1e-5)
    return g.infer_shapes()


def test_crown_norm_box_uses_crown_variance_so_the_float32_margin_stays_finite():
    """Where the input box of a LayerNorm admits zero variance the box's rsqrt error is
    unbounded, but CROWN's mean square (the correlation between the elements) stays
    away from zero: the norm's box and margin then come from it, finite and sound."""
    g = _common_mode_ln()
    x0 = torch.ones(1, 1, dtype=torch.float64)
    eps = 0.5                                   # t in [0.5, 1.5]: boxes overlap, variance >= 0.25 var(w)
    ibp = compute_bounds(g, x0, eps, "ibp")
    assert not torch.isfinite(ibp.upper - ibp.lower).all()
    cr = compute_bounds(g, x0, eps, "crown")
    assert torch.isfinite(cr.upper - cr.lower).all()
    for dtype in (torch.float32, torch.float64):
        assert violations(graph_fn(g, dtype), x0, eps, cr.lower, cr.upper, n_samples=2000, seed=3) == 0
    # the real-arithmetic box of the norm is no looser than the plain interval rule's
    real = compute_bounds(g, x0, eps, "crown", arithmetic="real").nodes["y"]
    plain = compute_bounds(g, x0, eps, "ibp", arithmetic="real").nodes["y"]
    assert (real.lower >= plain.lower).all() and (real.upper <= plain.upper).all()
    assert (real.width() < 0.5 * plain.width()).all()
