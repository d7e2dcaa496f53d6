"""Token-compact CROWN cotangents.

A CROWN spec row for an output at token t has a cotangent that is zero at
every other token until the backward walk crosses an op that mixes tokens
(the key/value side of attention).  :class:`Rows` stores such a cotangent
as one token slice per row: ``t`` (S, *lead, 1, n) with row s living at
token ``tok[s]`` of axis -2 of the node's shape (T tokens).  Rules in
:data:`COMPACT` map a compact cotangent of a node's output to cotangents of
its inputs (compact, or dense where the op spreads a row over tokens) and a
constant, with every per-token constant of the node gathered at each row's
token (:meth:`Rows.take`).  The dense walk (:mod:`.crown`) falls back to
:meth:`Rows.dense` for any other op or shape, so results equal the dense
computation; memory and work follow S x n instead of S x T x n.

Ops are token-local along axis -2 when they act on the last axis (linear,
norms, softmax rows), elementwise (activations, add, mul, rope with
per-token tables), or move axis -2 to axis -2 (split/merge heads,
repeat_kv).  ``x @ y^T`` keeps x's rows and spreads y's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from ..ops import AFFINE, ELEMENTWISE
from .bilinear import shift_constant, simplex_shift
from .linearization import row_dot

Tensor = torch.Tensor

# per-op parameters that broadcast against the node's value (gathered per row)
TOKEN_PARAMS = {"rope": ("cos", "sin"), "add_const": ("c",), "mul_const": ("c",)}
# ops whose inputs all have the node's own shape (no broadcasting between inputs)
SAME_SHAPE = ELEMENTWISE | {"add", "mul", "softmax", "layernorm", "rmsnorm", "add_const", "mul_const", "rope"}


@dataclass
class Rows:
    t: Tensor        # (S, *lead, 1, n)
    tok: Tensor      # (S,) token of each row on axis -2
    T: int           # tokens on axis -2 of the node
    one: Optional[int] = None   # the token of every row when they share one (a chunk of consecutive
                                # specs mostly does): constants are then sliced, not gathered per row

    @staticmethod
    def of(t: Tensor, tok: Tensor, T: int) -> "Rows":
        """Rows with :attr:`one` set when every row sits at the same token."""
        one = int(tok[0]) if len(tok) and bool((tok == tok[0]).all()) else None
        return Rows(t, tok, T, one)

    def dense(self) -> Tensor:
        """(S, *lead, T, n) with each row's slice at its token, zeros elsewhere."""
        S = self.t.shape[0]
        z = self.t.new_zeros(S, self.T, *self.t.shape[1:-2], self.t.shape[-1])     # (S, T, *lead, n)
        z = z.index_put((torch.arange(S, device=self.t.device), self.tok), self.t.squeeze(-2))
        return z.movedim(1, -2)

    def like(self, t: Tensor) -> "Rows":
        return Rows(t, self.tok, self.T, self.one)

    def take(self, c):
        """c (broadcastable to the node's shape) at each row's token, shaped to
        broadcast against ``t``: (S, *lead', 1, n'), (*clead, 1, n') when every
        row shares one token, or c itself when c has no token axis."""
        if not isinstance(c, Tensor) or c.dim() < 2 or c.shape[-2] == 1:
            return c
        if self.one is not None:
            return c.narrow(c.dim() - 2, self.one, 1)
        g = c.index_select(c.dim() - 2, self.tok).movedim(-2, 0).unsqueeze(-2)   # (S, *clead, 1, n')
        pad = self.t.dim() - g.dim()
        return g.reshape(g.shape[0], *([1] * pad), *g.shape[1:])

    def dot(self, c) -> Tensor:
        """(S,): sum over each row of ``t * c`` for c broadcastable to the node's shape."""
        S = self.t.shape[0]
        if not isinstance(c, Tensor):
            return self.t.reshape(S, -1).sum(1) * c
        g = self.take(c)
        return row_dot(self.t, g)


@dataclass
class Sym:
    """The stacked cotangent ``[lam; -lam]`` (2S rows) held as ``lam`` (S rows,
    a Tensor or :class:`Rows`).  Every spec starts this way (``[e_i; -e_i]``
    gives the lower and the upper bound).  A rule whose cotangent map is
    linear in Lambda runs once for both halves, its constant split into a
    part linear in Lambda (negated for the second half) and one in |Lambda|
    (the same for both); only the elementwise relaxations, which pick their
    lines by the sign of Lambda, need the two halves apart (:meth:`full`)."""
    lam: object

    def full(self):
        lam = self.lam
        if isinstance(lam, Rows):
            return Rows(torch.cat([lam.t, -lam.t]), torch.cat([lam.tok, lam.tok]), lam.T, lam.one)
        return torch.cat([lam, -lam])


