"""A norm's product remainder, read one linear layer back on its input side.

The decomposed form of LayerNorm / RMSNorm (:func:`.norm._norm_decomposed`) relaxes
``y_i = w_i c_i s + b_i`` (c = P x the centred input, P the centring or the
identity, s the inverse scale of the row) through the product ``c_i s`` around the
centres of c's and s's intervals.  For a cotangent row lam its remainder is

    sum_i lam_i w_i (c_i - cm_i)(s - sm) = (s - sm) U,    U = sum_i lam_i w_i (c_i - cm_i),

charged today as ``r_s sum_i |lam_i w_i| r_c,i``, i.e. with ``|U| <= sum |lam_i w_i| r_c,i``.
Where the norm's input is a residual add ``x = p + (W z + b)`` (the attention's or
the MLP's output projection), ``U = g . p + (W^T g) . z + const`` with ``g = P (lam w)``
(P is symmetric), whose radius over p's and z's boxes is ``|g| . (r_p + m) + |W^T g| . r_z``
(m: the float32 margins of the projection and of the add), around a centre
``g . (p_c + W z_c + b) - (lam w) . cm``.  The mixing in ``W^T g`` cancels where the
elementwise form cannot.  Per row and token the narrower reach wins; the saving is
``r_s max(0, R_box - R_back - |centre|)``, taken off the rule's even constant
(:func:`.crown_rules._jacobian`).

Measured (real arithmetic, eps 1e-3, max width; docs/depth.md, fifth round):
SmolLM2-135M block 0 40.2 -> 32.1; Whisper tiny.en blocks: no change worth its time
(its norms' product remainder is a small part of their constant), so the
engine uses it for RMSNorm only (``Tunings.norm_side``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..float32 import is_exact32
from . import fp

Tensor = torch.Tensor
_IN, _OUT = 1.0 - 1e-12, 1.0 + 1e-12       # float64 rounding of the sums below: the saving rounded down


class BackSide(NamedTuple):
    weight: Tensor            # (d, d_in): the projection's weight
    r_p: Tensor               # (T, d): radius of the residual's other input, plus the float32 margins
    r_z: Tensor               # (T, d_in): radius of the projection's input
    centre: Tensor            # (T, d): p_c + W z_c + b
    w32: Optional[Tensor] = None      # the weight as float32 where float32-valued and float32 matmuls are IEEE
    through: Optional[Tensor] = None  # (T, d): |W| r_z, z's box carried through the projection


def source(graph, node):
    """``(p, projection, add)`` when ``node``'s input is ``add(p, linear(z))``, else None."""
    x = graph[node.inputs[0]]
    if x.op != "add" or len(x.inputs) != 2:
        return None
    a, b = (graph[i] for i in x.inputs)
    if b.op != "linear":
        a, b = b, a
    if b.op != "linear" or a.name == b.name:
        return None
    return a, b, x


def build(graph, node, bounds: dict, margins: dict) -> Optional[BackSide]:
    """The constants of :func:`saving` for the norm ``node``, or None where its input is
    not a residual add of a linear layer or a box is missing."""
    src = source(graph, node)
    if src is None:
        return None
    p, lin, add = src
    bp, bz = bounds.get(p.name), bounds.get(lin.inputs[0])
    if bp is None or bz is None:
        return None
    w = lin.params["weight"].to(bp.center.dtype)
    b = lin.params.get("bias")
    centre = bp.center + bz.center @ w.T + (0 if b is None else b)
    r_p = bp.radius
    for name in (lin.name, add.name):
        m = margins.get(name)
        if m is not None:
            r_p = r_p + m
    w32 = w.float() if is_exact32(lin.params["weight"]) and fp.f32_matmul_is_ieee(w.device) else None
    return BackSide(w, r_p, bz.radius, centre, w32, bz.radius @ w.abs().T)


def saving(bs: BackSide, lam, w_norm: Tensor, cs: tuple, centered: bool) -> Tensor:
    """(S,): what reading U one layer back saves on the product's remainder, per row.

    lam: the cotangent at the norm's output (a layout, :mod:`.rows`); w_norm (d,): the
    norm's weight; cs = (r_c, r_s, c_m) from its linearization (r_s 0 on rows that
    do not take the decomposed form)."""
    r_c, r_s, c_m = cs
    t = lam.t                                                            # (S, I, d)
    lw = t * w_norm
    g = lw - lw.mean(-1, keepdim=True) if centered else lw
    r_box = (lw.abs() * lam.take(r_c)).sum(-1, keepdim=True)
    if bs.w32 is None:
        back = ((g @ bs.weight).abs() * lam.take(bs.r_z)).sum(-1, keepdim=True)
    else:
        # W^T g in float32: |error| <= (U + gamma_d (1 + U)) |g| |W| (g's rounding and the sum's, any
        # order) plus d underflows; |g| |W| . r_z = |g| . (|W| r_z) (a cheap product)
        d = g.shape[-1]
        k = fp.U + fp.gamma(d) * (1 + fp.U)
        rz = lam.take(bs.r_z)
        back = (((g.float() @ bs.w32).abs().to(g.dtype) * rz).sum(-1, keepdim=True)
                + k * (g.abs() * lam.take(bs.through)).sum(-1, keepdim=True)
                + d * fp.SUBNORMAL * rz.sum(-1, keepdim=True))
    r_back = (g.abs() * lam.take(bs.r_p)).sum(-1, keepdim=True) + back
    shift = ((g * lam.take(bs.centre)).sum(-1, keepdim=True) - (lw * lam.take(c_m)).sum(-1, keepdim=True)).abs()
    gain = (r_box * _IN - (r_back + shift) * _OUT).clamp(min=0)
    gain = torch.where(torch.isfinite(gain), gain, torch.zeros_like(gain))
    rs = lam.take(r_s)
    rs = torch.where(torch.isfinite(rs), rs, torch.zeros_like(rs))      # an unbounded scale: nothing to save
    return (rs * gain).reshape(t.shape[0], -1).sum(1)
