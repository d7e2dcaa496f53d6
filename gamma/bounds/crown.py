"""CROWN: backward linear bound propagation.

For a spec matrix ``Lambda`` (S, *target_shape) the walk computes, for every
row s, a lower bound of ``Lambda_s . y`` over the input box as
``A_s . x + bias_s`` with ``A`` propagated backwards node by node; the upper
bound of ``Lambda_s . y`` is minus the lower bound of ``-Lambda_s . y``, so
both are obtained in one pass by stacking ``[I; -I]``.

Rules (:data:`BACKWARD`) map the cotangent of a node's output to cotangents of
its inputs plus a constant, given a linear relaxation valid on the node's
intermediate bounds:

* affine ops: exact transpose (:data:`gamma.ops.AFFINE`);
* GELU / SiLU: chord/tangent lines from :mod:`gamma.bounds.relax`, chosen by the
  sign of Lambda (optionally parameterised by alpha);
* products ``x*y`` and ``x @ y^T``: ``xy = cy x + cx y - cx cy + dx dy`` with
  ``|dx dy| <= rx ry`` (centres and radii of the intermediate bounds);
* softmax / LayerNorm / RMSNorm: mean-value linearisation (:mod:`.jacobian`).

At each node the float32 margin ``m`` adds ``-|Lambda| . m`` to the constant.
The walk itself (:func:`backward`) knows nothing about the ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, ELEMENTWISE
from . import relax, rows
from .interval import Interval, simplex_shift
from .jacobian import linearize
from .rows import Rows

COMPACT_ROWS = True     # token-compact cotangents (rows.py); False: always dense

Tensor = torch.Tensor


class Context:
    """Intermediate bounds, margins and cached relaxations of one graph."""

    def __init__(self, graph, bounds: dict, margins: dict, alpha: Optional[dict] = None):
        self.graph = graph
        self.bounds = bounds            # name -> Interval (sound, float64)
        self.margins = margins          # name -> Tensor | None
        self.alpha = alpha or {}        # name -> (alpha_lower, alpha_upper) tensors
        self._lin: dict = {}
        self._const: dict = {}
        self._relax: dict = {}

    def inb(self, node, k: int = 0) -> Interval:
        return self.bounds[node.inputs[k]]

    def linearization(self, node):
        if node.name not in self._lin:
            self._lin[node.name] = linearize(node, self.inb(node))
        return self._lin[node.name]

    def lin_const(self, node):
        """``y0 - J0 x0`` of a linearised node (the constant of its linear form)."""
        if node.name not in self._const:
            lin = self.linearization(node)
            self._const[node.name] = lin.y0 - lin.jvp(lin.x0)
        return self._const[node.name]

    def relaxation(self, node):
        """(al, bl, au, bu) lines of an elementwise node on its input bounds."""
        if node.name in self.alpha:
            a_lo, a_hi = self.alpha[node.name]
            x = self.inb(node)
            al, bl, _, _ = relax.linear(node.op, x.lower, x.upper, alpha=a_lo)
            _, _, au, bu = relax.linear(node.op, x.lower, x.upper, alpha=a_hi)
            return al, bl, au, bu
        if node.name not in self._relax:
            x = self.inb(node)
            self._relax[node.name] = relax.linear(node.op, x.lower, x.upper)
        return self._relax[node.name]


def _flat_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _dot(lam: Tensor, c) -> Tensor:
    """sum over the trailing dims of lam * c (c broadcast to lam.shape[1:]): (S,).

    A mat-vec: on CPU it is ~50x faster than a multiply-then-sum reduction."""
    c = torch.as_tensor(c, dtype=lam.dtype, device=lam.device).expand(lam.shape[1:]).reshape(-1)
    return lam.reshape(lam.shape[0], -1) @ c


# ---------------------------------------------------------------- rules
def _affine(node, lam, ctx):
    fact = AFFINE[node.op]
    shapes = [ctx.graph[i].shape for i in node.inputs]
    ins = fact.lin_T(node, lam, shapes)
    off = fact.offset(node)
    bias = _dot(lam, off) if off is not None else lam.new_zeros(lam.shape[0])
    return list(ins), bias


def _elementwise(node, lam, ctx):
    al, bl, au, bu = ctx.relaxation(node)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    return [pos * al + neg * au], _dot(pos, bl) + _dot(neg, bu)


def _mul(node, lam, ctx):
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = x.center, y.center
    bias = -_dot(lam, cx * cy) - _dot(lam.abs(), x.radius * y.radius)
    return [lam * cy, lam * cx], bias


def _matmul(node, lam, ctx):
    """z = x y^T with x (.., T, a), y (.., S, a); lam (B, .., T, S)."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = x.center, y.center
    t = lambda v: v.transpose(-1, -2)
    m = simplex_shift(node, cy)                     # z = x (y - m)^T + m^T when x rows sum to 1
    bias = lam.new_zeros(lam.shape[0])
    if m is not None:
        # x (y - m)^T relaxed around (cx, cy - m): the y-term is cx (y - m)^T = cx y^T - cx m^T
        cy = cy - m
        bias = bias + _dot(lam, t(m).expand(node.shape)) - _dot(lam, cx @ t(m.expand(y.center.shape)))
    bias = bias - _dot(lam, cx @ t(cy)) - _dot(lam.abs(), x.radius @ t(y.radius))
    return [lam @ cy, t(lam) @ cx], bias


