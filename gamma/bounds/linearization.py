"""The linear forms of the ops bounded as a whole (softmax, LayerNorm, RMSNorm:
:mod:`.norm`, :mod:`.softmax`) and what they share.

For a smooth f and a box [l, u] with centre x0 and radius r, the mean value
theorem applied to each output component gives, for every x in the box,

    |f(x) - f(x0) - J0 (x - x0)|_i  <=  sum_j D_ij r_j =: err_i,

where J0 is the Jacobian at x0 and D_ij bounds |J_ij(xi) - J0_ij| over the
whole box.  The decomposed relaxations of the ops' formulas give forms of the
same shape with remainders that are not summed over the row.  Either way the
op is ``y in y0 + J (x - x0) +- err`` with J applied in structured form
(diagonal plus rank one), held by :class:`Linearization`: CROWN uses its
transpose (``vjp``), zonotopes its forward map (``jvp``).  Shapes: rows of the
last dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .interval import Interval

Tensor = torch.Tensor
ULP64 = 2.0 ** -52


@dataclass
class Linearization:
    x0: Tensor                        # expansion point (input shape)
    y0: Tensor                        # f(x0)
    err: Tensor                       # bound of the remainder over the box (output shape)
    jvp: Callable[[Tensor], Tensor]   # J0 dx,   (..., *in) -> (..., *out)
    vjp: Callable[[Tensor], Tensor]   # J0^T lam, (..., *out) -> (..., *in)
    abs_jvp: Callable[[Tensor], Tensor]   # |J0| r for r >= 0
    naive: Interval                   # a direct interval enclosure of f over the box
    vjp_at: Optional[Callable] = None  # take -> vjp with the per-row state gathered by take (rows.py)
    rem: Optional["RowRemainder"] = None  # err with what a row shares kept apart (CROWN); None: err only
    # norms' decomposed form: (r_c, r_s, c_m) of its c * s product, whose remainder |w| r_c r_s is part of
    # err and rem (r_s is 0 on rows of the mean-value form); :mod:`.norm_side`
    cs: Optional[tuple] = None

    def even_at(self, take=lambda c: c) -> Callable[[Tensor], Tensor]:
        """lam (S, ..) -> (S,): a bound of ``-lam . (f(x) - y0 - J0 (x - x0))`` over the box,
        even in lam; ``take`` gathers per-row state as :func:`vjp_at` does."""
        if self.rem is not None:
            return self.rem.at(take)
        err = take(self.err)
        return lambda lam: row_dot(lam.abs(), err)


def row_dot(x: Tensor, c: Tensor) -> Tensor:
    """(S,): per row of x (S, ..), the sum of ``x * c`` with c broadcastable to x.
    One mat-vec when c is the same for every row (no row axis: several times
    faster on CPU than the product and the sum), else the product and the sum."""
    S = x.shape[0]
    if c.dim() < x.dim() or c.shape[0] == 1:
        c = c[0] if c.dim() == x.dim() else c
        return x.reshape(S, -1) @ c.to(x.dtype).expand(x.shape[1:]).reshape(-1)
    return (x * c).reshape(S, -1).sum(1)


def row_sums(x: Tensor, u: Tensor) -> Tensor:
    """``(x * u).sum(-1, keepdim=True)`` (broadcasting) without the product's
    temporary: about 2x faster on CPU."""
    return torch.linalg.vecdot(x, u.to(x.dtype) if u.dtype != x.dtype else u).unsqueeze(-1)


@dataclass
class RowRemainder:
    """A remainder bound that keeps the terms the entries of a row share.

    For every x in the box, per row (last dim), the remainder of the linear form is

        rem_i = eps_i + P_i b_i + u_i (sum_j Q_j b_j + k),   |eps_i| <= E_i, |b_j| <= B_j, |k| <= K

    (the decomposed relaxations: b_j the remainders of the per-element lines,
    k that of the row's shared scalar, e.g. the inverse scale or 1/Z).  For a
    cotangent lam, with ``L = sum_i lam_i u_i`` per row,

        |lam . rem| <= sum_i |lam_i| E_i + sum_j B_j |lam_j P_j + L Q_j| + |L| K,

    which is even in lam and never above ``|lam| . err`` with err the
    elementwise bound (:meth:`elementwise`: the triangle inequality applied
    to every term): spec rows that mix the entries of a row with signs of
    both kinds (W^T of the next linear layer) no longer pay the shared term
    once per entry.  B, P, Q may be None (no b terms).  Shapes: E, u, B (.., d);
    P, Q, K (.., d) or (.., 1)."""
    E: Tensor
    u: Tensor
    K: Tensor
    B: Optional[Tensor] = None
    P: Optional[Tensor] = None
    Q: Optional[Tensor] = None

    def elementwise(self) -> Tensor:
        shared = self.K if self.B is None else self.K + (self.Q.abs() * self.B).sum(-1, keepdim=True)
        err = self.E + self.u.abs() * shared
        return err if self.B is None else err + self.P.abs() * self.B

    def where(self, keep: Tensor, err: Tensor) -> "RowRemainder":
        """This remainder on the rows where ``keep`` (.., 1), the elementwise ``err`` elsewhere."""
        z = lambda t: None if t is None else torch.where(keep, t, torch.zeros_like(t))
        shape = err.shape
        return RowRemainder(torch.where(keep, self.E, err).expand(shape), z(self.u).expand(shape), z(self.K),
                            z(self.B), z(self.P), z(self.Q))

    def at(self, take=lambda c: c) -> Callable[[Tensor], Tensor]:
        E, u, K = take(self.E), take(self.u), take(self.K)
        B, P, Q = (None, None, None) if self.B is None else (take(self.B), take(self.P), take(self.Q))

        def even(lam: Tensor) -> Tensor:
            L = row_sums(lam, u)                                      # (S, .., 1)
            out = row_dot(lam.abs(), E) + row_dot(L.abs(), K)
            if B is not None:
                out = out + row_dot((lam * P + L * Q).abs(), B)
            return out
        return even


# ---------------------------------------------------------------- shared by the forms
def convex_intercepts(f, fprime, lo: Tensor, hi: Tensor, beta: Tensor, t: Tensor):
    """For f convex on [lo, hi] and any slope beta: ``f(x) in beta x + [k_lo, k_hi]``
    there.  ``g = f - beta x`` is convex, so its maximum is at an end point,
    and for any t in [lo, hi] its minimum is at least ``g(t) + min(g'(t) (lo - t),
    g'(t) (hi - t))`` (its tangent at t); t near the minimiser makes it tight.
    A relative slack of a few float64 ulps covers the rounding of f and of
    these formulas."""
    t = torch.minimum(torch.maximum(t, lo), hi)
    g = lambda q: f(q) - beta * q
    k_hi = torch.maximum(g(lo), g(hi))
    gp = fprime(t) - beta
    k_lo = g(t) + torch.minimum(gp * (lo - t), gp * (hi - t)).clamp_max(0)
    mag = (torch.maximum(f(lo).abs(), f(hi).abs()) + f(t).abs() + beta.abs() * torch.maximum(lo.abs(), hi.abs())
           + fprime(t).abs() * (hi - lo))
    slack = 16 * ULP64 * mag
    return k_lo - slack, k_hi + slack



def bounded_rows(x: Interval):
    """Which rows (last dim) of a box are bounded, for rules whose mean-value
    refinement is useless (inf or NaN) on an unbounded row: True when all
    are, None when none is, else a (.., 1) bool mask."""
    if x.radius.numel() and bool(torch.isfinite(x.radius.amax())):     # one reduction (amax keeps NaN)
        return True
    fin = torch.isfinite(x.radius).all(-1, keepdim=True)
    if bool(fin.all()):
        return True
    return fin if bool(fin.any()) else None
