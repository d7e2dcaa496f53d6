"""Attention scores' product remainder read through both projections
(gamma.bounds.score_side): exact by hand, where it applies (RoPE and repeat_kv
chains included), never above the elementwise bound, and sound (samples + PGD
against float64 and float32 engines, both arithmetic modes)."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, score_side
from gamma.bounds.interval import Interval
from gamma.graph import Graph
from gamma.models.common import causal_mask
from gamma.models.llama import rope_tables
from draw import G, rnd
from draw import tensor as _t
from soundness import graph_fn, violations

def one_score(wq: torch.Tensor, wk: torch.Tensor, name: str = "n") -> Graph:
    """One head, one token each side: s = (W_q n) . (W_k n) for n of shape (1, 2)."""
    g = Graph("h", name, (1, 2))
    g.add("q", "linear", name, weight=wq)
    g.add("k", "linear", name, weight=wk)
    g.add("qh", "split_heads", "q", heads=1)
    g.add("kh", "split_heads", "k", heads=1)
    g.add("s", "matmul", "qh", "kh")
    return g.infer_shapes()


def push(products, x0: torch.Tensor, xs: torch.Tensor, eps: float, gen: torch.Generator, steps: int = 20,
         step: float = 0.05) -> torch.Tensor:
    """PGD inside the box: each sample pushes one entry of ``products(xs)`` (flattened per sample),
    chosen at random, up or down by sign steps of ``step * eps``; the pushed samples."""
    n = products(xs).shape[1]
    pick = torch.randint(n, (xs.shape[0],), generator=gen)
    sign = torch.where(torch.rand(xs.shape[0], generator=gen) < 0.5, -1.0, 1.0).double()
    xs = xs.clone().requires_grad_(True)
    for _ in range(steps):
        obj = (sign * products(xs).gather(1, pick[:, None]).squeeze(1)).sum()
        grad, = torch.autograd.grad(obj, xs)
        with torch.no_grad():
            xs = (xs + step * eps * grad.sign()).clamp(x0 - eps, x0 + eps).requires_grad_(True)
    return xs.detach()


def test_remainder_by_hand():
    """One head, d = dh = 2, one token each side, q = W_q n, k = W_k n with W_q = [[1, 1], [1, -1]],
    W_k = [[1, -1], [1, 1]]: W_q^T W_k = [[2, 0], [0, -2]], so with r_n = (1, 1) around n_c = 0 the
    bound is 1 * 2 * 1 + 1 * 2 * 1 = 4 (s = t = 0), against the boxes' r_q . r_k = (2, 2) . (2, 2) = 8."""
    g = one_score(_t([1.0, 1.0], [1.0, -1.0]), _t([1.0, -1.0], [1.0, 1.0]))
    n = Interval(_t([-1.0, -1.0]).reshape(1, 2), _t([1.0, 1.0]).reshape(1, 2))
    box = Interval(_t([-2.0, -2.0]).reshape(1, 1, 2), _t([2.0, 2.0]).reshape(1, 1, 2))
    r = score_side.remainder(g, g["s"], {"n": n}, {}, box, box)
    assert r.flatten().tolist() == pytest.approx([4.0], rel=1e-11)
    # boxes narrower than what n gives: the elementwise bound (0.5 * 0.5 + 0.5 * 0.5) wins
    small = Interval(box.lower * 0.25, box.upper * 0.25)
    assert score_side.remainder(g, g["s"], {"n": n}, {}, small, small).flatten().tolist() == [0.5]
    # a float32 margin of 0.1 on q: adds sum_c E_q,c r_k,c = 0.1 * 2 * 2 = 0.4
    r = score_side.remainder(g, g["s"], {"n": n}, {"q": torch.full((1, 2), 0.1, dtype=torch.float64)}, box, box)
    assert r.flatten().tolist() == pytest.approx([4.4], rel=1e-11)


def test_spectral_by_hand():
    """W_q = I, W_k = [[1, 1], [1, -1]]: M = W_q^T W_k has entries of mixed sign and ||M||_2 = sqrt(2),
    so with r_n = (1, 1) the operator-norm bound is sqrt(2) * ||r||^2 = 2 sqrt(2) against the
    entrywise r^T |M| r = 4 (the largest dn^T M dn' over the box is 2: sound and narrower)."""
    g = one_score(_t([1.0, 0.0], [0.0, 1.0]), _t([1.0, 1.0], [1.0, -1.0]))
    n = Interval(_t([-1.0, -1.0]).reshape(1, 2), _t([1.0, 1.0]).reshape(1, 2))
    box = Interval(_t([-2.0, -2.0]).reshape(1, 1, 2), _t([2.0, 2.0]).reshape(1, 1, 2))
    on = score_side.remainder(g, g["s"], {"n": n}, {}, box, box)
    assert on.flatten().tolist() == pytest.approx([2 * 2 ** 0.5], rel=1e-8)
    assert float(on) >= 2 * 2 ** 0.5
    off = score_side.remainder(g, g["s"], {"n": n}, {}, box, box, spectral_norms=False)
    assert off.flatten().tolist() == pytest.approx([4.0], rel=1e-11)
    corners = torch.tensor([[a, b] for a in (-1.0, 1.0) for b in (-1.0, 1.0)], dtype=torch.float64)
    m = _t([1.0, 1.0], [1.0, -1.0])
    assert float((corners @ m @ corners.T).abs().max()) == 2.0                     # the bilinear form's reach


