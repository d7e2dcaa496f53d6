"""The ops of imported graphs (gamma.ops_tensor, relu): transposes, ReLU's
relaxation by hand and on a grid, and per-op soundness of every bound method
by samples and PGD (zero violations)."""

from __future__ import annotations

import pytest
import torch

from gamma.bounds import compute_bounds, relax
from gamma.graph import Graph
from gamma.ops import AFFINE, ELEMENTWISE, FORWARD, evaluate
from gamma.ops_tensor import concat_offset
from soundness import explore

NEW_AFFINE = ("conv2d", "permute", "reshape", "slice", "concat", "reduce_mean")


def _graph(op: str, gen: torch.Generator) -> Graph:
    """x (1, 2, 4, 6) -> [op] -> linear mix -> relu -> sum to a small output."""
    g = Graph(f"t_{op}", "x", (1, 2, 4, 6))
    if op == "conv2d":
        w = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64)
        g.add("y", "conv2d", "x", weight=w, bias=torch.randn(3, generator=gen, dtype=torch.float64),
              stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=1)
    elif op == "permute":
        g.add("y", "permute", "x", perm=(0, 3, 1, 2))
    elif op == "reshape":
        g.add("y", "reshape", "x", in_shape=(1, 2, 4, 6), shape=(1, 8, 6))
    elif op == "slice":
        g.add("y", "slice", "x", axis=-1, start=1, stop=6, step=2)
    elif op == "concat":
        c = torch.randn(1, 2, 3, 6, generator=gen, dtype=torch.float64)
        pieces = ((-1, 3, c), (0, 4, None))
        g.add("y", "concat", "x", axis=-2, pieces=pieces, offset=concat_offset(pieces, -2, (1, 2, 7, 6)))
    elif op == "reduce_mean":
        g.add("y", "reduce_mean", "x", axes=(-3, -1), keepdim=False)
    elif op == "relu":
        g.add("y", "relu", "x")
    g.infer_shapes()
    n = 1
    for s in g["y"].shape:
        n *= s
    g.add("flat", "reshape", "y", in_shape=g["y"].shape, shape=(1, n))
    g.add("mix", "linear", "flat", weight=torch.randn(5, n, generator=gen, dtype=torch.float64))
    g.add("act", "relu", "mix")
    g.add("out", "linear", "act", weight=torch.randn(3, 5, generator=gen, dtype=torch.float64))
    return g.infer_shapes()


@pytest.mark.parametrize("op", NEW_AFFINE)
def test_transpose_is_the_adjoint(op):
    """<lin(x), lam> == <x, lin_T(lam)> with leading batch dims, and lin_abs of |x| bounds |lin(x)|."""
    gen = torch.Generator().manual_seed(10)
    g = _graph(op, gen)
    node, fact = g["y"], AFFINE[op]
    x = torch.randn(3, *g.input_shape, generator=gen, dtype=torch.float64)
    lam = torch.randn(3, *node.shape, generator=gen, dtype=torch.float64)
    y = fact.lin(node, x)
    (xt,) = fact.lin_T(node, lam, [g.input_shape])
    assert torch.allclose((y * lam).sum(), (x * xt).sum(), rtol=1e-12)
    assert bool((fact.lin_abs(node, x.abs()) >= y.abs() - 1e-12).all())
    off = fact.offset(node)
    full = FORWARD[op](node, x)
    assert torch.allclose(full, y if off is None else y + off)


def test_relu_lines_by_hand():
    al, bl, au, bu = relax.linear("relu", torch.tensor([-1.0, -3.0, 0.5, -2.0]), torch.tensor([3.0, 1.0, 2.0, -1.0]))
    assert al.tolist() == [1.0, 0.0, 1.0, 0.0]                  # adaptive: 1 where u >= -l
    assert au[:2].tolist() == [0.75, 0.25] and au[2:].tolist() == [1.0, 0.0]
    assert abs(bu[0] - 0.75) < 1e-14 and abs(bu[1] - 0.75) < 1e-14 and bu[0] >= 0.75 and bu[1] >= 0.75
    assert bl[2] == 0 and bu[2] == 0 and bu[3] == 0
    lo, hi = relax.interval("relu", torch.tensor([-1.0, 0.5]), torch.tensor([3.0, 2.0]))
    assert lo.tolist() == [0.0, 0.5] and hi.tolist() == [3.0, 2.0]


@pytest.mark.parametrize("alpha", [None, 0.0, 0.3, 1.0])
def test_relu_lines_hold_on_a_grid(alpha):
    gen = torch.Generator().manual_seed(11)
    l = torch.randn(400, generator=gen, dtype=torch.float64) * 3
    u = l + torch.rand(400, generator=gen, dtype=torch.float64) * 4
    a = None if alpha is None else torch.full_like(l, alpha)
    al, bl, au, bu = relax.linear("relu", l, u, alpha=a)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)[:, None]
    x = l + t * (u - l)                                          # (201, 400) grid, ends and 0 included
    x = torch.cat([x, torch.where((l < 0) & (u > 0), 0.0, l)[None]])
    f = x.clamp(min=0)
    assert bool((al * x + bl <= f).all()) and bool((au * x + bu >= f).all())
    blo, bhi = relax.offsets("relu", l, u, al, au)
    assert bool((al * x + blo <= f).all()) and bool((au * x + bhi >= f).all())


@pytest.mark.parametrize("op", NEW_AFFINE + ("relu",))
@pytest.mark.parametrize("method", ["ibp", "crown", "alpha", "zonotope"])
def test_new_op_sound(op, method):
    gen = torch.Generator().manual_seed(12)
    g = _graph(op, gen)
    x = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.3
    for arithmetic in ("real", "float32"):
        r = compute_bounds(g, x, eps, method, arithmetic=arithmetic, alpha_iters=4)
        emp = explore(lambda z: evaluate(g, z), x, eps, r.lower, r.upper, n_samples=150, seed=13, steps=8, restarts=1)
        assert emp.violations == 0, (op, method, arithmetic)
        if method != "ibp":
            continue
        # IBP's image of the op itself (exact for the copy ops; ends of the box are sampled)
        iv = r.nodes["y"]
        sub = g.subgraph("x", "y")
        emp = explore(lambda z: evaluate(sub, z), x, eps, iv.lower, iv.upper, n_samples=100, seed=14, attack=False)
        assert emp.violations == 0


def test_relu_is_elementwise_with_rules_everywhere():
    from gamma.bounds.fpmargin import MARGIN
    from gamma.bounds.zonotope import ZONO
    from gamma.bounds.crown_rules import RULES
    assert "relu" in ELEMENTWISE
    for op in NEW_AFFINE + ("relu",):
        assert op in MARGIN and op in ZONO and op in RULES
