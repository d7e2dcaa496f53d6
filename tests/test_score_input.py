"""Attention scores' product remainder from both sides' linear bounds over the input
(gamma.bounds.score_input) and the linear bounds CROWN keeps for it (crown.Linear): exact by
hand, the kept bounds contain float64 and float32 engines' values, the remainder contains the
products at sampled and PGD-pushed inputs, and whole graphs stay sound (samples + PGD) and no
wider than without it."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, score_input, value_input
from gamma.ops import evaluate
from draw import tensor as _t
from soundness import graph_fn, violations
from test_score_side import attention, no_wider, one_score, push

OFF = Tunings(score_side=False)                 # only the boxes and this module's bound


def _capture(monkeypatch) -> dict:
    """The kept linear bounds, copied as the score product reads them (the Context frees them after)."""
    seen: dict = {}
    real = score_input.remainder

    def spy(graph, node, linear, x_box, y_box):
        seen.update(linear)
        return real(graph, node, linear, x_box, y_box)
    monkeypatch.setattr(score_input, "remainder", spy)
    return seen


def test_by_hand():
    """q = u, k = W u with W = [[1, 1], [1, -1]] on u in [-1, 1]^2: the score u^T W u ranges over
    [-2, 2]; CROWN's linear part around the centre 0 is 0, so its bound is the remainder: the
    operator-norm form ||W||_2 ||r||^2 = 2 sqrt(2) here, the boxes' r_q . r_k = 4 without it."""
    g = one_score(_t([1.0, 0.0], [0.0, 1.0]), _t([1.0, 1.0], [1.0, -1.0]), "u")
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    on = compute_bounds(g, x0, 1.0, "crown", arithmetic="real", tunings=OFF)
    assert on.upper.flatten().tolist() == pytest.approx([2 * 2 ** 0.5], rel=1e-8)
    assert on.lower.flatten().tolist() == pytest.approx([-2 * 2 ** 0.5], rel=1e-8)
    off = compute_bounds(g, x0, 1.0, "crown", arithmetic="real", tunings=Tunings(score_side=False, score_input=False))
    assert off.upper.flatten().tolist() == pytest.approx([4.0], rel=1e-10)
    assert score_input.wanted(g, {"q", "k"}) == {"q", "k"}


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("arithmetic,chunk", [("real", None), ("float32", None), ("float32-probabilistic", 512)])
def test_kept_linear_bounds_contain_the_engines(monkeypatch, rope, arithmetic, chunk):
    """a_lo u + b_lo <= y <= a_hi u + b_hi at 512 sampled inputs and at inputs PGD pushes against
    either line, for the float64 forward and (in the float32 modes) a float32 one, for every kept
    node; ``chunk``: spec rows in several passes, whose pieces the engine joins."""
    seen = _capture(monkeypatch)
    g = attention(rope, 1, d=16, heads=2)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.1
    compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic,
                   tunings=Tunings() if chunk is None else Tunings(chunk_elems=chunk))
    assert seen, "no linear bounds were kept"
    for name, lin in seen.items():
        def gaps(z, lin=lin, name=name):          # both lines' violations (positive = outside)
            y = evaluate(g, z, keep_all=True)[name].reshape(z.shape[0], -1)
            u = z.reshape(z.shape[0], -1)
            return torch.cat([u @ lin.a_lo.T + lin.b_lo - y, y - u @ lin.a_hi.T - lin.b_hi], 1)
        start = x0 + eps * (2 * torch.rand((64,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
        assert float(gaps(push(gaps, x0, start, eps, gen, steps=20)).max()) <= 1e-12, name
    us = x0 + eps * (2 * torch.rand((512,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
    dtypes = (torch.float64, torch.float32) if arithmetic == "float32" else (torch.float64,)
    for dtype in dtypes:
        vals = evaluate(g.to(dtype=dtype) if dtype != torch.float64 else g, us.to(dtype), keep_all=True)
        for name, lin in seen.items():
            y = vals[name].double().reshape(512, -1)
            u = us.reshape(512, -1)
            assert bool((u @ lin.a_lo.T + lin.b_lo <= y + 1e-12).all()), (name, dtype)
            assert bool((y <= u @ lin.a_hi.T + lin.b_hi + 1e-12).all()), (name, dtype)


@pytest.mark.parametrize("rope", [False, True])
def test_remainder_contains_products_at_sampled_and_pushed_inputs(monkeypatch, rope):
    """Where this bound is narrower than the boxes', it still contains |(q_i - cq_i) . (k_j - ck_j)|
    at sampled inputs and at inputs PGD pushes to maximise one remainder each."""
    seen: dict = {}
    real = score_input.remainder

    def spy(graph, node, linear, x_box, y_box):
        r = real(graph, node, linear, x_box, y_box)
        seen[node.name] = (r, x_box, y_box, dict(linear))
        return r
    monkeypatch.setattr(score_input, "remainder", spy)
    gen = torch.Generator().manual_seed(7)
    g = attention(rope, 1, d=32, heads=2)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.15
    compute_bounds(g, x0, eps, "crown", arithmetic="real", tunings=OFF)
    r, xb, kb, _ = seen["s"]
    box = xb.radius @ kb.radius.transpose(-1, -2)
    assert bool((r <= box).all()) and bool((r < box * 0.99).any())
    qn, kn = g["s"].inputs
    xs = x0 + eps * (2 * torch.rand((128,) + x0.shape, generator=gen, dtype=torch.float64) - 1)

    def products(z):
        v = evaluate(g, z, keep_all=True)
        return ((v[qn] - xb.center) @ (v[kn] - kb.center).transpose(-1, -2)).flatten(1)
    assert bool((products(xs).abs() <= r.flatten() + 1e-12).all())
    assert bool((products(push(products, x0, xs, eps, gen, steps=25)).abs() <= r.flatten() + 1e-12).all())


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_value_product_read_the_same_way(monkeypatch, whisper_hf_dir, layer):
    """Attention @ V (x the probabilities, y = V^T through split_heads and transpose) on the tiny
    Whisper encoder: the per-entry bound contains |sum_j (P_ij - cP_ij)(V_jc - cV_jc)| at sampled
    and PGD-pushed inputs, is never above the boxes' and narrower somewhere; the same for q k^T."""
    from gamma import Model
    from gamma.io import load_checkpoint
    seen: dict = {}
    real = score_input.remainder

    def spy(graph, node, linear, x_box, y_box):
        r = real(graph, node, linear, x_box, y_box)
        seen[node.name] = (r, x_box, y_box)
        return r
    monkeypatch.setattr(score_input, "remainder", spy)
    model = Model(load_checkpoint(whisper_hf_dir[0]))
    ip = model.input_point("encoder", seq_len=4)
    g = model.graph("encoder", seq_len=4)
    x0, eps = ip.x, 1e-3
    compute_bounds(g, x0, eps, "crown", arithmetic="real", tunings=Tunings(value_side=False))
    gen = torch.Generator().manual_seed(17)
    for name in (f"layer{layer}.attn.av", f"layer{layer}.attn.qk"):
        r, xb, yb = seen[name]
        box = xb.radius @ yb.radius.transpose(-1, -2)
        assert bool((r <= box).all()) and bool((r < box * 0.99).any()), name
        xn, yn = g[name].inputs

        def products(z):
            v = evaluate(g, z, keep_all=True)
            return ((v[xn] - xb.center) @ (v[yn] - yb.center).transpose(-1, -2)).flatten(1)
        xs = x0 + eps * (2 * torch.rand((64,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
        assert bool((products(xs).abs() <= r.flatten() + 1e-12).all()), name
        pushed = push(products, x0, xs, eps, gen, steps=15, step=0.1)
        assert bool((products(pushed).abs() <= r.flatten() + 1e-12).all()), name


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("arithmetic", ["real", "float32", "float32-probabilistic"])
def test_sound_and_never_wider(rope, arithmetic):
    """Every node up to the scores no wider with the input-side bound, the output within 1e-3
    (the softmax's relaxation is not monotone in its box), and zero violations under samples +
    PGD of float64 and float32 engines."""
    g = attention(rope, 1, d=32, heads=2)
    gen = torch.Generator().manual_seed(13)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.05
    on, _ = no_wider(g, x0, eps, arithmetic, Tunings(score_input=False))
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_not_kept_under_cut_or_above_the_budget(monkeypatch):
    """--intermediate cut keeps no linear bounds (its passes stop early), nor does a side whose
    slopes would exceed BUDGET entries (score_input's for q and k, value_input's for V, each of
    which may keep V for the other): the bounds are then those without either module."""
    seen = _capture(monkeypatch)
    built: list = []
    real = value_input.build
    monkeypatch.setattr(value_input, "build", lambda *a: built.append(a[1].name) or real(*a))
    g = attention(False, 1, d=16, heads=2)
    x0 = torch.zeros(g.input_shape, dtype=torch.float64)
    compute_bounds(g, x0, 0.05, "crown", intermediate="cut")
    assert not seen and not built
    monkeypatch.setattr(score_input, "BUDGET", 16)
    monkeypatch.setattr(value_input, "BUDGET", 16)
    a = compute_bounds(g, x0, 0.05, "crown")
    b = compute_bounds(g, x0, 0.05, "crown", tunings=Tunings(score_input=False, value_input=False))
    assert not seen and not built                       # (value_input.build never ran: nothing kept)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