@pytest.mark.parametrize("shared", [True, False])
def test_spectral_bounds_the_operator_norms(shared):
    """spectral() is at least ||A_hi^T B_hj||_2 (by a float64 SVD of the d x d' product) and within
    1e-6 of it, per head and token pair; shared chains give one value per head."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 1 if shared else 4, 8, 24, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 1 if shared else 5, 8, 20, generator=gen, dtype=torch.float64)
    A, B = (a.expand(3, 4, 8, 24), b.expand(3, 5, 8, 20)) if shared else (a, b)
    sig = score_side.spectral(A, B, shared)
    assert sig.shape == (3, 4, 5)
    exact = torch.linalg.matrix_norm(A.transpose(-1, -2)[:, :, None] @ B[:, None], ord=2)
    assert bool((sig >= exact).all()) and bool((sig <= exact * (1 + 1e-6)).all())


def attention(rope: bool, rep: int = 1, d: int = 16, T: int = 4, heads: int = 2):
    """norm -> q [*scale] [rope], k [rope] [repeat_kv], v -> softmax -> @ V -> residual."""
    g = Graph("att", "x", (T, d))
    g.add("n", "rmsnorm" if rope else "layernorm", "x", weight=1 + rnd(d, scale=0.2),
          **({} if rope else {"bias": rnd(d, scale=0.1)}), eps=1e-5)
    dh, kv = d // heads, heads // rep
    cos, sin = (t.double() for t in rope_tables(T, dh, 10000.0))
    q = g.add("qh", "split_heads", g.add("q", "linear", "n", weight=rnd(d, d, scale=0.4), bias=rnd(d, scale=0.1)),
              heads=heads)
    k = g.add("kh", "split_heads", g.add("k", "linear", "n", weight=rnd(kv * dh, d, scale=0.4)), heads=kv)
    if rope:
        q, k = g.add("qr", "rope", q, cos=cos, sin=sin), g.add("kr", "rope", k, cos=cos, sin=sin)
    else:
        q = g.add("qs", "mul_const", q, c=0.5)
    v = g.add("vh", "split_heads", g.add("v", "linear", "n", weight=rnd(kv * dh, d, scale=0.5)), heads=kv)
    if rep > 1:
        k, v = g.add("krep", "repeat_kv", k, n_rep=rep), g.add("vrep", "repeat_kv", v, n_rep=rep)
    p = g.add("p", "softmax", g.add("s", "matmul", q, k), mask=causal_mask(T))
    av = g.add("av", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    g.add("y", "add", "x", g.add("o", "linear", g.add("m", "merge_heads", av), weight=rnd(d, d, scale=0.5)))
    return g.infer_shapes()


def test_source_walks_the_chain():
    g = attention(rope=True, rep=2, heads=4)
    lin, chain = score_side.source(g, "krep")
    assert lin.name == "k" and [c.name for c in chain] == ["kh", "kr", "krep"]
    assert score_side.source(g, "p") is None and score_side.source(g, "q") is None   # not a chain / no chain


def no_wider(g, x0, eps, arithmetic, off_tunings):
    """Bounds with the default tunings and with ``off_tunings``: every node up to the scores no
    wider with the defaults; after the softmax within 1e-3 (its relaxation is not monotone in its
    input box: the Taylor interval's centring and the row-sum charge move with it)."""
    on = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    off = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=off_tunings)
    after = {"p"} | {n.name for n in g if "p" in g.ancestors(n.name)}
    for name in on.nodes:
        tol = 1e-3 if name in after else 1e-9
        assert bool((on.nodes[name].width() <= off.nodes[name].width() * (1 + tol) + 1e-12).all()), name
    return on, off


