"""Tensor-plumbing ops of imported graphs (ONNX): conv2d, permute, reshape,
slice, concat with constant pieces and reduce_mean.

Each op is a forward function and the transpose of its linear part; the
rule records (``FORWARD`` / ``AFFINE`` entries) live in :mod:`gamma.ops`.
A node's shape is the whole tensor shape of the imported graph (batch axis
of 1 included), and every function accepts extra leading batch dimensions:
a value is ``(*lead, *node.shape)``, a CROWN cotangent ``(S, *node.shape)``,
a zonotope's generators ``(n, *node.shape)``.  Axes in node parameters are
negative (counted from the right), so leading dimensions never shift them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _lead(x: Tensor, rank: int) -> tuple:
    """The extra leading dims of ``x`` in front of a node value of ``rank`` dims."""
    return tuple(x.shape[:x.dim() - rank])


# ---------------------------------------------------------------- conv2d
def conv2d(x: Tensor, w: Tensor, b: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """x (*lead, C_in, H, W) -> (*lead, C_out, H', W'); w (C_out, C_in/groups, kh, kw)."""
    lead = x.shape[:-3]
    y = F.conv2d(x.reshape(-1, *x.shape[-3:]), w, b, stride=stride, padding=padding, dilation=dilation,
                 groups=groups)
    return y.reshape(*lead, *y.shape[-3:])


def conv2d_T(lam: Tensor, w: Tensor, stride, padding, dilation, groups: int, in_hw) -> Tensor:
    """Transpose of conv2d's linear part: (*lead, C_out, H', W') -> (*lead, C_in, *in_hw).
    ``output_padding`` restores the input rows / columns the stride skips."""
    lead = lam.shape[:-3]
    lam2 = lam.reshape(-1, *lam.shape[-3:])
    out_pad = []
    for i in range(2):
        natural = ((lam2.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[-2 + i] - 1) + 1)
        out_pad.append(in_hw[i] - natural)
    y = F.conv_transpose2d(lam2, w, stride=stride, padding=padding, output_padding=tuple(out_pad), groups=groups,
                           dilation=dilation)
    return y.reshape(*lead, *y.shape[-3:])


# ---------------------------------------------------------------- permute / reshape
def permute(x: Tensor, perm: Sequence[int]) -> Tensor:
    """Permute the trailing ``len(perm)`` axes (ONNX Transpose)."""
    k = x.dim() - len(perm)
    return x.permute(*range(k), *(k + p for p in perm))


def inverse_perm(perm: Sequence[int]) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def reshape(x: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """(*lead, *in_shape) -> (*lead, *out_shape) in row-major order (ONNX Reshape)."""
    return x.reshape(*_lead(x, len(in_shape)), *out_shape)


# ---------------------------------------------------------------- slice
def _index(dim: int, axis: int, sl: slice) -> tuple:
    idx = [slice(None)] * dim
    idx[dim + axis] = sl
    return tuple(idx)


def slice_axis(x: Tensor, axis: int, start: int, stop: int, step: int) -> Tensor:
    """x[..., start:stop:step, ...] on the (negative) ``axis``; step > 0."""
    return x[_index(x.dim(), axis, slice(start, stop, step))]


def slice_axis_T(lam: Tensor, in_shape: Sequence[int], axis: int, start: int, stop: int, step: int) -> Tensor:
    """Transpose of :func:`slice_axis`: lam scattered into zeros of the input shape."""
    out = lam.new_zeros(*_lead(lam, len(in_shape)), *in_shape)
    out[_index(out.dim(), axis, slice(start, stop, step))] = lam
    return out


# ---------------------------------------------------------------- concat
# pieces: ((k, size, const), ...) in order along the axis: input k (const None)
# or a constant tensor (k = -1) of the node's rank, broadcast to the leading dims
def concat(xs: Sequence[Tensor], pieces, axis: int, zero_consts: bool = False) -> Tensor:
    """Concatenate inputs and constants along (negative) ``axis``; ``zero_consts``:
    zeros in place of the constants (the linear part)."""
    ref = xs[0]
    parts = []
    for k, _, const in pieces:
        if const is None:
            parts.append(xs[k])
            continue
        c = torch.zeros_like(const) if zero_consts else const
        parts.append(c.to(dtype=ref.dtype, device=ref.device).expand(*_lead(ref, const.dim()), *const.shape))
    return torch.cat(parts, dim=axis)


def concat_T(lam: Tensor, pieces, axis: int, n_inputs: int) -> tuple:
    """Transpose of concat's linear part: each input's slab of lam, in input order."""
    out: list = [None] * n_inputs
    pos = 0
    for k, size, _ in pieces:
        if k >= 0:
            out[k] = lam.narrow(lam.dim() + axis, pos, size)
        pos += size
    return tuple(out)


def concat_offset(pieces, axis: int, out_shape: Sequence[int]) -> Optional[Tensor]:
    """The constant part of a concat (zeros in the input slabs), or None without constants."""
    if all(const is None for _, _, const in pieces):
        return None
    parts = []
    for k, size, const in pieces:
        if const is None:
            shape = list(out_shape)
            shape[len(shape) + axis] = size
            parts.append(torch.zeros(shape, dtype=torch.float64))
        else:
            parts.append(const.to(torch.float64))
    return torch.cat(parts, dim=axis)


# ---------------------------------------------------------------- reduce_mean
def reduce_mean(x: Tensor, axes: Sequence[int], keepdim: bool) -> Tensor:
    """Mean over the (negative) ``axes``."""
    return x.mean(dim=tuple(axes), keepdim=keepdim)


def reduce_mean_T(lam: Tensor, in_shape: Sequence[int], axes: Sequence[int], keepdim: bool) -> Tensor:
    """Transpose of the mean: lam spread evenly (1/n) over the reduced axes."""
    r = len(in_shape)
    kept = [1 if (i - r) in axes else s for i, s in enumerate(in_shape)]     # in_shape, 1 on reduced axes
    n = 1
    for a in axes:
        n *= in_shape[a]
    out_rank = r if keepdim else r - len(axes)
    lead = _lead(lam, out_rank)
    return (lam.reshape(*lead, *kept) / n).expand(*lead, *in_shape)
