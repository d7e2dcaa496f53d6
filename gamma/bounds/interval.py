"""The interval domain and interval bound propagation (IBP).

:class:`Interval` is the one bound type every method reports.  IBP rules work
in centre/radius form, so an affine op costs two applications of its linear
part (one with absolute coefficients).  Rules are looked up in :data:`IBP`;
every affine op gets its rule from :data:`gamma.ops.AFFINE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, COPY, ELEMENTWISE, FORWARD
from . import relax
from .fp import linear_image, matmul_upper

Tensor = torch.Tensor


@dataclass
class Interval:
    lower: Tensor
    upper: Tensor
    # linear nodes' IBP image only: |x|max |W|^T, reused by the float32 margin
    abs_sums: Optional[Tensor] = field(default=None, repr=False, compare=False)
    # norm nodes' IBP image only: the input's ``jacobian._norm_stats``, reused by the float32 margin
    stats: Optional[tuple] = field(default=None, repr=False, compare=False)

    @staticmethod
    def from_center(center: Tensor, radius) -> "Interval":
        return Interval(center - radius, center + radius)

    # computed once per interval (bounds are never modified in place)
    @cached_property
    def center(self) -> Tensor:
        return (self.lower + self.upper) / 2

    @cached_property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    def width(self) -> Tensor:
        return self.upper - self.lower

    def abs_max(self) -> Tensor:
        return torch.maximum(self.lower.abs(), self.upper.abs())

    def widen(self, margin) -> "Interval":
        if margin is None:
            return self
        return Interval(self.lower - margin, self.upper + margin)

    def intersect(self, other: "Interval") -> "Interval":
        return Interval(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        return (x >= self.lower - tol) & (x <= self.upper + tol)

    def to(self, *args, **kw) -> "Interval":
        return Interval(self.lower.to(*args, **kw), self.upper.to(*args, **kw))


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


def simplex_shift(node, y_center: Tensor):
    """For ``z = x @ y^T`` whose x rows sum to one (softmax probabilities):
    the per-row constant m (.., S', 1) with ``z = x @ (y - m)^T + m^T`` exactly.
    Centring y this way removes its common offset from every relaxation."""
    if not node.params.get("rows_sum_to_one"):
        return None
    return y_center.mean(-1, keepdim=True)


def shift_constant(x_center: Tensor, m: Tensor) -> Tensor:
    """The constant ``m^T - cx m'^T`` (m' = m broadcast over y's last axis) of
    the shifted product, relaxed around x's centre ``cx`` (.., T, S'); (.., T, a).
    Every column of m' is m, so ``cx m'^T = rowsum(cx) m^T``: an outer
    product, not a matmul with a stride-0 operand (a slow path on CPU)."""
    return (1 - x_center.sum(-1, keepdim=True)) * m.transpose(-1, -2)


def planes(node) -> bool:
    """Whether CROWN may relax this product ``x @ y^T`` by McCormick planes chosen
    per sign of Lambda (:func:`gamma.bounds.crown._matmul_planes`): the
    attention @ V product, whose x rows are probabilities."""
    return bool(node.params.get("rows_sum_to_one"))


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


def _jacobian_op(node, x: Interval) -> Interval:
    from .jacobian import interval_bound
    return interval_bound(node, x)


IBP: dict = {op: _affine for op in AFFINE}
IBP.update({op: _elementwise for op in ELEMENTWISE})
IBP.update({op: _copy for op in COPY})
IBP["reduce_mean"] = _mean
IBP.update({"linear": _linear, "mul": _mul, "matmul": _matmul,
            "softmax": _jacobian_op, "layernorm": _jacobian_op, "rmsnorm": _jacobian_op})

assert set(IBP) == set(FORWARD), set(FORWARD) ^ set(IBP)


def ibp_node(node, *xs: Interval) -> Interval:
    try:
        rule = IBP[node.op]
    except KeyError:
        raise UnsupportedOp(node.op, "ibp", node.name) from None
    return rule(node, *xs)
