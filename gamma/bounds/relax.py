"""Sound interval and linear bounds of scalar elementwise functions.

Every function is a :class:`ScalarFn` record in :data:`FUNCTIONS`
(:mod:`.scalar`): its float64 formula, first and second derivatives, and its
facts as data (monotonicity, the pieces of the real line on which it is
convex or concave, the global minimum of the non-monotone ones, and how
accurate its float64 formula is).  The two public rules work for every entry:

``interval(fn, l, u) -> (lo, hi)``
    ``lo <= f(x) <= hi`` for every real ``x`` in ``[l, u]``.  Monotone
    functions use the endpoints; the non-monotone ones (gelu, gelu_tanh, silu,
    square) are unimodal (proof sketches at their entries), so the maximum is
    at an endpoint and the minimum is the stored lower bound ``fmin_lo`` of the
    global minimum when ``[l, u]`` contains the minimiser.

``linear(fn, l, u, alpha=None) -> (al, bl, au, bu)``
    ``al*x + bl <= f(x) <= au*x + bu`` for every real ``x`` in ``[l, u]``.

Slopes (the only thing ``alpha`` changes, so every alpha is sound):

* convex (exp, reciprocal, rsqrt, square): upper = chord slope; lower =
  ``f'(t)`` with ``t = l + alpha*(u - l)`` (default alpha 0.5, the tangent of
  least area).  Concave (sqrt): the mirror image.
* non-convex (gelu, gelu_tanh, silu, sigmoid, tanh): both slopes are the chord
  slope by default; with ``alpha`` the slope is ``f'(l + alpha*(u-l))``.
  ``alpha`` may be one tensor (the same point for both sides) or a pair
  ``(alpha_lower, alpha_upper)``; convex / concave functions ignore the alpha
  of their chord side (the chord is the best line there).  By the mean value
  theorem the chord slope is one of the ``f'(t)``, so optimising alpha can
  only do better than the default.

Offsets never trust the slope: for any slope ``a`` the offsets bound the
extremes of ``g(x) = f(x) - a*x`` on ``[l, u]`` (:func:`offsets`).  ``[l, u]``
is cut at the inflection points of ``f``; on a convex piece the maximum of
``g`` is at the piece's ends, on a concave piece ``g`` lies below its tangent
at any point ``c`` of the piece.  So the maximum of ``g`` is at most the
largest of ``g(l)``, ``g(u)`` and, for each concave piece ``[p, q]``,
``g(c) + max(g'(c)(p - c), g'(c)(q - c))`` with ``c`` a numerical root of
``f'(c) = a`` (safeguarded Newton).  The minimum is the mirror image with
convex pieces.  ``c`` only affects tightness, never soundness.

Rounding: every float64 value of ``f`` / ``f'`` carries an error bound
``EPS*(rel64*|f| + abs64)`` (per-function data, validated against mpmath in
``tests/test_relax.py``); each candidate adds it, the slope-times-width error,
a slack for the float64 position of the inflection points
(``m3 * delta**2 * width``) and, once per line, the rounding of evaluating
``a*x + b`` and ``f(x)`` in float64.  Widths at or below ``1e-12`` relative
(and ``l == u``) use constant bounds ``(0, lo)`` / ``(0, hi)``; any non-finite
slope or offset (e.g. exp beyond ~709) falls back the same way.

``alpha`` is differentiable: ``b`` is ``f(c) - a*c`` with ``c`` detached
(envelope theorem), all margins are detached, and alpha is clamped to [0, 1].
All results are float64 tensors of the broadcast shape of ``l``, ``u`` (and
``alpha``).  Inputs with NaN, ``l > u`` or outside the domain raise
:class:`GammaError`; an unknown function raises :class:`UnsupportedOp`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import GammaError
from .piecewise import PIECEWISE
from .scalar import FUNCTIONS, ScalarFn, get

__all__ = ["ScalarFn", "FUNCTIONS", "get", "interval", "linear", "offsets"]

Tensor = torch.Tensor
Alpha = Union[None, Tensor, float, Sequence]

EPS = 2.0 ** -52          # float64 machine epsilon (2 units of roundoff)
TINY = 2.0 ** -1000       # absolute floor covering float64 underflow
REL_WIDTH = 1e-12         # widths below this (relative) get constant bounds
NEWTON_STEPS = 30         # root finding for the tangent points (tightness only)
INF = math.inf

# ----------------------------------------------------------------------------
# helpers

def _prep(spec: ScalarFn, l, u):
    """(l, u) as broadcast float64 tensors; check order, NaN and domain."""
    l = torch.as_tensor(l, dtype=torch.float64)
    u = torch.as_tensor(u, dtype=torch.float64)
    l, u = torch.broadcast_tensors(l, u)
    if not bool((l <= u).all()):                # false for NaN as well: one pass in the common case
        if torch.isnan(l).any() or torch.isnan(u).any():
            raise GammaError(f"{spec.name}: input bounds contain NaN")
        raise GammaError(f"{spec.name}: lower bound above upper bound")
    if spec.domain is not None and l.numel():
        bound, strict = spec.domain
        lmin = float(l.min())
        if (lmin <= bound) if strict else (lmin < bound):
            rel = ">" if strict else ">="
            raise GammaError(f"{spec.name} is defined only for x {rel} {bound:g}, "
                             f"but the input interval reaches {lmin:g}")
    return l, u


def _err(fx: Tensor, rel: float, ab: float) -> Tensor:
    """Bound on the float64 evaluation error of a computed value fx."""
    return EPS * (rel * fx.abs() + ab) + TINY


def _solve(spec: ScalarFn, a: Tensor, p: Tensor, q: Tensor, sgn: int,
           x0: Optional[Tensor] = None) -> Tensor:
    """A point c of [p, q] near the root of f'(c) = a (f' monotone there).

    1-D tensors.  ``sgn`` is +1 on convex pieces (f' increasing), -1 on
    concave ones.  Safeguarded Newton from the regula-falsi point (or ``x0``)
    on a shrinking bracket, run only on the elements whose root is inside
    (p, q) and not yet converged (``|f'(c) - a| * (q - p)`` negligible).
    The result only affects tightness, never soundness.
    """
    with torch.no_grad():
        hp, hq = sgn * (spec.df(p) - a), sgn * (spec.df(q) - a)   # increasing
        c = torch.where(hq <= 0, q, p)
        (idx,) = ((hp < 0) & (hq > 0)).nonzero(as_tuple=True)
        if idx.numel() == 0:
            return c
        lo, hi, a, hl, hh = p[idx], q[idx], a[idx], hp[idx], hq[idx]
        w = hi - lo
        tol = 1e-14 * (1.0 + a.abs() * torch.maximum(lo.abs(), hi.abs())) / w
        x = lo - hl * (w / (hh - hl))                  # regula falsi
        x = torch.where(torch.isfinite(x) & (x > lo) & (x < hi), x, 0.5 * (lo + hi))
        if x0 is not None:
            x0 = x0[idx]
            x = torch.where((x0 >= lo) & (x0 <= hi), x0, x)
        best_h = torch.full_like(x, INF)
        pos = torch.arange(x.numel(), device=x.device)  # working slot -> subset index
        out = x.clone()
        d12 = spec.d12 or (lambda t: (spec.df(t), spec.d2f(t)))
        best = x.clone()
        for _ in range(NEWTON_STEPS):
            d1, d2 = d12(x)
            hx = sgn * (d1 - a)
            better = hx.abs() < best_h
            best = torch.where(better, x, best)
            best_h = torch.where(better, hx.abs(), best_h)
            neg = hx < 0
            lo = torch.where(neg, x, lo)
            hi = torch.where(neg, hi, x)
            xn = x - hx / (sgn * d2)
            ok = torch.isfinite(xn) & (xn > lo) & (xn < hi)
            x = torch.where(hx == 0, x, torch.where(ok, xn, 0.5 * (lo + hi)))
            live = best_h > tol
            n_live = int(live.sum())
            if n_live == 0:
                break
            if 2 * n_live < live.numel():              # compact the working set
                out[pos] = best
                pos, x, lo, hi, a, tol, best, best_h = (
                    t[live] for t in (pos, x, lo, hi, a, tol, best, best_h))
        out[pos] = best
        best = out
        c[idx] = best
        return torch.minimum(torch.maximum(c, p), q)


def _extreme(spec: ScalarFn, a: Tensor, l: Tensor, u: Tensor, fl: Tensor, fu: Tensor,
             upper: bool, x0: Optional[Tensor] = None) -> Tensor:
    """Sound bound of max (upper) or min (lower) of g = f - a x over [l, u].

    1-D tensors.  The value part f(c) - a c keeps its gradient w.r.t. ``a``
    (c is detached: envelope theorem); margins and the tangent extension are
    detached.
    """
    sign = 1.0 if upper else -1.0
    pick = torch.maximum if upper else torch.minimum
    ad = a.detach()

    def endpoint(x, fx):
        e = _err(fx, spec.rel64, spec.abs64) + 2 * EPS * (fx.abs() + (ad * x).abs())
        return fx - a * x + sign * e.detach()

    best = pick(endpoint(l, fl), endpoint(u, fu))
    want = -1 if upper else +1                      # concave pieces for the max
    for start, end, s in spec.pieces:
        if s != want:
            continue
        (idx,) = ((l <= end) & (u >= start)).nonzero(as_tuple=True)
        if idx.numel() == 0:
            continue
        p, q, ai, adi = l[idx].clamp(min=start), u[idx].clamp(max=end), a[idx], ad[idx]
        c = _solve(spec, adi, p, q, s, None if x0 is None else x0.detach()[idx])
        fc = spec.f(c)
        dc = spec.df(c)
        with torch.no_grad():
            gp = dc - adi
            t1, t2 = gp * (p - c), gp * (q - c)
            ext = torch.maximum(t1, t2) if upper else torch.minimum(t1, t2)
            w = q - p
            e = (_err(fc, spec.rel64, spec.abs64) + 2 * EPS * (fc.abs() + (adi * c).abs())
                 + (_err(dc, spec.drel64, spec.dabs64) + 2 * EPS * (dc.abs() + adi.abs())) * w
                 + 2 * EPS * ext.abs() + spec.m3 * spec.delta ** 2 * w)
            extra = ext + sign * e
        cand = fc - ai * c + extra
        full = torch.full_like(best, -INF if upper else INF).index_put((idx,), cand)
        best = pick(best, full)
    return best


def _line_slack(spec: ScalarFn, a: Tensor, b: Tensor, fmag: Tensor, xmag: Tensor) -> Tensor:
    """Margin for evaluating a*x + b and f(x) in float64 anywhere in [l, u]."""
    with torch.no_grad():
        return (EPS * (spec.rel64 * fmag + spec.abs64) + TINY
                + 4 * EPS * (a.detach().abs() * xmag + b.detach().abs()))


def _bounds_f(spec, l, u):
    """f(l), f(u) and their float64 error bounds."""
    fl, fu = spec.f(l), spec.f(u)
    return fl, fu, _err(fl, spec.rel64, spec.abs64), _err(fu, spec.rel64, spec.abs64)


# ----------------------------------------------------------------------------
# public rules

def interval(fn: Union[str, ScalarFn], l, u):
    """Sound ``(lo, hi)`` with ``lo <= f(x) <= hi`` for all real x in [l, u].

    l, u: tensors (broadcast), float64 results of the broadcast shape.
    """
    if fn in PIECEWISE:                     # kinks (relu): closed-form rules in .piecewise
        return PIECEWISE[fn].interval(l, u)
    spec = get(fn)
    l, u = _prep(spec, l, u)
    with torch.no_grad():
        fl, fu, el, eu = _bounds_f(spec, l, u)
        if spec.monotone > 0:
            lo, hi = fl - el, fu + eu
        elif spec.monotone < 0:
            lo, hi = fu - eu, fl + el
        else:
            hi = torch.maximum(fl + el, fu + eu)
            lo = torch.minimum(fl - el, fu - eu)
            inside = (l <= spec.argmin + spec.argmin_tol) & (u >= spec.argmin - spec.argmin_tol)
            lo = lo.masked_fill(inside, spec.fmin_lo)
        lo = torch.nan_to_num(lo, nan=-INF, posinf=INF, neginf=-INF)     # NaN -> unbounded, infs kept
        hi = torch.nan_to_num(hi, nan=INF, posinf=INF, neginf=-INF)
    return lo, hi


def _split_alpha(alpha: Alpha):
    if alpha is None:
        return None, None
    if isinstance(alpha, (tuple, list)):
        if len(alpha) != 2:
            raise GammaError("alpha must be a tensor or a pair (alpha_lower, alpha_upper)")
        return alpha[0], alpha[1]
    return alpha, alpha


def _tangent_point(spec, l, u, alpha):
    """t = l + clamp(alpha, 0, 1) * (u - l), inside [l, u] (differentiable)."""
    t = torch.minimum(torch.maximum(l + alpha.clamp(0.0, 1.0) * (u - l), l), u)
    if spec.name == "sqrt":        # f'(0) = inf: keep the tangent point off 0
        t = torch.maximum(t, 1e-6 * u)
    return t


def _flat(x, shape):
    return torch.as_tensor(x, dtype=torch.float64).expand(shape).reshape(-1)


def _broadcast_shapes(*shapes) -> tuple:
    """numpy's broadcast rule; torch.broadcast_shapes imports sympy on its first
    call (torch.fx symbolic shapes), 0.8 s of every fresh process's first CROWN run."""
    return tuple(np.broadcast_shapes(*(tuple(s) for s in shapes)))


def offsets(fn: Union[str, ScalarFn], l, u, a_lower, a_upper):
    """Sound offsets for given slopes: ``(bl, bu)`` with
    ``a_lower*x + bl <= f(x) <= a_upper*x + bu`` on [l, u].

    Any slopes are allowed (tensors broadcast with l, u); where a slope or
    the result is not finite the offset is -inf / +inf.
    """
    if fn in PIECEWISE:
        return PIECEWISE[fn].offsets(l, u, a_lower, a_upper)
    spec = get(fn)
    l, u = _prep(spec, l, u)
    shape = _broadcast_shapes(l.shape, torch.as_tensor(a_lower).shape, torch.as_tensor(a_upper).shape)
    l, u, al, au = (_flat(x, shape) for x in (l, u, a_lower, a_upper))
    bl, bu, _ = _offsets(spec, l, u, al, au, None, None)
    bl = torch.where(torch.isfinite(bl), bl, torch.full_like(bl, -INF))
    bu = torch.where(torch.isfinite(bu), bu, torch.full_like(bu, INF))
    return bl.reshape(shape), bu.reshape(shape)


def _offsets(spec, l, u, al, au, x0l, x0u):
    """1-D tensors: sound (bl, bu) for slopes (al, au), NaN where a slope is
    not finite, and the interval (lo, hi) of f on [l, u]."""
    fl, fu = spec.f(l), spec.f(u)
    lo, hi = interval(spec, l, u)
    fmag = torch.maximum(lo.abs(), hi.abs())
    xmag = torch.maximum(l.abs(), u.abs())
    with torch.no_grad():
        safe = torch.isfinite(al) & torch.isfinite(au)
    al0 = torch.where(safe, al, torch.zeros_like(al))
    au0 = torch.where(safe, au, torch.zeros_like(au))
    bl = _extreme(spec, al0, l, u, fl, fu, upper=False, x0=x0l)
    bu = _extreme(spec, au0, l, u, fl, fu, upper=True, x0=x0u)
    bl = bl - _line_slack(spec, al0, bl, fmag, xmag)
    bu = bu + _line_slack(spec, au0, bu, fmag, xmag)
    nan = torch.full_like(bl, math.nan)
    return torch.where(safe, bl, nan), torch.where(safe, bu, nan), (lo, hi)


def linear(fn: Union[str, ScalarFn], l, u, alpha: Alpha = None):
    """Sound linear bounds ``(al, bl, au, bu)`` of f on [l, u].

    ``al*x + bl <= f(x) <= au*x + bu`` for every real x in [l, u].
    ``alpha``: None, a tensor in [0, 1] (clamped) broadcastable with l, or a
    pair ``(alpha_lower, alpha_upper)``; see the module docstring for what it
    selects.  Differentiable w.r.t. alpha.  Results: float64 tensors of the
    broadcast shape of l, u and alpha.
    """
    if fn in PIECEWISE:
        return PIECEWISE[fn].linear(l, u, alpha)
    spec = get(fn)
    l, u = _prep(spec, l, u)
    alpha_l, alpha_u = _split_alpha(alpha)
    shape = _broadcast_shapes(l.shape, *(torch.as_tensor(x).shape for x in (alpha_l, alpha_u) if x is not None))
    l, u = _flat(l, shape), _flat(u, shape)
    alpha_l = None if alpha_l is None else _flat(alpha_l, shape)
    alpha_u = None if alpha_u is None else _flat(alpha_u, shape)
    w = u - l
    with torch.no_grad():
        degen = w <= REL_WIDTH * torch.maximum(l.abs(), u.abs())
    ws = torch.where(degen, torch.ones_like(w), w)
    fl, fu = spec.f(l), spec.f(u)
    chord = (fu - fl) / ws
    x0l = x0u = None
    if spec.convex or spec.concave:
        tangent_alpha = alpha_l if spec.convex else alpha_u
        if tangent_alpha is None:
            tangent_alpha = torch.full_like(l, 0.5)
        t = _tangent_point(spec, l, u, tangent_alpha)
        tangent = spec.df(t)
        if spec.convex:
            al, au, x0l = tangent, chord, t
        else:
            al, au, x0u = chord, tangent, t
    else:
        al = au = chord
        if alpha_l is not None:
            x0l = _tangent_point(spec, l, u, alpha_l)
            al = spec.df(x0l)
        if alpha_u is not None:
            x0u = _tangent_point(spec, l, u, alpha_u)
            au = spec.df(x0u)
    zero = torch.zeros_like(w)
    al = torch.where(degen, zero, al)
    au = torch.where(degen, zero, au)
    bl, bu, (lo, hi) = _offsets(spec, l, u, al, au, x0l, x0u)
    with torch.no_grad():
        bad_l = degen | ~torch.isfinite(bl) | ~torch.isfinite(al)
        bad_u = degen | ~torch.isfinite(bu) | ~torch.isfinite(au)
    al = torch.where(bad_l, zero, al)
    bl = torch.where(bad_l, lo, bl)
    au = torch.where(bad_u, zero, au)
    bu = torch.where(bad_u, hi, bu)
    return tuple(t.reshape(shape) for t in (al, bl, au, bu))
