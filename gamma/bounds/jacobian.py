"""Mean-value linearisation of smooth vector ops: softmax, LayerNorm, RMSNorm.

For a smooth f and a box [l, u] with centre x0 and radius r, the mean value
theorem applied to each output component gives, for every x in the box,

    |f(x) - f(x0) - J0 (x - x0)|_i  <=  sum_j D_ij r_j =: err_i,

where J0 is the Jacobian at x0 and D_ij bounds |J_ij(xi) - J0_ij| over the
whole box.  D comes from an interval enclosure of the Jacobian, built from
interval bounds of the op's internal quantities (softmax probabilities,
normalised values n and inverse scale s).  The same linearisation serves
CROWN (backward: ``vjp``) and zonotopes (forward: ``jvp``).

J0 is applied in structured form (diagonal plus rank one/two), so the
backward pass costs O(d) per row; only the error term uses the dense D,
processed a few rows at a time.  IBP (:func:`interval_bound`) must cost a
few forward passes: it uses ``y0 +- (|J0| r + err)`` with |J0| r computed
exactly in O(d log d) and err from a separable bound of D, intersected
with the direct interval rule.

LayerNorm / RMSNorm and softmax have a second linear form, the decomposed
relaxation of their formula (``w (c s) + b``, :func:`_norm_decomposed`;
``exp(x_i) / sum exp``, :func:`.softmax._softmax_decomposed`), whose remainder is not
summed over the row; CROWN and zonotopes take per row whichever form has the
smaller remainder, and CROWN first tightens the norm's internals (the
centred input c and the mean square) with small backward passes of its own
(:func:`gamma.bounds.crown.norm_mean_square`).

Shapes: softmax works on rows of the last dim ``(.., R, S)`` with an
optional (R, S) mask; the norms on rows ``(.., d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import FORWARD
from .interval import Interval
from .tuning import DEFAULT, Tunings

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


def _rows(t: Tensor, n: int) -> Tensor:
    return t.reshape(-1, n)


def _chunked_rows(n_rows: int, row_elems: int, chunk_elems: int):
    step = max(1, chunk_elems // max(1, row_elems))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


# ---------------------------------------------------------------- convex functions
def _convex_intercepts(f, fprime, lo: Tensor, hi: Tensor, beta: Tensor, t: Tensor):
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


# ---------------------------------------------------------------- LayerNorm / RMSNorm
def _norm_stats(x: Interval, eps: float, centered: bool, q: Optional[tuple] = None, c: Optional[tuple] = None):
    """Interval bounds of the normalised values n, the inverse scale s, the mean
    square q (intersected with ``q = (q_lo, q_hi)``, (.., 1) each, when given)
    and the centred values c."""
    d = x.lower.shape[-1]
    cx, rx = x.center, x.radius
    if centered:
        c_c = cx - cx.mean(-1, keepdim=True)
        c_r = rx * (1 - 1 / d) + (rx.sum(-1, keepdim=True) - rx) / d
    else:
        c_c, c_r = cx, rx
    cl, cu = c_c - c_r, c_c + c_r
    if c is not None:
        cl, cu = torch.maximum(cl, c[0]), torch.minimum(cu, c[1])
        cu = torch.maximum(cu, cl)
    sq_lo = torch.clamp(torch.maximum(cl, -cu), min=0) ** 2
    sq_hi = torch.maximum(cl * cl, cu * cu)
    v_lo, v_hi = sq_lo.mean(-1, keepdim=True), sq_hi.mean(-1, keepdim=True)
    if q is not None:
        v_lo, v_hi = torch.maximum(v_lo, q[0]), torch.minimum(v_hi, q[1])
        v_hi = torch.maximum(v_hi, v_lo)                 # empty only through rounding: keep it an interval
    s_lo, s_hi = torch.rsqrt(v_hi + eps), torch.rsqrt(v_lo + eps)
    n_lo = torch.minimum(cl * s_lo, cl * s_hi)
    n_hi = torch.maximum(cu * s_lo, cu * s_hi)
    bound = math.sqrt(d)              # |n_i| < sqrt(d) for every real input, bounded or not (NaN: unbounded rows)
    return ((n_lo.nan_to_num(nan=-bound).clamp(-bound, bound), n_hi.nan_to_num(nan=bound).clamp(-bound, bound)),
            (s_lo, s_hi), (v_lo, v_hi), (cl, cu))


def _norm_mv(node, x: Interval, q: Optional[tuple] = None, c: Optional[tuple] = None,
             chunk_elems: int = DEFAULT.row_chunk_elems):
    """Mean-value form of LayerNorm/RMSNorm around the box centre: the exact
    Jacobian ``a P + u v^T P`` (a = w s0, u = -w s0 n0 / d, v = n0) and the
    dense remainder bound err (rows (.., d); d x d per row, a few rows at a time)."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    b = node.params.get("bias")
    eps = node.params["eps"]
    d = x.lower.shape[-1]
    x0, r = x.center, x.radius
    n0, s0 = _norm_point(node, x0)
    y0 = n0 * w + (b if b is not None else 0)
    (nl, nu), (sl, su), _, _ = _norm_stats(x, eps, centered, q, c)

    # dense error term, a few rows at a time: J_ij = w_i s (delta_ij - [1/d] - n_i n_j / d)
    shape = x0.shape
    rows = x0.numel() // d
    NL, NU, SL, SU = _rows(nl, d), _rows(nu, d), sl.reshape(-1, 1), su.reshape(-1, 1)
    N0, S0, R = _rows(n0, d), s0.reshape(-1, 1), _rows(r, d)
    err = torch.empty(rows, d, dtype=x0.dtype, device=x0.device)
    eye = torch.eye(d, dtype=x0.dtype, device=x0.device)
    off = 1.0 / d if centered else 0.0
    for sl_ in _chunked_rows(rows, d * d, chunk_elems):
        a, bb = NL[sl_], NU[sl_]
        p = torch.stack([a.unsqueeze(-1) * a.unsqueeze(-2), a.unsqueeze(-1) * bb.unsqueeze(-2),
                         bb.unsqueeze(-1) * a.unsqueeze(-2), bb.unsqueeze(-1) * bb.unsqueeze(-2)])
        p_lo, p_hi = p.min(0).values, p.max(0).values
        del p
        sq_lo = torch.clamp(torch.maximum(a, -bb), min=0) ** 2      # n_i^2 on the diagonal
        sq_hi = torch.maximum(a * a, bb * bb)
        p_lo = torch.diagonal_scatter(p_lo, sq_lo, 0, -2, -1)
        p_hi = torch.diagonal_scatter(p_hi, sq_hi, 0, -2, -1)
        a_lo = eye - off - p_hi / d                                   # A = delta - 1/d - n n^T / d
        a_hi = eye - off - p_lo / d
        s_lo, s_hi = SL[sl_].unsqueeze(-1), SU[sl_].unsqueeze(-1)
        j_lo = torch.minimum(s_lo * a_lo, s_hi * a_lo)                # s * A  (s > 0)
        j_hi = torch.maximum(s_lo * a_hi, s_hi * a_hi)
        n0r = N0[sl_]
        j0 = S0[sl_].unsqueeze(-1) * (eye - off - n0r.unsqueeze(-1) * n0r.unsqueeze(-2) / d)
        D = torch.maximum(j_hi - j0, j0 - j_lo).clamp_min(0) * w.abs().unsqueeze(-1)
        err[sl_] = (D @ R[sl_].unsqueeze(-1)).squeeze(-1)
    ws0 = w * s0
    return y0, ws0, -ws0 * n0 / d, n0, err.reshape(shape)


