"""Attention products' remainder from the two sides' linear bounds over the input box.

CROWN relaxes ``z = x y^T`` (per head, ``z_ij = x_i . y_j``) around its boxes' centres; the
remainder of score (i, j) is ``(x_i - cx_i) . (y_j - cy_j)``.  :mod:`.score_side` reads it
through the layers' input n, whose box loses how n's elements move together: deep in a model
(the whole Whisper encoder) the boxes of q and k are the narrower reading.  Here each side is
read through its own CROWN bounds as linear functions of the network's input u (kept by the
pass that bounded it, :class:`.crown.Linear`; the heads come from that node by copies only):
``a_lo u + b_lo <= x <= a_hi u + b_hi``.  With ``A = (a_lo + a_hi) / 2`` and ``du = u - u_c``,

    x_i - cx_i = A_i du + g_i,    |g_i| <= |a_hi - a_lo| r_u / 2 + max(|a_lo u_c + b_lo - cx|, |a_hi u_c + b_hi - cx|)

elementwise (the band: what the relaxations before x add beyond a linear function), so

    |(x_i - cx_i) . (y_j - cy_j)| <= |du^T A_i^T B_j du| + g_i . rho_j + rho_i . h_j + g_i . h_j

with ``rho = |A| r_u`` the linear part's reach.  Its quadratic term is at most
``||A_i^T B_j||_2 ||r_u||_2^2`` (:func:`.score_side.spectral`), or ``rho_i . rho_j``: the
narrower.  The operator norm sees that the two sides' input directions mostly do not align,
which no box can.  Every score takes the narrowest of this, the boxes' ``r_x r_y`` and
whatever :mod:`.score_side` gave.  Attention @ V (x the probabilities, y = V^T: the sum runs over
the keys) is read the same way, each row of the cotangent taking the narrower of this and
:mod:`.value_side`'s remainder.  Cost: two QRs per head and token of an (input, dh) matrix
and one dh x dh SVD per head and token pair; memory: the two sides' slopes, which the engine
keeps only below :data:`BUDGET` entries each.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import forward_op
from .score_side import spectral

Tensor = torch.Tensor
COPIES = {"split_heads", "repeat_kv", "transpose"}     # ops that only move or copy elements
BUDGET = 1 << 22                              # slope entries per side (node elements x input elements): 32 MiB
_OUT = 1.0 + 1e-12                            # float64 rounding of the sums below, outward


def kept_source(graph, name: str, kept) -> Optional[tuple]:
    """``(node name, chain)`` where ``name`` is ``kept``'s node carried by :data:`COPIES` ops
    (chain in forward order), else None."""
    chain = []
    node = graph[name]
    while node.name not in kept and node.op in COPIES:
        chain.append(node)
        node = graph[node.inputs[0]]
    return (node.name, chain[::-1]) if node.name in kept else None


def wanted(graph, need: set) -> set:
    """The nodes whose linear bounds a product of two activations can read (q k^T, attention @ V):
    each side's source among the needed nodes."""
    out = set()
    for node in graph:
        if node.op != "matmul":
            continue
        srcs = [kept_source(graph, i, need) for i in node.inputs]
        if all(s is not None for s in srcs):
            out |= {s[0] for s in srcs}
    return out


def side(graph, src: tuple, linear: dict, box) -> tuple:
    """``(slopes, rho, g, r_u)`` of the kept node ``src = (name, chain)`` carried to the product's
    side (``box``: that side's box): ``slopes`` (*side shape, n) the midpoint slopes A, ``rho =
    |A| r_u`` and ``g`` (side shape) the band of the module docstring, ``r_u`` (n,) the input's radius."""
    name, chain = src
    lin = linear[name]
    c_u, r_u = lin.box.center.reshape(-1), lin.box.radius.reshape(-1)
    shape = graph[name].shape

    def carry(t: Tensor, lead: int) -> Tensor:           # (lead..., *src) -> (lead..., *side)
        t = t.reshape(*t.shape[:lead], *shape)
        for op in chain:
            t = forward_op(op, t)
        return t
    a = 0.5 * (lin.a_lo + lin.a_hi)                                           # (m, n)
    # this float64 arithmetic's rounding, outward: every sum below has at most n + 2 roundings (gamma),
    # on terms no larger than |a_lo| |c_u| + |a_hi| |c_u| + |b| + |centre| + the slopes' reach (the
    # computed midpoint a is within 2^-53 |a| of the exact one, so its reach covers that too)
    k = (len(c_u) + 4) * 2.0 ** -53 * (1 + 2.0 ** -40)
    rho = carry(a.abs() @ r_u, 0) * (1 + k)
    half = carry(0.5 * (lin.a_hi - lin.a_lo).abs() @ r_u, 0)
    lo = carry(lin.a_lo @ c_u + lin.b_lo, 0) - box.center
    hi = carry(lin.a_hi @ c_u + lin.b_hi, 0) - box.center
    size = carry((lin.a_lo.abs() + lin.a_hi.abs()) @ c_u.abs() + lin.b_lo.abs() + lin.b_hi.abs(), 0)
    pad = k * (size + box.center.abs() + rho + half)
    slopes = carry(a.T.contiguous(), 1).movedim(0, -1)                        # (*side, n)
    return slopes, rho, (half + torch.maximum(lo.abs(), hi.abs()) + pad) * (1 + k), r_u


def remainder(graph, node, linear: dict, x_box, y_box) -> Optional[Tensor]:
    """(.., T, Tk): a bound of ``|(x_i - cx_i) . (y_j - cy_j)|`` per score, never above the
    boxes' ``r_x r_y^T``; None where a side's linear bounds were not kept."""
    sides = [kept_source(graph, i, linear) for i in node.inputs]
    if any(s is None for s in sides):
        return None
    parts = []
    for src, b in zip(sides, (x_box, y_box)):
        slopes, rho, g, r_u = side(graph, src, linear, b)
        if slopes.shape[:-1] != b.center.shape:
            return None
        parts.append((slopes, rho, g, float((r_u * r_u).sum())))
    (A, rx, gx, ru2), (B, ry, gy, _) = parts
    if A.dim() != 4:                                       # (H, T, dh, n) only: one leading axis, the heads
        return None
    t = lambda v: v.transpose(-1, -2)
    quad = torch.minimum(spectral(A, B, False) * ru2, rx @ t(ry))
    bil = (quad + gx @ t(ry) + rx @ t(gy) + gx @ t(gy)) * _OUT
    bil = torch.where(torch.isnan(bil), torch.full_like(bil, float("inf")), bil)
    return torch.minimum(x_box.radius @ t(y_box.radius), bil)
