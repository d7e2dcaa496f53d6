"""Sound bounds of piecewise-linear elementwise functions (ReLU).

The smooth functions of :mod:`.relax` are records of derivatives and convex
pieces; a kink does not fit that form (a tangent at the kink is no tangent),
so piecewise-linear functions have closed-form rules here, with the same
signatures, and :mod:`.relax` dispatches to them by name
(:data:`PIECEWISE`).

ReLU on ``[l, u]``:

* ``l >= 0``: the identity (``al = au = 1``, offsets 0); ``u <= 0``: zero.
* ``l < 0 < u``: upper line the chord ``u (x - l) / (u - l)``; lower line
  ``a x`` for any ``a`` in [0, 1] (``a x <= relu(x)`` on the whole line).
  The default ``a`` is the adaptive choice, 1 where ``u >= -l`` and 0
  elsewhere (the line of least area between the two); ``alpha`` (clamped
  to [0, 1]) is the lower slope itself, so alpha-CROWN optimises it directly.

Offsets carry the float64 rounding of the chord and of evaluating
``a x + b`` (as :func:`.relax._line_slack` does): ``4 EPS (|a| |x|max + |b|)``.
"""

from __future__ import annotations

import torch

from ..errors import GammaError

EPS = 2.0 ** -52
TINY = 2.0 ** -1000


def _prep(name: str, l, u):
    l = torch.as_tensor(l, dtype=torch.float64)
    u = torch.as_tensor(u, dtype=torch.float64)
    l, u = torch.broadcast_tensors(l, u)
    if not bool((l <= u).all()):
        if torch.isnan(l).any() or torch.isnan(u).any():
            raise GammaError(f"{name}: input bounds contain NaN")
        raise GammaError(f"{name}: lower bound above upper bound")
    return l, u


def _slack(a, b, xmag):
    return (4 * EPS * (a.detach().abs() * xmag + b.detach().abs()) + TINY).detach()


def relu_interval(l, u):
    """``(relu(l), relu(u))``: exact (monotone, and exact in float64)."""
    l, u = _prep("relu", l, u)
    return l.clamp(min=0), u.clamp(min=0)


def relu_linear(l, u, alpha=None):
    """``(al, bl, au, bu)`` with ``al x + bl <= relu(x) <= au x + bu`` on [l, u];
    ``alpha``: None, a tensor (the lower slope) or a pair (lower slope, ignored)."""
    l, u = _prep("relu", l, u)
    a_lo = alpha[0] if isinstance(alpha, (tuple, list)) else alpha
    if a_lo is not None:
        shape = torch.broadcast_shapes(l.shape, torch.as_tensor(a_lo).shape)
        l, u = l.expand(shape), u.expand(shape)
    pos, neg = l >= 0, u <= 0
    cross = ~(pos | neg)
    one, zero = torch.ones_like(l), torch.zeros_like(l)
    w = torch.where(cross, u - l, one)
    chord = torch.where(cross, u / w, zero)
    au = torch.where(pos, one, chord)
    bu = torch.where(cross, -l * chord, zero)
    xmag = torch.maximum(l.abs(), u.abs())
    bu = bu + torch.where(cross, _slack(au, bu, xmag), zero)
    if a_lo is None:
        slope = (u >= -l).to(l.dtype)
    else:
        slope = torch.as_tensor(a_lo, dtype=torch.float64).clamp(0.0, 1.0).expand(l.shape)
    al = torch.where(pos, one, torch.where(cross, slope, zero))
    bl = torch.where(cross, -_slack(al, zero, xmag), zero)
    return al, bl, au, bu


def relu_offsets(l, u, a_lower, a_upper):
    """Offsets for given slopes: relu - a x is convex and piecewise linear, so its
    maximum is at an end of [l, u] and its minimum at an end or at the kink."""
    l, u = _prep("relu", l, u)
    al = torch.as_tensor(a_lower, dtype=torch.float64)
    au = torch.as_tensor(a_upper, dtype=torch.float64)
    g = lambda a, x: x.clamp(min=0) - a * x
    kink = torch.where((l < 0) & (u > 0), torch.zeros_like(l), torch.full_like(l, float("inf")))
    bl = torch.minimum(torch.minimum(g(al, l), g(al, u)), kink)
    bu = torch.maximum(g(au, l), g(au, u))
    xmag = torch.maximum(l.abs(), u.abs())
    bl = bl - _slack(al, bl, xmag)
    bu = bu + _slack(au, bu, xmag)
    bl = torch.where(torch.isfinite(bl), bl, torch.full_like(bl, -float("inf")))
    bu = torch.where(torch.isfinite(bu), bu, torch.full_like(bu, float("inf")))
    return bl, bu


class _Rules:
    def __init__(self, interval, linear, offsets):
        self.interval, self.linear, self.offsets = interval, linear, offsets


PIECEWISE = {"relu": _Rules(relu_interval, relu_linear, relu_offsets)}
