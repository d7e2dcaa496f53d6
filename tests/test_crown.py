"""CROWN's refinements of a norm's internals (gamma/bounds/refine.py):
:func:`centred_bounds` (bounds of ``x - mean(x)``) and
:func:`norm_mean_square` (bounds of ``mean(c^2)``) contain every sampled and
attacked value, and are tighter than what the box of x gives."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import compute_bounds
from gamma.bounds.crown import Context
from gamma.bounds.refine import centred_bounds, norm_mean_square
from gamma.bounds.norm import norm_stats
from gamma.graph import Graph
from gamma.ops import evaluate

from soundness import violations

GEN = torch.Generator()            # reseeded before every test (below)


@pytest.fixture(autouse=True)
def _seed_per_test(test_seed):
    """Each test draws its own values, whichever tests ran before it."""
    GEN.manual_seed(test_seed)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale


def mixed_norm_graph(op, d=24, T=4):
    """x -> linear (mixes features, so h_i and mean(h) correlate) -> gelu -> linear -> norm."""
    g = Graph(op, "x", (T, d))
    g.add("h1", "linear", "x", weight=rnd(d, d, scale=0.4), bias=rnd(d, scale=0.1))
    g.add("a", "gelu", "h1")
    g.add("h", "linear", "a", weight=rnd(d, d, scale=0.4) + 0.3, bias=rnd(d, scale=0.1))
    kw = dict(weight=rnd(d, scale=0.3) + 1, eps=1e-5)
    if op == "layernorm":
        kw["bias"] = rnd(d, scale=0.1)
    g.add("y", op, "h", **kw)
    return g.infer_shapes()


def _ctx(g, x0, eps):
    res = compute_bounds(g, x0, eps, "crown")
    bounds = dict(res.nodes)
    ctx = Context(g, bounds, {n.name: None for n in g})
    return ctx


@pytest.mark.parametrize("eps", [1e-3, 5e-2])
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_norm_internals_sound_and_tighter(op, eps):
    g = mixed_norm_graph(op)
    x0 = rnd(4, 24)
    ctx = _ctx(g, x0, eps)
    node = g["y"]
    centered = op == "layernorm"
    P = (lambda t: t - t.mean(-1, keepdim=True)) if centered else (lambda t: t)
    refined = norm_mean_square(ctx, node)
    q_lo, q_hi = refined["q"]
    _, _, (bq_lo, bq_hi), (bcl, bcu) = norm_stats(ctx.bounds["h"], node.params["eps"], centered)

    def internals(xs):                                  # (c, q) of the norm's input, flattened
        c = P(evaluate(g, xs, upto="h"))
        return torch.cat([c.flatten(-2), (c * c).mean(-1)], -1)

    if centered:
        cl, cu = refined["c"]
        assert torch.all(cu - cl <= bcu - bcl + 1e-12) and float((cu - cl).sum()) < float((bcu - bcl).sum())
    else:
        assert refined["c"] is None
        cl, cu = bcl, bcu
    lower = torch.cat([cl.flatten(), q_lo.flatten()])
    upper = torch.cat([cu.flatten(), q_hi.flatten()])
    assert violations(internals, x0, eps, lower, upper, targets=torch.arange(lower.numel()), steps=20) == 0
    assert torch.all(q_hi - q_lo <= bq_hi - bq_lo + 1e-12)
    # refined / box width of the mean square, over 20 seeds: layernorm 0.14-0.26, rmsnorm 0.67-0.85
    assert float((q_hi - q_lo).sum()) < (0.3 if centered else 0.9) * float((bq_hi - bq_lo).sum())


def test_mean_square_lower_bound_by_hand_where_the_tangent_reaches_zero():
    """x = t w, t in [0.5, 1.5] -> RMSNorm: q = t^2 mean(w^2), least 0.25 mean(w^2) at t = 0.5.
    The tangent at the box centre w gives mean(2 w c) - mean(w^2) >= 2 (0.5) mean(w^2) - mean(w^2)
    = 0; the scaled tangent (Cauchy-Schwarz) gives mean(w c)^2 / mean(w^2) = 0.25 mean(w^2)."""
    d = 8
    w = torch.arange(1, d + 1, dtype=torch.float64)
    g = Graph("line", "x", (1, 1))
    g.add("h", "linear", "x", weight=w[:, None])
    g.add("y", "rmsnorm", "h", weight=torch.ones(d, dtype=torch.float64), eps=1e-5)
    g.infer_shapes()
    res = compute_bounds(g, torch.ones(1, 1, dtype=torch.float64), 0.5, "crown", arithmetic="real")
    ctx = Context(g, dict(res.nodes), {n.name: None for n in g})
    q_lo, q_hi = norm_mean_square(ctx, g["y"])["q"]
    ms = float((w * w).mean())                               # 25.5
    # (within the float32 cotangent products' error terms, which the pass charges outward)
    assert float(q_lo) == pytest.approx(0.25 * ms, rel=1e-5) and float(q_lo) <= 0.25 * ms
    assert float(q_hi) >= 2.25 * ms * (1 - 1e-12)


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_mean_square_lower_bound_sound_on_wide_boxes(op):
    """Boxes wide enough that the tangent at the box centre reaches zero for some rows:
    the scaled tangent keeps those rows above zero, and sampling + PGD find nothing below."""
    g = mixed_norm_graph(op, d=12, T=3)
    x0, eps = rnd(3, 12), 0.6
    ctx = _ctx(g, x0, eps)
    node = g["y"]
    P = (lambda t: t - t.mean(-1, keepdim=True)) if op == "layernorm" else (lambda t: t)
    q_lo, q_hi = norm_mean_square(ctx, node)["q"]
    assert (q_lo >= 0).all() and (q_lo <= q_hi).all()
    ms = lambda xs: (P(evaluate(g, xs, upto="h")) ** 2).mean(-1)
    assert violations(ms, x0, eps, q_lo.flatten(), q_hi.flatten(), targets=torch.arange(3), steps=30,
                      n_samples=2000) == 0


@pytest.mark.parametrize("intermediate", ["crown", "cut"])
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_crown_with_refined_norm_sound(op, intermediate):
    g = mixed_norm_graph(op)
    g.add("out", "linear", "y", weight=rnd(6, 24, scale=0.3))
    g.infer_shapes()
    x0, eps = rnd(4, 24), 3e-2
    res = compute_bounds(g, x0, eps, "crown", intermediate=intermediate)
    assert violations(lambda xs: evaluate(g, xs), x0, eps, res.lower, res.upper, targets=torch.arange(24)) == 0


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_trace_accounts_for_the_whole_width(op):
    """``backward``'s ``trace`` sees every term the walk adds to the constants:
    per spec, their widths add up to the bound's width.  Optimised GELU slopes
    (``ctx.alpha``) split the halves there (after that, offsets no longer cancel
    between the halves), and float32-valued weights give the linear
    transposes' error terms, so margin, rule and box terms all occur."""
    from gamma.bounds import crown
    d, T = 24, 4
    w32 = lambda *shape, scale: rnd(*shape, scale=scale).float().double()
    g = Graph(op, "x", (T, d))
    g.add("h1", "linear", "x", weight=w32(d, d, scale=0.4), bias=rnd(d, scale=0.1))
    g.add("a", "gelu", "h1")
    g.add("h", "linear", "a", weight=w32(d, d, scale=0.4) + 0.3, bias=rnd(d, scale=0.1))
    kw = dict(bias=rnd(d, scale=0.1)) if op == "layernorm" else {}
    g.add("y", op, "h", weight=rnd(d, scale=0.3) + 1, eps=1e-5, **kw)
    g.add("out", "linear", "y", weight=w32(6, d, scale=0.3))
    g.infer_shapes()
    x0, eps = rnd(T, d), 3e-2
    ctx = _ctx(g, x0, eps)
    ctx.alpha["a"] = (torch.full((T, d), 0.3, dtype=torch.float64), torch.full((T, d), 0.8, dtype=torch.float64))
    S = T * 6
    lams, bias = crown._first_step(ctx, "out", torch.arange(S), torch.float64, "cpu")
    seen, kinds = torch.zeros(S, dtype=torch.float64), set()

    def trace(label, delta):
        assert delta.shape == (2 * S,)
        kinds.add(label.split(":")[1])
        seen.sub_(delta[:S] + delta[S:])

    lb = crown.backward(ctx, lams, bias, ctx.bounds[g.input], trace=trace)
    width = -lb[S:] - lb[:S]
    assert torch.allclose(seen - (bias[:S] + bias[S:]), width, rtol=1e-9, atol=1e-12)
    assert kinds == {"box", "margin", "rule"}
    assert float(width.min()) > 0


