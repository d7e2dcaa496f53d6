"""What llama.cpp's CPU backend (ggml) computes beyond a float32 engine: ``--engine llama.cpp``.

The float32 margins (:mod:`.fpmargin`) bound any float32 evaluation of each op.  ggml departs
from that in three places, each bounded here as an extra margin over the node's input box
(:func:`extra`, added to the node's float32 margin by the engine):

* **Linear layers** take their activations in the weight type's ``vec_dot_type``
  (:mod:`gamma.io.ggml`).  Per block b of 32 along the row, Q8_0 / Q8_1 keep
  ``x~ = fp16(d) q`` with ``d = amax / 127`` and ``q = round(x / d)``; with ``A_b`` the block's
  largest ``|x|`` over the box and ``D = A_b / 127 (1 + 2U)``,

      |x~ - x| <= 127 e16(D) + D (1/2 + 300 U),    e16(d) = max(2^-11 d, 2^-25)

  (fp16's rounding of d, normal or subnormal; the 300 U covers ``x * (1/d)`` in float32).
  F16 / BF16 round each element: ``e16(|x|)``, ``2^-8 |x| + 2^-133``.  A Q8_1 block also keeps
  ``s = fp16(fl(d sum q))``, which the dot multiplies by the weight block's minimum m (Q4_1,
  Q5_1: ``w = d_w q_w + m``), and ``|s - fp16(d) sum q| <= e16(4064 D') + 4064 (U D + e16(D))``,
  ``D' = D (1 + U)``.  The products then run as integer block sums (exact), scaled and added
  in float32 in any order (SIMD lanes, FMA), and the dequantized weights we hold differ from
  ``d q + m`` by a rounding: all of it within ``gamma_{n+n/32+4} S`` with
  ``S = sum (|w| + |m|) (|x| + |x~ - x|) + sum_b |m_b| |s_b| + |b|``.  So the extra margin is
  ``sum_j |w_j| |x~_j - x_j| + sum_b |m_b| |s err_b| + gamma_{n+n/32+4} S``, its known signed part
  (each element's shift where the box pins it) returned apart as an offset.  An fp16 overflow
  (``d`` or ``s`` past 65504) makes it infinite.
* **Attention's products** read an F16 KV cache (the default; without flash attention): q and k
  in q k^T, the probabilities and v in attention @ V are rounded to F16, so each product moves
  by ``e16(|x|) (|y| + e16(|y|)) + |x| e16(|y|)``, summed along the inner axis (the float32
  sums stay in the float32 margin, which a product of F16 values does not exceed).
* **RMSNorm** (``ggml_rms_norm``): each square in float32, their sum in double, the mean rounded
  to float32, then ``1 / sqrtf(mean + eps)`` and the two products in float32.  So the mean of
  squares is within ``2 U (1 + U) + (n + 2) 2^-52`` of its value, relative (the terms are
  non-negative), against the ``gamma_n``-sized bound that any float32 summation order needs:
  :data:`RMS_SUMS`, which the engine passes to the norm's margin (:mod:`.fpmargin`) in place of it.
* **RoPE's tables**: ggml computes ``theta_i = p theta_scale^i`` by i float32 products with
  ``theta_scale = powf(base, -2 / d)`` and takes cosf / sinf of it; transformers' float32 table
  holds cos / sin of ``p inv_freq_i``.  Both are within ``(3i + 26) U`` of the exact angle,
  relative, so each table entry differs by at most ``theta (3i + 26) U (1 + 2^-6) + 2^-22``
  (two library roundings of at most one ulp of a value <= 1); the rotation's output by that
  times ``|x| + |rotate_half(x)|``.

Not covered and said so in the README: flash attention (its V accumulation in F16), a
quantized KV cache, ggml's SIMD exp in SiLU beyond the ulp accuracy the SiLU margin allows.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import ops
from ..errors import GammaError
from ..io.ggml import BLOCK, activation_type
from .fp import dot_error_signed, gamma
from .fpprob import NormSums

U = 2.0 ** -24
F16_MAX = 65504.0
F16_REL, F16_SUB = 2.0 ** -11, 2.0 ** -25        # half an ulp of fp16: relative (normal), absolute (subnormal)
BF16_REL, BF16_SUB = 2.0 ** -8, 2.0 ** -133
Q8_MAX = 127.0
Q8_1_SUM = 32 * 127.0                            # |sum q| of a Q8_1 block


def _e16(a: torch.Tensor) -> torch.Tensor:
    """|fp16(v) - v| for every |v| <= a (inf where fp16 may overflow)."""
    e = torch.maximum(F16_REL * a, torch.full_like(a, F16_SUB))
    return torch.where(a < F16_MAX, e, torch.full_like(a, math.inf))


def _blocks(a: torch.Tensor, size: int) -> torch.Tensor:
    """(.., n) -> (.., n / size): the largest entry of each block of ``size`` along the last axis."""
    return a.reshape(*a.shape[:-1], a.shape[-1] // size, size).amax(-1)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of nonnegative factors, inf where an inf entry meets a zero (never NaN), with a
    float64 pad outward."""
    return torch.nan_to_num(a @ b, nan=math.inf) * (1 + 2.0 ** -40)