def _jacobian(node, lam, ctx):
    lin = ctx.linearization(node)
    const = ctx.lin_const(node)
    bias = _dot(lam, const) - _dot(lam.abs(), lin.err)
    return [lin.vjp(lam)], bias


BACKWARD: dict = {op: _affine for op in AFFINE}
BACKWARD.update({op: _elementwise for op in ELEMENTWISE})
BACKWARD.update({"mul": _mul, "matmul": _matmul,
                 "softmax": _jacobian, "layernorm": _jacobian, "rmsnorm": _jacobian})


# ---------------------------------------------------------------- the walk
def backward(ctx: Context, lams: dict, bias: Tensor, box: Interval, stop: frozenset = frozenset()) -> Tensor:
    """Lower bounds (S,) of ``sum_k lams[k] . value(k) + bias`` over the input box.

    Walks the ancestors of the nodes in ``lams`` in reverse topological order.
    At a node in ``stop`` (whose bounds are known) the remaining term is
    concretised over that node's interval instead of being propagated further.
    """
    graph = ctx.graph
    lams = dict(lams)
    anc: set = set()
    for k in lams:
        anc |= graph.ancestors(k, stop=None)
    order = [n for n in graph if n.name in anc]
    for node in reversed(order):
        lam = lams.pop(node.name, None)
        if lam is None:
            continue
        if node.op == "input" or node.name in stop:
            iv = box if node.op == "input" else ctx.bounds[node.name]
            if isinstance(lam, Rows):
                bias = bias + lam.dot(iv.center) - lam.like(lam.t.abs()).dot(iv.radius)
            else:
                bias = bias + _dot(lam, iv.center) - _dot(lam.abs(), iv.radius)
            continue
        if isinstance(lam, Rows) and not rows.applies(graph, node, lam):
            lam = lam.dense()
        m = ctx.margins.get(node.name)
        if isinstance(lam, Rows):
            if m is not None:
                bias = bias - lam.like(lam.t.abs()).dot(m)
            ins, b = rows.COMPACT[node.op](node, lam, ctx)
        else:
            if m is not None:
                bias = bias - _dot(lam.abs(), m)
            try:
                rule = BACKWARD[node.op]
            except KeyError:
                raise UnsupportedOp(node.op, "crown", node.name) from None
            ins, b = rule(node, lam, ctx)
        bias = bias + b
        for name, li in zip(node.inputs, ins):
            lams[name] = rows.add(lams[name], li) if name in lams else li
    return bias