def _norm_mv_diagonal(node, x: Interval, q: Optional[tuple] = None, c: Optional[tuple] = None) -> Tensor:
    """Per row, an O(d) lower bound of the row sum ``sum_ij D_ij r_j`` of the
    mean-value remainder of :func:`_norm_mv` (its diagonal exactly, the rest
    from a separable lower bound), which decides without the d x d work that
    the decomposed form wins.  Only the choice depends on it, not soundness."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    d = x.lower.shape[-1]
    n0, s0 = _norm_point(node, x.center)
    (nl, nu), (sl, su), _, _ = _norm_stats(x, node.params["eps"], centered, q, c)
    off = 1.0 / d if centered else 0.0
    sq_lo = torch.clamp(torch.maximum(nl, -nu), min=0) ** 2
    sq_hi = torch.maximum(nl * nl, nu * nu)
    a_lo, a_hi = 1 - off - sq_hi / d, 1 - off - sq_lo / d
    j_lo = torch.minimum(sl * a_lo, su * a_lo)
    j_hi = torch.maximum(sl * a_hi, su * a_hi)
    j0 = s0 * (1 - off - n0 * n0 / d)
    r = x.radius
    diag = torch.maximum(j_hi - j0, j0 - j_lo).clamp_min(0) * r
    # off the diagonal: D_ij >= (j_hi - j_lo) / 2 >= sl (width of n_i n_j) / (2 d), and an
    # interval product is at least as wide as either factor's width times the other's |midpoint|
    wn, mn = nu - nl, (0.5 * (nl + nu)).abs()
    mr, wr = (mn * r).sum(-1, keepdim=True), (wn * r).sum(-1, keepdim=True)
    offd = sl / (4 * d) * (wn * (mr - mn * r) + mn * (wr - wn * r)).clamp_min(0)
    return (w.abs() * (diag + offd)).sum(-1, keepdim=True)


def _inv_sqrt_line(ql: Tensor, qu: Tensor, eps: float):
    """One slope for ``f(q) = (q + eps)^-1/2`` on [ql, qu] (convex, decreasing):
    ``f(q) in beta q + [k_lo, k_hi]``.  beta is the chord slope (f' at the
    midpoint when the interval is too narrow for a chord); for any beta the
    intercepts are rigorous: ``g = f - beta q`` is convex, so its maximum is at
    an end point and its minimum is at least ``g(t) + min(0, g'(t) (ql - t),
    g'(t) (qu - t))`` for the computed minimiser t."""
    f = lambda q: torch.rsqrt(q + eps)
    fp = lambda q: -0.5 * torch.rsqrt(q + eps) ** 3
    span = qu - ql
    narrow = span <= 1e-9 * (ql + eps)
    beta = torch.where(narrow, fp(0.5 * (ql + qu)), (f(qu) - f(ql)) / torch.where(narrow, torch.ones_like(span), span))
    t = torch.where(beta < 0, (-2 * beta).clamp_min(1e-300) ** (-2.0 / 3.0) - eps, qu)     # where f' = beta
    k_lo, k_hi = _convex_intercepts(f, fp, ql, qu, beta, t)
    return beta, k_lo, k_hi


def _norm_decomposed(node, x: Interval, q: Optional[tuple] = None, c: Optional[tuple] = None):
    """LayerNorm/RMSNorm relaxed as its formula ``y = w (c s) + b``, ``c = P x``
    (P: centring or identity), ``q = mean(c^2)``, ``s = (q + eps)^-1/2``, one
    slope per quantity over the box:

        c_j^2 in m_j c_j + [-(m_j/2)^2, -cl_j cu_j]         (m = cl + cu; tangent at the midpoint, chord)
        s     in beta q + [k_lo, k_hi]                       (:func:`_inv_sqrt_line`)
        c_i s in s_m c_i + c_m_i s - c_m_i s_m +- (cu_i - cl_i)(su - sl) / 4
                                                             (half-sum of the two McCormick planes)

    Composed: ``y in a*(Px) + u (v . Px) + k +- e`` per row with ``a = w s_m``,
    ``u = w c_m beta / d``, ``v = m``.  Every remainder is second order in the
    box radius and none is summed over the row (the mean-value remainder is),
    which keeps it tight at large radii.  Returns (a, u, v, k, e, rem): e the
    elementwise remainder, rem the same with the inverse scale's and the mean
    square's remainders kept as one term per row (:class:`RowRemainder`)."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    b = node.params.get("bias")
    eps = node.params["eps"]
    d = x.lower.shape[-1]
    _, (sl, su), (ql, qu), (cl, cu) = _norm_stats(x, eps, centered, q, c)
    m = cl + cu                                                   # (.., d)
    kq = (-(0.25 * m * m) - cl * cu).mean(-1, keepdim=True) * 0.5  # centre of mean([-(m/2)^2, -cl cu])
    gq = ((cu - cl) ** 2).mean(-1, keepdim=True) / 8               # its half-width
    beta, ks_lo, ks_hi = _inv_sqrt_line(ql, qu, eps)               # (.., 1)
    ks, gs = 0.5 * (ks_lo + ks_hi), 0.5 * (ks_hi - ks_lo)
    s_m, c_m = 0.5 * (sl + su), 0.5 * (cl + cu)
    g_cs = 0.25 * (cu - cl) * (su - sl)
    a = w * s_m
    u = w * c_m * beta / d
    k = w * (c_m * (beta * kq + ks) - c_m * s_m) + (b if b is not None else 0)
    shared = gs + beta.abs() * gq                                  # (.., 1): |s - line(q)|, q's lines included
    e = w.abs() * (g_cs + c_m.abs() * shared)
    # float64 rounding of these formulas and of the linear form's evaluation
    c_abs = torch.maximum(cl.abs(), cu.abs())
    mag = a.abs() * c_abs + u.abs() * (m.abs() * c_abs).sum(-1, keepdim=True) + k.abs() + e
    slack = 64 * d * ULP64 * mag
    # y_i - line_i = w_i d_i + (w_i c_m_i) z, |d_i| <= g_cs_i, z = s - line(s) shared by the row, |z| <= shared
    rem = RowRemainder(w.abs() * g_cs + slack, w * c_m, shared)
    return a, u, m, k, e + slack, rem


def _norm_lin(node, x: Interval, tunings: Tunings = DEFAULT, q: Optional[tuple] = None,
              c: Optional[tuple] = None) -> Linearization:
    """Per row, whichever of the mean-value form (:func:`_norm_mv`) and the
    decomposed form (:func:`_norm_decomposed`) has the smaller total
    remainder; both are ``y in a*(Px) + u (v . Px) + k +- e``.  ``q``: sound
    bounds of the mean square ``mean((Px)^2)`` per row, tighter than the box's
    (CROWN passes them, :func:`gamma.bounds.crown.norm_mean_square`)."""
    centered = node.op == "layernorm"
    shape = x.center.shape
    x0 = x.center
    a_dc, u_dc, v_dc, k_dc, e_dc, rem_dc = _norm_decomposed(node, x, q, c)
    e_dc_sum = e_dc.sum(-1, keepdim=True)
    if tunings.norm_decomposed and bool((_norm_mv_diagonal(node, x, q, c) >= e_dc_sum).all()):
        # the mean-value remainder cannot be smaller in any row: skip its d x d work
        a, u, v, err = a_dc.expand(shape), u_dc.expand(shape), v_dc.expand(shape), e_dc.expand(shape)
        dec, mv = torch.ones_like(e_dc_sum, dtype=torch.bool), None
        rem = rem_dc.where(dec, err)
    else:
        y0_mv, a_mv, u_mv, v_mv, e_mv = mv = _norm_mv(node, x, q, c, tunings.row_chunk_elems)
        dec = e_dc_sum < e_mv.sum(-1, keepdim=True)                         # (.., 1) per row
        if not tunings.norm_decomposed:
            dec = torch.zeros_like(dec)
        pick = lambda p, q: torch.where(dec, p, q).expand(shape)
        a, u, v, err = pick(a_dc, a_mv), pick(u_dc, u_mv), pick(v_dc, v_mv), pick(e_dc, e_mv)
        rem = rem_dc.where(dec, err)
    P = (lambda t: t - t.mean(-1, keepdim=True)) if centered else (lambda t: t)

    def lin_at(a, u, v):
        def jvp(dx):
            g = P(dx)
            return a * g + u * (v * g).sum(-1, keepdim=True)

        def vjp(lam):
            return P(torch.addcmul(a * lam, v, row_sums(lam, u)))
        return jvp, vjp

    jvp, vjp = lin_at(a, u, v)
    y0 = k_dc + jvp(x0) if mv is None else torch.where(dec, k_dc + jvp(x0), y0_mv)

    def vjp_at(take):
        return lin_at(take(a), take(u), take(v))[1]

    n0, _ = _norm_point(node, x0)

    def abs_jvp(rr):
        rr = rr.expand(shape)
        pr = (1 - 1 / shape[-1]) * rr + (rr.sum(-1, keepdim=True) - rr) / shape[-1] if centered else rr
        vp = P(v) if centered else v
        bound = a.abs() * pr + u.abs() * (vp.abs() * rr).sum(-1, keepdim=True)
        bound = bound * (1 + 8 * shape[-1] * ULP64)
        if mv is None:
            return bound
        return torch.where(dec, bound, norm_abs_jvp(n0, rr, centered) * a_mv.abs())

    return Linearization(x0, y0, err, jvp, vjp, abs_jvp, norm_naive(node, x), vjp_at, rem)


def norm_abs_jvp(n0: Tensor, r: Tensor, centered: bool) -> Tensor:
    """Exact ``|M| r`` per row for ``M = I - [1/d] - n0 n0^T / d`` (rows (.., d),
    r >= 0), in O(d log d) per row instead of a dense d x d product.

    RMSNorm: ``|M_ij| = |n_i||n_j| / d`` off the diagonal (separable).
    LayerNorm: ``|M_ij| = |1 + n_i n_j| / d``; per row i the sign of
    ``1 + n_i n_j`` changes once along sorted n_j (at ``-1 / n_i``), so
    ``F_i = sum_j |1 + n_i n_j| r_j`` is a signed sum of two prefix sums.
    A relative slack of a few float64 ulps per term covers the rounding of
    the prefix sums (the dense sum has the same order of error).
    """
    d = n0.shape[-1]
    a, r = n0, r.expand(n0.shape)
    aa = a.abs()
    aar = aa * r
    ar_abs = aar.sum(-1, keepdim=True)                              # sum_j |a_j| r_j
    if not centered:
        diag = (1 - a * a / d).abs() * r
        out = diag + aa * (ar_abs - aar) / d
        return out + 4 * d * ULP64 * (r + aa * ar_abs / d)
    srt, perm = torch.sort(a, -1)                                   # (.., d)
    rs = r.gather(-1, perm)
    zero = a.new_zeros(a.shape[:-1] + (1,))
    p0 = torch.cat([zero, rs.cumsum(-1)], -1)                       # (.., d+1): sums of r_j, a_j < bound
    p1 = torch.cat([zero, (srt * rs).cumsum(-1)], -1)
    tot0, tot1 = p0[..., -1:], p1[..., -1:]
    zero_a = a == 0
    safe = a.masked_fill(zero_a, 1.0)
    tau = -1.0 / safe                                               # 1 + a_i a_j < 0  <=>  a_j beyond tau
    # #{a_j < tau}; for a_i < 0 the terms with a_j > tau are negative, and an a_j equal to the rounded
    # tau counted either way moves F by 2 |1 + a_i a_j| r_j <= 2 |a_i| ulp(tau) r_j, within the slack below
    k = torch.searchsorted(srt.contiguous(), tau.contiguous(), side="left")
    pos = a > 0
    g0, g1 = p0.gather(-1, k), p1.gather(-1, k)
    neg0 = torch.where(pos, g0, tot0 - g0).masked_fill_(zero_a, 0.0)
    neg1 = torch.where(pos, g1, tot1 - g1).masked_fill_(zero_a, 0.0)
    plain = tot0 + a * tot1                                         # sum_j (1 + a_i a_j) r_j
    F = plain - 2 * (neg0 + a * neg1)
    F = torch.maximum(F, plain.abs())                               # a sum of |.| is >= |sum|
    q = 1 + a * a
    off = (F - q * r).clamp_min(0)                                  # j != i
    diag = (1 - q / d).abs() * r
    return diag + off / d + 4 * d * ULP64 * (tot0 + aa * ar_abs) / d


def norm_err_separable(n0, s0, nl, nu, sl, su, r, centered: bool) -> Tensor:
    """An O(d) upper bound of the dense mean-value remainder ``sum_j D_ij r_j``
    of LayerNorm/RMSNorm (before the |w_i| factor), from

        |J_ij - J0_ij| <= ds |delta_ij - [1/d]|
                          + (ds N_i N_j + s0 (dn_i N_j + |n0_i| dn_j)) / d,

    with ``J = s (delta - [1/d] - n n^T / d)``, ``ds = max |s - s0|``,
    ``N = max |n|`` and ``dn = max |n - n0|`` over the box (triangle
    inequality on ``s n_i n_j - s0 n0_i n0_j``); times |w_i| it bounds
    ``|f(x) - f(x0) - J0 (x - x0)|_i``.  Used by IBP, which must
    cost a few forward passes; CROWN and zonotopes keep the dense term.
    """
    d = n0.shape[-1]
    r = r.expand(n0.shape)
    off = 1.0 / d if centered else 0.0
    ds = torch.maximum(su - s0, s0 - sl).clamp_min(0)                # (.., 1)
    N = torch.maximum(nl.abs(), nu.abs())
    dn = torch.maximum(nu - n0, n0 - nl).clamp_min(0)
    R = r.sum(-1, keepdim=True)
    first = ds * ((1 - off) * r + off * (R - r))
    Nr = (N * r).sum(-1, keepdim=True)
    dnr = (dn * r).sum(-1, keepdim=True)
    second = ((ds * N + s0 * dn) * Nr + s0 * n0.abs() * dnr) / d
    return (first + second) * (1 + 8 * d * ULP64)


def _norm_point(node, x0: Tensor):
    centered = node.op == "layernorm"
    c0 = x0 - x0.mean(-1, keepdim=True) if centered else x0
    s0 = torch.rsqrt((c0 * c0).mean(-1, keepdim=True) + node.params["eps"])
    return c0 * s0, s0


def norm_radius(node, box: Interval, r: Tensor, point=None, stats=None) -> Tensor:
    """Bound of ``|J(xi) d|`` for every xi in ``box`` and ``|d| <= r`` (J: the
    LayerNorm/RMSNorm Jacobian, weight included), in O(d log d) per row:
    ``|J0| r`` exactly plus the separable remainder.  ``point`` / ``stats``:
    :func:`_norm_point` at the centre and :func:`_norm_stats` of the box, when
    the caller has them."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    n0, s0 = point if point is not None else _norm_point(node, box.center)
    (nl, nu), (sl, su), _, _ = stats if stats is not None else _norm_stats(box, node.params["eps"], centered)
    return norm_abs_jvp(n0, r, centered) * (w * s0).abs() \
        + norm_err_separable(n0, s0, nl, nu, sl, su, r, centered) * w.abs()


def norm_naive(node, x: Interval, stats=None) -> Interval:
    """Direct enclosure ``w n + b`` from the interval of the normalised values."""
    w, b = node.params["weight"], node.params.get("bias")
    (nl, nu), _, _, _ = stats if stats is not None else _norm_stats(x, node.params["eps"], node.op == "layernorm")
    wl, wu = torch.minimum(w * nl, w * nu), torch.maximum(w * nl, w * nu)
    return Interval(wl, wu) if b is None else Interval(wl + b, wu + b)


def norm_interval(node, x: Interval, q: Optional[tuple] = None, c: Optional[tuple] = None) -> Interval:
    """IBP rule of LayerNorm/RMSNorm in O(d log d) per row: the direct
    enclosure intersected with ``y0 +- norm_radius`` (mean value theorem).
    ``q`` / ``c``: sound bounds of the mean square and of the centred input
    (CROWN's, :func:`gamma.bounds.crown.norm_mean_square`), tighter than the
    box's.  The statistics ride on the result for the float32 margin."""
    stats = _norm_stats(x, node.params["eps"], node.op == "layernorm", q, c)
    naive = norm_naive(node, x, stats)
    finite = bounded_rows(x)
    if finite is None:              # every row unbounded: the mean-value radius is inf (or NaN) throughout
        naive.stats = stats
        return naive
    point = _norm_point(node, x.center)
    b = node.params.get("bias")
    y0 = point[0] * node.params["weight"] + (b if b is not None else 0)
    rad = norm_radius(node, x, x.radius, point, stats)
    out = naive.intersect(Interval(y0 - rad, y0 + rad))
    if finite is not True:
        out = Interval(torch.where(finite, out.lower, naive.lower), torch.where(finite, out.upper, naive.upper))
    out.stats = stats
    return out


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


from .softmax import _softmax_lin, softmax_ibp  # noqa: E402  (softmax.py uses Linearization from here)

LINEARIZE = {"softmax": _softmax_lin, "layernorm": _norm_lin, "rmsnorm": _norm_lin}


def linearize(node, x: Interval, tunings: Tunings = DEFAULT, **refined) -> Linearization:
    """``refined``: extra sound facts about the op's internals (``q`` and ``c`` for norms)."""
    return LINEARIZE[node.op](node, x, tunings, **refined)


IBP_RULES = {"softmax": softmax_ibp, "layernorm": norm_interval, "rmsnorm": norm_interval}


def interval_bound(node, x: Interval) -> Interval:
    """IBP image of softmax / LayerNorm / RMSNorm: the direct enclosure
    intersected with the mean-value enclosure, without any d x d matrix."""
    return IBP_RULES[node.op](node, x)
