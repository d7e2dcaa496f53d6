"""Attention scores' product remainder, read one linear layer back on both sides.

CROWN relaxes ``z = x y^T`` (per head, ``z_ij = x_i . y_j``: queries against keys)
around the centres of the two boxes; the remainder of entry (i, j) is
``(x_i - cx_i) . (y_j - cy_j)``, bounded elementwise by ``sum_c r_x,ic r_y,jc``.
Where each side is a linear layer's output carried to the heads by per-token
linear maps (``split_heads``, ``mul_const``, ``rope``, ``repeat_kv``), ``x_i = A_i n_i
+ a_i`` and ``y_j = B_j n'_j + b_j`` with n, n' the layers' inputs, and

    (x_i - cx_i) . (y_j - cy_j) = dn_i^T A_i^T B_j dn'_j + s_i . B_j dn'_j + t_j . A_i dn_i + s_i . t_j

(dn = n - n_c over n's box, ``s_i = A_i n_c,i + a_i - cx_i``, t likewise).  Its bound
``r_n,i^T |A_i^T B_j| r_n',j + |B_j^T s_i| . r_n',j + |A_i^T t_j| . r_n,i + |s_i . t_j|``
reads ``|A^T B|``, where the sum over the head's columns cancels, instead of
``|A|^T |B|``.  Its quadratic term also has the operator-norm bound
``||A_i^T B_j||_2 ||r_n,i||_2 ||r_n',j||_2`` (:func:`spectral`), narrower where the
head's bilinear form mixes signs over many input pairs (Whisper's layers 1-3: 2-3x on a
uniform radius); each entry takes the narrower of the two.  In the float32 mode the sides' margins e, f (each side's linear
margin carried through the chain, plus the chain's own) add
``sum_c E_x,c r_y,c + (r_x,c + E_x,c) E_y,c``.  Each entry takes the narrower of the
two bounds; the result is a constant per node (no cotangent enters it).

The cost is ``H T Tk d d' dh`` once per node and Context (token-independent
chains, without RoPE: ``H d d' dh``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops import forward_op, rotate_half_abs

Tensor = torch.Tensor
CHAIN = {"split_heads", "mul_const", "rope", "repeat_kv"}     # linear, no offset, token by token
_OUT = 1.0 + 1e-12                                            # float64 rounding of the sums, outward
BUDGET = 2e10                                                 # multiply-adds per node (about 0.5 s here)


def source(graph, name: str):
    """``(linear node, chain)`` when ``name`` is a linear layer's output carried by
    :data:`CHAIN` ops (chain in forward order), else None."""
    chain = []
    node = graph[name]
    while node.op in CHAIN:
        chain.append(node)
        node = graph[node.inputs[0]]
    if node.op != "linear" or not chain:
        return None
    return node, chain[::-1]


def _side(graph, name: str, bounds: dict, margins: dict, T: int):
    """(A (H, T, dh, d), a (H, T, dh), n box, E (H, T, dh) or None) of one side, or None."""
    src = source(graph, name)
    if src is None or bounds.get(src[0].inputs[0]) is None:
        return None
    lin, chain = src
    n = bounds[lin.inputs[0]]
    w = lin.params["weight"].to(n.center.dtype)                       # (d_out, d)
    basis = w.T[:, None, :].expand(w.shape[1], T, w.shape[0])        # column k of W at every token
    b = lin.params.get("bias")
    off = (torch.zeros(T, w.shape[0], dtype=w.dtype, device=w.device) if b is None
           else b.to(w.dtype).expand(T, w.shape[0]))
    m = margins.get(lin.name)
    err = None if m is None else m.expand(T, w.shape[0])
    for node in chain:
        basis, off = forward_op(node, basis), forward_op(node, off)
        if err is not None:
            err = _abs_op(node, err)
        extra = margins.get(node.name)
        if extra is not None:
            err = extra if err is None else err + extra
    return basis.movedim(0, -1), off, n, err                         # A: (H, T, dh, d)


def _abs_op(node, e: Tensor) -> Tensor:
    """A bound of |op(v)| for |v| <= e (e >= 0), op a :data:`CHAIN` op."""
    if node.op == "mul_const":
        return e * torch.as_tensor(node.params["c"], dtype=e.dtype, device=e.device).abs()
    if node.op == "rope":
        return e * node.params["cos"].abs() + rotate_half_abs(e) * node.params["sin"].abs()
    return forward_op(node, e)                                       # split_heads, repeat_kv: copies


def _cost(graph, node, x_box, y_box) -> float:
    """Multiply-adds of :func:`remainder` for ``node`` (inf where a side is no chain)."""
    sides = [source(graph, name) for name in node.inputs]
    if any(s is None for s in sides):
        return math.inf
    H, T, dh = x_box.center.shape[-3:]
    Tk = y_box.center.shape[-2]
    d, d2 = (int(s[0].params["weight"].shape[1]) for s in sides)
    per_token = any(c.op == "rope" for s in sides for c in s[1])
    return float(H * dh * d * d2 * (T * Tk if per_token else 1) + H * T * dh * d * (1 + Tk))


def spectral(A: Tensor, B: Tensor, shared: bool) -> Tensor:
    """(H, T, Tk): an upper bound of ``||A_hi^T B_hj||_2`` for A (H, T, dh, d), B (H, Tk, dh, d')
    (``shared``: one A and one B per head, every entry the same).  With ``A_hi^T = Q R`` and
    ``B_hj^T = Q' R'`` (thin QR, orthonormal columns) ``A^T B = Q (R R'^T) Q'^T``, whose norm
    is that of the dh x dh ``R R'^T``; float64 QR's and SVD's errors (about ``d u ||R|| ||R'||``)
    are covered by ``2^-30`` of ``||R||_F ||R'||_F`` added."""
    a, b = (A[:, :1], B[:, :1]) if shared else (A, B)
    ra = torch.linalg.qr(a.transpose(-1, -2), mode="r").R                  # (H, T, dh, dh)
    rb = torch.linalg.qr(b.transpose(-1, -2), mode="r").R                  # (H, Tk, dh, dh)
    core = ra[:, :, None] @ rb[:, None].transpose(-1, -2)                  # (H, T, Tk, dh, dh)
    sig = torch.linalg.matrix_norm(core, ord=2)
    pad = 2.0 ** -30 * (torch.linalg.matrix_norm(ra, "fro")[:, :, None] * torch.linalg.matrix_norm(rb, "fro")[:, None])
    sig = (sig + pad) * _OUT
    return sig.expand(A.shape[0], A.shape[1], B.shape[1])


def remainder(graph, node, bounds: dict, margins: dict, x_box, y_box,
              spectral_norms: bool = True) -> Optional[Tensor]:
    """(H, T, Tk): a bound of ``|(x_i - cx_i) . (y_j - cy_j)|`` per score, never above the
    elementwise ``r_x r_y^T``; None where a side is not a linear layer's heads, or where
    it would cost more than :data:`BUDGET` multiply-adds (RoPE makes it per token pair:
    SmolLM2-135M 12e9, a Llama-8B-shaped block 1e12)."""
    if _cost(graph, node, x_box, y_box) > BUDGET:
        return None
    T, Tk = x_box.center.shape[-2], y_box.center.shape[-2]
    xs, ys = _side(graph, node.inputs[0], bounds, margins, T), _side(graph, node.inputs[1], bounds, margins, Tk)
    if xs is None or ys is None:
        return None
    (A, a, n, ex), (B, b, n2, ey) = xs, ys
    if A.shape[:3] != x_box.center.shape or B.shape[:3] != y_box.center.shape:
        return None
    rn, rn2 = n.radius, n2.radius                                   # (T, d), (Tk, d')
    s = torch.einsum("htcd,td->htc", A, n.center) + a - x_box.center     # (H, T, dh)
    t = torch.einsum("hjce,je->hjc", B, n2.center) + b - y_box.center
    H = A.shape[0]
    quad = torch.empty(H, T, Tk, dtype=A.dtype, device=A.device)
    shared = bool((A == A[:, :1]).all()) and bool((B == B[:, :1]).all())   # no RoPE: one A, B per head
    for h in range(H):
        if shared:
            quad[h] = rn @ (A[h, 0].T @ B[h, 0]).abs() @ rn2.T
            continue
        for i in range(T):
            m = torch.einsum("cd,jce->jde", A[h, i], B[h]).abs()             # (Tk, d, d')
            quad[h, i] = torch.einsum("jde,je->jd", m, rn2) @ rn[i]
    if spectral_norms:                  # dn_i^T M dn_j <= ||M||_2 ||dn_i||_2 ||dn_j||_2, |dn| <= r elementwise
        sig = spectral(A, B, shared)
        quad = torch.minimum(quad, sig * rn.norm(dim=-1)[:, None] * rn2.norm(dim=-1)[None] * _OUT)
    e1 = torch.einsum("hic,hjce->hije", s, B).abs()                          # |B_j^T s_i|: (H, T, Tk, d')
    e1 = (e1 * rn2).sum(-1)
    e2 = torch.einsum("hjc,hicd->hijd", t, A).abs()                          # |A_i^T t_j|: (H, T, Tk, d)
    e2 = (e2 * rn[:, None, :]).sum(-1)
    bil = quad + e1 + e2 + (s @ t.transpose(-1, -2)).abs()
    rx, ry = x_box.radius, y_box.radius
    if ex is not None or ey is not None:
        zx = torch.zeros_like(rx) if ex is None else ex
        zy = torch.zeros_like(ry) if ey is None else ey
        bil = bil + zx @ ry.transpose(-1, -2) + (rx + zx) @ zy.transpose(-1, -2)
    bil = bil * _OUT
    box = rx @ ry.transpose(-1, -2)
    bil = torch.where(torch.isnan(bil), torch.full_like(bil, math.inf), bil)
    return torch.minimum(box, bil)
