"""Interval bound propagation (IBP): one rule per op in :data:`IBP`, each
mapping the input :class:`Interval` s of a node to its own.

Rules work in centre/radius form, so an affine op costs two applications of
its linear part (one with absolute coefficients); every affine op gets its
rule from :data:`gamma.ops.AFFINE`.  Softmax and the norms: the direct
enclosure intersected with the mean-value one (:mod:`.softmax`, :mod:`.norm`).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, COPY, ELEMENTWISE, FORWARD
from . import relax
from .bilinear import simplex_shift
from .fp import linear_image, matmul_upper
from .interval import Interval
from .norm import norm_interval
from .softmax import softmax_ibp

Tensor = torch.Tensor


# ---------------------------------------------------------------- rules
def _affine(node, *xs: Interval) -> Interval:
    fact = AFFINE[node.op]
    c = fact.lin(node, *(x.center for x in xs))
    off = fact.offset(node)
    if off is not None:
        c = c + off
    r = fact.lin_abs(node, *(x.radius for x in xs))
    return Interval(c - r, c + r)


def _copy(node, *xs: Interval) -> Interval:
    """Ops that copy entries (:data:`gamma.ops.COPY`): the image of the ends is exact."""
    fact = AFFINE[node.op]
    lo, hi = fact.lin(node, *(x.lower for x in xs)), fact.lin(node, *(x.upper for x in xs))
    off = fact.offset(node)
    return Interval(lo, hi) if off is None else Interval(lo + off, hi + off)


def _mean(node, x: Interval) -> Interval:
    """reduce_mean: monotone, so the means of the ends, widened by the float64
    rounding of an n-term sum (any order) and the division."""
    fact = AFFINE[node.op]
    n = x.lower.numel() // max(1, fact.lin(node, x.lower).numel())
    slack = (n + 2) * 2.0 ** -52 * fact.lin(node, x.abs_max()) + 2.0 ** -1000
    return Interval(fact.lin(node, x.lower) - slack, fact.lin(node, x.upper) + slack)


def _linear(node, x: Interval) -> Interval:
    """``x W^T + b`` by :func:`fp.linear_image`: the centre and the radius from
    float32 products, plus the sums ``|x|max |W|^T`` that the float32 margin
    needs (left on the result as ``abs_sums``)."""
    p, rad, sums = linear_image(x.center, x.radius, node.params["weight"])
    b = node.params.get("bias")
    if b is not None:
        p = p + b
    return Interval(p - rad, p + rad, abs_sums=sums)


def _elementwise(node, x: Interval) -> Interval:
    lo, hi = relax.interval(node.op, x.lower, x.upper)
    return Interval(lo, hi)


def mul_interval(x: Interval, y: Interval) -> Interval:
    """Exact interval of an elementwise product (corner min/max)."""
    c = torch.stack([x.lower * y.lower, x.lower * y.upper, x.upper * y.lower, x.upper * y.upper])
    return Interval(c.min(0).values, c.max(0).values)


def _mul(node, x: Interval, y: Interval) -> Interval:
    return mul_interval(x, y)


def _matmul(node, x: Interval, y: Interval) -> Interval:
    """x (.., T, a) @ y (.., S, a)^T in midpoint-radius form (sound, 4 matmuls)."""
    cx, rx, cy, ry = x.center, x.radius, y.center, y.radius
    m = simplex_shift(node, cy)
    if m is not None:
        cy = cy - m
    yt = lambda t: t.transpose(-1, -2)
    c = cx @ yt(cy)
    r = matmul_upper(cx.abs(), yt(ry)) + matmul_upper(rx, yt(cy.abs() + ry))   # |cx| ry^T + rx (|cy| + ry)^T
    if m is not None:
        c = c + yt(m)
    return Interval(c - r, c + r)


IBP: dict = {op: _affine for op in AFFINE}
IBP.update({op: _elementwise for op in ELEMENTWISE})
IBP.update({op: _copy for op in COPY})
IBP["reduce_mean"] = _mean
IBP.update({"linear": _linear, "mul": _mul, "matmul": _matmul,
            # the direct enclosure intersected with the mean-value one, without any d x d matrix
            "softmax": softmax_ibp, "layernorm": norm_interval, "rmsnorm": norm_interval})

assert set(IBP) == set(FORWARD), set(FORWARD) ^ set(IBP)


def ibp_node(node, *xs: Interval) -> Interval:
    try:
        rule = IBP[node.op]
    except KeyError:
        raise UnsupportedOp(node.op, "ibp", node.name) from None
    return rule(node, *xs)
