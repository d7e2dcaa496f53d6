"""Forward zonotopes (DeepT-style) with one symbol per input element.

A value is ``c + sum_k G_k eps_k + beta`` with eps in [-1, 1]^n (n = number of
input elements, shared by every node so that identical paths cancel) and
``|beta| <= box`` elementwise (independent error terms).  Nonlinear ops add
fresh error terms; error-term reduction is the sound merge of all fresh
terms into the elementwise ``box`` (a box is a zonotope with diagonal
generators, so merging only ever enlarges the set).

Rules (:data:`ZONO`):
* affine ops: exact on ``c`` and ``G``, ``|L|`` on ``box``;
* GELU / SiLU: ``y in a x + [b_lo, b_hi]`` from the relaxation lines;
* products: ``xy = cx cy + cy dx + cx dy + dx dy`` with ``|dx dy| <= Rx Ry``
  (Rx: radius of x about its centre, from the zonotope and its interval);
* softmax / LayerNorm / RMSNorm: their linear forms (:func:`.jacobian.linearize`).
No rescaling of any kind is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, ELEMENTWISE
from . import relax
from .bilinear import simplex_shift
from .interval import Interval
from .jacobian import linearize
from .tuning import DEFAULT, Tunings

Tensor = torch.Tensor


@dataclass
class Zono:
    c: Tensor        # (*shape) centre
    G: Tensor        # (n, *shape) generators of the input symbols
    box: Tensor      # (*shape) >= 0, independent error

    def radius(self) -> Tensor:
        return self.G.abs().sum(0) + self.box

    def interval(self) -> Interval:
        r = self.radius()
        return Interval(self.c - r, self.c + r)

    @staticmethod
    def from_box(box: Interval) -> "Zono":
        c, r = box.center, box.radius
        n = c.numel()
        G = torch.diag_embed(r.reshape(-1)).reshape(n, *c.shape)
        return Zono(c, G, torch.zeros_like(c))


def _dev(z: Zono, iv: Interval) -> Tensor:
    """Bound of |x - c| over the node: the smaller of the zonotope radius and
    the distance from c to the ends of the (possibly tighter) interval."""
    return torch.minimum(z.radius(), torch.maximum(iv.upper - z.c, z.c - iv.lower).clamp_min(0))


def _affine(node, zs, ivs, tunings):
    fact = AFFINE[node.op]
    c = fact.lin(node, *(z.c for z in zs))
    off = fact.offset(node)
    if off is not None:
        c = c + off
    G = fact.lin(node, *(z.G for z in zs))
    box = fact.lin_abs(node, *(z.box for z in zs))
    return Zono(c, G, box)


def _elementwise(node, zs, ivs, tunings):
    z, iv = zs[0], ivs[0]
    al, bl, au, bu = relax.linear(node.op, iv.lower, iv.upper)
    a = au
    b_lo = torch.minimum((al - a) * iv.lower, (al - a) * iv.upper) + bl
    b_hi = bu
    return Zono(a * z.c + (b_lo + b_hi) / 2, a * z.G, a.abs() * z.box + (b_hi - b_lo).clamp_min(0) / 2)


def _mul(node, zs, ivs, tunings):
    x, y = zs
    rem = _dev(x, ivs[0]) * _dev(y, ivs[1])
    return Zono(x.c * y.c, y.c * x.G + x.c * y.G, y.c.abs() * x.box + x.c.abs() * y.box + rem)


def _matmul(node, zs, ivs, tunings):
    x, y = zs
    t = lambda v: v.transpose(-1, -2)
    rem = _dev(x, ivs[0]) @ t(_dev(y, ivs[1]))
    m = simplex_shift(node, y.c)                    # z = x (y - m)^T + m^T when x rows sum to 1
    yc = y.c if m is None else y.c - m
    G = x.G @ t(yc) + x.c @ t(y.G)
    box = x.box @ t(yc.abs()) + x.c.abs() @ t(y.box) + rem
    c = x.c @ t(yc)
    return Zono(c if m is None else c + t(m), G, box)


def _jacobian(node, zs, ivs, tunings):
    z = zs[0]
    lin = linearize(node, ivs[0], tunings)
    c = lin.y0 + lin.jvp(z.c - lin.x0)
    return Zono(c, lin.jvp(z.G), lin.abs_jvp(z.box) + lin.err)


ZONO: dict = {op: _affine for op in AFFINE}
ZONO.update({op: _elementwise for op in ELEMENTWISE})
ZONO.update({"mul": _mul, "matmul": _matmul,
             "softmax": _jacobian, "layernorm": _jacobian, "rmsnorm": _jacobian})


def zono_node(node, zs, ivs, tunings: Tunings = DEFAULT) -> Zono:
    try:
        rule = ZONO[node.op]
    except KeyError:
        raise UnsupportedOp(node.op, "zonotope", node.name) from None
    return rule(node, zs, ivs, tunings)