def _swiglu(seed: int, outputs: int):
    """A SwiGLU-shaped graph ``y = W (silu(G x) * (U x))`` on (3, 6) inputs, and a random point."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph("swiglu", "x", (3, 6))
    gate = g.add("gate", "linear", "x", weight=torch.randn(8, 6, generator=gen).double())
    up = g.add("up", "linear", "x", weight=torch.randn(8, 6, generator=gen).double())
    h = g.add("h", "mul", g.add("act", "silu", gate), up)
    g.add("y", "linear", h, weight=torch.randn(outputs, 8, generator=gen).double())
    return g.infer_shapes(), torch.randn(3, 6, generator=gen, dtype=torch.float64)


def test_mul_planes_by_hand_and_alpha_on_a_product_is_sound_and_never_looser():
    """alpha-CROWN mixes the two McCormick planes of x * y per element
    (bilinear.mul_planes): a = 1 gives P1 = xl y + yl x - xl yl exactly, a = b = 1/2
    the half-sum rule; on a SwiGLU-shaped graph the optimised bounds contain the
    function (samples + PGD) and are never looser than CROWN's."""
    from gamma.bounds.bilinear import mul_planes
    from gamma.bounds.interval import Interval
    from soundness import graph_fn, violations
    x = Interval(torch.tensor([-1.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 1.5], dtype=torch.float64))
    y = Interval(torch.tensor([0.5, -3.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64))
    one, half = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    (lx, ly, lc), (ux, uy, uc) = mul_planes(x, y, one, one)
    assert torch.equal(lx, y.lower) and torch.equal(ly, x.lower) and torch.equal(lc, -x.lower * y.lower)
    assert torch.equal(ux, y.lower) and torch.equal(uy, x.upper) and torch.equal(uc, -x.upper * y.lower)
    (lx, ly, lc), _ = mul_planes(x, y, half, half)
    assert torch.allclose(lc, -(x.center * y.center + x.radius * y.radius))
    g, x0 = _swiglu(seed=12, outputs=4)
    c = compute_bounds(g, x0, 0.3, "crown")
    a = compute_bounds(g, x0, 0.3, "alpha", alpha_iters=15)
    assert torch.all(a.lower >= c.lower) and torch.all(a.upper <= c.upper)
    assert float(a.width().sum()) < float(c.width().sum())
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, 0.3, a.lower, a.upper, steps=20) == 0


