"""Attention @ V's product remainder with V read through its linear bounds over the input
(gamma.bounds.value_input): exact by hand, the per-entry bound contains the value side's
products at sampled and PGD-pushed inputs, the token-block layout equals the dense one, and
whole graphs stay sound (samples + PGD, float64 and float32 engines) and no wider than without it."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, value_input
from gamma.bounds.value_input import ValueInput, entries
from gamma.ops import evaluate
from soundness import as_dtype, graph_fn, violations
from test_score_side import attention, push

OFF = Tunings(value_input=False)


def _capture(monkeypatch) -> dict:
    """node name -> (ValueInput, y box) as the engine built them."""
    seen: dict = {}
    real = value_input.build

    def spy(graph, node, linear, y_box):
        vi = real(graph, node, linear, y_box)
        seen[node.name] = (vi, y_box)
        return vi
    monkeypatch.setattr(value_input, "build", spy)
    return seen


def test_entries_by_hand():
    """One head, two value columns over two input elements: B_0 = [1, 1], B_1 = [1, -1], bands
    0.1 and 0.2, r_u = 1.  For lam = (1, 1) the slopes cancel in the second input element:
    |(2, 0)| . r_u + 0.1 + 0.2 = 2.3; for lam = (1, -1): |(0, 2)| . r_u + 0.3 = 2.3; for
    lam = (2, 0): |(2, 2)| . r_u + 0.2 = 4.2 (no cancellation)."""
    slopes = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64).reshape(1, 2, 1, 2)   # (H, dh, Tk, m)
    band = torch.tensor([0.1, 0.2], dtype=torch.float64).reshape(1, 2, 1)
    vi = ValueInput(slopes, band, torch.ones(1, 2, dtype=torch.float64))
    lam = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]], dtype=torch.float64).reshape(3, 1, 1, 2)
    assert entries(vi, lam).flatten().tolist() == pytest.approx([2.3, 2.3, 4.2], rel=1e-10)


def test_served_rows_by_hand():
    """Slopes over the whole input: token-compact rows are all served; of a dense cotangent, the rows
    at one query get that query's entries and inf elsewhere, rows over two queries get inf (no
    reading), a row at no query gets zeros at query 0 (its cotangent is zero); token blocks serve
    every row."""
    gen = torch.Generator().manual_seed(29)
    slopes = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)           # (H, dh, Tk, n)
    band = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64)
    whole = ValueInput(slopes, band, torch.rand(1, 5, generator=gen, dtype=torch.float64))
    t = torch.zeros(3, 2, 4, 3, dtype=torch.float64)                                  # (S, H, T, dh)
    t[0, :, 2] = torch.randn(2, 3, generator=gen, dtype=torch.float64)                # row 0: query 2 only
    t[1, :, 0] = 1.0
    t[1, 1, 3] = -1.0                                                                   # row 1: queries 0 and 3
    got = value_input.served(whole, t, compact=False)
    want = entries(whole, t[0:1, :, 2:3])[0, :, 0]
    assert torch.equal(got[0, :, 2], want)
    assert bool(torch.isinf(got[0, :, [0, 1, 3]]).all())
    assert bool(torch.isinf(got[1]).all())
    assert bool((got[2, :, 0] == 0).all()) and bool(torch.isinf(got[2, :, 1:]).all())
    assert torch.equal(value_input.served(whole, t[0:1, :, 2:3], compact=True), entries(whole, t[0:1, :, 2:3]))
    blocks = ValueInput(slopes, band, torch.rand(4, 5, generator=gen, dtype=torch.float64))
    assert torch.equal(value_input.served(blocks, t, compact=False), entries(blocks, t))
    assert value_input.served(None, t, compact=True) is None
    assert value_input.served(whole, t[1:2], compact=False) is None


def test_spread_by_hand():
    """One head, two value columns over two input elements, B_0 = [1, 1], B_1 = [1, -1], no band.
    With r = (1, 4) the row lam = (1, 0) gives v = (1, 1): |v| . r = 5 and Cauchy-Schwarz
    sqrt(1 + 4) sqrt(5) = 5, equal; with r = (1, 1) the row (1, 1) gives v = (2, 0): |v| . r = 2
    against sqrt(4) sqrt(2) = 2.83, the price of reading every query at dh^2 per entry."""
    slopes = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64).reshape(1, 2, 1, 2)
    band = torch.zeros(1, 2, 1, dtype=torch.float64)
    for r, lam, want in (([1.0, 4.0], [1.0, 0.0], 5.0), ([1.0, 1.0], [1.0, 1.0], 2 * 2 ** 0.5)):
        reach = torch.tensor([r], dtype=torch.float64)
        vi = ValueInput(slopes, band, reach, gram=value_input.gram(slopes, reach))
        lam_t = torch.tensor(lam, dtype=torch.float64).reshape(1, 1, 1, 2)
        assert value_input.spread(vi, lam_t).item() == pytest.approx(want, rel=1e-10)
        assert value_input.spread(vi, lam_t).item() >= want


def test_spread_contains_the_products(monkeypatch, whisper_hf_dir):
    """The tiny Whisper encoder (V's slopes over the whole input: the stem mixes the frames), the
    last block's attention @ V, random cotangents over every query: the Cauchy-Schwarz reading is
    never below the exact one (:func:`entries`), and contains ``|sum_c lam_ic (V_jc - cV_jc)|``
    at 64 sampled and PGD-pushed inputs, float64 and float32 engines; the served rows spread over
    the queries get it, the rows at one query the exact one."""
    seen = _capture(monkeypatch)
    from gamma import Model
    from gamma.io import load_checkpoint
    model = Model(load_checkpoint(whisper_hf_dir[0]))
    x0 = model.input_point("encoder", seq_len=4).x
    g = model.graph("encoder", seq_len=4)
    eps = 1e-3
    compute_bounds(g, x0, eps, "crown")
    name = [n for n in seen if n.endswith("attn.av")][-1]
    vi, yb = seen[name]
    assert vi.gram is not None and vi.reach.shape[0] == 1
    gen = torch.Generator().manual_seed(37)
    H, dh, Tk = vi.band.shape
    lam = torch.randn(4, H, g[name].shape[-2], dh, generator=gen, dtype=torch.float64)   # (S, H, T, dh)
    bound = value_input.spread(vi, lam)
    assert bool((bound >= entries(vi._replace(f32=None), lam) * (1 - 1e-12)).all())
    assert bool((bound < torch.einsum("shic,hcj->shij", lam.abs(), yb.radius)).any())   # V's box
    one = torch.zeros_like(lam)
    one[:, :, 1] = lam[:, :, 1]
    both = value_input.served(vi, torch.cat([lam, one]), compact=False)
    assert torch.equal(both[:4], bound)
    assert torch.equal(both[4:, :, 1], entries(vi, one[:, :, 1:2])[:, :, 0])
    yn = g[name].inputs[1]

    def products(z, dtype=torch.float64):
        y = evaluate(as_dtype(g, dtype), z.to(dtype), keep_all=True)[yn].double() - yb.center
        return torch.einsum("shic,nhcj->nshij", lam, y).flatten(1)
    xs = x0 + eps * (2 * torch.rand((64,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
    b = bound.flatten()
    for dtype in (torch.float64, torch.float32):
        assert bool((products(xs, dtype).abs() <= b).all())
    pushed = push(products, x0, xs, eps, gen, steps=20)
    assert bool((products(pushed).abs() <= b).all())


@pytest.mark.parametrize("rope,rep", [(False, 1), (True, 2)])
def test_built_per_token_and_equal_to_the_dense_layout(monkeypatch, rope, rep):
    """A block on its own input: V's key j moves with input token j alone, so the slopes are kept
    as that token's block; entries from them equal those of the slopes over the whole input (the
    other blocks are zero)."""
    seen = _capture(monkeypatch)
    g = attention(rope, rep, d=16, heads=4)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    compute_bounds(g, x0, 0.05, "crown", arithmetic="real")
    vi, _ = seen["av"]
    assert vi is not None and vi.f32 is not None
    vi = vi._replace(f32=None)                          # the float64 products in both layouts
    H, dh, Tk, d = vi.slopes.shape
    assert (H, dh, Tk, d) == (4, 4, 4, 16)
    dense = torch.zeros(H, dh, Tk, Tk, d, dtype=torch.float64)
    idx = torch.arange(Tk)
    dense[:, :, idx, idx] = vi.slopes
    full = ValueInput(dense.reshape(H, dh, Tk, Tk * d), vi.band, vi.reach.reshape(1, -1))
    lam = torch.randn(5, H, 3, dh, generator=gen, dtype=torch.float64)
    assert torch.allclose(entries(vi, lam), entries(full, lam), rtol=1e-12, atol=0)


def test_float32_products_bound_the_float64_ones(monkeypatch):
    """The float32 products' bound is never below the float64 products' (which equal the exact
    sums to float64 rounding) and within 1e-5 of them; rows of mixed magnitudes (1e-30 to 1e3),
    so underflow and cancellation are both met."""
    seen = _capture(monkeypatch)
    g = attention(False, 1, d=32, heads=4)
    gen = torch.Generator().manual_seed(23)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    compute_bounds(g, x0, 0.05, "crown", arithmetic="real")
    vi, _ = seen["av"]
    H, dh = vi.band.shape[:2]
    scale = 10.0 ** torch.randint(-30, 4, (6, H, 2, dh), generator=gen).double()
    lam = torch.randn(6, H, 2, dh, generator=gen, dtype=torch.float64) * scale
    lam[0] = lam[0].sign()                              # +-1: the dot products cancel exactly in places
    a, b = entries(vi, lam), entries(vi._replace(f32=None), lam)
    assert bool((a >= b).all())
    assert bool((a <= b * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("rope,rep", [(False, 1), (True, 2)])
@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_entries_contain_the_products(monkeypatch, rope, rep, arithmetic):
    """For random cotangents, |sum_c lam_ic (V_jc - cV_jc)| at 128 sampled inputs and at inputs PGD
    pushes to maximise one entry each lies within ``entries``; the float32 engine's V too (float32
    mode); and the bound is narrower than V's box somewhere."""
    seen = _capture(monkeypatch)
    g = attention(rope, rep, d=32, heads=4)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.08
    compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    vi, yb = seen["av"]
    yn = g["av"].inputs[1]
    lam = torch.randn(3, *vi.band.shape[:1], g["av"].shape[-2], vi.band.shape[1], generator=gen,
                      dtype=torch.float64)                                             # (S, H, T, dh)
    bound = entries(vi, lam)                                                           # (S, H, T, Tk)
    box = torch.einsum("shic,hcj->shij", lam.abs(), yb.radius)
    assert bool((bound < box).any())

    def products(z, dtype=torch.float64):
        gg = as_dtype(g, dtype)
        y = evaluate(gg, z.to(dtype), keep_all=True)[yn].double() - yb.center        # (N, H, dh, Tk)
        return torch.einsum("shic,nhcj->nshij", lam, y).flatten(1)
    xs = x0 + eps * (2 * torch.rand((128,) + x0.shape, generator=gen, dtype=torch.float64) - 1)
    b = bound.flatten()
    assert bool((products(xs).abs() <= b + 1e-12).all())
    if arithmetic == "float32":
        assert bool((products(xs, torch.float32).abs() <= b + 1e-12).all())
    pushed = push(products, x0, xs, eps, gen, steps=20)
    assert bool((products(pushed).abs() <= b + 1e-12).all())


