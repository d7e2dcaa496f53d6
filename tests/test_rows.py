"""gamma.bounds.rows: token-compact cotangents, by hand and in use."""

import torch

from gamma.bounds import crown, rows
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
    for op in ("linear", "rmsnorm", "matmul"):
        monkeypatch.setitem(rows.COMPACT, op, (lambda f, op: lambda *a: (used.append(op), f(*a))[1])(rows.COMPACT[op], op))
    from gamma.bounds import compute_bounds
    x0 = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    a = compute_bounds(g, x0, 1e-2, "crown")
    assert {"linear", "rmsnorm", "matmul"} <= set(used)
    monkeypatch.setattr(crown, "COMPACT_ROWS", False)
    b = compute_bounds(g, x0, 1e-2, "crown")
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
