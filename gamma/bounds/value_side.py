"""Attention @ V's product remainder, read one linear layer back on the value side.

CROWN relaxes ``z = P V`` (per head, ``z_ic = sum_j P_ij V_jc``; in the graph
``x @ y^T`` with x = P and y = V^T) around the centres of the two boxes.  For a
cotangent row ``lam`` (lam_ic at z) the product's contribution is

    sum_ij P_ij u_ij,        u_ij = sum_c lam_ic V_jc,

and ``P u = cP u + P cu - cP cu + (P - cP)(u - cu)`` with ``cu_ij = lam_i . cV_j``
is what :func:`.crown_rules._matmul_centre` takes, its remainder bounded by
``r_P,ij max|u_ij - cu_ij|``.  Box algebra gives ``max|u - cu| <= sum_c
|lam_ic| r_V,jc`` (the elementwise half-sum remainder).  But V is one linear
layer away from a node n with a box of its own (the attention norm's output):
``V_j = W n_j + b`` (head h's rows of W), so

    u_ij = (W_h^T lam_i) . n_j + lam_i . b_h   (+ V's float32 margin),

whose range over n's box has radius ``|W_h^T lam_i| . r_n,j`` (plus ``|lam_i| .
m_V,j`` in the float32 mode) around ``lam_i . (W n_c + b)_j``.  The mixing of the
head's columns in ``W_h^T lam_i`` cancels, which the elementwise form cannot.
The remainder takes, per (row, i, j), the narrower of the two intervals' reach
from ``cu``: ``min(R_box, R_back + |cu - lam_i . (W n_c + b)_j|)``.  Nothing else
of the rule changes; both intervals contain u, so the bound stays sound.

Measured (real arithmetic, eps 1e-3, max width; docs/depth.md, fifth round):
Whisper tiny.en block 2 0.876 -> 0.598, SmolLM2-135M block 0 99.8 -> 40.2.

:func:`source` finds the linear layer (``transpose <- [repeat_kv] <- split_heads
<- linear``), :func:`build` its per-node constants once per Context (none where n's
elements move together, :data:`CORRELATED`), :func:`remainder` the rows' remainders.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..float32 import is_exact32
from . import fp

Tensor = torch.Tensor
_OUT = 1.0 + 1e-12            # float64 rounding of the sums below, outward
# V's own box against n's box carried through |W_h| (median ratio) below which n's elements move
# together (the whole encoder: 0.09-0.15) and the value side cannot gain; a block on its own box:
# 0.48. Skipping is a matter of time only: the box remainder is sound either way.
CORRELATED = 0.25


class ValueSide(NamedTuple):
    w: Tensor                 # (H, dh, d): head h's rows of the value layer's weight (kv heads repeated)
    r_n: Tensor               # (Tk, d): radius of the value layer's input box
    margin: Optional[Tensor]  # (H, Tk, dh): V's float32 margin per head, or None
    shift: Tensor             # (H, Tk, dh): centre of V's box - (W n_c + b)
    w32: Optional[Tensor] = None   # w as float32 where it is float32-valued and float32 matmuls are IEEE
    through: Optional[Tensor] = None   # (H, Tk, dh): |W_h| r_n, n's box carried to V


def source(graph, node):
    """``(linear node, n_rep, kv heads)`` when y of ``node = x @ y^T`` is the transpose of
    a linear layer's heads (``transpose <- [repeat_kv] <- split_heads <- linear``), else None."""
    y = graph[node.inputs[1]]
    if y.op != "transpose":
        return None
    h = graph[y.inputs[0]]
    rep = 1
    if h.op == "repeat_kv":
        rep = int(h.params["n_rep"])
        h = graph[h.inputs[0]]
    if h.op != "split_heads":
        return None
    lin = graph[h.inputs[0]]
    if lin.op != "linear":
        return None
    return lin, rep, int(h.params["heads"])


def _heads(t: Tensor, kv: int, idx: Tensor) -> Tensor:
    """(Tk, kv * dh) -> (H, Tk, dh), kv head ``idx[h]`` for head h."""
    return t.reshape(t.shape[0], kv, -1).transpose(0, 1)[idx]


