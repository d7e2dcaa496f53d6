"""The conv1d transpose as one GEMM plus strided adds (ops._conv1d_T): exact
adjoints and parity with conv_transpose1d over strides, paddings and lengths,
and CROWN through convs sound under samples + PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gamma import ops
from gamma.graph import Graph
from soundness import graph_fn, violations

CONFIGS = [  # (C_in, C_out, L_in, K, stride, padding)
    (3, 5, 7, 3, 1, 1), (4, 6, 9, 3, 2, 1), (2, 3, 10, 5, 3, 2), (3, 2, 8, 1, 1, 0), (3, 4, 11, 4, 2, 0),
    (2, 2, 3, 3, 2, 1), (80, 16, 16, 3, 1, 1), (16, 16, 16, 3, 2, 1),     # the last two: Whisper's stem, narrowed
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
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    natural = (y.shape[-1] - 1) * stride - 2 * pad + k
    ref = F.conv_transpose1d(lam.reshape(10, c_out, -1), w, stride=stride, padding=pad, output_padding=n - natural)
    assert torch.allclose(t.reshape(10, c_in, n), ref, rtol=1e-12, atol=1e-12)


def test_conv1d_transpose_of_a_basis_vector_is_the_weight_column():
    """Exact case: the cotangent e_(o, i) maps to W[o, :, k] placed at input positions
    ``i stride + k - padding`` (those inside the input), and nothing else."""
    w = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(2, 2, 3)       # (C_out 2, C_in 2, K 3)
    lam = torch.zeros(1, 2, 3, dtype=torch.float64)                          # L' = 3 for L = 5, stride 2, pad 1
    lam[0, 1, 0] = 1.0                                                       # output channel 1, position 0
    t = ops._conv1d_T(lam, w, 2, 1, 5)
    want = torch.zeros(1, 2, 5, dtype=torch.float64)
    want[0, :, 0] = w[1, :, 1]                                               # tap 1 at position 0; tap 0 at -1: padding
    want[0, :, 1] = w[1, :, 2]                                               # tap 2 at position 1
    assert torch.equal(t, want)


def test_crown_through_convs_contains_float32_and_float64_engines():
    """CROWN bounds of conv -> GELU -> conv (stride 2), default mode, contain the
    float32 and float64 outputs at samples, corners and PGD points."""
    from gamma.bounds import compute_bounds
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
    b = compute_bounds(gr, x0, eps, "crown")
    xs = x0 + eps * (2 * torch.rand(400, 3, 10, generator=g, dtype=torch.float64) - 1)
    xs[:200] = x0 + eps * torch.sign(xs[:200] - x0)                                       # corners
    for dt in (torch.float32, torch.float64):
        xx = xs.to(dt)
        y = F.conv1d(F.gelu(F.conv1d(xx, w1.to(dt), padding=1)), w2.to(dt), stride=2, padding=1).double()
        assert bool((y >= b.lower).all()) and bool((y <= b.upper).all())
        assert violations(graph_fn(gr, dt), x0, eps, b.lower, b.upper, n_samples=200, steps=20, restarts=2) == 0
    # tighter than IBP: the transposes carry the correlation IBP loses
    ibp = compute_bounds(gr, x0, eps, "ibp")
    assert float(b.width().sum()) < float(ibp.width().sum())
