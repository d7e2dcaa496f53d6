"""gamma.bounds.rows: token-compact cotangents, by hand and in use."""

import torch

from gamma.bounds import Tunings, crown, crown_rules, rows
from gamma.bounds.rows import Rows
from gamma.graph import Graph


def test_dense_take_dot_by_hand():
    # 2 rows, node shape (H=2, T=3, n=2); row 0 at token 2, row 1 at token 0
    t = torch.arange(8, dtype=torch.float64).reshape(2, 2, 1, 2)
    r = Rows(t, torch.tensor([2, 0]), 3)
    d = r.dense()
    assert d.shape == (2, 2, 3, 2)
    assert torch.equal(d[0, :, 2], t[0, :, 0]) and torch.equal(d[1, :, 0], t[1, :, 0])
    assert float(d.abs().sum()) == float(t.abs().sum())            # zeros elsewhere
    c = torch.arange(6, dtype=torch.float64).reshape(3, 2)          # (T, n): broadcast over heads
    assert torch.equal(r.take(c).squeeze(), torch.tensor([[4.0, 5.0], [0.0, 1.0]], dtype=torch.float64))
    # dot: row 0 = sum t[0] * c[2] = (0*4 + 1*5) + (2*4 + 3*5) = 28; row 1 = (4*0+5*1) + (6*0+7*1) = 12
    assert torch.equal(r.dot(c), torch.tensor([28.0, 12.0], dtype=torch.float64))
    assert torch.equal(r.dot(c), (d * c).reshape(2, -1).sum(1))
    v = torch.tensor([1.0, -1.0], dtype=torch.float64)              # no token axis
    assert torch.equal(r.dot(v), (d * v).reshape(2, -1).sum(1))
    assert torch.equal(rows.add(r, d).sum(), 2 * d.sum())           # compact + dense = dense sum


def test_compact_rules_are_used(monkeypatch):
    """On a block the walk stays compact through linear, norm and the query side."""
    gen = torch.Generator().manual_seed(0)
    W = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.3
    g = Graph("blk", "x", (4, 8))
    n = g.add("n", "rmsnorm", "x", weight=torch.ones(8, dtype=torch.float64), eps=1e-6)
    q = g.add("q", "split_heads", g.add("qp", "linear", n, weight=W(8, 8)), heads=2)
    k = g.add("k", "split_heads", g.add("kp", "linear", n, weight=W(8, 8)), heads=2)
    g.add("y", "matmul", q, k)
    g.infer_shapes()
    used = []
    for op in ("linear", "rmsnorm", "matmul"):                  # rules that ran on a compact cotangent
        monkeypatch.setitem(crown_rules.RULES, op, (lambda f, op: lambda n, lam, c: (
            isinstance(lam, Rows) and used.append(op), f(n, lam, c))[1])(crown_rules.RULES[op], op))
    from gamma.bounds import compute_bounds
    x0 = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    a = compute_bounds(g, x0, 1e-2, "crown")
    assert {"linear", "rmsnorm", "matmul"} <= set(used)
    b = compute_bounds(g, x0, 1e-2, "crown", tunings=Tunings(compact_rows=False))
    assert torch.allclose(a.lower, b.lower, rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.upper, b.upper, rtol=1e-12, atol=1e-14)


def test_matmul_sparse_rows_equals_dense():
    """The row-compacted transpose product equals the dense one, zero rows,
    a NaN row (kept: NaN must propagate) and the all-zero case included."""
    from gamma.ops import matmul_sparse_rows
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    lam = torch.zeros(4, 3, 6, dtype=torch.float64)
    lam[0, 1] = torch.randn(6, generator=gen, dtype=torch.float64)
    lam[2, 0, 3] = -2.0
    got = matmul_sparse_rows(lam, w)
    assert got.shape == (4, 3, 5) and torch.equal(got[lam.abs().sum(-1) == 0], torch.zeros(10, 5, dtype=torch.float64))
    assert torch.allclose(got, lam @ w, rtol=1e-15, atol=0)
    lam[3, 2, 0] = float("nan")
    assert torch.isnan(matmul_sparse_rows(lam, w)[3, 2]).all()
    assert torch.equal(matmul_sparse_rows(torch.zeros(2, 6, dtype=torch.float64), w), torch.zeros(2, 5, dtype=torch.float64))