def add(a, b):
    """Sum of two cotangents of one node (compact or dense, shared or not)."""
    if isinstance(a, Sym) and isinstance(b, Sym):
        return Sym(add(a.lam, b.lam))
    if isinstance(a, Sym):
        a = a.full()
    if isinstance(b, Sym):
        b = b.full()
    if isinstance(a, Rows) and isinstance(b, Rows):
        return a.like(a.t + b.t)
    if isinstance(a, Rows):
        a = a.dense()
    if isinstance(b, Rows):
        b = b.dense()
    return a + b


def applies(graph, node, lam: Rows) -> bool:
    """Whether the compact rule of ``node`` is valid for ``lam``: axis -2 of
    the node and of its row-keeping inputs holds lam.T tokens."""
    if node.op not in COMPACT or len(node.shape) < 2 or node.shape[-2] != lam.T:
        return False
    ins = node.inputs[:1] if node.op == "matmul" else node.inputs
    for name in ins:
        shape = graph[name].shape
        if len(shape) < 2 or shape[-2] != lam.T:
            return False
        if node.op in SAME_SHAPE and tuple(shape) != tuple(node.shape):
            return False
    return True


def first_rows(graph, target: str, idx: Tensor, dtype, device):
    """Compact specs ``[e_idx; -e_idx]`` of ``target`` as :class:`Sym` (None if it has no token axis)."""
    node = graph[target]
    shape = node.shape
    if len(shape) < 2:
        return None
    T, n = shape[-2], shape[-1]
    k = len(idx)
    unit, tok, lead = idx % n, (idx // n) % T, idx // (n * T)
    lead_shape = tuple(shape[:-2])
    t = torch.zeros(k, max(1, math.prod(lead_shape)), n, dtype=dtype, device=device)
    t[torch.arange(k, device=device), lead, unit] = 1.0
    t = t.reshape(k, *lead_shape, 1, n)
    return Sym(Rows.of(t, tok, T))


# ---------------------------------------------------------------- rules
def _view(node, lam: Rows):
    keys = TOKEN_PARAMS.get(node.op, ())
    if not keys:
        return node
    params = {k: (lam.take(v) if k in keys else v) for k, v in node.params.items()}
    return SimpleNamespace(name=node.name, op=node.op, params=params, shape=node.shape)


def _affine(node, lam: Rows, ctx):
    fact = AFFINE[node.op]
    view = _view(node, lam)
    shapes = [ctx.graph[i].shape for i in node.inputs]
    ins = fact.lin_T(view, lam.t, shapes)
    off = fact.offset(node)
    bias = lam.dot(off) if off is not None else lam.t.new_zeros(lam.t.shape[0])
    return [lam.like(i) for i in ins], bias, None


def _linear(node, lam: Rows, ctx):
    """``lam W`` as a float32 product where it applies (:class:`.fp.CotangentProduct`)."""
    p = ctx.linear_product(node)
    if p is not None:
        lin = lam.like(p.product(lam.t, sparse=False))       # compact rows are rarely zero
        odd = lam.dot(p.y0) - lin.dot(p.x0)
        if bool(torch.isfinite(odd).all()):                  # else float32 overflowed somewhere
            return [lin], odd, p.floor
    return _affine(node, lam, ctx)


def _elementwise(node, lam: Rows, ctx):
    al, bl, au, bu = ctx.relaxation(node)
    band = ctx.band(node)
    if band is not None:                        # parallel lines: linear in lam (crown._elementwise)
        c, h = band
        return [lam.like(lam.t * lam.take(al))], lam.dot(c), lam.like(lam.t.abs()).dot(h)
    pos, neg = lam.t.clamp(min=0), lam.t.clamp(max=0)
    bias = lam.like(pos).dot(bl) + lam.like(neg).dot(bu)
    return [lam.like(pos * lam.take(al) + neg * lam.take(au))], bias, None


def _mul(node, lam: Rows, ctx):
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = lam.take(x.center), lam.take(y.center)
    rr = x.radius * y.radius
    odd = -(lam.t * cx * cy).reshape(lam.t.shape[0], -1).sum(1)
    return [lam.like(lam.t * cy), lam.like(lam.t * cx)], odd, lam.like(lam.t.abs()).dot(rr)


def _matmul(node, lam: Rows, ctx):
    if ctx.use_planes(node):
        return _matmul_planes(node, lam, ctx)
    return _matmul_centre(node, lam, ctx)


def _matmul_centre(node, lam: Rows, ctx):
    """z = x y^T: lam (S, .., 1, Tk) keeps x's rows; y's cotangent is dense.

    The x-side product runs with the rows as the matrix dimension, one
    (S, Tk) @ (Tk, a) per head, and serves the constant too:
    ``sum lam * (cx cy^T) = sum (lam cy) * cx``."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cy = y.center
    t = lambda v: v.transpose(-1, -2)
    m = simplex_shift(node, cy)
    cx_rows = lam.take(x.center)                                   # (S, .., 1, a)
    S = lam.t.shape[0]
    bias = lam.t.new_zeros(S)
    if m is not None:
        cy = cy - m
        bias = bias + lam.dot(shift_constant(x.center, m).expand(node.shape))
    lx = (lam.t.squeeze(-2).movedim(0, -2) @ cy).movedim(-2, 0).unsqueeze(-2)   # (S, .., 1, a)
    bias = bias - (lx * cx_rows).reshape(S, -1).sum(1)
    even = lam.like(lam.t.abs()).dot(x.radius @ t(y.radius))
    return [lam.like(lx), _outer(t(lam.t), cx_rows)], bias, even     # (S, .., Tk, a): outer products


def _outer(col: Tensor, row: Tensor) -> Tensor:
    """``col * row`` for col (S, .., Tk, 1) and row (S or 1, .., 1, a), written
    contiguously: left to broadcasting, the output may take a permuted layout
    (heads outermost), which every later row-wise dot has to copy."""
    if torch.is_grad_enabled() and (col.requires_grad or row.requires_grad):
        return col * row                                          # alpha: out= has no autograd
    rs = (1,) * (col.dim() - row.dim()) + tuple(row.shape)
    shape = tuple(max(a, b) for a, b in zip(col.shape, rs))       # each pair equal or 1
    return torch.mul(col, row, out=col.new_empty(shape))


def _matmul_planes(node, lam: Rows, ctx):
    """:func:`.crown._matmul_planes` with lam keeping x's rows (y's cotangent dense);
    the constant from the x-side product: ``sum_j lam_j (xl yl^T)_j = (lam yl) . xl``."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    t = lambda v: v.transpose(-1, -2)
    m = simplex_shift(node, y.center)
    yl, yu = y.lower, y.upper
    S = lam.t.shape[0]
    bias = lam.t.new_zeros(S)
    if m is not None:
        yl, yu = yl - m, yu - m
        bias = bias + lam.dot(t(m).expand(node.shape))
    xl_rows = lam.take(x.lower)                                    # (S, .., 1, a)
    pos, neg = lam.t.clamp(min=0), lam.t.clamp(max=0)
    mm = lambda v, w: (v.squeeze(-2).movedim(0, -2) @ w).movedim(-2, 0).unsqueeze(-2)
    lx = mm(pos, yl) + mm(neg, yu)                                 # (S, .., 1, a)
    bias = bias - (lx * xl_rows).reshape(S, -1).sum(1)
    ly = _outer(t(lam.t), xl_rows)                                 # (S, .., Tk, a)
    if m is not None:
        bias = bias - (ly * m).reshape(S, -1).sum(1)               # ly . (y - m) = ly . y - ly . m
    return [lam.like(lx), ly], bias, None


def _jacobian(node, lam: Rows, ctx):
    lin = ctx.linearization(node)
    const = ctx.lin_const(node)
    return [lam.like(lin.vjp_at(lam.take)(lam.t))], lam.dot(const), lin.even_at(lam.take)(lam.t)


COMPACT: dict = {op: _affine for op in ("add", "add_const", "mul_const", "split_heads",
                                        "merge_heads", "repeat_kv", "rope", "matmul_const")}
COMPACT.update({op: _elementwise for op in ELEMENTWISE})
COMPACT.update({"linear": _linear, "mul": _mul, "matmul": _matmul, "softmax": _jacobian, "layernorm": _jacobian,
                "rmsnorm": _jacobian})

