"""Attention @ V's remainder read through the value layer (gamma.bounds.value_side):
exact by hand, where it applies, never wider than the box remainder, and sound
(samples + PGD against float64 and float32 engines, both arithmetic modes)."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds
from gamma.bounds import value_side
from gamma.graph import Graph
from gamma.models.common import causal_mask
from draw import rnd
from soundness import graph_fn, violations

def test_remainder_by_hand():
    """One head, dh = d = 2, V_j = W n_j with W = [[1, 1], [1, -1]], r_n = (1, 1) for both keys,
    lam_i = (1, 1), r_P = (0.5, 0.25). u_j = lam . V_j = (2, 0) . n_j has radius 2; the box
    remainder reads r_V = |W| r_n = (2, 2), radius 4. Remainders: 0.75 * 2 = 1.5 against 3."""
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    vs = value_side.ValueSide(w=w[None], r_n=torch.ones(2, 2, dtype=torch.float64), margin=None,
                              shift=torch.zeros(1, 2, 2, dtype=torch.float64))
    lam = torch.tensor([1.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 2)      # (S, H, I, dh)
    r_p = torch.tensor([0.5, 0.25], dtype=torch.float64).reshape(1, 1, 2)          # (H, I, Tk)
    r_v = torch.full((1, 2, 2), 2.0, dtype=torch.float64)                          # (H, dh, Tk)
    assert value_side.remainder(vs, lam, r_p, r_v).tolist() == pytest.approx([1.5], rel=1e-11)
    # lam_i = (1, -1): u_j = (0, 2) . n_j, radius 2 again; a shift of V's centre by (0.5, 0) at key 0
    # moves that key's interval: min(4, 2 + |lam . (0.5, 0)|) = 2.5
    vs = vs._replace(shift=torch.tensor([[[0.5, 0.0], [0.0, 0.0]]], dtype=torch.float64))
    lam = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    assert value_side.remainder(vs, lam, r_p, r_v).tolist() == pytest.approx([0.5 * 2.5 + 0.25 * 2], rel=1e-11)
    # V's float32 margin adds |lam| . m to the value-side radius: with m = 1 everywhere, min(4, 4.5) = 4 at key 0
    vs = vs._replace(margin=torch.ones(1, 2, 2, dtype=torch.float64))
    assert value_side.remainder(vs, lam, r_p, r_v).tolist() == pytest.approx([0.5 * 4 + 0.25 * 4], rel=1e-11)


def attention(rep: int = 1, d: int = 32, T: int = 4, heads: int = 2):
    """norm -> q, k, v (kv heads = heads / rep, repeated) -> softmax(q k^T) @ V -> o -> residual;
    small score weights, so that at eps 0.05 the softmax is not saturated and the product's
    remainder matters; float32-valued weights, as checkpoints hold (the remainder's float32
    product path)."""
    g = Graph("attention", "x", (T, d))
    src = g.add("n", "layernorm", "x", weight=1 + rnd(d, scale=0.2), bias=rnd(d, scale=0.1), eps=1e-5)
    kvd = d // rep

    def heads_of(name, rows, h, scale):
        return g.add(name + "h", "split_heads", g.add(name, "linear", src, weight=rnd(rows, d, scale=scale).float().double(),
                                                      bias=rnd(rows, scale=0.1)), heads=h)
    q, k = heads_of("q", d, heads, 0.15), heads_of("k", kvd, heads // rep, 0.15)
    v = heads_of("v", kvd, heads // rep, 0.6)
    if rep > 1:
        k = g.add("kr", "repeat_kv", k, n_rep=rep)
        v = g.add("vr", "repeat_kv", v, n_rep=rep)
    p = g.add("p", "softmax", g.add("s", "matmul", q, k), mask=causal_mask(T))
    av = g.add("av", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    o = g.add("o", "linear", g.add("m", "merge_heads", av), weight=rnd(d, d, scale=0.5))
    g.add("y", "add", "x", o)
    return g.infer_shapes()


def test_source_finds_the_value_layer():
    g = attention(rep=2, heads=4)
    lin, rep, kv = value_side.source(g, g["av"])
    assert (lin.name, rep, kv) == ("v", 2, 2)
    assert value_side.source(attention(), attention()["av"])[1:] == (1, 2)
    assert value_side.source(g, g["s"]) is None                 # q k^T: k's heads, no transpose


@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_sound_and_never_wider(rep, arithmetic):
    """Output and every node's bounds with the value-side remainder: zero violations under
    samples + PGD (float64 and float32 engines), never wider than the box remainder at any
    node, and narrower at the output in real arithmetic (in the float32 mode this toy's
    norm margins dominate the later tokens)."""
    g = attention(rep=rep)
    x0, eps = rnd(*g.input_shape), 0.05
    # (value_input.py, which reads V through the input instead, off in both: this module's own gain)
    on = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=Tunings(value_input=False))
    off = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic,
                         tunings=Tunings(value_side=False, value_input=False))
    vs = value_side.build(g, g["av"], dict(on.nodes), {}, on.nodes["vt"])
    assert vs is not None and vs.w32 is not None                 # the float32 product path is the one tested
    for name in on.nodes:
        assert bool((on.nodes[name].width() <= off.nodes[name].width() * (1 + 1e-9) + 1e-12).all()), name
    if arithmetic == "real":
        assert float(on.width().sum()) < 0.995 * float(off.width().sum())
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_value_side_off_without_a_value_layer():
    """V straight from the input (no linear layer): the rule keeps the box remainder."""
    g = Graph("a", "x", (4, 8))
    q = g.add("qh", "split_heads", g.add("q", "linear", "x", weight=rnd(8, 8, scale=0.5)), heads=2)
    k = g.add("kh", "split_heads", g.add("k", "linear", "x", weight=rnd(8, 8, scale=0.5)), heads=2)
    v = g.add("vh", "split_heads", "x", heads=2)
    p = g.add("p", "softmax", g.add("s", "matmul", q, k))
    g.add("y", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    g.infer_shapes()
    x0 = rnd(4, 8)
    on = compute_bounds(g, x0, 0.05, "crown")
    off = compute_bounds(g, x0, 0.05, "crown", tunings=Tunings(value_side=False))
    assert torch.equal(on.lower, off.lower) and torch.equal(on.upper, off.upper)
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, 0.05, on.lower, on.upper, steps=20) == 0


def test_skipped_where_the_value_layers_inputs_move_together():
    """Where V's own box is far narrower than n's box carried through |W_h| (n's elements move
    together, as in a whole encoder), build gives None and the rule keeps the box remainder;
    with V's box as wide as that image it gives the value side."""
    from gamma.bounds.interval import Interval
    g = attention()
    n = Interval(-torch.ones(4, 32, dtype=torch.float64), torch.ones(4, 32, dtype=torch.float64))
    w = g["v"].params["weight"]
    image = (n.radius @ w.abs().T).reshape(4, 2, 16).transpose(0, 1).transpose(-1, -2)    # (H, dh, Tk)
    for scale, expect in ((0.1, None), (0.9, value_side.ValueSide)):
        y = Interval(-scale * image, scale * image)
        got = value_side.build(g, g["av"], {"n": n}, {}, y)
        assert (got is None) if expect is None else isinstance(got, expect)


def test_float32_product_bounds_the_float64_one():
    """With float32-valued weights the remainder's product runs in float32 with its rounding
    charged: never below the float64 computation's remainder, and within 1e-5 of it."""
    from gamma.bounds.crown import Context
    g = attention()
    x0 = rnd(*g.input_shape)
    res = compute_bounds(g, x0, 0.05, "crown", arithmetic="real")
    ctx = Context(g, dict(res.nodes), {n.name: None for n in g})
    vs = value_side.build(g, g["av"], ctx.bounds, {}, ctx.inb(g["av"], 1))
    assert vs.w32 is not None and vs.w32.dtype == torch.float32
    lam = rnd(7, 2, 4, 16) * torch.logspace(-30, 3, 7, dtype=torch.float64).reshape(7, 1, 1, 1)
    r_p, r_v = ctx.inb(g["av"], 0).radius, ctx.inb(g["av"], 1).radius
    f32 = value_side.remainder(vs, lam, r_p, r_v)
    f64 = value_side.remainder(vs._replace(w32=None), lam, r_p, r_v)
    assert bool((f32 >= f64).all()) and bool((f32 <= f64 * (1 + 1e-5) + 1e-300).all())