def _spread(b: torch.Tensor, size: int) -> torch.Tensor:
    """(.., n / size) -> (.., n): each block's value on each of its elements."""
    return b.repeat_interleave(size, dim=-1)


def activation_error(a: torch.Tensor, act: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(|x~ - x| per element (.., n), |s - fp16(d) sum q| per block (.., n / 32) or None)`` for
    every float32 x with ``|x| <= a`` converted to ``act`` as ggml converts it."""
    if act == "F16":
        return _e16(a), None
    if act == "BF16":
        return BF16_REL * a + BF16_SUB, None
    size = BLOCK[act]
    if a.shape[-1] % size:
        raise GammaError(f"--engine llama.cpp: a row of {a.shape[-1]} activations is not a whole number of "
                         f"{act} blocks of {size}")
    d = _blocks(a, size) / Q8_MAX * (1 + 2 * U)                    # each block's scale, at most
    per = Q8_MAX * _e16(d) + d * (0.5 + 300 * U)
    s = None
    if act == "Q8_1":
        s = _e16(Q8_1_SUM * d * (1 + U)) + Q8_1_SUM * (U * d + _e16(d))
    return _spread(per, size), s


def _to_f16(d: torch.Tensor) -> torch.Tensor:
    """fp16(fl32(d)) in float64 (round to nearest even, as ggml's conversion; inf past fp16's range).
    Rounding is monotone, so for bounds ``d_lo <= d <= d_hi`` of a float32 d this bounds fp16(d)."""
    lo32 = d.to(torch.float32)
    return lo32.to(torch.float16).to(torch.float64)


def q8_error(x, act: str, dx: torch.Tensor, ds: Optional[torch.Tensor] = None) -> tuple:
    """``(lo, hi, s, held)``: lo, hi (.., n) the range of ``x~ - x`` over the box ``x`` (an Interval) for
    Q8_0 / Q8_1, within ``[-dx, dx]`` (:func:`activation_error`'s bound); s (.., n / 32) for Q8_1
    (else None) ``(centre, radius)`` (.., n / 32) of ``s - fp16(d) sum q`` over the box (the radius
    within ``ds``), by interval arithmetic on the scales and integer sums the box allows; held
    ``(lo, hi)`` (.., n) the range of x~ itself.  Where the box is narrow next to the
    block's step d, few elements can cross a rounding boundary: x~ = fp16(d) q then stays within
    the hull of ``fp16(d) q`` over the scales and integers the box allows, and ``x~ - x`` within
    that hull less x's range.  The known signed shift of each element then cancels in ``W (x~ - x)``
    as the worst-case ``|W| dx`` cannot."""
    lo, hi = x.lower, x.upper
    a = torch.maximum(lo.abs(), hi.abs())
    near = torch.where((lo > 0) | (hi < 0), torch.minimum(lo.abs(), hi.abs()), torch.zeros_like(lo))
    d_lo = _spread(_blocks(near, 32), 32) / Q8_MAX * (1 - 2 * U)     # amax over the box, at least
    d_hi = _spread(_blocks(a, 32), 32) / Q8_MAX * (1 + 2 * U)
    ok = d_lo > 0
    dl = torch.where(ok, d_lo, torch.ones_like(d_lo))
    v_lo = torch.where(lo < 0, lo / dl, lo / d_hi.clamp_min(1e-300)) - 4 * U * Q8_MAX
    v_hi = torch.where(hi > 0, hi / dl, hi / d_hi.clamp_min(1e-300)) + 4 * U * Q8_MAX
    q_lo = torch.ceil(v_lo - 0.5).clamp(-Q8_MAX, Q8_MAX)
    q_hi = torch.floor(v_hi + 0.5).clamp(-Q8_MAX, Q8_MAX)
    s_lo, s_hi = _to_f16(d_lo), _to_f16(d_hi)                       # fp16(d) over the box: it rounds monotonically
    t_lo = torch.minimum(s_lo * q_lo, s_hi * q_lo)
    t_hi = torch.maximum(s_lo * q_hi, s_hi * q_hi)
    e_lo = torch.where(ok, torch.maximum(-dx, t_lo - hi), -dx)
    e_hi = torch.where(ok, torch.minimum(dx, t_hi - lo), dx)
    # x~ itself over the box: the hull above, or x's range +- dx where the scale is not bounded below
    held = (torch.where(ok, torch.maximum(t_lo, lo - dx), lo - dx), torch.where(ok, torch.minimum(t_hi, hi + dx), hi + dx))
    s = None
    if ds is not None:                 # s - fp16(d) sum q over the box's scales and integer sums, by intervals
        Q_lo, Q_hi = _sum32(q_lo), _sum32(q_hi)
        dl, dh = _blocks(d_lo, 32), _blocks(d_hi, 32)
        p = torch.stack([dl * Q_lo, dl * Q_hi, dh * Q_lo, dh * Q_hi])
        pad = 2.0 ** -50 * p.abs().amax(0)                           # float64 products, outward
        s16_lo, s16_hi = _to_f16(p.amin(0) - pad), _to_f16(p.amax(0) + pad)   # fp16(fl32(d sum q)): monotone
        t = torch.stack([_blocks(s_lo, 32) * Q_lo, _blocks(s_lo, 32) * Q_hi, _blocks(s_hi, 32) * Q_lo,
                         _blocks(s_hi, 32) * Q_hi])
        g_lo, g_hi = s16_lo - t.amax(0), s16_hi - t.amin(0)
        qs = torch.maximum(Q_lo.abs(), Q_hi.abs())                   # or by sizes: |sum q| at most qs
        # |fp16(d) - d| over the box's scales: from fp16(d)'s range, or (where d's range is wide) its rounding
        gap = torch.minimum(torch.maximum((_blocks(s_hi, 32) - dl).abs(), (dh - _blocks(s_lo, 32)).abs()), _e16(dh))
        by_size = _e16(dh * qs * (1 + U)) + U * dh * qs + gap * qs
        narrow = (_blocks(ok.to(dl.dtype), 32) > 0) & ((g_hi - g_lo) / 2 <= by_size)
        s = (torch.where(narrow, (g_lo + g_hi) / 2, torch.zeros_like(ds)),
             torch.minimum(torch.where(narrow, (g_hi - g_lo) / 2, by_size), ds))
    return e_lo, torch.maximum(e_hi, e_lo), s, held


def _sum32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // 32, 32).sum(-1)


def _linear(node, ins):
    wtype = node.params.get("ggml_type")
    act = activation_type(wtype, node.name) if wtype is not None else None
    if act is None:
        return None                               # float32 weights: float32 activations, the float32 margin
    a = ins[0].abs_max()                                           # (.., n)
    w = node.params["weight"]
    dx, ds = activation_error(a, act)
    m = node.params.get("ggml_minima")                             # (out, n / 32) or None
    shift = walk = None
    if act in ("Q8_0", "Q8_1"):                                    # the conversion: its signed shift, and a spread
        e_lo, e_hi, s_err, (h_lo, h_hi) = q8_error(ins[0], act, dx, ds if m is not None else None)
        e_c, e_r = (e_lo + e_hi) / 2, (e_hi - e_lo) / 2
        h_c, h_r = (h_lo + h_hi) / 2, (h_hi - h_lo) / 2
        s_c = 0.0
        if m is not None:                                          # Q8_1's s, times each block's minimum
            s_c = s_err[0] @ m.T
            ds = s_err[1]
        shift = e_c @ w.T + s_c
        out = shift.abs() * 2.0 ** -40 + _mm(e_r, w.abs().T)      # (the shift's float64 rounding)
        # Where x~'s own range is no wider than x~ - x's, the walk takes x~ as a constant (slope 0):
        # what the box allows of x then never reaches the layer, where slope 1 passes it through W.
        keep = ~(h_r <= e_r)                                       # (.., n) True: x~ = x + e (slope 1)
        if not bool(keep.all()):
            w_shift = torch.where(keep, e_c, h_c) @ w.T + s_c
            w_out = w_shift.abs() * 2.0 ** -40 + _mm(torch.where(keep, e_r, h_r), w.abs().T)
            walk = (keep, w_shift, w_out)
    else:
        out = _mm(dx, w.abs().T)
    xs = a + dx
    size = w.abs()
    tail = 0.0
    if m is not None:
        m = m.abs()
        size = size + _spread(m, 32)
        tail = _mm(ds, m.T)
    s = _mm(xs, size.T)
    if m is not None:
        s = s + _mm(_sum32(xs) + ds, m.T)                          # |s| <= sum |x~| (+ its own rounding)
    b = node.params.get("bias")
    if b is not None:
        s = s + b.abs()
    n = w.shape[1]
    # at most n integer pieces and n / 32 pieces m s, each rounded at most 3 times, summed in any order;
    # this bounds the whole float32 evaluation of the pieces, so it replaces the node's float32 margin
    # or by the pieces' cancellation (fp.dot_error_signed's lemma: every partial sum is a subset sum of the
    # pieces, within max(P, N) = (S + |sum|) / 2): each piece is one rounding of an exact integer block sum
    # times a scale (or an exact product of F16 / BF16 values), and 4 more roundings of size S cover the
    # weights we hold against d q + m, the bias add and two spare; |sum| from x's box, the conversion and
    # Q8_1's sums
    val = (ins[0].center @ w.T).abs() + _mm(ins[0].radius, w.abs().T) + out + tail
    if shift is not None:
        val = val + shift.abs()
    if b is not None:
        val = val + b.abs()
    val = torch.nan_to_num(val + U * s, nan=math.inf)             # (+ the weights we hold against d q + m)
    pieces = torch.minimum(gamma(n + n // 32 + 4) * s, dot_error_signed(s, val, n + n // 32, extra=4))
    tail = tail + pieces + n * 2.0 ** -126                         # (a BF16 dot instruction flushes subnormals)
    if shift is not None and not bool(torch.isfinite(shift).all()):
        return Extra(None, out + tail + shift.abs(), own=True)
    if walk is not None:
        keep, w_shift, w_out = walk
        walk = (keep, w_shift, w_out + tail) if bool(torch.isfinite(w_shift).all()) else None
    return Extra(shift, out + tail, own=True, walk=walk)


def _matmul(node, ins) -> torch.Tensor:
    """Both sides rounded to F16 (the KV cache's type, and the vec_dot type of an F16 cache)."""
    x, y = ins[0].abs_max(), ins[1].abs_max()                      # (.., T, a), (.., S, a)
    ex, ey = _e16(x), _e16(y)
    yt = lambda v: v.transpose(-1, -2)
    moved = _mm(ex, yt(y + ey)) + _mm(x, yt(ey))
    # and the float32 margin's growth from |x| |y| to |x~| |y~| (at most moved's size times gamma)
    return moved * (1 + gamma(x.shape[-1] + 2))


def _rope(node, ins) -> torch.Tensor:
    """ggml's RoPE angles against the graph's float32 tables."""
    cos, sin = node.params["cos"], node.params["sin"]              # (T, dh)
    T, dh = cos.shape
    half = dh // 2
    if T < 2:
        return torch.zeros_like(ins[0].lower)                      # position 0: cos 1, sin 0 exactly
    freq = torch.atan2(sin[1].abs(), cos[1]) * (1 + 2.0 ** -20) + 2.0 ** -40   # p = 1: the angle itself (< pi)
    i = torch.arange(dh, dtype=cos.dtype, device=cos.device) % half
    pos = torch.arange(T, dtype=cos.dtype, device=cos.device)[:, None]
    d = pos * freq * (3 * i + 26) * U * (1 + 2.0 ** -6) + 2.0 ** -22          # (T, dh)
    a = ins[0].abs_max()
    return (a + ops.rotate_half_abs(a)) * d


RULES = {"linear": _linear, "matmul": _matmul, "rope": _rope}


def _rms_relative(n: int) -> float:
    """ggml's mean of n squares against the exact one, relative: the squares (U each, all of one
    sign), the double sum and division ((n + 1) 2^-53, padded), the cast to float32 (U)."""
    return 2 * U * (1 + U) + (n + 2) * 2.0 ** -52


def _rms_tree(t: torch.Tensor) -> torch.Tensor:
    return _rms_relative(t.shape[-1]) * t.sum(-1, keepdim=True) * (1 + 2.0 ** -40)


# how ggml's RMSNorm sums its row (fpmargin's ``sums``; every form a deterministic bound)
RMS_SUMS = NormSums(_rms_relative, _rms_relative, _rms_tree, _rms_tree)


class Extra(NamedTuple):
    """Where ggml's value of a node lies beyond the real function's, as :func:`extra` finds it."""
    offset: Optional[torch.Tensor]    # a known signed shift (node shape; the Q8 conversions'), or None
    margin: torch.Tensor              # (node shape) symmetric, about the offset
    own: bool = False                 # the margin bounds the node's whole float32 evaluation too: it
                                      # replaces the float32 margin (else it adds to it)
    walk: Optional[tuple] = None      # ``(keep, offset, margin)``: the form the CROWN walk charges, with
                                      # the linear layer's input elements where ``keep`` (.., n) is False
                                      # taken as constants (slope 0), their range inside offset +- margin


def extra(node, ins) -> Optional[Extra]:
    """What ggml computes at ``node`` beyond the real function (None where nothing beyond the float32
    margin): ggml's value lies within ``offset +- margin`` of the real function's (plus the float32
    margin unless ``own``); the engine centres the node's box on the offset.  With ``walk``, also
    within ``W (keep x) + b + offset +- margin`` of that form."""
    rule = RULES.get(node.op)
    if rule is None:
        return None
    out = rule(node, ins)
    return out if out is None or isinstance(out, Extra) else Extra(None, out)


def check(graph) -> None:
    """GammaError unless every linear node of ``graph`` whose weight came from a GGUF file in a type
    other than F32 (the type is on the node: :meth:`Weights.ggml`) has a modelled activation path.
    (A graph from another format has no such nodes: :func:`gamma.io.ggml.check_checkpoint` refuses it
    where the user's model is known.)"""
    for node in graph:
        if node.op == "linear" and "ggml_type" in node.params:
            activation_type(node.params["ggml_type"], node.name)