def build(graph, node, bounds: dict, margins: dict, y_box) -> Optional[ValueSide]:
    """The constants of :func:`remainder` for ``node`` (attention @ V), or None where
    its value side is not a linear layer's heads or that layer's input has no box.
    ``y_box``: the box of y = V^T (H, dh, Tk)."""
    src = source(graph, node)
    if src is None:
        return None
    lin, rep, kv = src
    n = bounds.get(lin.inputs[0])
    if n is None:
        return None
    H = y_box.center.shape[-3]
    idx = torch.arange(H, device=y_box.center.device) // rep
    w = lin.params["weight"].to(y_box.center.dtype)                      # (kv dh, d)
    dh = w.shape[0] // kv
    w3 = w.reshape(kv, dh, -1)[idx]                                      # (H, dh, d)
    back = n.center @ w.T                                                # (Tk, kv dh): W n_c + b
    b = lin.params.get("bias")
    if b is not None:
        back = back + b
    m = margins.get(lin.name)
    r_v = y_box.radius.transpose(-1, -2)                                  # (H, Tk, dh)
    through = torch.einsum("hcd,jd->hjc", w3.abs(), n.radius)            # |W_h| r_n: n's box carried to V
    if float((r_v / through).nan_to_num(nan=1.0, posinf=1.0).median()) < CORRELATED:
        return None
    w32 = w3.float() if is_exact32(lin.params["weight"]) and fp.f32_matmul_is_ieee(w3.device) else None
    return ValueSide(w3, n.radius, None if m is None else _heads(m, kv, idx),
                     y_box.center.transpose(-1, -2) - _heads(back, kv, idx), w32, through)


def remainder(vs: Optional[ValueSide], lam: Tensor, r_p: Tensor, r_v: Tensor,
              other: Optional[Tensor] = None) -> Tensor:
    """(S,): ``sum_hij r_P,hij min(R_box, R_back + |shift term|, other)`` per row.

    lam (S, H, I, dh): the cotangent at z (I = T dense, 1 token-compact); r_p (S or 1,
    H, I, Tk): P's radius as each row sees it; r_v (H, dh, Tk): V^T's radius; ``vs`` None:
    no reading through the value layer; ``other`` (S, H, I, Tk): another bound of
    ``max |u_ij - cu_ij|`` per entry (:func:`.value_input.entries`), or None."""
    r_vt = r_v.transpose(-1, -2)                                         # (H, Tk, dh)
    r = torch.einsum("shic,hjc->shij", lam.abs(), r_vt)                  # R_box
    if vs is not None:
        r = torch.minimum(r, _back(vs, lam))
    if other is not None:
        r = torch.minimum(r, other)
    if r_p.dim() == r.dim() - 1:
        r_p = r_p.unsqueeze(0)
    return (r_p * r).reshape(r.shape[0], -1).sum(1)


def _back(vs: ValueSide, lam: Tensor) -> Tensor:
    """(S, H, I, Tk): ``R_back + |shift term|``, the reach of u_ij read through the value layer."""
    if vs.w32 is None:
        a = torch.einsum("shic,hcd->shid", lam, vs.w)                    # W_h^T lam_i: (S, H, I, d)
        r_back = a.abs() @ vs.r_n.transpose(0, 1)                        # (S, H, I, Tk)
    else:
        # the product in float32: |a - a32| <= (U + gamma_dh (1 + U)) |lam| |W| (lam's rounding and the
        # sum's, any order), plus dh underflows; |lam| |W| . r_n = |lam| . through (a cheap product)
        a32 = torch.einsum("shic,hcd->shid", lam.float(), vs.w32)
        dh = lam.shape[-1]
        k = fp.U + fp.gamma(dh) * (1 + fp.U)
        r_back = (a32.abs().to(lam.dtype) @ vs.r_n.transpose(0, 1)
                  + k * torch.einsum("shic,hjc->shij", lam.abs(), vs.through)
                  + dh * fp.SUBNORMAL * vs.r_n.sum(-1))
    if vs.margin is not None:
        r_back = r_back + torch.einsum("shic,hjc->shij", lam.abs(), vs.margin)
    r_back = (r_back + torch.einsum("shic,hjc->shij", lam, vs.shift).abs()) * _OUT
    return torch.where(torch.isnan(r_back), torch.full_like(r_back, math.inf), r_back)
