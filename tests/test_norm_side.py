"""An RMSNorm's product remainder read one linear layer back on its input side
(gamma.bounds.norm_side): exact by hand, where it applies, never wider, and sound
(samples + PGD against float64 and float32 engines, both arithmetic modes)."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, norm_side
from gamma.bounds.rows import Dense
from gamma.graph import Graph
from draw import rnd
from draw import tensor as _t
from soundness import graph_fn, violations

def test_saving_by_hand():
    """RMSNorm input x = p + W z with W = [[1, 1], [1, -1]], r_p = 0, r_z = (1, 1), lam w = (1, 1):
    U = (1, 1) . W dz = (2, 0) . dz has radius 2; the box form reads r_c = |W| r_z = (2, 2), radius 4.
    With r_s = 0.5 the remainder 0.5 * 4 = 2 shrinks by 0.5 * (4 - 2) = 1."""
    bs = norm_side.BackSide(weight=_t([1.0, 1.0], [1.0, -1.0]), r_p=_t([0.0, 0.0]), r_z=_t([1.0, 1.0]),
                            centre=_t([0.3, -0.2]))
    cs = (_t([2.0, 2.0]), _t([0.5]), _t([0.3, -0.2]))            # r_c, r_s (per row), c_m = the centre
    lam = Dense(_t([1.0, 1.0]).reshape(1, 1, 2))
    assert norm_side.saving(bs, lam, _t(1.0, 1.0), cs, centered=False).tolist() == pytest.approx([1.0], rel=1e-9)
    # lam w = (1, 2): U = (3, -1) . dz, radius 4 against the box's 6: saving 0.5 * 2 = 1
    lam = Dense(_t([1.0, 2.0]).reshape(1, 1, 2))
    assert norm_side.saving(bs, lam, _t(1.0, 1.0), cs, centered=False).tolist() == pytest.approx([1.0], rel=1e-9)
    # a centre that disagrees with c's by (0.5, 0): the back-side interval moves by |lam w . shift| = 0.5
    bs = bs._replace(centre=_t([0.8, -0.2]))
    assert norm_side.saving(bs, lam, _t(1.0, 1.0), cs, centered=False).tolist() == pytest.approx([0.75], rel=1e-9)
    # an unbounded inverse scale or a back side no narrower than the box: nothing saved
    assert norm_side.saving(bs, lam, _t(1.0, 1.0), (cs[0], _t([float("inf")]), cs[2]), False).tolist() == [0.0]
    wide = bs._replace(r_p=_t([5.0, 5.0]))
    assert norm_side.saving(wide, lam, _t(1.0, 1.0), cs, centered=False).tolist() == [0.0]


def block(d: int = 16, T: int = 3):
    """x -> linear -> silu -> o = linear (+ bias, float32-valued weight: the float32 product
    path); r = x + o; RMSNorm(r) -> linear."""
    g = Graph("rms", "x", (T, d))
    g.add("a", "linear", "x", weight=rnd(d, d, scale=0.5))
    g.add("z", "silu", "a")
    g.add("o", "linear", "z", weight=rnd(d, d, scale=0.3).float().double(), bias=rnd(d, scale=0.1))
    g.add("r", "add", "x", "o")
    g.add("n", "rmsnorm", "r", weight=1 + rnd(d, scale=0.2), eps=1e-5)
    g.add("y", "linear", "n", weight=rnd(8, d, scale=0.5))
    return g.infer_shapes()


def test_source_finds_the_projection():
    g = block()
    p, lin, add = norm_side.source(g, g["n"])
    assert (p.name, lin.name, add.name) == ("x", "o", "r")
    g2 = Graph("m", "x", (2, 4))
    g2.add("n", "rmsnorm", "x", weight=rnd(4), eps=1e-5)
    assert norm_side.source(g2.infer_shapes(), g2["n"]) is None       # the input itself: nothing one layer back


@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_sound_and_never_wider(arithmetic):
    """Every node's bounds with the back-side remainder no wider than without, the output
    narrower (its norm's product remainder is a large part of it here), and zero violations
    under samples + PGD against float64 and float32 engines."""
    g = block()
    x0, eps = rnd(*g.input_shape), 0.1
    on = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    off = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=Tunings(norm_side=False))
    assert norm_side.build(g, g["n"], dict(on.nodes), {}).w32 is not None   # the float32 product path is tested
    for name in on.nodes:
        assert bool((on.nodes[name].width() <= off.nodes[name].width() * (1 + 1e-9) + 1e-12).all()), name
    assert float(on.width().sum()) < 0.99 * float(off.width().sum())
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_layernorm_unchanged():
    """LayerNorm keeps its own remainder (on Whisper's blocks the saving was not worth its time)."""
    g = Graph("ln", "x", (3, 8))
    g.add("o", "linear", "x", weight=rnd(8, 8, scale=0.3))
    g.add("r", "add", "x", "o")
    g.add("n", "layernorm", "r", weight=1 + rnd(8, scale=0.2), bias=rnd(8, scale=0.1), eps=1e-5)
    g.infer_shapes()
    x0 = rnd(3, 8)
    on = compute_bounds(g, x0, 0.1, "crown")
    off = compute_bounds(g, x0, 0.1, "crown", tunings=Tunings(norm_side=False))
    assert torch.equal(on.lower, off.lower) and torch.equal(on.upper, off.upper)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_product_remainder_is_part_of_what_the_rule_charges(op):
    """The saving comes off the rule's even constant, so the product remainder
    ``|w| r_c r_s`` it is taken from must be inside that constant: in the row remainder's
    elementwise part and in the elementwise error, on every row of the decomposed form,
    and r_s is 0 on the other rows."""
    from gamma.bounds.interval import Interval
    from gamma.bounds.jacobian import linearize
    g = Graph("n", "x", (4, 8))
    g.add("y", op, "x", weight=1 + rnd(8, scale=0.3), **({"bias": rnd(8)} if op == "layernorm" else {}), eps=1e-5)
    g.infer_shapes()
    x0 = rnd(4, 8)
    x0[1] *= 0.01                                              # a row with a wide inverse scale
    lin = linearize(g["y"], Interval(x0 - 0.05, x0 + 0.05))
    r_c, r_s, _ = lin.cs
    prod = g["y"].params["weight"].abs() * r_c * r_s
    assert bool((prod <= lin.rem.E * (1 + 1e-12)).all()) and bool((prod <= lin.err * (1 + 1e-12)).all())
    assert bool((r_s >= 0).all()) and bool((prod > 0).any())


def test_float32_product_never_saves_more():
    """With float32-valued weights W^T g runs in float32 with its rounding charged: the saving is
    never above the float64 computation's, and within 1e-5 of it (relative to the remainder)."""
    from gamma.bounds.crown import Context
    g = block()
    x0 = rnd(*g.input_shape)
    res = compute_bounds(g, x0, 0.1, "crown", arithmetic="real")
    ctx = Context(g, dict(res.nodes), {n.name: None for n in g})
    bs = norm_side.build(g, g["n"], ctx.bounds, {})
    assert bs.w32 is not None
    cs = ctx.linearization(g["n"]).cs
    lam = Dense(rnd(9, 3, 16) * torch.logspace(-30, 3, 9, dtype=torch.float64).reshape(9, 1, 1))
    w = g["n"].params["weight"]
    f32 = norm_side.saving(bs, lam, w, cs, centered=False)
    f64 = norm_side.saving(bs._replace(w32=None), lam, w, cs, centered=False)
    box = (lam.t.abs() * w.abs() * cs[0] * cs[1]).reshape(9, -1).sum(1)
    assert bool((f32 <= f64).all()) and bool(((f64 - f32) <= 1e-5 * box + 1e-300).all()) and bool((f64 > 0).any())