def _llama_block(T: int = 4, d: int = 8, seed: int = 0) -> Graph:
    """A pre-norm block with RoPE, grouped kv heads, causal softmax attention and a
    SwiGLU MLP (silu: the chord slope on both sides, so its lines are parallel)."""
    from gamma.models.common import causal_mask
    from gamma.models.llama import rope_tables
    gen = torch.Generator().manual_seed(seed)
    W = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * 0.4
    cos, sin = rope_tables(T, d // 2, 10000.0)
    g = Graph("blk", "x", (T, d))
    n = g.add("n", "rmsnorm", "x", weight=torch.ones(d, dtype=torch.float64) + W(d) * 0.1, eps=1e-6)
    q = g.add("qr", "rope", g.add("q", "split_heads", g.add("qp", "linear", n, weight=W(d, d)), heads=2),
              cos=cos.double(), sin=sin.double())
    k = g.add("kr", "rope", g.add("k", "split_heads", g.add("kp", "linear", n, weight=W(d // 2, d)), heads=1),
              cos=cos.double(), sin=sin.double())
    v = g.add("v", "split_heads", g.add("vp", "linear", n, weight=W(d // 2, d)), heads=1)
    k, v = g.add("kk", "repeat_kv", k, n_rep=2), g.add("vv", "repeat_kv", v, n_rep=2)
    s = g.add("s", "mul_const", g.add("qk", "matmul", q, k), c=0.5)
    p = g.add("p", "softmax", s, mask=causal_mask(T))
    a = g.add("av", "matmul", p, g.add("vt", "transpose", v), rows_sum_to_one=True)
    h = g.add("h", "add", "x", g.add("o", "linear", g.add("m", "merge_heads", a), weight=W(d, d)))
    n2 = g.add("n2", "rmsnorm", h, weight=torch.ones(d, dtype=torch.float64), eps=1e-6)
    act = g.add("act", "silu", g.add("gate", "linear", n2, weight=W(2 * d, d)))
    up = g.add("up", "linear", n2, weight=W(2 * d, d))
    g.add("y", "add", h, g.add("down", "linear", g.add("sw", "mul", act, up), weight=W(d, 2 * d)))
    return g.infer_shapes()


def test_single_token_rows_slice_instead_of_gather():
    """Rows.of marks rows that share one token; take then slices (no per-row copy)
    and take / dot / every rule give what the per-row gather gives."""
    t = torch.arange(12, dtype=torch.float64).reshape(3, 2, 1, 2)            # node (H=2, T=4, n=2)
    one = Rows.of(t, torch.tensor([2, 2, 2]), 4)
    mixed = Rows.of(t, torch.tensor([2, 0, 2]), 4)
    assert one.one == 2 and mixed.one is None and one.like(t * 2).one == 2
    c = torch.arange(8, dtype=torch.float64).reshape(4, 2)                   # (T, n)
    assert one.take(c).shape == (1, 2) and torch.equal(one.take(c), c[2:3])
    gathered = Rows(t, one.tok, 4)                                           # same rows, gathered per row
    assert torch.equal(torch.broadcast_to(one.take(c), gathered.take(c).shape), gathered.take(c))
    assert torch.equal(one.dot(c), gathered.dot(c)) and torch.equal(one.dot(c), (one.dense() * c).reshape(3, -1).sum(1))
    assert rows.Sym(one).full().one == 2


def test_single_token_rows_give_the_gathered_bounds(monkeypatch):
    from gamma.bounds import compute_bounds
    g = _llama_block()
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    six = Tunings(chunk_elems=6 * 2 * 64)                      # 6 spec rows per chunk at the output: some
    a = compute_bounds(g, x0, 1e-2, "crown", tunings=six)      # chunks within one token, some across two
    seen = []
    orig = Rows.of
    monkeypatch.setattr(Rows, "of", staticmethod(lambda t, tok, T: (seen.append(orig(t, tok, T).one),
                                                                     Rows(t, tok, T))[1]))
    b = compute_bounds(g, x0, 1e-2, "crown", tunings=six)
    assert None in seen and any(s is not None for s in seen)               # both paths were taken in a
    assert torch.allclose(a.lower, b.lower, rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.upper, b.upper, rtol=1e-12, atol=1e-14)


def test_repeat_kv_T_is_the_transpose():
    """<repeat_kv(x), lam> == <x, repeat_kv_T(lam)> exactly on integers, n_rep 1-4."""
    from gamma.ops import repeat_kv, repeat_kv_T
    gen = torch.Generator().manual_seed(2)
    for n_rep in (1, 2, 3, 4):
        x = torch.randint(-5, 6, (3, 2, 5, 4), generator=gen).double()
        lam = torch.randint(-5, 6, (3, 2 * n_rep, 5, 4), generator=gen).double()
        assert float((repeat_kv(x, n_rep) * lam).sum()) == float((x * repeat_kv_T(lam, n_rep)).sum())
        assert torch.equal(repeat_kv_T(lam, n_rep), lam.reshape(3, 2, n_rep, 5, 4).sum(2))


def test_band_rounds_outward():
    """c - h <= bl and c + h >= bu in float64, for offsets of every magnitude and sign."""
    gen = torch.Generator().manual_seed(4)
    e = torch.randint(-300, 300, (20000,), generator=gen).double()
    bl = torch.randn(20000, generator=gen, dtype=torch.float64) * 2.0 ** e
    bu = bl + torch.rand(20000, generator=gen, dtype=torch.float64) * 2.0 ** (e - torch.randint(0, 60, (20000,), generator=gen))
    a = torch.zeros_like(bl)
    c, h = crown._band(a, bl, a, bu)
    assert bool((c - h <= bl).all()) and bool((c + h >= bu).all())
    assert crown._band(a, bl, a + 1e-300, bu) is None                      # slopes differ: no band


def test_parallel_lines_keep_the_halves_shared(monkeypatch):
    """silu's lines share the chord slope, so the walk keeps ``[lam; -lam]`` as one
    cotangent through the MLP (no split at the activation) and gives the bounds of
    the split walk; samples + PGD find no violation; alpha (different slopes) splits."""
    from gamma.bounds import compute_bounds
    from soundness import graph_fn, violations
    g = _llama_block()
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    splits = set()
    orig = crown.sign_dependent
    monkeypatch.setattr(crown, "sign_dependent", lambda n, c: (lambda r: (r and splits.add(n.name), r)[1])(orig(n, c)))
    for intermediate in ("crown", "cut"):
        splits.clear()
        r = compute_bounds(g, x0, 1e-2, "crown", intermediate=intermediate)
        # nothing splits: attention @ V by its half-sums (sign-chosen planes only with
        # Tunings(matmul_planes=True), tests/test_bounds.py), silu by its band
        assert splits == set(), intermediate
        for dtype in (torch.float64, torch.float32):
            assert violations(graph_fn(g, dtype), x0, 1e-2, r.lower, r.upper, steps=20) == 0
        with monkeypatch.context() as m:
            m.setattr(crown.Context, "band", lambda self, node: None)
            s = compute_bounds(g, x0, 1e-2, "crown", intermediate=intermediate)
        assert "act" in splits                                   # without the band silu splits
        assert torch.allclose(r.lower, s.lower, rtol=1e-12, atol=1e-13)
        assert torch.allclose(r.upper, s.upper, rtol=1e-12, atol=1e-13)
    splits.clear()
    a = compute_bounds(g, x0, 1e-2, "alpha", alpha_iters=2)
    assert splits and violations(graph_fn(g, torch.float64), x0, 1e-2, a.lower, a.upper, steps=20) == 0


def test_rope_T_is_the_transpose():
    """<rope(x), lam> == <x, rope_T(lam)> for the tables of a real head size, with
    per-row (gathered) and shared tables."""
    from gamma.models.llama import rope_tables
    from gamma.ops import AFFINE, rope_T
    cos, sin = (t.double() for t in rope_tables(5, 8, 10000.0))              # (T, dh)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64)
    lam = torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64)
    node = type("N", (), {"params": {"cos": cos, "sin": sin}})()
    y = AFFINE["rope"].lin(node, x)
    assert abs(float((y * lam).sum()) - float((x * rope_T(lam, cos, sin)).sum())) < 1e-12
    # by hand on one pair: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
    l1, l2 = lam[..., :4], lam[..., 4:]
    want = torch.cat([l1 * cos[:, :4] + l2 * sin[:, 4:], l2 * cos[:, 4:] - l1 * sin[:, :4]], -1)
    assert torch.allclose(rope_T(lam, cos, sin), want, rtol=1e-15, atol=1e-15)


def test_outer_is_contiguous_and_the_product():
    """rows.outer: the broadcast product, written contiguously, with a shared or per-row row factor."""
    gen = torch.Generator().manual_seed(6)
    # a compact cotangent whose memory has the heads outermost, as upstream rules can leave it
    lam_t = torch.randn(2, 3, 1, 5, generator=gen, dtype=torch.float64).transpose(0, 1)   # (S, H, 1, Tk)
    col = lam_t.transpose(-1, -2)                                                         # (S, H, Tk, 1)
    c = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)                          # (H, T, a)
    gathered = Rows(torch.zeros(3, 2, 1, 4, dtype=torch.float64), torch.tensor([1, 4, 2]), 6).take(c)
    assert not (col * gathered).is_contiguous()           # the plain product keeps that layout
    for row in (gathered, c.narrow(-2, 3, 1)):            # per-row, and one token shared
        out = rows.outer(col, row)
        assert out.shape == (3, 2, 5, 4) and out.is_contiguous()
        assert torch.equal(out, col * row)