def test_alpha_gradient_by_chunks_is_the_whole_loss_gradient():
    """alpha-CROWN back-propagates each chunk of output rows as it is bounded (one chunk's graph
    held at a time: SmolLM2-135M's block 0 fits in 3 GB instead of exhausting 24 GB): on a
    SwiGLU-shaped graph split into 7 chunks, the accumulated gradient of every alpha equals that of
    the whole loss in one piece, and the bounds are the same (to float32 rounding)."""
    from dataclasses import replace
    from gamma.bounds import alpha as A
    from gamma.bounds.crown import node_bounds
    g, x0 = _swiglu(seed=5, outputs=7)
    ctx = _ctx(g, x0, 0.3)
    box = ctx.bounds[g.input]
    grads, out = [], []
    for chunks in (True, False):
        ctx.tunings = replace(ctx.tunings, chunk_elems=2 * 24 * 3 if chunks else 1 << 22)   # 3 rows a chunk: 7
        ctx.alpha = {"act": tuple(torch.full((3, 8), v, dtype=torch.float64, requires_grad=True) for v in (.3, .7)),
                     "h": tuple(torch.full((3, 8), v, dtype=torch.float64, requires_grad=True) for v in (.6, .2))}
        calls = []
        if chunks:
            b = node_bounds(ctx, "y", box, each=lambda lo, hi: (calls.append(1), A._grad(lo, hi)))
            assert len(calls) == 7 and not b.lower.requires_grad
        else:
            b = node_bounds(ctx, "y", box)
            A._grad(b.lower, b.upper)
        grads.append([p.grad.clone() for pair in ctx.alpha.values() for p in pair])
        out.append(b)
    assert all(float(g1.abs().max()) > 0 for g1 in grads[0])
    # equal up to the float32 rounding of the walk's products, whose kernels differ with the chunk's shape
    for g1, g2 in zip(*grads):
        assert float((g1 - g2).abs().max()) <= 1e-6 * float(g1.abs().max())
    for a, b in ((out[0].lower, out[1].lower), (out[0].upper, out[1].upper)):
        assert float((a - b.detach()).abs().max()) <= 1e-6 * float(b.detach().abs().max())


