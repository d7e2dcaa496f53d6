"""CROWN's per-op rules: one table (:data:`RULES`) for both cotangent layouts.

A rule maps a cotangent ``lam`` of a node's output (a layout object,
:class:`.rows.Dense` or :class:`.rows.Rows`) to cotangents of its inputs plus
a constant, given a linear relaxation valid on the node's intermediate
bounds: ``rule(node, lam, ctx) -> (ins, odd, even)``, where the constant is
``odd - even`` with ``odd`` (S,) linear in Lambda and ``even`` (S,) even in it
(None where zero), so a stack ``[lam; -lam]`` can be walked as one lam
(:class:`.rows.Sym`).  The rules ask the layout for what differs between the
two (``take``, ``like``, ``dot``, ...), so a rule is written once:

* affine ops: exact transpose (:data:`gamma.ops.AFFINE`); linear layers as
  float32 products where they apply (:class:`.fp.CotangentProduct`);
* GELU / SiLU: chord/tangent lines from :mod:`.relax`, chosen by the sign of
  Lambda, or one band ``a x + c +- h`` when the lines are parallel;
* products ``x*y`` and ``x @ y^T``: ``xy = cy x + cx y - cx cy + dx dy`` with
  ``|dx dy| <= rx ry`` (the half-sum of the McCormick planes); attention @ V's
  remainder also read through the value layer (:mod:`.value_side`), or, with
  ``Tunings(matmul_planes=True)``, one plane per product chosen by the sign of
  Lambda; SwiGLU's product under alpha-CROWN by its plane mixtures
  (:func:`.bilinear.mul_planes`);
* softmax, LayerNorm, RMSNorm: their linear forms (:func:`.jacobian.linearize`).

The products' constants are the one place the layouts compute differently:
a dense cotangent forms ``cx cy^T`` once for all rows and takes one mat-vec,
a compact row (one token) reuses its x-side product ``lam cy`` instead.  Both
are kept as they were (one body, a branch for the constant), so either
layout gives the bounds and speed it gave before the tables were merged.
Under alpha-CROWN the order in which a rule uses its cotangent is the order
in which autograd sums the gradient's contributions, so each branch also
keeps its layout's order of operations (bit-identical alpha bounds).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, ELEMENTWISE
from .bilinear import mul_planes, polar_band, shift_constant, simplex_shift
from .linearization import row_dot
from .rows import Dense, Rows, layout, outer
from .norm_side import saving as norm_saving
from . import value_input
from .value_side import remainder as value_remainder

Tensor = torch.Tensor


def _dot(lam: Tensor, c) -> Tensor:
    """(S,): per row of a dense lam, the sum of ``lam * c`` (c broadcast to lam.shape[1:])."""
    return row_dot(lam, torch.as_tensor(c, dtype=lam.dtype, device=lam.device))


def _t(v: Tensor) -> Tensor:
    return v.transpose(-1, -2)


def _affine(node, lam, ctx):
    fact = AFFINE[node.op]
    shapes = [ctx.graph[i].shape for i in node.inputs]
    ins = fact.lin_T(lam.view(node), lam.t, shapes)
    off = fact.offset(node)
    bias = lam.dot(off) if off is not None else lam.t.new_zeros(lam.t.shape[0])
    return [lam.like(i) for i in ins], bias, None


def _linear(node, lam, ctx):
    """``lam W`` as a float32 product where it applies (:class:`.fp.CotangentProduct`;
    its error term is in :meth:`.crown.Context.margin`), else in float64.  Under
    ``--engine llama.cpp`` the input elements the walk takes as constants (``ctx.keep``)
    get no cotangent: ``lam (W (keep x) + b)`` in float64, the rest in the node's offset."""
    keep = ctx.keep.get(node.name)
    if keep is not None:
        (lin,), odd, even = _affine(node, lam, ctx)
        return [lin.like(lin.t * lin.take(keep))], odd, even
    p = ctx.linear_product(node)
    if p is not None:
        lin = lam.like(p.product(lam.t, sparse=lam.sparse))
        odd = lam.dot(p.y0) - lin.dot(p.x0)
        if bool(torch.isfinite(odd).all()):                  # else float32 overflowed somewhere
            return [lin], odd, p.floor
    return _affine(node, lam, ctx)


