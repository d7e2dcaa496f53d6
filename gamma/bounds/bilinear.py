"""Facts about products of two bounded tensors that every domain uses.

``z = x @ y^T`` whose x rows sum to one (softmax probabilities: attention @ V,
``rows_sum_to_one``) equals ``x @ (y - m)^T + m^T`` for any per-row constant
m, so the domains relax the product around ``y - m`` (:func:`simplex_shift`)
and CROWN may take one McCormick plane per product by the sign of Lambda
(:func:`planes`).  The McCormick planes of an elementwise product and their
mixtures (alpha-CROWN's parameters): :func:`mul_planes`.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


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
    per sign of Lambda (:func:`gamma.bounds.crown_rules._matmul_planes`): the
    attention @ V product, whose x rows are probabilities."""
    return bool(node.params.get("rows_sum_to_one"))


def mul_planes(x, y, a_lo, a_hi):
    """Mixtures of the two McCormick planes of ``z = x y`` on the box, per element:

        z >= a P1 + (1 - a) P2,  P1 = xl y + yl x - xl yl,  P2 = xu y + yu x - xu yu   (a = a_lo)
        z <= b Q1 + (1 - b) Q2,  Q1 = xu y + yl x - xu yl,  Q2 = xl y + yu x - xl yu   (b = a_hi)

    each a convex combination of valid planes, so valid for any a, b in [0, 1];
    a = b = 1/2 is the half-sum rule (alpha-CROWN optimises a, b).  Returns (x and
    y slopes, constant) of the lower and of the upper line."""
    xl, xu, yl, yu = x.lower, x.upper, y.lower, y.upper
    lo = (a_lo * yl + (1 - a_lo) * yu, a_lo * xl + (1 - a_lo) * xu, -(a_lo * xl * yl + (1 - a_lo) * xu * yu))
    hi = (a_hi * yl + (1 - a_hi) * yu, a_hi * xu + (1 - a_hi) * xl, -(a_hi * xu * yl + (1 - a_hi) * xl * yu))
    return lo, hi


def polar_band(x, y, s: tuple, d: tuple, k=1.0):
    """A band ``a x + b y + c +- h`` that contains ``x y`` wherever x, y lie in their
    boxes and ``s = k x + y / k``, ``d = k x - y / k`` in theirs (k > 0 per element),
    per element: the narrower of

    * the half-sum of the McCormick planes: ``a = cy, b = cx, c = -cx cy, h = rx ry``;
    * the polarization ``x y = (s^2 - d^2) / 4``: ``s^2`` above its tangent at s's centre
      s0 and below its chord, ``d^2`` likewise, which gives lines with one slope pair
      ``a = k (s0 - d0) / 2, b = (s0 + d0) / (2 k)`` and constants
      ``(dl du - s0^2) / 4`` (lower) and ``(d0^2 - sl su) / 4`` (upper), so
      ``h = (rs^2 + rd^2) / 8``.

    With s, d from the boxes alone (``rs = rd = k rx + ry / k``, at least ``2 sqrt(rx ry)``,
    reached at ``k = sqrt(ry / rx)``) the second is never the narrower; with CROWN's own
    bounds of s and d it is where x and y move together or against each other.
    Returns (a, b, c, h)."""
    cx, cy, rx, ry = x.center, y.center, x.radius, y.radius
    sl, su = s
    dl, du = d
    s0, d0 = 0.5 * (sl + su), 0.5 * (dl + du)
    lo = 0.25 * (dl * du - s0 * s0)
    hi = 0.25 * (d0 * d0 - sl * su)
    c_p, h_p = 0.5 * (lo + hi), 0.5 * (hi - lo)
    h_p = h_p + 1e-12 * (lo.abs() + hi.abs())          # float64 rounding of the constants, outward
    use = h_p < rx * ry
    a = torch.where(use, 0.5 * k * (s0 - d0), cy)
    b = torch.where(use, 0.5 * (s0 + d0) / k, cx)
    c = torch.where(use, c_p, -cx * cy)
    h = torch.where(use, h_p, rx * ry)
    return a, b, c, h
