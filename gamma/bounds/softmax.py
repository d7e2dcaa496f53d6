"""Softmax: its direct interval, the mean-value radius IBP uses, and the two
linear forms CROWN and zonotopes choose between per row (mean value around
the centre; the decomposed relaxation of ``exp(x_i) / sum exp``).  The
shared machinery (:class:`Linearization`, convex intercepts) lives in
:mod:`.linearization`.  Rows are the last dim ``(.., R, S)`` with an optional
(R, S) mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import FORWARD
from .interval import Interval
from .linearization import ULP64, Linearization, RowRemainder, bounded_rows, convex_intercepts, row_dot, row_sums
from .tuning import DEFAULT, Tunings

Tensor = torch.Tensor


def _loo_logsumexp(a: Tensor) -> Tensor:
    """``log sum_{j != i} exp(a_j)`` per i along the last dim, in O(S):
    prefix and suffix log-cumsum-exp (sums of positive terms, no cancellation)."""
    ninf = torch.full_like(a[..., :1], float("-inf"))
    pre = torch.cat([ninf, torch.logcumsumexp(a, -1)[..., :-1]], -1)                 # j < i
    suf = torch.cat([torch.logcumsumexp(a.flip(-1), -1).flip(-1)[..., 1:], ninf], -1)  # j > i
    return torch.logaddexp(pre, suf)


def softmax_interval(l: Tensor, u: Tensor, mask: Optional[Tensor]) -> Interval:
    """Tight interval of softmax over a box, in O(S) per row: y_i is smallest
    with x_i = l_i and every other x_j = u_j, i.e. ``y_i >= sigmoid(l_i - log
    sum_{j!=i} e^{u_j})``, and ``y_i <= sigmoid(u_i - log sum_{j!=i} e^{l_j})``.

    Computed by plain sums (:func:`_corner_ratio`) when every finite exponent
    stays within +-700 of its row's shift (no exp under- or overflows), else
    by leave-one-out log-sum-exps (:func:`_loo_logsumexp`)."""
    if mask is not None:
        l = l.masked_fill(~mask, float("-inf"))
        u = u.masked_fill(~mask, float("-inf"))
    fast = _corner_ratio(l, u), _corner_ratio(u, l)
    if fast[0] is not None and fast[1] is not None:
        # float64 rounding, relative: each exp(fl(a - M)) is off by |a - M| 2^-53 + 1 ulp, the sums by S ulps
        slack = (2 * max(fast[0][1], fast[1][1]) + 2 * l.shape[-1] + 16) * ULP64
        lo, hi = fast[0][0] * (1 - slack), fast[1][0] * (1 + slack)
    else:
        al, ah = l - _loo_logsumexp(u), u - _loo_logsumexp(l)
        # rounding, relative: |argument| and the log-sums' magnitudes in ulps; subnormal results absolutely
        fin = lambda t: float(t[torch.isfinite(t)].abs().max()) if bool(torch.isfinite(t).any()) else 0.0
        slack = (2 * max(fin(al), fin(ah)) + 4 * max(fin(l), fin(u)) + 4 * l.shape[-1] + 16) * ULP64
        lo = torch.sigmoid(al) * (1 - slack)
        hi = torch.sigmoid(ah) * (1 + slack) + 2.0 ** -1000
    if mask is not None:
        lo = lo.masked_fill(~mask, 0.0)
        hi = hi.masked_fill(~mask, 0.0)
    return Interval(lo.clamp(0, 1), hi.clamp(0, 1))


def _corner_ratio(a: Tensor, b: Tensor) -> Optional[tuple]:
    """``e^{a_i} / (e^{a_i} + sum_{j != i} e^{b_j})`` per row (last dim) by sums,
    shifted by ``M = max_j b_j``: every ``e^{b_j - M} <= 1`` and the row's
    largest is 1, so for every i but that one ``Z - e^{b_i - M} >= Z / 2`` (no
    cancellation), and the largest one's rest is summed directly.  Returns
    the ratios and the largest |exponent| E (relative error below
    ``(2 E + 2 S + 16)`` float64 ulps), or None when some finite exponent
    leaves [-700, 700] (exp may under- or overflow) or a row is unbounded or
    empty: the caller then takes the log-space form."""
    M = b.amax(-1, keepdim=True)
    da, db = a - M, b - M
    lo_e = torch.minimum(da.nan_to_num(nan=-1e9, neginf=0.0), db.nan_to_num(nan=-1e9, neginf=0.0))
    hi_e = torch.maximum(da.nan_to_num(nan=1e9, posinf=1e9), db.nan_to_num(nan=1e9, posinf=1e9))
    e_min, e_max = float(lo_e.amin()), float(hi_e.amax())
    if not (bool(torch.isfinite(M).all()) and e_min >= -700.0 and e_max <= 700.0):
        return None
    eb, ea = torch.exp(db), torch.exp(da)
    k = db.argmax(-1, keepdim=True)
    rest = eb.sum(-1, keepdim=True) - eb
    rest.scatter_(-1, k, eb.scatter(-1, k, 0.0).sum(-1, keepdim=True))
    return ea / (ea + rest), max(-e_min, e_max)


def softmax_radius(node, box: Interval, r: Tensor, y0: Optional[Tensor] = None,
                   naive: Optional[Interval] = None) -> Tensor:
    """Bound of ``|J(xi) d|`` for every xi in ``box`` and ``|d| <= r`` (J:
    softmax's Jacobian), in O(S) per row: ``|J0| r + sum_j D_ij r_j`` with J0
    at the box centre and, with ``dy = max |y - y0|`` and ``Y = max y`` over
    the box, ``|y_i y_j - y0_i y0_j| <= dy_i Y_j + y0_i dy_j`` off the
    diagonal and the exact range of ``y - y^2`` on it."""
    mask = node.params.get("mask")
    if mask is not None:
        r = r.masked_fill(~mask, 0.0)
    if y0 is None:
        y0 = FORWARD["softmax"](node, box.center)
    if naive is None:
        naive = softmax_interval(box.lower, box.upper, mask)
    yl, yu = naive.lower, naive.upper
    h = lambda t: t - t * t
    dlo = torch.minimum(h(yl), h(yu))
    dhi = h(torch.minimum(torch.maximum(torch.full_like(yl, 0.5), yl), yu))
    d0 = h(y0)
    dd = torch.maximum(dhi - d0, d0 - dlo).clamp_min(0)
    dy = torch.maximum(yu - y0, y0 - yl).clamp_min(0)
    sum_yr = (yu * r).sum(-1, keepdim=True)
    sum_dr = (dy * r).sum(-1, keepdim=True)
    err = dd * r + dy * (sum_yr - yu * r).clamp_min(0) + y0 * (sum_dr - dy * r).clamp_min(0)
    s0 = (y0 * r).sum(-1, keepdim=True)
    absj = y0 * (1 - y0) * r + y0 * (s0 - y0 * r).clamp_min(0)
    return (absj + err) * (1 + 8 * box.lower.shape[-1] * ULP64)


def softmax_ibp(node, x: Interval) -> Interval:
    """IBP rule of softmax in O(S) per row: the direct interval intersected with
    ``y0 +- softmax_radius`` (mean value theorem)."""
    naive = softmax_interval(x.lower, x.upper, node.params.get("mask"))
    finite = bounded_rows(x)
    if finite is None:              # every row unbounded: the mean-value radius is inf (or NaN) throughout
        return naive
    y0 = FORWARD["softmax"](node, x.center)
    rad = softmax_radius(node, x, x.radius, y0, naive)
    out = naive.intersect(Interval(y0 - rad, y0 + rad))
    if finite is not True:
        out = Interval(torch.where(finite, out.lower, naive.lower), torch.where(finite, out.upper, naive.upper))
    return out


def _softmax_decomposed(node, x: Interval):
    """Softmax relaxed as its formula ``y_i = e_i s``, ``e_i = exp(x_i - m)``
    (m: the row's largest upper bound), ``Z = sum e``, ``s = 1 / Z``, one
    slope per quantity over the box (convex exp and 1/Z: chord slope, rigorous
    intercepts from :func:`convex_intercepts`), and the product by the
    half-sum of its two McCormick planes, as :func:`.norm._norm_decomposed`:

        e_i in alpha_i x_i + [b_lo_i, b_hi_i],   s in gamma Z + [k_lo, k_hi]
        e_i s in s_m e_i + e_m_i s - e_m_i s_m +- (eu_i - el_i)(su - sl) / 4

    Composed: ``y in a*x + u (v . x) + k +- e`` per row with ``a = s_m alpha``,
    ``u = e_m gamma``, ``v = alpha``.  No remainder is summed over the row
    (the mean-value one is).  Masked entries are exactly 0.  Returns (a, u, v, k, e, rem):
    e the elementwise remainder, rem the same with what the row shares kept
    apart (:class:`RowRemainder`: the exp lines' remainders b_j enter the
    row's sum Z, and 1/Z's line has one remainder per row)."""
    mask = node.params.get("mask")
    l, hi_x = x.lower, x.upper
    valid = torch.ones_like(l, dtype=torch.bool) if mask is None else mask.expand(l.shape)
    lf = torch.where(valid, l, torch.zeros_like(l))
    uf = torch.where(valid, hi_x, torch.zeros_like(l))
    m = torch.where(valid, uf, torch.full_like(uf, -math.inf)).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    f = lambda t: torch.exp(t - m)
    el, eu = f(lf) * (1 - 4 * ULP64), f(uf) * (1 + 4 * ULP64)       # float64 exp: within 1 ulp
    span = uf - lf
    narrow = span <= 1e-9 * (1 + lf.abs())
    alpha = torch.where(narrow, f(0.5 * (lf + uf)), (eu - el) / torch.where(narrow, torch.ones_like(span), span))
    alpha = alpha.clamp_min(0)
    b_lo, b_hi = convex_intercepts(f, f, lf, uf, alpha, m + torch.log(alpha))
    zero = torch.zeros_like(l)
    alpha, b_lo, b_hi = (torch.where(valid, t, zero) for t in (alpha, b_lo, b_hi))
    el, eu = torch.where(valid, el, zero), torch.where(valid, eu, zero)
    S = l.shape[-1]
    zl = el.sum(-1, keepdim=True) * (1 - 2 * S * ULP64)
    zu = eu.sum(-1, keepdim=True) * (1 + 2 * S * ULP64)
    sl, su = (1 / zu) * (1 - 4 * ULP64), (1 / zl) * (1 + 4 * ULP64)
    zspan = zu - zl
    znarrow = zspan <= 1e-9 * zl
    gamma = torch.where(znarrow, -1 / (0.5 * (zl + zu)) ** 2,
                        (1 / zu - 1 / zl) / torch.where(znarrow, torch.ones_like(zspan), zspan))
    k_lo, k_hi = convex_intercepts(lambda z: 1 / z, lambda z: -1 / (z * z), zl, zu, gamma,
                                    torch.rsqrt(-gamma.clamp_max(-1e-300)))
    bc, bg = 0.5 * (b_lo + b_hi), 0.5 * (b_hi - b_lo)
    kc, kg = 0.5 * (k_lo + k_hi), 0.5 * (k_hi - k_lo)
    s_m, e_m = 0.5 * (sl + su), 0.5 * (el + eu)
    a = s_m * alpha
    u = e_m * gamma
    k = s_m * bc + e_m * (gamma * bc.sum(-1, keepdim=True) + kc) - e_m * s_m
    g_prod = 0.25 * (eu - el) * (su - sl)
    e = s_m * bg + e_m * (gamma.abs() * bg.sum(-1, keepdim=True) + kg) + g_prod
    # float64 rounding of these formulas and of the linear form's evaluation
    xmag = torch.where(valid, torch.maximum(lf.abs(), uf.abs()), zero)
    mag = a.abs() * xmag + u.abs() * (alpha * xmag).sum(-1, keepdim=True) + k.abs() + e
    slack = 64 * S * ULP64 * mag
    e = e + slack
    a, u, k, e = (torch.where(valid, t, zero) for t in (a, u, k, e))
    # y_i - line_i = d_i + s_m b_i + e_m_i (gamma sum_j b_j + z): d_i the product's, b_j the exp lines',
    # z the 1/Z line's remainder (|d_i| <= g_prod_i, |b_j| <= bg_j, |z| <= kg)
    rem = RowRemainder(torch.where(valid, g_prod + slack, zero), e_m, kg, B=bg, P=s_m, Q=gamma)
    return a, u, alpha, k, e, rem


def pairwise_interval(x: Interval, d_lo: Tensor, d_hi: Tensor, mask: Optional[Tensor] = None) -> Interval:
    """Softmax interval from bounds of the differences ``z_j - z_i`` at ``[.., i, j]``
    (intersected with the box's ``[l_j - u_i, u_j - l_i]``), in float64 with its
    rounding covered.  Masked keys (mask False) have y = 0 and leave the sums."""
    xl, xu = x.lower, x.upper
    d_lo = torch.maximum(d_lo, xl.unsqueeze(-2) - xu.unsqueeze(-1))
    d_hi = torch.minimum(d_hi, xu.unsqueeze(-2) - xl.unsqueeze(-1))
    S = xl.shape[-1]
    eye = torch.eye(S, dtype=torch.bool, device=xl.device)
    d_lo, d_hi = d_lo.masked_fill(eye, 0.0), d_hi.masked_fill(eye, 0.0)
    if mask is not None:
        drop = ~mask.unsqueeze(-2).expand(d_lo.shape)                   # [.., t, i, j]: key j masked
        d_lo, d_hi = d_lo.masked_fill(drop, -math.inf), d_hi.masked_fill(drop, -math.inf)
    # y_i = exp(-M) / sum_j exp(d_ij - M) with M the row's largest d (>= 0, as d_ii = 0): no overflow
    m_hi, m_lo = d_hi.amax(-1), d_lo.amax(-1)
    lo = torch.exp(-m_hi) / torch.exp(d_hi - m_hi.unsqueeze(-1)).sum(-1)
    hi = torch.exp(-m_lo) / torch.exp(d_lo - m_lo.unsqueeze(-1)).sum(-1)
    # float64: each exponent is off by an ulp of its operands' magnitude, exp by one ulp, the sum by S
    mag = torch.maximum(d_hi.abs().nan_to_num(posinf=0.0).amax(-1), d_lo.abs().nan_to_num(posinf=0.0).amax(-1))
    slack = (4 * S + 16 + 4 * (m_hi.abs() + m_lo.abs() + mag)) * ULP64
    lo, hi = lo * (1 - slack), hi * (1 + slack)
    if mask is not None:
        lo, hi = lo.masked_fill(~mask, 0.0), hi.masked_fill(~mask, 0.0)
    ok = torch.isfinite(lo) & torch.isfinite(hi) & torch.isfinite(slack)
    lo = torch.where(ok, lo, torch.zeros_like(lo))
    hi = torch.where(ok, hi, torch.ones_like(hi))
    return Interval(lo.clamp(0, 1), hi.clamp(0, 1))


def shifted_radius(x: Interval, d_lo: Tensor, d_hi: Tensor) -> Tensor:
    """(*lead, T, S+1, S): for each reference key k (and, last, none), a bound of
    ``|(z_j - z_k) - (x0_j - x0_k)|`` over the region, from CROWN's bounds
    ``[d_lo, d_hi]`` of ``z_j - z_k`` at ``[.., k, j]`` (the box's where tighter); the
    last row is the box radius itself (no shift)."""
    x0, r = x.center, x.radius
    c0 = x0.unsqueeze(-2) - x0.unsqueeze(-1)                             # x0_j - x0_k at [.., k, j]
    rk = r.unsqueeze(-2) + r.unsqueeze(-1)                               # the box's reach of the difference
    slack = 4 * ULP64 * (d_hi.abs() + d_lo.abs() + c0.abs())              # float64 rounding of c0 and the differences
    rho = torch.minimum(torch.maximum(d_hi - c0, c0 - d_lo) + slack, rk)
    return torch.cat([rho.nan_to_num(nan=math.inf), r.unsqueeze(-2)], -2)


def _jacobian_range(y0: Tensor, seg: Interval) -> Tensor:
    """(.., T, S, S): ``max |J(y) - J(y0)|`` entrywise over ``y`` in ``seg`` (J = diag(y) - y y^T)."""
    yl, yu = seg.lower, seg.upper
    jlo = -(yu.unsqueeze(-1) * yu.unsqueeze(-2))
    jhi = -(yl.unsqueeze(-1) * yl.unsqueeze(-2))
    h = lambda t: t - t * t
    dlo = torch.minimum(h(yl), h(yu))
    dhi = h(torch.minimum(torch.maximum(torch.full_like(yl, 0.5), yl), yu))
    j0 = -(y0.unsqueeze(-1) * y0.unsqueeze(-2))
    jlo = torch.diagonal_scatter(jlo, dlo, 0, -2, -1)
    jhi = torch.diagonal_scatter(jhi, dhi, 0, -2, -1)
    j0 = torch.diagonal_scatter(j0, h(y0), 0, -2, -1)
    return torch.maximum(jhi - j0, j0 - jlo).clamp_min(0)


def _segment_interval(x: Interval, t: float, mask, d: Optional[tuple]) -> Interval:
    """Softmax's interval over the points ``x0 + s (z - x0)``, ``s <= t``, z in the region
    (x0 the box centre): the box scaled by t about its centre and, with the score
    differences ``d``, their bounds widened to the centre's and scaled likewise."""
    x0, r = x.center, x.radius
    if t >= 1.0:
        lo, hi = x.lower, x.upper
    else:
        pad = 2 * ULP64 * (x0.abs() + r)                                  # float64 rounding of x0 -+ t r
        lo, hi = x0 - t * r - pad, x0 + t * r + pad
    iv = softmax_interval(lo, hi, mask)
    if d is not None:
        c0 = x0.unsqueeze(-2) - x0.unsqueeze(-1)                          # x0_j - x0_k at [.., k, j]
        dl, dh = torch.minimum(d[0], c0), torch.maximum(d[1], c0)
        pad = 4 * ULP64 * (c0.abs() + dl.abs() + dh.abs())             # float64 rounding of c0 (and of the scaling)
        if t < 1.0:
            dl, dh = c0 + t * (dl - c0), c0 + t * (dh - c0)
        dl, dh = dl - pad, dh + pad
        iv = iv.intersect(pairwise_interval(Interval(lo, hi), dl, dh, mask))
    return iv


@dataclass
class SimplexRemainder:
    """The mean-value form's remainder with what its row's sum fixes.

    Per row, ``y - (y0c + J0 dz) = rho + s`` with ``|rho_i| <= H_i`` and ``sum_i rho_i = -sum_i mid_i``
    (the exact remainders ``y_i - y0_i - J0_i dz`` sum to 0, as y and y0 sum to 1 and J0's
    columns to 0; ``y0c = y0 + mid``; ``M >= |sum_i mid_i|``), and ``|s_i| <= E_i`` the float64
    rounding of the computed form.  So for a cotangent lam and any mu,

        |lam . (rho + s)| <= sum_i |lam_i - mu| H_i + |mu M| + sum_i |lam_i| E_i,

    taken at mu the H-weighted median of the row's lam (the minimiser of the first sum;
    any mu is sound), or the plain ``|lam| . (H + E)`` where that is smaller.  Even in lam.
    Shapes: H, E (.., S); M (.., 1)."""
    H: Tensor
    E: Tensor
    M: Tensor

    def at(self, take=lambda c: c) -> Callable[[Tensor], Tensor]:
        H, E, M = take(self.H), take(self.E), take(self.M)

        def even(lam: Tensor) -> Tensor:
            mu = _weighted_median(lam, H)                                 # (N, .., 1)
            n = lam.shape[0]
            plain = row_dot(lam.abs(), E)
            out = row_dot((lam - mu).abs(), H) + (mu.abs() * M.abs()).reshape(n, -1).sum(1)
            return plain + torch.minimum(out, row_dot(lam.abs(), H))      # mu = 0 without M: the plain charge
        return even


def _weighted_median(lam: Tensor, w: Tensor) -> Tensor:
    """(N, .., 1): per row (last dim) of lam (N, .., S) the median of lam weighted by
    w (broadcast to lam): the first sorted entry whose cumulative weight reaches half."""
    srt, idx = lam.sort(-1)
    cw = w.expand_as(lam).gather(-1, idx).cumsum(-1)
    pos = (cw < 0.5 * cw[..., -1:]).sum(-1, keepdim=True).clamp_max(lam.shape[-1] - 1)
    return srt.gather(-1, pos)


def _taylor_remainder(stages: list, rho: Tensor, pairs: Optional[Tensor] = None) -> tuple:
    """``(lo, hi)``, each (.., T, S): bounds of ``y_i(z) - y0_i - J0_i dz`` by Taylor's
    integral remainder ``int_0^1 (1 - s) q_i(s) ds``, ``q_i(s) = dz^T H_i dz`` at
    ``x0 + s dz``.  Softmax's Hessian gives ``q_i = y_i (dz_i - y . dz)^2 - y_i Var_y(dz)``
    (``Var_y(dz) = sum_j y_j dz_j^2 - (y . dz)^2``), two terms of fixed sign, so on the
    step ending at t (y within ``stages[k]``'s interval, upper ``yu``)

        -yu_i V  <=  q_i  <=  yu_i (rho_i + M)^2,
        M = min(sum_j yu_j rho_j, max_j rho_j) >= |y . dz|,  V = min(sum_j yu_j rho_j^2, max_j rho_j^2),

    with ``|dz_j| <= rho_j``.  ``rho`` (.., T, R, S): R choices of dz (the shifts of
    :func:`shifted_radius`, or the box radius alone); q_i does not depend on the choice, so each
    stage and side takes the narrowest.  ``pairs`` (.., T, S, S): bounds of ``|dz_j - dz_k|`` at
    ``[.., k, j]`` (0 where j or k is masked), which bound ``|dz_i - y.dz| <= sum_j yu_j p_ij`` and
    ``Var_y(dz) <= sum_jk yu_j yu_k p_jk^2 / 2`` directly."""
    K = len(stages)
    lo = hi = None
    for k, iv in enumerate(stages, 1):
        w = ((1 - (k - 1) / K) ** 2 - (1 - k / K) ** 2) / 2                # int (1 - s) ds over the step
        yu1 = iv.upper                                                   # (.., T, S)
        yu = yu1.unsqueeze(-2)                                           # (.., T, 1, S)
        big = rho.amax(-1, keepdim=True)                                 # (.., T, R, 1)
        M = torch.minimum((yu * rho).sum(-1, keepdim=True), big)
        V = torch.minimum((yu * rho * rho).sum(-1, keepdim=True), big * big)
        # q_i is the same for every shift of dz (H annihilates 1): per stage the best choice per side
        A, B = ((rho + M) ** 2).amin(-2), V.amin(-2)                     # (.., T, S), (.., T, 1)
        if pairs is not None:
            # dz_i - y.dz = sum_j y_j (dz_i - dz_j) and Var_y(dz) = sum_jk y_j y_k (dz_j - dz_k)^2 / 2,
            # also at most the largest difference (a mean) and a quarter of its square (Popoviciu)
            A = torch.minimum(A, torch.minimum((pairs * yu).sum(-1), pairs.amax(-1)) ** 2)
            Bv = 0.5 * (yu1.unsqueeze(-1) * yu1.unsqueeze(-2) * pairs * pairs).sum((-1, -2)).unsqueeze(-1)
            B = torch.minimum(B, torch.minimum(Bv, 0.25 * pairs.amax((-1, -2)).unsqueeze(-1) ** 2))
        up, down = w * yu1 * A, w * yu1 * B                              # (.., T, S)
        hi = up if hi is None else hi + up
        lo = down if lo is None else lo + down
    hi = hi.nan_to_num(nan=math.inf) * (1 + 1e-12)                          # float64 rounding, outward
    lo = -lo.nan_to_num(nan=math.inf) * (1 + 1e-12)
    return lo, hi


def softmax_lin(node, x: Interval, tunings: Tunings = DEFAULT, y: Optional[Interval] = None,
                d: Optional[tuple] = None) -> Linearization:
    """Per row, whichever of the mean-value form (exact Jacobian at the centre,
    dense remainder) and the decomposed form (:func:`_softmax_decomposed`) has
    the smaller total remainder; both are ``y in a*x + u (v . x) + k +- e``.

    CROWN's refinement (:mod:`.softmax_pairs`) may add ``y``, bounds of the output
    over the region tighter than the box's corners (the form's direct enclosure),
    and ``d``, bounds ``(lo, hi)`` of the score differences ``z_j - z_k`` at
    ``[.., k, j]``.

    The mean-value remainder: with ``dz = z - x0``, ``y(z) - y0 - J0 dz`` is
    ``int_0^1 (J(x0 + s dz) - J0) dz ds``.  Its Jacobians are bounded stage by
    stage (``tunings.softmax_stages`` equal steps of s; on the step ending at t, over
    :func:`_segment_interval` at t), which halves the single-stage bound as the
    stages grow when J moves in proportion to s.  With ``d`` (and
    ``tunings.softmax_shift``), ``dz`` may be replaced by ``dz - dz_k 1`` for any
    key k, as softmax is shift invariant and every J annihilates 1: the remainder
    then reads the differences' radii (:func:`shifted_radius`), per output the best
    reference k (or none)."""
    mask = node.params.get("mask")
    x0, r = x.center, x.radius
    y0 = FORWARD["softmax"](node, x0)
    box = softmax_interval(x.lower, x.upper, mask)
    naive = box if y is None else box.intersect(y)
    yu = _segment_interval(x, 1.0, mask, d).upper if d is not None else box.upper
    if mask is not None:
        r = r.masked_fill(~mask, 0.0)
    K = tunings.softmax_stages
    stages = [_segment_interval(x, k / K, mask, d) for k in range(1, K + 1)]
    D = sum(_jacobian_range(y0, iv) for iv in stages) / K
    S = x0.shape[-1]
    if d is not None and tunings.softmax_shift:
        rho = shifted_radius(x, *d)
        if mask is not None:
            rho = rho.masked_fill(~mask.unsqueeze(-2), 0.0)
        mv = (D @ rho.transpose(-1, -2)).amin(-1) * (1 + 2 * S * ULP64)  # (.., T, S): min over k
        mv = torch.where(torch.isnan(mv), (D @ r.unsqueeze(-1)).squeeze(-1), mv)
    else:
        rho = r.unsqueeze(-2)
        mv = (D @ r.unsqueeze(-1)).squeeze(-1)
    mv = mv * (1 + 2 * K * ULP64)
    # the Taylor form's interval, intersected with the mean value's +-mv; the linear form is centred on it
    lo, hi = -mv, mv
    if tunings.softmax_taylor:
        pairs = None
        if d is not None and tunings.softmax_shift:
            pairs = rho[..., :S, :]
            if mask is not None:
                pairs = pairs.masked_fill(~mask.unsqueeze(-1), 0.0)
        t_lo, t_hi = _taylor_remainder(stages, rho, pairs)
        lo, hi = torch.maximum(t_lo, lo), torch.minimum(t_hi, hi)
    mid = torch.where(lo <= hi, 0.5 * (lo + hi), torch.zeros_like(mv))
    half = torch.where(lo <= hi, 0.5 * (hi - lo), mv)
    # plus float64 rounding of y0 (a softmax), of the centring and of the linear form's evaluation
    rounding = 16 * S * ULP64 * (yu + (yu * r).sum(-1, keepdim=True)) + 4 * ULP64 * mid.abs()
    err_mv = half + rounding
    y0c = y0 + mid                                                       # the form's value at x0
    shape = x0.shape

    if tunings.softmax_decomposed:
        a_dc, u_dc, v_dc, k_dc, e_dc, rem_dc = _softmax_decomposed(node, x)
        dec = e_dc.sum(-1, keepdim=True) < err_mv.sum(-1, keepdim=True)        # NaN / inf rows: mean value
    else:
        dec = torch.zeros_like(err_mv[..., :1], dtype=torch.bool)
    if not bool(dec.any()):
        def jvp(dx):
            return y0 * (dx - (y0 * dx).sum(-1, keepdim=True))

        def abs_jvp(rr):
            s = (y0 * rr).sum(-1, keepdim=True)
            return y0 * (1 - y0) * rr + y0 * (s - y0 * rr)

        def vjp_at(take):
            y = take(y0)
            return lambda lam: y * (lam - row_sums(lam, y))

        # |sum mid| with the float64 rounding of that sum, outward
        msum = mid.sum(-1, keepdim=True).abs() + 2 * S * ULP64 * mid.abs().sum(-1, keepdim=True)
        rem = SimplexRemainder(half, rounding, msum) if tunings.softmax_simplex else None
        return Linearization(x0, y0c, err_mv, jvp, jvp, abs_jvp, naive, vjp_at, rem)

    # mean value as the same form: a = y0, u = -y0, v = y0
    pick = lambda p, q: torch.where(dec, p, q).expand(shape)
    a, u, v, err = pick(a_dc, y0), pick(u_dc, -y0), pick(v_dc, y0), pick(e_dc, err_mv)
    rem = rem_dc.where(dec, err)

    def lin_at(a, u, v):
        def jvp(dx):
            return a * dx + u * (v * dx).sum(-1, keepdim=True)

        def vjp(lam):
            return torch.addcmul(a * lam, v, row_sums(lam, u))
        return jvp, vjp

    jvp, vjp = lin_at(a, u, v)
    x0z = x0 if mask is None else x0.masked_fill(~mask, 0.0)
    y_lin = torch.where(dec, k_dc + jvp(x0z), y0c)

    def abs_jvp(rr):
        s = (y0 * rr).sum(-1, keepdim=True)
        exact_mv = y0 * (1 - y0) * rr + y0 * (s - y0 * rr)
        bound = (a.abs() * rr + u.abs() * (v.abs() * rr).sum(-1, keepdim=True)) * (1 + 8 * shape[-1] * ULP64)
        return torch.where(dec, bound, exact_mv)

    def vjp_at(take):
        return lin_at(take(a), take(u), take(v))[1]

    return Linearization(x0, y_lin, err, jvp, vjp, abs_jvp, naive, vjp_at, rem)
