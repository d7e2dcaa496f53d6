"""LayerNorm and RMSNorm: interval statistics of their internals, the IBP rule,
and the two linear forms CROWN and zonotopes choose between per row.

Rows are the last dim ``(.., d)``; ``c = P x`` is the centred input (P:
centring for LayerNorm, identity for RMSNorm), ``q = mean(c^2)`` the mean
square, ``s = (q + eps)^-1/2`` the inverse scale, ``n = c s`` the normalised
values, ``y = w n + b``.

* :func:`norm_interval` (IBP, O(d log d) per row): the direct enclosure
  ``w n + b`` intersected with ``y0 +- (|J0| r + err)``, |J0| r exact
  (:func:`norm_abs_jvp`, sorting and prefix sums) and err from a separable
  bound of the Jacobian's variation (:func:`norm_err_separable`);
* :func:`norm_lin` (CROWN, zonotopes): per row the mean-value form around the
  box centre (exact Jacobian, dense remainder, :func:`_norm_mv`) or the
  decomposed relaxation of the formula (:func:`_norm_decomposed`), whichever
  has the smaller remainder.

``q`` / ``c``: sound bounds of the mean square and of the centred input
tighter than the box's (CROWN's own backward passes,
:func:`gamma.bounds.refine.norm_mean_square`), intersected with the box's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .interval import Interval
from .linearization import ULP64, Linearization, RowRemainder, bounded_rows, convex_intercepts, row_sums
from .tuning import DEFAULT, Tunings

Tensor = torch.Tensor


def _rows(t: Tensor, n: int) -> Tensor:
    return t.reshape(-1, n)


def _chunked_rows(n_rows: int, row_elems: int, chunk_elems: int):
    step = max(1, chunk_elems // max(1, row_elems))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def norm_stats(x: Interval, eps: float, centered: bool, q: Optional[tuple] = None, c: Optional[tuple] = None):
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
    n0, s0 = norm_point(node, x0)
    y0 = n0 * w + (b if b is not None else 0)
    (nl, nu), (sl, su), _, _ = norm_stats(x, eps, centered, q, c)

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
    n0, s0 = norm_point(node, x.center)
    (nl, nu), (sl, su), _, _ = norm_stats(x, node.params["eps"], centered, q, c)
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
    k_lo, k_hi = convex_intercepts(f, fp, ql, qu, beta, t)
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
    which keeps it tight at large radii.  Returns (a, u, v, k, e, rem, (r_c, r_s, c_m)): e the
    elementwise remainder, rem the same with the inverse scale's and the mean
    square's remainders kept as one term per row (:class:`RowRemainder`); r_c, r_s
    and c_m the radii and centre the product's remainder ``|w| r_c r_s`` (part of e and
    rem) is made of (:mod:`.norm_side` reads it one layer back)."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    b = node.params.get("bias")
    eps = node.params["eps"]
    d = x.lower.shape[-1]
    _, (sl, su), (ql, qu), (cl, cu) = norm_stats(x, eps, centered, q, c)
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
    return a, u, m, k, e + slack, rem, (0.5 * (cu - cl), 0.5 * (su - sl), c_m)


def norm_lin(node, x: Interval, tunings: Tunings = DEFAULT, q: Optional[tuple] = None,
              c: Optional[tuple] = None) -> Linearization:
    """Per row, whichever of the mean-value form (:func:`_norm_mv`) and the
    decomposed form (:func:`_norm_decomposed`) has the smaller total
    remainder; both are ``y in a*(Px) + u (v . Px) + k +- e``.  ``q``: sound
    bounds of the mean square ``mean((Px)^2)`` per row, tighter than the box's
    (CROWN passes them, :func:`gamma.bounds.refine.norm_mean_square`)."""
    centered = node.op == "layernorm"
    shape = x.center.shape
    x0 = x.center
    a_dc, u_dc, v_dc, k_dc, e_dc, rem_dc, (r_c, r_s, c_m) = _norm_decomposed(node, x, q, c)
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

    n0, _ = norm_point(node, x0)

    def abs_jvp(rr):
        rr = rr.expand(shape)
        pr = (1 - 1 / shape[-1]) * rr + (rr.sum(-1, keepdim=True) - rr) / shape[-1] if centered else rr
        vp = P(v) if centered else v
        bound = a.abs() * pr + u.abs() * (vp.abs() * rr).sum(-1, keepdim=True)
        bound = bound * (1 + 8 * shape[-1] * ULP64)
        if mv is None:
            return bound
        return torch.where(dec, bound, norm_abs_jvp(n0, rr, centered) * a_mv.abs())

    # the c * s product's remainder, |w_i| r_c_i r_s per element of the decomposed rows (none elsewhere)
    cs = (r_c, torch.where(dec, r_s, torch.zeros_like(r_s)), c_m)
    return Linearization(x0, y0, err, jvp, vjp, abs_jvp, norm_naive(node, x), vjp_at, rem, cs)


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


def norm_point(node, x0: Tensor):
    centered = node.op == "layernorm"
    c0 = x0 - x0.mean(-1, keepdim=True) if centered else x0
    s0 = torch.rsqrt((c0 * c0).mean(-1, keepdim=True) + node.params["eps"])
    return c0 * s0, s0


def norm_radius(node, box: Interval, r: Tensor, point=None, stats=None) -> Tensor:
    """Bound of ``|J(xi) d|`` for every xi in ``box`` and ``|d| <= r`` (J: the
    LayerNorm/RMSNorm Jacobian, weight included), in O(d log d) per row:
    ``|J0| r`` exactly plus the separable remainder.  ``point`` / ``stats``:
    :func:`norm_point` at the centre and :func:`norm_stats` of the box, when
    the caller has them."""
    centered = node.op == "layernorm"
    w = node.params["weight"]
    n0, s0 = point if point is not None else norm_point(node, box.center)
    (nl, nu), (sl, su), _, _ = stats if stats is not None else norm_stats(box, node.params["eps"], centered)
    return norm_abs_jvp(n0, r, centered) * (w * s0).abs() \
        + norm_err_separable(n0, s0, nl, nu, sl, su, r, centered) * w.abs()


def norm_naive(node, x: Interval, stats=None) -> Interval:
    """Direct enclosure ``w n + b`` from the interval of the normalised values."""
    w, b = node.params["weight"], node.params.get("bias")
    (nl, nu), _, _, _ = stats if stats is not None else norm_stats(x, node.params["eps"], node.op == "layernorm")
    wl, wu = torch.minimum(w * nl, w * nu), torch.maximum(w * nl, w * nu)
    return Interval(wl, wu) if b is None else Interval(wl + b, wu + b)


def norm_interval(node, x: Interval, q: Optional[tuple] = None, c: Optional[tuple] = None) -> Interval:
    """IBP rule of LayerNorm/RMSNorm in O(d log d) per row: the direct
    enclosure intersected with ``y0 +- norm_radius`` (mean value theorem).
    ``q`` / ``c``: sound bounds of the mean square and of the centred input
    (CROWN's, :func:`gamma.bounds.refine.norm_mean_square`), tighter than the
    box's.  The statistics ride on the result for the float32 margin."""
    stats = norm_stats(x, node.params["eps"], node.op == "layernorm", q, c)
    naive = norm_naive(node, x, stats)
    finite = bounded_rows(x)
    if finite is None:              # every row unbounded: the mean-value radius is inf (or NaN) throughout
        naive.stats = stats
        return naive
    point = norm_point(node, x.center)
    b = node.params.get("bias")
    y0 = point[0] * node.params["weight"] + (b if b is not None else 0)
    rad = norm_radius(node, x, x.radius, point, stats)
    out = naive.intersect(Interval(y0 - rad, y0 + rad))
    if finite is not True:
        out = Interval(torch.where(finite, out.lower, naive.lower), torch.where(finite, out.upper, naive.upper))
    out.stats = stats
    return out