def test_walk_stops_where_an_unbounded_margin_reaches_every_row(monkeypatch):
    """Once an infinite margin has made every row's bound -inf, the walk returns
    without visiting the nodes before it; where it reaches only some rows, the
    others stay finite and the walk goes on."""
    import math
    from gamma.bounds import crown, crown_rules
    from gamma.bounds.interval import Interval
    g = torch.Generator().manual_seed(11)
    gr = Graph("t", "x", (2, 3))
    gr.add("h", "linear", "x", weight=torch.randn(4, 3, generator=g, dtype=torch.float64), bias=None)
    gr.add("y", "linear", "h", weight=torch.randn(2, 4, generator=g, dtype=torch.float64), bias=None)
    gr.infer_shapes()
    box = Interval(-torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    seen = []
    apply = crown_rules.apply
    monkeypatch.setattr(crown_rules, "apply", lambda node, lam, ctx: (seen.append(node.name), apply(node, lam, ctx))[1])
    for hit, finite_rows in ((torch.full((2, 4), math.inf, dtype=torch.float64), 0), (None, 2)):
        m = torch.zeros(2, 4, dtype=torch.float64)
        if hit is None:
            m[0] = math.inf                          # token 0 only: token 1's rows stay finite
        else:
            m = hit
        ctx = Context(gr, {"x": box, "h": Interval(-10 * torch.ones(2, 4, dtype=torch.float64),
                                                   10 * torch.ones(2, 4, dtype=torch.float64))},
                      {"h": m, "y": None})
        seen.clear()
        b = crown.node_bounds(ctx, "y", box)
        assert int(torch.isfinite(b.lower).sum()) == int(torch.isfinite(b.upper).sum()) == finite_rows
        assert bool(torch.isneginf(b.lower[0]).all()) and bool(torch.isposinf(b.upper[0]).all())
        assert ("h" in seen) is (hit is None)        # the walk stopped at h's margin when every row was hit


def test_norm_fed_nodes_are_those_only_layernorms_read():
    """A residual read by a LayerNorm and an add gets its box from the norm; one also read
    by a GELU, an RMSNorm's input, and the output keep their own CROWN passes."""
    from gamma.bounds.engine import needs_bounds, norm_fed
    d = 6
    g = Graph("r", "x", (2, d))
    g.add("h", "linear", "x", weight=rnd(d, d))
    g.add("n1", "layernorm", "h", weight=rnd(d), bias=rnd(d), eps=1e-5)
    g.add("r1", "add", "h", "n1")                           # h: read by a norm and an add
    g.add("n2", "layernorm", "r1", weight=rnd(d), bias=rnd(d), eps=1e-5)
    g.add("a", "gelu", "r1")                                # r1: also read by a GELU
    g.add("r2", "add", "a", "n2")
    g.add("n3", "rmsnorm", "r2", weight=rnd(d), eps=1e-5)   # r2: an RMSNorm has no centred pass
    g.add("r3", "add", "r2", "n3")
    g.add("t", "transpose", "r3")
    g.add("out", "layernorm", "t", weight=rnd(2), bias=rnd(2), eps=1e-5)   # r3 through a transpose
    g.add("z", "linear", "out", weight=rnd(3, 2))
    g.infer_shapes()
    need = needs_bounds(g)
    assert {"h", "r1", "r2", "r3"} <= need
    assert norm_fed(g, need) == {"h", "r3"}
    g2 = Graph("o", "x", (2, d))
    g2.add("h", "linear", "x", weight=rnd(d, d))
    g2.add("n", "layernorm", "h", weight=rnd(d), bias=rnd(d), eps=1e-5)
    g2.add("y", "add", "h", "n")
    g2.infer_shapes()
    assert norm_fed(g2, {"h"}) == {"h"}
    assert norm_fed(g2, {"h", "y"} | set()) == {"h"}           # never the output, even when asked


def test_row_mean_bounds_exact_for_a_linear_input():
    """For h = W x + b the row mean of h is linear in x: the norm's mean rows give its exact
    range, mean(W x0 + b) +- eps sum_j |mean_i W_ij| (within the float32 products' charge)."""
    d, T, eps = 5, 3, 0.1
    w, b, x0 = rnd(d, d), rnd(d), rnd(T, d)
    g = Graph("m", "x", (T, d))
    g.add("h", "linear", "x", weight=w, bias=b)
    g.add("y", "layernorm", "h", weight=torch.ones(d, dtype=torch.float64), bias=torch.zeros(d, dtype=torch.float64),
          eps=1e-5)
    g.infer_shapes()
    res = compute_bounds(g, x0, eps, "crown", arithmetic="real")
    ctx = Context(g, dict(res.nodes), {n.name: None for n in g})
    norm_mean_square(ctx, g["y"])
    lo, hi = ctx.means["y"]
    centre = (x0 @ w.T + b).mean(-1, keepdim=True)
    rad = eps * w.mean(0).abs().sum()
    assert torch.allclose(lo, centre - rad, rtol=0, atol=1e-9) and torch.allclose(hi, centre + rad, rtol=0, atol=1e-9)
    assert bool((lo <= centre - rad + 1e-15).all()) and bool((hi >= centre + rad - 1e-15).all())


@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_norm_input_box_from_centre_and_mean_sound_and_output_unchanged(arithmetic):
    """A LayerNorm input's box as centred input + mean (no CROWN pass of its own) contains
    every sampled and attacked value of that input; the graph's output bounds stay those
    of the pass they replace (the norm reads the centred input and the mean square only)
    and contain the output under samples + PGD."""
    from gamma.bounds import Tunings
    from soundness import graph_fn
    g = mixed_norm_graph("layernorm")
    g.add("r", "add", "h", "y")                               # the residual: h read by the norm and an add
    g.add("out", "linear", "r", weight=rnd(6, 24, scale=0.3))
    g.infer_shapes()
    x0, eps = rnd(4, 24), 3e-2
    on, off = (compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=Tunings(norm_input_from_centre=v))
               for v in (True, False))
    assert on.stats["crown_nodes"] == off.stats["crown_nodes"] - 1   # h's own pass is gone
    h = on.nodes["h"]
    assert violations(lambda xs: evaluate(g, xs, upto="h").flatten(-2), x0, eps, h.lower.flatten(), h.upper.flatten(),
                      targets=torch.arange(h.lower.numel()), steps=20) == 0
    assert float(h.width().sum()) <= 1.5 * float(off.nodes["h"].width().sum())
    assert torch.allclose(on.lower, off.lower, rtol=1e-4, atol=1e-9) and torch.allclose(on.upper, off.upper, rtol=1e-4,
                                                                                          atol=1e-9)
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, targets=torch.arange(24)) == 0