@pytest.mark.parametrize("rope,rep", [(False, 1), (True, 1), (True, 2)])
@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_sound_and_never_wider(rope, rep, arithmetic):
    """Every node's bounds no wider with the score-side remainder, the scores' own bounds
    narrower somewhere, and zero violations under samples + PGD (float64 and float32 engines)."""
    g = attention(rope, rep, heads=4 if rep == 2 else 2)
    x0, eps = rnd(*g.input_shape), 0.05
    on, off = no_wider(g, x0, eps, arithmetic, Tunings(score_side=False))
    assert float(on.width().sum()) <= float(off.width().sum()) * (1 + 1e-3)
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_remainder_contains_sampled_products():
    """The per-score bound contains |(q_i - cq_i) . (k_j - ck_j)| at sampled inputs (real
    arithmetic, RoPE and repeat_kv on), with the boxes of the run, and never exceeds
    the elementwise bound."""
    from gamma.ops import evaluate
    g = attention(True, 2, d=64, heads=4)
    x0, eps = rnd(*g.input_shape), 0.05
    res = compute_bounds(g, x0, eps, "crown", arithmetic="real")
    xb, kb = res.nodes["qr"], res.nodes["krep"]
    r = score_side.remainder(g, g["s"], res.nodes, {}, xb, kb)
    assert bool((r <= xb.radius @ kb.radius.transpose(-1, -2)).all())
    xs = x0 + eps * (2 * torch.rand((256,) + x0.shape, generator=G, dtype=torch.float64) - 1)
    vals = evaluate(g, xs, keep_all=True)
    prod = ((vals["qr"] - xb.center) @ (vals["krep"] - kb.center).transpose(-1, -2)).abs()
    assert bool((prod <= r + 1e-12).all())
    assert float(r.sum()) < float((xb.radius @ kb.radius.transpose(-1, -2)).sum())


@pytest.mark.parametrize("rope", [False, True])
def test_spectral_term_sound_where_it_is_narrower(rope):
    """Where the operator-norm bound is the narrower one, the scores' remainder still contains
    |(q_i - cq_i) . (k_j - ck_j)| at sampled inputs and at inputs that PGD pushes to maximise it
    (wide heads, eps large enough that the quadratic term decides); the graph's bounds contain
    samples + PGD of float64 and float32 engines, and are no wider than without the term."""
    from gamma.ops import evaluate
    gen = torch.Generator().manual_seed(11)
    g = attention(rope, 1, d=64, heads=2)
    x0, eps = rnd(*g.input_shape), 0.2
    res = compute_bounds(g, x0, eps, "crown", arithmetic="real")
    qn, kn = ("qr", "kr") if rope else ("qs", "kh")
    xb, kb = res.nodes[qn], res.nodes[kn]
    on = score_side.remainder(g, g["s"], res.nodes, {}, xb, kb)
    off = score_side.remainder(g, g["s"], res.nodes, {}, xb, kb, spectral_norms=False)
    assert bool((on <= off).all()) and bool((on < off * 0.999).any())
    def products(z):
        v = evaluate(g, z, keep_all=True)
        return ((v[qn] - xb.center) @ (v[kn] - kb.center).transpose(-1, -2)).flatten(1)
    xs = x0 + eps * (2 * torch.rand((256,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
    assert bool((products(xs).abs() <= on.flatten() + 1e-12).all())
    assert bool((products(push(products, x0, xs, eps, gen)).abs() <= on.flatten() + 1e-12).all())
    tight = compute_bounds(g, x0, eps, "crown", arithmetic="float32")
    loose = compute_bounds(g, x0, eps, "crown", arithmetic="float32", tunings=Tunings(score_spectral=False))
    assert float(tight.width().sum()) <= float(loose.width().sum()) * (1 + 1e-3)
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, tight.lower, tight.upper, steps=30) == 0


def test_skipped_above_its_budget(monkeypatch):
    """A node whose bound would cost more than BUDGET multiply-adds keeps the elementwise
    remainder (RoPE makes the cost per token pair), and the bounds equal those without it."""
    g = attention(True, 1)
    x0 = rnd(*g.input_shape)
    full = compute_bounds(g, x0, 0.05, "crown")
    off = compute_bounds(g, x0, 0.05, "crown", tunings=Tunings(score_side=False))
    qr, kr = full.nodes["qr"], full.nodes["kr"]
    cost = score_side._cost(g, g["s"], qr, kr)
    assert cost == 2 * 8 * 16 * 16 * 4 * 4 + 2 * 4 * 8 * 16 * 5      # H dh d d' T Tk + H T dh d (1 + Tk)
    assert score_side.remainder(g, g["s"], full.nodes, {}, qr, kr) is not None   # within budget it applies
    monkeypatch.setattr(score_side, "BUDGET", cost - 1)
    assert score_side.remainder(g, g["s"], full.nodes, {}, qr, kr) is None
    on = compute_bounds(g, x0, 0.05, "crown")
    assert torch.equal(on.lower, off.lower) and torch.equal(on.upper, off.upper)