def _linear_spec_bias(node, idx: Tensor, unit: Tensor, m, dtype, device) -> Tensor:
    """Constants (2k,) of the specs ``[e_idx; -e_idx]`` placed through a linear
    target: its bias and, outward, its float32 margin."""
    b = node.params.get("bias")
    const = b[unit] if b is not None else torch.zeros(len(idx), dtype=dtype, device=device)
    bias = torch.cat([const, -const])
    if m is not None:
        mm = m.reshape(-1)[idx]
        bias = bias - torch.cat([mm, mm])
    return bias


def _first_step(ctx: Context, target: str, idx: Tensor, dtype, device):
    """Cotangents after the target node for the specs ``[e_idx; -e_idx]``.

    For a linear target the rows of W are placed directly (no product with an
    identity matrix); otherwise the spec itself is returned.
    """
    graph = ctx.graph
    node = graph[target]
    shape = node.shape
    k = len(idx)
    n = _numel(shape)
    m = ctx.margins.get(target)
    if COMPACT_ROWS and node.op == "linear" and len(shape) >= 2:
        W = node.params["weight"]                               # (out, in)
        in_shape = graph[node.inputs[0]].shape
        T, out = shape[-2], shape[-1]
        unit, tok, lead = idx % out, (idx // out) % T, idx // (out * T)
        t = torch.zeros(k, max(1, _numel(in_shape[:-2])), in_shape[-1], dtype=dtype, device=device)
        t[torch.arange(k, device=device), lead] = W[unit]
        t = t.reshape(k, *in_shape[:-2], 1, in_shape[-1])
        lam = Rows(torch.cat([t, -t]), torch.cat([tok, tok]), T)
        return {node.inputs[0]: lam}, _linear_spec_bias(node, idx, unit, m, dtype, device)
    if COMPACT_ROWS and len(shape) >= 2:
        return {target: rows.first_rows(graph, target, idx, dtype, device)}, torch.zeros(2 * k, dtype=dtype,
                                                                                          device=device)
    if node.op == "linear" and len(shape) >= 1:
        W = node.params["weight"]                               # (out, in)
        out = shape[-1]
        tok, unit = idx // out, idx % out                       # flat leading index, output unit
        in_shape = graph[node.inputs[0]].shape
        lead = _numel(in_shape[:-1])
        lam = torch.zeros(k, lead, in_shape[-1], dtype=dtype, device=device)
        lam[torch.arange(k), tok] = W[unit]
        lam = torch.cat([lam, -lam]).reshape(2 * k, *in_shape)
        return {node.inputs[0]: lam}, _linear_spec_bias(node, idx, unit, m, dtype, device)
    eye = torch.zeros(k, n, dtype=dtype, device=device)
    eye[torch.arange(k), idx] = 1.0
    spec = torch.cat([eye, -eye]).reshape(2 * k, *shape)
    return {target: spec}, spec.new_zeros(2 * k)


def node_bounds(ctx: Context, target: str, box: Interval, chunk_elems: int = 1 << 22,
                stop: frozenset = frozenset()) -> Interval:
    """CROWN bounds of every element of ``target``, in chunks of spec rows."""
    graph = ctx.graph
    shape = graph[target].shape
    n = _numel(shape)
    widest = max(_numel(graph[a].shape) for a in graph.ancestors(target))
    n_rows = max(1, min(n, chunk_elems // max(1, 2 * widest)))
    dtype, device = box.lower.dtype, box.lower.device
    lo = torch.empty(n, dtype=dtype, device=device)
    hi = torch.empty(n, dtype=dtype, device=device)
    for s in range(0, n, n_rows):
        e = min(n, s + n_rows)
        k = e - s
        lams, bias = _first_step(ctx, target, torch.arange(s, e, device=device), dtype, device)
        lb = backward(ctx, lams, bias, box, stop)
        lo[s:e] = lb[:k]
        hi[s:e] = -lb[k:]
    return Interval(lo.reshape(shape), hi.reshape(shape))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