def _elementwise(node, lam, ctx):
    al, bl, au, bu = ctx.relaxation(node)
    band = ctx.band(node)
    if band is not None:                        # lam (a x + c) -/+ |lam| h: linear in lam
        c, h = band
        return [lam.like(lam.t * lam.take(al))], lam.dot(c), lam.abs_dot(h)
    pos, neg = lam.t.clamp(min=0), lam.t.clamp(max=0)
    out = lam.like(pos * lam.take(al) + neg * lam.take(au))
    return [out], lam.like(pos).dot(bl) + lam.like(neg).dot(bu), None


def _mul(node, lam, ctx):
    """x * y by the half-sum of its McCormick planes (linear in lam); under
    alpha-CROWN by its plane mixtures (dense cotangents only, the walk sees to it)."""
    if node.name in ctx.alpha:
        return _mul_planes(node, lam, ctx)
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    facts = ctx.refinement(node)
    if facts:
        a, b, c, h = ctx.cached(node, lambda: polar_band(x, y, facts["s"], facts["d"], facts["k"]))
        ins = [lam.like(lam.t * lam.take(a)), lam.like(lam.t * lam.take(b))]
        return ins, lam.dot(c), lam.abs_dot(h)
    cx, cy = lam.take(x.center), lam.take(y.center)
    if isinstance(lam, Rows):                   # one token's centres per row: product and sum in one pass
        odd = -(lam.t * cx * cy).reshape(lam.t.shape[0], -1).sum(1)
        ins = [lam.like(lam.t * cy), lam.like(lam.t * cx)]
    else:
        ins = [lam.like(lam.t * cy), lam.like(lam.t * cx)]
        odd = -lam.dot(cx * cy)                 # cx cy formed once for all rows, one mat-vec
    return ins, odd, lam.abs_dot(x.radius * y.radius)


def _mul_planes(node, lam: Dense, ctx):
    """x * y with alpha-CROWN's plane mixtures (:func:`.bilinear.mul_planes`): the lower
    line where lam > 0, the upper one where lam < 0 (sign-dependent)."""
    (lx, ly, lc), (ux, uy, uc) = mul_planes(ctx.inb(node, 0), ctx.inb(node, 1), *ctx.alpha[node.name])
    pos, neg = lam.t.clamp(min=0), lam.t.clamp(max=0)
    return [pos * lx + neg * ux, pos * ly + neg * uy], _dot(pos, lc) + _dot(neg, uc), None


def _matmul(node, lam, ctx):
    if ctx.use_planes(node):
        return _matmul_planes(node, lam, ctx)
    return _matmul_centre(node, lam, ctx)


def _rows_matmul(t: Tensor, w: Tensor) -> Tensor:
    """Compact rows t (S, .., 1, Tk) times w (.., Tk, a), with the rows as the matrix
    dimension: one (S, Tk) @ (Tk, a) per head; (S, .., 1, a)."""
    return (t.squeeze(-2).movedim(0, -2) @ w).movedim(-2, 0).unsqueeze(-2)


