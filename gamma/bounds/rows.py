"""The two layouts of a CROWN cotangent, behind one interface the rules use.

:class:`Dense`: ``t`` (S, *node shape), one full cotangent per spec row.

:class:`Rows` (token-compact): a CROWN spec row for an output at token t has a
cotangent that is zero at every other token until the backward walk crosses
an op that mixes tokens (the key/value side of attention).  Rows stores such
a cotangent as one token slice per row: ``t`` (S, *lead, 1, n) with row s
living at token ``tok[s]`` of axis -2 of the node's shape (T tokens).  Ops in
:data:`TOKEN_LOCAL` keep it (their rules map it to compact cotangents of the
row-keeping inputs, dense ones where the op spreads a row over tokens), with
every per-token constant of the node gathered at each row's token
(:meth:`Rows.take`).  The walk (:mod:`.crown`) falls back to :meth:`Rows.dense`
for any other op or shape, so results equal the dense computation; memory and
work follow S x n instead of S x T x n.

Both layouts answer ``take`` (a node-shaped constant as each row sees it),
``like`` (another cotangent of the same layout), ``view`` (the node with its
per-token parameters taken), ``dot`` / ``abs_dot`` (per-row sums against a
constant), ``vjp`` (a linearisation's transpose) and ``sparse`` (whether a
linear transpose should skip all-zero rows), each with the tensor ops that
layout has always used, so one rule body serves both
(:mod:`.crown_rules`).

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

from ..ops import ELEMENTWISE
from .linearization import row_dot

Tensor = torch.Tensor

# per-op parameters that broadcast against the node's value (gathered per row)
TOKEN_PARAMS = {"rope": ("cos", "sin"), "add_const": ("c",), "mul_const": ("c",)}
# ops whose inputs all have the node's own shape (no broadcasting between inputs)
SAME_SHAPE = ELEMENTWISE | {"add", "mul", "softmax", "layernorm", "rmsnorm", "add_const", "mul_const", "rope"}
# ops whose rules keep a compact cotangent at its token (x @ y^T: on x's side)
TOKEN_LOCAL = ELEMENTWISE | {"add", "add_const", "mul_const", "split_heads", "merge_heads", "repeat_kv", "rope",
                             "matmul_const", "linear", "mul", "matmul", "softmax", "layernorm", "rmsnorm"}


class Dense:
    """A dense cotangent ``t`` (S, *node shape) behind the layout interface (module docstring)."""

    sparse = True                    # linear transposes skip all-zero rows (attention's spread rows have many)
    __slots__ = ("t",)

    def __init__(self, t: Tensor):
        self.t = t

    def take(self, c):
        return c

    def like(self, t: Tensor) -> "Dense":
        return Dense(t)

    def view(self, node):
        return node

    def dot(self, c) -> Tensor:
        """(S,): sum over each row of ``t * c``, c broadcast to the node's shape (one mat-vec)."""
        return row_dot(self.t, torch.as_tensor(c, dtype=self.t.dtype, device=self.t.device))

    def abs_dot(self, c) -> Tensor:
        return row_dot(self.t.abs(), torch.as_tensor(c, dtype=self.t.dtype, device=self.t.device))

    def shared_abs_dot(self, v: Tensor, s: Tensor) -> Tensor:
        """(S,): ``sum_rows s_row |sum_i t_i v_i|`` per cotangent row; rows are the node's
        last axis, ``s`` (.., 1) one factor per row of the node."""
        return Dense((self.t * v).sum(-1, keepdim=True).abs()).dot(s)

    def vjp(self, lin) -> Tensor:
        return lin.vjp(self.t)


@dataclass
class Rows:
    t: Tensor        # (S, *lead, 1, n)
    tok: Tensor      # (S,) token of each row on axis -2
    T: int           # tokens on axis -2 of the node
    one: Optional[int] = None   # the token of every row when they share one (a chunk of consecutive
                                # specs mostly does): constants are then sliced, not gathered per row
    sparse = False              # (not a field) compact rows are rarely zero: linear transposes keep them all

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

    def abs_dot(self, c) -> Tensor:
        return self.like(self.t.abs()).dot(c)

    def shared_abs_dot(self, v: Tensor, s: Tensor) -> Tensor:
        """As :meth:`Dense.shared_abs_dot`, each row at its token."""
        return self.like((self.t * self.take(v)).sum(-1, keepdim=True).abs()).dot(s)

    def view(self, node):
        """The node with its per-token parameters (:data:`TOKEN_PARAMS`) taken at each row's token."""
        keys = TOKEN_PARAMS.get(node.op, ())
        if not keys:
            return node
        params = {k: (self.take(v) if k in keys else v) for k, v in node.params.items()}
        return SimpleNamespace(name=node.name, op=node.op, params=params, shape=node.shape)

    def vjp(self, lin) -> Tensor:
        return lin.vjp_at(self.take)(self.t)


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


def layout(lam):
    """A cotangent (Tensor, :class:`Rows` or :class:`Dense`) behind the layout interface."""
    return lam if isinstance(lam, (Rows, Dense)) else Dense(lam)


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
    if node.op not in TOKEN_LOCAL or len(node.shape) < 2 or node.shape[-2] != lam.T:
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


def outer(col: Tensor, row: Tensor) -> Tensor:
    """``col * row`` for col (S, .., Tk, 1) and row (S or 1, .., 1, a), written
    contiguously: left to broadcasting, the output may take a permuted layout
    (heads outermost), which every later row-wise dot has to copy."""
    if torch.is_grad_enabled() and (col.requires_grad or row.requires_grad):
        return col * row                                          # alpha: out= has no autograd
    rs = (1,) * (col.dim() - row.dim()) + tuple(row.shape)
    shape = tuple(max(a, b) for a, b in zip(col.shape, rs))       # each pair equal or 1
    return torch.mul(col, row, out=col.new_empty(shape))
