"""Attention @ V's product remainder, with V read through its linear bounds over the input box.

CROWN relaxes ``z = P V`` (per head, ``z_ic = sum_j P_ij V_jc``; in the graph ``x @ y^T`` with
x = P and y = V^T) around the centres of the two boxes.  For a cotangent row ``lam`` the
remainder is

    sum_ij (P_ij - cP_ij) w_ij,        w_ij = sum_c lam_ic (V_jc - cV_jc),

at most ``sum_ij r_P,ij max|w_ij|``.  :mod:`.value_side` bounds ``max|w_ij|`` from V's box, or
one linear layer back through the box of that layer's input n (the attention norm's output).
Both lose how V's elements move together through the norm: n's box is as wide as its
elements can move one at a time.  Here V's CROWN bounds as linear functions of the network's
input u (kept by the pass that bounded V, :class:`.crown.Linear`; the heads come from that node
by copies only, :func:`.score_input.kept_source`) give, with ``B = (a_lo + a_hi) / 2`` and
``du = u - u_c``, elementwise

    V_jc - cV_jc = B_jc du + g_jc,
    |g_jc| <= |a_hi - a_lo|_jc r_u / 2 + max(|a_lo u_c + b_lo - cV|, |a_hi u_c + b_hi - cV|)_jc,

so ``|w_ij| <= |sum_c lam_ic B_jc| . r_u + sum_c |lam_ic| |g_jc|``: the head's columns and the
norm's Jacobian cancel inside ``sum_c lam_ic B_jc`` before any absolute value is taken.  Each
(row, head, i, j) takes the narrowest of this and :mod:`.value_side`'s readings; every one
contains ``w_ij``, so the bound stays sound.

Where V's key j depends on the input's token j alone (a block on its own input: V is a norm and
a linear layer per token), the slopes are kept as that token's block only: the cost per cotangent
row is ``H dh Tk d`` instead of ``H dh Tk n``.  Where V's keys move with every input element (the
whole encoder: the stem's convolutions, then attention, mix the input frames) each row costs
``H dh Tk n``, x T where it has spread over the queries: there the rows whose cotangent sits at one
query get that exact reading (:func:`served`; every row at its own block's attention), and the rows
spread over the queries a Cauchy-Schwarz one, ``|v| . r_u <= sqrt(v^T diag(r_u) v) sqrt(sum r_u)`` with
``v^T diag(r_u) v = lam^T G_j lam`` through one (dh, dh) Gram matrix per head and key (:class:`Gram`,
:func:`spread`): ``H Tk dh^2`` per query.  Serving every row the exact reading took the whole Whisper
tiny.en encoder's bound from about a minute to over ten (measured).

Measured (real arithmetic, CROWN; docs/depth.md, sixteenth and seventeenth rounds): Whisper tiny.en
block 0 at eps 1e-3, max width 0.368 -> 0.329, median 0.170 -> 0.154; the whole encoder at eps 1e-4
0.207 -> 0.179 (rows at one query) -> 0.148 (with the spread rows' Gram reading).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import fp
from .score_input import kept_source, side

Tensor = torch.Tensor
_OUT = 1.0 + 1e-12            # float64 rounding of the sums below, outward
BUDGET = 1 << 24              # slope entries V may keep (V's elements x input elements): 128 MiB per side
ROW_CHUNK = 1 << 23           # entries of the per-row products ``sum_c lam_ic B_jc`` formed at once


class ValueInput(NamedTuple):
    slopes: Tensor            # (H, dh, Tk, m): V^T's midpoint slopes B over key j's token block of the input
    band: Tensor              # (H, dh, Tk): |g|, what the relaxations before V add beyond B du
    reach: Tensor             # (Tk, m): key j's token block of r_u ((1, n) for slopes over all of u)
    f32: Optional["Float32"] = None   # the products in float32 (:func:`float32`), where float32 matmuls are IEEE
    gram: Optional["Gram"] = None     # slopes over all of u: the rows spread over the queries (:func:`spread`)


class Gram(NamedTuple):
    """``|v| . r <= sqrt(sum_m v_m^2 r_m) sqrt(sum_m r_m)`` (Cauchy-Schwarz) for ``v = sum_c lam_c B_c``:
    ``sum_m v_m^2 r_m = lam^T G lam`` with G per head and key (dh, dh), so a row costs ``dh^2`` per
    (head, query, key) instead of ``dh n``."""
    g: Tensor                 # (H, Tk, dh, dh): B_j diag(r) B_j^T
    s: Tensor                 # (H, dh, Tk): sqrt(G_cc), rounded up
    rsum: float               # sqrt(sum_m r_m), rounded up
    k: float                  # the float64 rounding of lam^T G lam, relative to (|lam| . s)^2


def gram(slopes: Tensor, reach: Tensor) -> Gram:
    """:class:`Gram` of slopes (H, dh, Tk, n) over the whole input, reach (1, n).  G's entries are
    sums of n products, lam^T G lam one of dh^2: the computed value is within ``gamma_{n + dh^2 + 4}
    sum_cc' |lam_c| |lam_c'| sum_m r_m |B_cm| |B_c'm|`` of the exact one, and that sum is at most
    ``(|lam| . s)^2`` (Minkowski's inequality in the r-weighted 2-norm)."""
    dh, n = slopes.shape[1], slopes.shape[-1]
    w = slopes * reach.sqrt()                                          # the sqrt's rounding: in k below
    g = torch.einsum("hcjm,hdjm->hjcd", w, w)
    k = (n + dh * dh + 8) * 2.0 ** -53 * (1 + 2.0 ** -40)
    s = (slopes * slopes * reach).sum(-1).sqrt() * (1 + k)
    return Gram(g, s, math.sqrt(float(reach.sum())) * (1 + k), 4 * k)


def spread(vi: ValueInput, lam: Tensor) -> Tensor:
    """(S, H, I, Tk): :func:`entries`'s bound by :class:`Gram` (for rows over every query)."""
    gr = vi.gram
    S, H, I, dh = lam.shape
    q = lam.new_empty(S, H, I, gr.g.shape[1])
    step = max(1, ROW_CHUNK // max(1, H * I * gr.g.shape[1] * dh))      # (s, H, I, Tk, dh) at once
    for a in range(0, S, step):
        part = lam[a:a + step]
        q[a:a + step] = torch.einsum("shijd,shid->shij", torch.einsum("shic,hjcd->shijd", part, gr.g), part)
    q = q.clamp_min(0)
    pad = gr.k * torch.einsum("shic,hcj->shij", lam.abs(), gr.s) ** 2
    out = (q + pad).sqrt() * gr.rsum + torch.einsum("shic,hcj->shij", lam.abs(), vi.band)
    out = out * _OUT
    return torch.where(torch.isnan(out), torch.full_like(out, float("inf")), out)


class Float32(NamedTuple):
    """The per-row products in float32 with their error bound (:func:`entries`): the slopes are
    B32 = B rounded to float32 (``band`` holds ``|B - B32| r_u`` too), the reach r32 rounded up."""
    slopes: Tensor            # (H, dh, Tk, m) float32: B32
    reach: Tensor             # (Tk, m) float32: r32 >= r_u
    rho: Tensor               # (H, dh, Tk) float64: |B32| r_u per column, rounded up
    const: Tensor             # (H, Tk) float64: the underflows' share, lam-free
    band: Tensor              # (H, dh, Tk) float64: the band plus |B - B32| r_u


def float32(slopes: Tensor, band: Tensor, reach: Tensor) -> Float32:
    """:class:`Float32` of float64 slopes (H, dh, Tk, m), band (H, dh, Tk) and reach (Tk, m).

    For a row lam (float64) and w32 = fl32(sum_c fl32(lam_c) B32_c) by any float32 matmul:
    ``|sum_c lam_c B32_c - w32| <= k sum_c |lam_c| |B32_c| + FLOOR (1 + gamma_dh) sum_c |B32_c| + dh FLOOR``
    elementwise, ``k = U + gamma_dh (1 + U)`` (lam's rounding, then the dot product's in any
    order; FLOOR covers an underflow or flush per operation), so over the reach
    ``sum_m |w_m| r_m <= sum_m |w32_m| r32_m + k sum_c |lam_c| rho_c + const``."""
    dh, m = slopes.shape[1], slopes.shape[-1]
    b32 = slopes.float()
    r32 = reach.float()
    r32 = torch.where(r32.double() < reach, torch.nextafter(r32, torch.full_like(r32, math.inf)), r32)
    rho = (b32.double().abs() * reach).sum(-1) * _OUT
    const = (fp.FLOOR * (1 + fp.gamma(dh)) * rho.sum(1) + dh * fp.FLOOR * reach.sum(-1)) * _OUT
    extra = ((slopes - b32.double()).abs() * reach).sum(-1) * _OUT
    return Float32(b32, r32, rho, const, band + extra)


def wanted(graph, need: set) -> set:
    """The nodes whose linear bounds attention @ V's value side reads: V's source among ``need``."""
    out = set()
    for node in graph:
        if node.op == "matmul" and node.params.get("rows_sum_to_one"):
            src = kept_source(graph, node.inputs[1], need)
            if src is not None:
                out.add(src[0])
    return out


def build(graph, node, linear: dict, y_box) -> Optional[ValueInput]:
    """The constants of :func:`entries` for ``node`` (attention @ V), or None where y = V^T's
    linear bounds over the input were not kept.  ``y_box``: the box of y (H, dh, Tk)."""
    src = kept_source(graph, node.inputs[1], linear)
    if src is None:
        return None
    slopes, _, band, r_u = side(graph, src, linear, y_box)                   # (H, dh, Tk, n), (H, dh, Tk)
    band = band * _OUT
    if slopes.dim() != 4 or slopes.shape[:-1] != y_box.center.shape:
        return None
    lin = linear[src[0]]
    H, dh, Tk, n = slopes.shape
    b, reach = slopes.contiguous(), r_u.reshape(1, n)
    if n % Tk == 0 and lin.box.center.dim() >= 2 and lin.box.center.shape[0] == Tk:
        d = n // Tk
        blocks = slopes.reshape(H, dh, Tk, Tk, d)
        own = torch.eye(Tk, dtype=torch.bool, device=slopes.device).reshape(1, 1, Tk, Tk, 1)
        if not bool(blocks.masked_fill(own, 0).any()):      # key j moves with input token j only
            idx = torch.arange(Tk, device=slopes.device)
            b, reach = blocks[:, :, idx, idx].contiguous(), r_u.reshape(Tk, d)
    return ValueInput(b, band, reach, float32(b, band, reach) if fp.f32_matmul_is_ieee(b.device) else None,
                      gram(b, reach) if reach.shape[0] == 1 else None)


def served(vi: Optional[ValueInput], t: Tensor, compact: bool) -> Optional[Tensor]:
    """(S, H, I, Tk) :func:`entries` for the cotangent t (S, H, I, dh) of either layout (``compact``:
    token-compact, I = 1), or None.  Over token blocks every row is served; over the whole input
    the rows whose cotangent sits at one query (every row of a token-compact pass, and the same
    rows of a dense one, so both layouts give the same bounds) get :func:`entries` there (inf at the
    other queries), and the rows spread over the queries :func:`spread`."""
    if vi is None:
        return None
    if compact or vi.reach.shape[0] > 1:
        return entries(vi, t)
    at = t.abs().sum(-1).sum(1) > 0                                     # (S, T): queries each row reaches
    one = at.sum(1) <= 1
    S, H, T, _ = t.shape
    out = t.new_full((S, H, T, vi.slopes.shape[2]), float("inf"))
    if vi.gram is not None and not bool(one.all()):
        many = (~one).nonzero().squeeze(1)
        out[many] = spread(vi, t[many])
    elif not bool(one.any()):
        return None
    rows = one.nonzero().squeeze(1)
    tok = at[rows].to(torch.int8).argmax(1)                             # (s,): the row's query (0 when none)
    part = t[rows, :, tok].unsqueeze(2)                                  # (s, H, 1, dh)
    out[rows, :, tok] = entries(vi, part).squeeze(2)
    return out


def entries(vi: ValueInput, lam: Tensor) -> Tensor:
    """(S, H, I, Tk): a bound of ``|sum_c lam_ic (V_jc - cV_jc)|`` per row, head, query i and key j.

    lam (S, H, I, dh): the cotangent at z (I = T dense, 1 token-compact).  With :attr:`ValueInput.f32`
    the products run in float32 (about half the time) and the bound adds their error
    (:func:`float32`), and the float32 sums' (``sum_m`` of m nonnegative products: at most
    ``gamma_m`` of the exact sum, plus an underflow each)."""
    S, H, I, dh = lam.shape
    Tk, m = vi.slopes.shape[2], vi.slopes.shape[3]
    f = vi.f32
    out = lam.new_empty(S, H, I, Tk)
    step = max(1, ROW_CHUNK // max(1, H * I * Tk * m))
    for s in range(0, S, step):
        part = lam[s:s + step]
        if f is None:
            w = torch.einsum("shic,hcjm->shijm", part, vi.slopes)               # (s, H, I, Tk, m)
            out[s:s + step] = (w.abs() * vi.reach).sum(-1)
        else:
            w = torch.einsum("shic,hcjm->shijm", part.float(), f.slopes)         # float32
            out[s:s + step] = (w.abs_() * f.reach).sum(-1).double()
    if f is None:
        # the float64 products' rounding: at most gamma_{dh+m+1} (2^-53 units) of sum_c |lam_c| |B_c| . r
        k64 = (dh + m + 2) * 2.0 ** -53 * (1 + 2.0 ** -40)
        rho = (vi.slopes.abs() * vi.reach).sum(-1)                               # (H, dh, Tk)
        out = out + torch.einsum("shic,hcj->shij", lam.abs(), vi.band + k64 * rho)
    else:
        k = fp.U + fp.gamma(dh) * (1 + fp.U)
        out = (out / (1 - fp.gamma(m)) + m * fp.FLOOR + f.const.unsqueeze(-2)
               + torch.einsum("shic,hcj->shij", lam.abs(), k * f.rho + f.band))
    out = out * _OUT
    return torch.where(torch.isnan(out), torch.full_like(out, float("inf")), out)