@pytest.mark.parametrize("rope,rep", [(False, 1), (True, 2)])
@pytest.mark.parametrize("arithmetic", ["real", "float32", "float32-probabilistic"])
def test_sound_and_no_wider(rope, rep, arithmetic):
    """The residual output no wider than without the module (attention @ V's inputs and everything
    before are the same passes), narrower somewhere, and zero violations under samples + PGD of
    float64 and float32 engines."""
    g = attention(rope, rep, d=32, heads=4)
    gen = torch.Generator().manual_seed(13)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.05
    on = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    off = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=OFF)
    for name in on.nodes:
        assert bool((on.nodes[name].width() <= off.nodes[name].width() * (1 + 1e-9) + 1e-12).all()), name
    assert bool((on.width() < off.width() * 0.999).any())
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_whisper_encoder_sound(monkeypatch, whisper_hf_dir):
    """The tiny Whisper encoder (two blocks, transformers' weights) in the default mode: its bounds
    contain gamma's float64 and float32 forwards under samples + PGD, and are no wider than
    without the module.  The stem's convolutions mix the input frames, so V's slopes span the
    whole input there (the layout served to token-compact rows only)."""
    seen = _capture(monkeypatch)
    from gamma import Model
    from gamma.io import load_checkpoint
    model = Model(load_checkpoint(whisper_hf_dir[0]))
    ip = model.input_point("encoder", seq_len=4)
    g = model.graph("encoder", seq_len=4)
    eps = 1e-3
    on = compute_bounds(g, ip.x, eps, "crown")
    assert seen and all(vi is not None and vi.reach.shape[0] == 1 for vi, _ in seen.values())
    off = compute_bounds(g, ip.x, eps, "crown", tunings=OFF)
    assert bool((on.width() <= off.width() * (1 + 1e-3)).all())
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), ip.x, eps, on.lower, on.upper, steps=20) == 0