def _matmul_centre(node, lam, ctx):
    """z = x y^T with x (.., T, a), y (.., S', a); lam (S, .., T, S') dense or
    (S, .., 1, S') compact (x's rows kept; y's cotangent is dense): every product
    ``x_k y_k`` by the half-sum of its McCormick planes (linear in lam)."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = x.center, y.center
    m = simplex_shift(node, cy)                     # z = x (y - m)^T + m^T when x rows sum to 1
    cx_rows = lam.take(cx)                          # compact: (S, .., 1, a)
    S = lam.t.shape[0]
    bias = lam.t.new_zeros(S)
    if m is not None:
        # x (y - m)^T relaxed around (cx, cy - m): the y-term is cx (y - m)^T = cx y^T - cx m^T
        cy = cy - m
        bias = bias + lam.dot(shift_constant(cx, m).expand(node.shape))
    if isinstance(lam, Rows):
        # lam . (cx cy^T) = (lam cy) . cx: the x-side product serves the constant too
        lx = _rows_matmul(lam.t, cy)                                   # (S, .., 1, a)
        bias = bias - (lx * cx_rows).reshape(S, -1).sum(1)
        return [lam.like(lx), outer(_t(lam.t), cx_rows)], bias, _remainder(node, lam, ctx, x, y)
    bias = bias - lam.dot(cx @ _t(cy))                                 # cx cy^T formed once for all rows
    return [lam.t @ cy, _t(lam.t) @ cx], bias, _remainder(node, lam, ctx, x, y)


def _remainder(node, lam, ctx, x, y) -> Tensor:
    """(S,): the half-sum remainder ``sum |lam| (rx ry^T)``, or, where y is a linear
    layer's heads (attention @ V), the narrower one read through that layer
    (:mod:`.value_side`) or through V's linear bounds over the input (:mod:`.value_input`),
    or, where both sides are (q k^T), through both layers
    (:mod:`.score_side`); either also through both sides' linear bounds over the input
    (:mod:`.score_input`), the narrower per row (per entry for q k^T)."""
    vi = ctx.value_input(node)                      # (first: score_side frees the kept slopes)
    vs = ctx.value_side(node)
    r = ctx.score_side(node)                        # per-entry bounds (score_side.py, score_input.py)
    other = value_input.served(vi, lam.t, isinstance(lam, Rows))
    if vs is not None or other is not None:
        v = value_remainder(vs, lam.t, lam.take(x.radius), y.radius, other)
        return v if r is None else torch.minimum(v, lam.abs_dot(r))
    return lam.abs_dot(x.radius @ _t(y.radius) if r is None else r)


def _matmul_planes(node, lam, ctx):
    """z = x y^T (attention @ V: x the probabilities) with one McCormick plane per
    product chosen by the sign of lam, both exact where x is at its lower bound,
    which is where most probabilities are tight:

        x y >= yl x + xl y - xl yl   (lam > 0),    x y <= yu x + xl y - xl yu   (lam < 0),

    y shifted by the row constant m as in :func:`_matmul_centre`.  On the
    width-64 Whisper block at eps 1e-2 the output is 2% tighter than with the
    half-sum of the planes (which stays for q k^T, where it is 2% tighter).
    The rule is not linear in lam, so the shared halves split here and a
    pass through attention costs up to 2x on its query side; the engine
    therefore uses it in the output's own pass only (``Context.planes``),
    which keeps 70-100% of the gain at about no cost, and never under
    ``--intermediate cut``."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    m = simplex_shift(node, y.center)
    yl, yu = y.lower, y.upper
    S = lam.t.shape[0]
    bias = lam.t.new_zeros(S)
    if m is not None:
        yl, yu = yl - m, yu - m
        bias = bias + lam.dot(_t(m).expand(node.shape))
    pos, neg = lam.t.clamp(min=0), lam.t.clamp(max=0)
    if isinstance(lam, Rows):
        # the constant from the x-side product: sum_j lam_j (xl yl^T)_j = (lam yl) . xl
        xl_rows = lam.take(x.lower)                                    # (S, .., 1, a)
        lx = _rows_matmul(pos, yl) + _rows_matmul(neg, yu)             # (S, .., 1, a)
        bias = bias - (lx * xl_rows).reshape(S, -1).sum(1)
        ly = outer(_t(lam.t), xl_rows)                                 # (S, .., Tk, a)
        if m is not None:
            bias = bias - (ly * m).reshape(S, -1).sum(1)               # ly . (y - m) = ly . y - ly . m
        return [lam.like(lx), ly], bias, None
    xl = x.lower
    ly = _t(lam.t) @ xl
    bias = bias - _dot(pos, xl @ _t(yl)) - _dot(neg, xl @ _t(yu))
    if m is not None:
        bias = bias - _dot(ly, m.expand(y.center.shape))               # ly . (y - m) = ly . y - ly . m
    return [pos @ yl + neg @ yu, ly], bias, None


def _jacobian(node, lam, ctx):
    lin = ctx.linearization(node)
    const = ctx.lin_const(node)
    even = lin.even_at(lam.take)(lam.t)
    bs = ctx.norm_side(node)
    if bs is not None and lin.cs is not None:      # a norm's product remainder read one layer back (norm_side.py)
        even = even - norm_saving(bs, lam, node.params["weight"], lin.cs, node.op == "layernorm")
    return [lam.like(lam.vjp(lin))], lam.dot(const), even


RULES: dict = {op: _affine for op in AFFINE}
RULES.update({op: _elementwise for op in ELEMENTWISE})
RULES.update({"linear": _linear, "mul": _mul, "matmul": _matmul,
              "softmax": _jacobian, "layernorm": _jacobian, "rmsnorm": _jacobian})


def apply(node, lam, ctx) -> tuple:
    """``RULES[node.op]`` on a cotangent lam (a Tensor or a layout, :func:`.rows.layout`):
    ``(input cotangents (Tensor or Rows), odd, even)``."""
    try:
        rule = RULES[node.op]
    except KeyError:
        raise UnsupportedOp(node.op, "crown", node.name) from None
    ins, odd, even = rule(node, layout(lam), ctx)
    return [i.t if isinstance(i, Dense) else i for i in ins], odd, even
