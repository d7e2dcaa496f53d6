"""Primitive ops: exact forward functions and facts as data.

Every op in a :class:`gamma.graph.Graph` has an entry in :data:`FORWARD`.
Ops whose map is affine in their bounded inputs also have an
:class:`Affine` entry in :data:`AFFINE`, giving the linear part, its
transpose (for backward bound propagation), the linear part with absolute
values (for interval radii) and the constant offset.  Bound methods get
every affine op for free from these four functions.

All functions accept extra leading batch dimensions ``(..., *shape)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import ops_tensor as ot
from .errors import GammaError

Tensor = torch.Tensor


# ---------------------------------------------------------------- helpers
def rotate_half(x: Tensor) -> Tensor:
    """(..., dh) -> (..., dh): [-x2, x1] as in HF's rotate_half."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_half_abs(x: Tensor) -> Tensor:
    """|rotate_half| applied to a non-negative tensor: the permutation only."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], x[..., :h]), dim=-1)


def rope_T(lam: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Transpose of ``x cos + rotate_half(x) sin`` applied to lam, in three passes:
    ``[lam1 cos1 + lam2 sin2, lam2 cos2 - lam1 sin1]`` (halves of the last dim)."""
    h = lam.shape[-1] // 2
    out = lam * cos                                  # cos, sin: the node's tables (T, d)
    out[..., :h].addcmul_(lam[..., h:], sin[..., h:])
    out[..., h:].addcmul_(lam[..., :h], sin[..., :h], value=-1)
    return out


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(..., T, H*dh) -> (..., H, T, dh)."""
    *lead, t, hd = x.shape
    return x.reshape(*lead, t, heads, hd // heads).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(..., H, T, dh) -> (..., T, H*dh)."""
    *lead, h, t, dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, t, h * dh)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(..., Hkv, T, dh) -> (..., Hkv*n_rep, T, dh); head h reads kv head h // n_rep."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=-3)


def repeat_kv_T(lam: Tensor, n_rep: int) -> Tensor:
    """Transpose of repeat_kv: sum each group of n_rep heads."""
    if n_rep == 1:
        return lam
    *lead, h, t, dh = lam.shape
    g = lam.reshape(*lead, h // n_rep, n_rep, t, dh)
    out = g.select(-3, 0) + g.select(-3, 1)          # slice adds: ~2x faster than .sum(-3) on CPU
    for i in range(2, n_rep):
        out += g.select(-3, i)
    return out


def _conv1d(x: Tensor, w: Tensor, b: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """x (..., C_in, L) -> (..., C_out, L')."""
    lead = x.shape[:-2]
    y = F.conv1d(x.reshape(-1, *x.shape[-2:]), w, b, stride=stride, padding=padding)
    return y.reshape(*lead, *y.shape[-2:])


def _conv1d_T(lam: Tensor, w: Tensor, stride: int, padding: int, in_len: int) -> Tensor:
    """Transpose of the conv's linear part: (..., C_out, L') -> (..., C_in, in_len).

    One GEMM ``(N L', C_out) @ (C_out, C_in K)`` gives every tap's contribution,
    then K strided adds place tap k of output position i at input position
    ``i stride + k - padding`` (positions in the padding are dropped): 2-3x the
    speed of ``conv_transpose1d`` in float64, which every CROWN pass of a whole
    Whisper encoder ends with (the stem)."""
    c_out, c_in, k_taps = w.shape
    lead = lam.shape[:-2]
    lam2 = lam.reshape(-1, *lam.shape[-2:])                         # (N, C_out, L')
    n, out_len = lam2.shape[0], lam2.shape[-1]
    cols = torch.matmul(lam2.transpose(1, 2), w.reshape(c_out, c_in * k_taps))
    cols = cols.view(n, out_len, c_in, k_taps)                      # (N, L', C_in, K)
    span = (out_len - 1) * stride + 1
    full = lam2.new_zeros(n, max(span + k_taps - 1, padding + in_len), c_in)   # padded input positions
    for k in range(k_taps):
        full[:, k:k + span:stride] += cols[..., k]
    y = full[:, padding:padding + in_len].transpose(1, 2)          # (N, C_in, in_len)
    return y.reshape(*lead, c_in, in_len)


def softmax_masked(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim; masked-out positions (mask False) are exactly 0."""
    if mask is None:
        return torch.softmax(x, dim=-1)
    x = x.masked_fill(~mask, float("-inf"))
    return torch.softmax(x, dim=-1)


def layernorm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    c = x - mu
    var = (c * c).mean(-1, keepdim=True)
    return c * torch.rsqrt(var + eps) * w + b


def rmsnorm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    var = (x * x).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * w


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------- forward table
def _p(node, k):
    return node.params[k]


FORWARD: dict[str, Callable] = {
    "linear": lambda n, x: F.linear(x, _p(n, "weight"), n.params.get("bias")),
    "conv1d": lambda n, x: _conv1d(x, _p(n, "weight"), n.params.get("bias"), _p(n, "stride"), _p(n, "padding")),
    "transpose": lambda n, x: x.transpose(-1, -2),
    "add": lambda n, x, y: x + y,
    "add_const": lambda n, x: x + _p(n, "c"),
    "mul_const": lambda n, x: x * _p(n, "c"),
    "split_heads": lambda n, x: split_heads(x, _p(n, "heads")),
    "merge_heads": lambda n, x: merge_heads(x),
    "repeat_kv": lambda n, x: repeat_kv(x, _p(n, "n_rep")),
    "rope": lambda n, x: x * _p(n, "cos") + rotate_half(x) * _p(n, "sin"),
    "matmul_const": lambda n, x: torch.matmul(x, _p(n, "c")),
    "gelu": lambda n, x: gelu(x),
    "gelu_tanh": lambda n, x: gelu_tanh(x),
    "silu": lambda n, x: F.silu(x),
    "mul": lambda n, x, y: x * y,
    "matmul": lambda n, x, y: torch.matmul(x, y.transpose(-1, -2)),   # (.., T, a) @ (.., S, a)^T
    "softmax": lambda n, x: softmax_masked(x, n.params.get("mask")),
    "layernorm": lambda n, x: layernorm(x, _p(n, "weight"), _p(n, "bias"), _p(n, "eps")),
    "rmsnorm": lambda n, x: rmsnorm(x, _p(n, "weight"), _p(n, "eps")),
    # imported graphs (gamma.io.onnx_load): tensor plumbing, conv2d and relu (gamma.ops_tensor)
    "conv2d": lambda n, x: _conv2d(n, x, n.params.get("bias")),
    "permute": lambda n, x: ot.permute(x, _p(n, "perm")),
    "reshape": lambda n, x: ot.reshape(x, _p(n, "in_shape"), _p(n, "shape")),
    "slice": lambda n, x: ot.slice_axis(x, _p(n, "axis"), _p(n, "start"), _p(n, "stop"), _p(n, "step")),
    "concat": lambda n, *xs: ot.concat(xs, _p(n, "pieces"), _p(n, "axis")),
    "reduce_mean": lambda n, x: ot.reduce_mean(x, _p(n, "axes"), _p(n, "keepdim")),
    "relu": lambda n, x: F.relu(x),
}

ELEMENTWISE = {"gelu", "gelu_tanh", "silu", "relu"}
COPY = {"permute", "reshape", "slice", "concat"}  # affine, each output entry a copy of one input entry or a constant      # unary, scalar relaxations in bounds.relax
BILINEAR = {"mul", "matmul"}                     # products of two bounded tensors
JACOBIAN = {"softmax", "layernorm", "rmsnorm"}   # smooth vector maps, mean-value linearisation


# ---------------------------------------------------------------- affine facts
@dataclass(frozen=True)
class Affine:
    """y = lin(x1, x2, ...) + offset, with lin linear in the bounded inputs.

    ``lin(node, *xs)``: the linear part; ``lin_T(node, lam, in_shapes)``: its
    transpose, returning one cotangent per input; ``lin_abs(node, *rs)``: the
    linear part with every coefficient replaced by its absolute value,
    applied to non-negative tensors (radii); ``offset(node)``: the constant
    term or None.
    """
    lin: Callable
    lin_T: Callable
    lin_abs: Callable
    offset: Callable


def _none(node):
    return None


def _sum_to(lam: Tensor, shape: tuple) -> Tensor:
    """Sum a broadcasted cotangent back to ``shape`` (trailing dims)."""
    extra = lam.dim() - len(shape)
    dims = [extra + i for i, s in enumerate(shape) if s == 1 and lam.shape[extra + i] != 1]
    return lam.sum(dims, keepdim=True) if dims else lam


SPARSE_ROWS_BELOW = 0.9   # row-compacted product when fewer rows than this fraction are non-zero


def matmul_sparse_rows(lam: Tensor, w: Tensor, compute: Optional[torch.dtype] = None, sparse: bool = True) -> Tensor:
    """``lam @ w`` for lam (.., n) and w (n, m), skipping all-zero rows of lam.

    CROWN cotangents are mostly zero rows: a spec row at token t touches only
    token t until attention mixes tokens, and only tokens <= t after a causal
    one.  The product of the non-zero rows is scattered into zeros, so the
    result equals the dense product while the flops follow the non-zeros.
    ``compute``: the dtype of the product (w's); only the live rows are
    converted to it, and the result comes back in lam's dtype.  ``sparse=False``:
    one dense product (the caller knows lam has few zero rows).
    """
    cast = (lambda t: t) if compute is None or compute == lam.dtype else (lambda t: t.to(compute))
    back = (lambda t: t) if compute is None or compute == lam.dtype else (lambda t: t.to(lam.dtype))
    if not sparse:
        return back(torch.matmul(cast(lam), w))
    flat = lam.reshape(-1, lam.shape[-1])                       # (R, n)
    live = flat.abs().amax(-1) != 0                             # NaN counts as non-zero; 3x faster than != 0 .any
    k = int(live.sum())
    if k >= SPARSE_ROWS_BELOW * flat.shape[0]:
        return back(torch.matmul(cast(lam), w))
    idx = live.nonzero().squeeze(1)
    out = flat.new_zeros(flat.shape[0], w.shape[-1])            # (R, m)
    if k:
        out.index_copy_(0, idx, back(cast(flat.index_select(0, idx)) @ w))
    return out.reshape(*lam.shape[:-1], w.shape[-1])


AFFINE: dict[str, Affine] = {
    "linear": Affine(
        lin=lambda n, x: torch.matmul(x, _p(n, "weight").T),
        lin_T=lambda n, lam, shapes: (matmul_sparse_rows(lam, _p(n, "weight")),),
        lin_abs=lambda n, r: torch.matmul(r, _p(n, "weight").abs().T),
        offset=lambda n: n.params.get("bias"),
    ),
    "conv1d": Affine(
        lin=lambda n, x: _conv1d(x, _p(n, "weight"), None, _p(n, "stride"), _p(n, "padding")),
        lin_T=lambda n, lam, shapes: (_conv1d_T(lam, _p(n, "weight"), _p(n, "stride"), _p(n, "padding"), shapes[0][-1]),),
        lin_abs=lambda n, r: _conv1d(r, _p(n, "weight").abs(), None, _p(n, "stride"), _p(n, "padding")),
        offset=lambda n: None if n.params.get("bias") is None else n.params["bias"][:, None],
    ),
    "transpose": Affine(
        lin=lambda n, x: x.transpose(-1, -2),
        lin_T=lambda n, lam, shapes: (lam.transpose(-1, -2),),
        lin_abs=lambda n, r: r.transpose(-1, -2),
        offset=_none,
    ),
    "add": Affine(
        lin=lambda n, x, y: x + y,
        lin_T=lambda n, lam, shapes: (lam, lam),
        lin_abs=lambda n, rx, ry: rx + ry,
        offset=_none,
    ),
    "add_const": Affine(
        lin=lambda n, x: x,
        lin_T=lambda n, lam, shapes: (lam,),
        lin_abs=lambda n, r: r,
        offset=lambda n: _p(n, "c"),
    ),
    "mul_const": Affine(
        lin=lambda n, x: x * _p(n, "c"),
        lin_T=lambda n, lam, shapes: (lam * _p(n, "c"),),
        lin_abs=lambda n, r: r * (_p(n, "c").abs() if isinstance(_p(n, "c"), Tensor) else abs(_p(n, "c"))),
        offset=_none,
    ),
    "split_heads": Affine(
        lin=lambda n, x: split_heads(x, _p(n, "heads")),
        lin_T=lambda n, lam, shapes: (merge_heads(lam),),
        lin_abs=lambda n, r: split_heads(r, _p(n, "heads")),
        offset=_none,
    ),
    "merge_heads": Affine(
        lin=lambda n, x: merge_heads(x),
        lin_T=lambda n, lam, shapes: (split_heads(lam, shapes[0][-3]),),
        lin_abs=lambda n, r: merge_heads(r),
        offset=_none,
    ),
    "repeat_kv": Affine(
        lin=lambda n, x: repeat_kv(x, _p(n, "n_rep")),
        lin_T=lambda n, lam, shapes: (repeat_kv_T(lam, _p(n, "n_rep")),),
        lin_abs=lambda n, r: repeat_kv(r, _p(n, "n_rep")),
        offset=_none,
    ),
    "rope": Affine(
        lin=lambda n, x: x * _p(n, "cos") + rotate_half(x) * _p(n, "sin"),
        lin_T=lambda n, lam, shapes: (rope_T(lam, _p(n, "cos"), _p(n, "sin")),),
        lin_abs=lambda n, r: r * _p(n, "cos").abs() + rotate_half_abs(r) * _p(n, "sin").abs(),
        offset=_none,
    ),
    "matmul_const": Affine(
        lin=lambda n, x: torch.matmul(x, _p(n, "c")),
        lin_T=lambda n, lam, shapes: (torch.matmul(lam, _p(n, "c").transpose(-1, -2)),),
        lin_abs=lambda n, r: torch.matmul(r, _p(n, "c").abs()),
        offset=_none,
    ),
}


def _conv2d(n, x, b):
    p = n.params
    return ot.conv2d(x, p["weight"], b, p["stride"], p["padding"], p["dilation"], p["groups"])


def _conv2d_abs(n, r):
    p = n.params
    return ot.conv2d(r, p["weight"].abs(), None, p["stride"], p["padding"], p["dilation"], p["groups"])


def _conv2d_T(n, lam, shapes):
    p = n.params
    return (ot.conv2d_T(lam, p["weight"], p["stride"], p["padding"], p["dilation"], p["groups"], shapes[0][-2:]),)


# lin_abs of the plumbing ops and of the mean is the map itself (coefficients 0, 1 or 1/n)
AFFINE.update({
    "conv2d": Affine(
        lin=lambda n, x: _conv2d(n, x, None),
        lin_T=_conv2d_T,
        lin_abs=_conv2d_abs,
        offset=lambda n: None if n.params.get("bias") is None else n.params["bias"][:, None, None],
    ),
    "permute": Affine(
        lin=FORWARD["permute"],
        lin_T=lambda n, lam, shapes: (ot.permute(lam, ot.inverse_perm(_p(n, "perm"))),),
        lin_abs=FORWARD["permute"],
        offset=_none,
    ),
    "reshape": Affine(
        lin=FORWARD["reshape"],
        lin_T=lambda n, lam, shapes: (ot.reshape(lam, _p(n, "shape"), shapes[0]),),
        lin_abs=FORWARD["reshape"],
        offset=_none,
    ),
    "slice": Affine(
        lin=FORWARD["slice"],
        lin_T=lambda n, lam, shapes: (ot.slice_axis_T(lam, shapes[0], _p(n, "axis"), _p(n, "start"),
                                                      _p(n, "stop"), _p(n, "step")),),
        lin_abs=FORWARD["slice"],
        offset=_none,
    ),
    "concat": Affine(
        lin=lambda n, *xs: ot.concat(xs, _p(n, "pieces"), _p(n, "axis"), zero_consts=True),
        lin_T=lambda n, lam, shapes: ot.concat_T(lam, _p(n, "pieces"), _p(n, "axis"), len(shapes)),
        lin_abs=lambda n, *rs: ot.concat(rs, _p(n, "pieces"), _p(n, "axis"), zero_consts=True),
        offset=lambda n: n.params.get("offset"),
    ),
    "reduce_mean": Affine(
        lin=FORWARD["reduce_mean"],
        lin_T=lambda n, lam, shapes: (ot.reduce_mean_T(lam, shapes[0], _p(n, "axes"), _p(n, "keepdim")),),
        lin_abs=FORWARD["reduce_mean"],
        offset=_none,
    ),
})


def affine_offset(node) -> Optional[Tensor]:
    return AFFINE[node.op].offset(node)


# ---------------------------------------------------------------- evaluation
def forward_op(node, *xs: Tensor) -> Tensor:
    try:
        fn = FORWARD[node.op]
    except KeyError:
        raise GammaError(f"no forward rule for op '{node.op}' (node {node.name})") from None
    return fn(node, *xs)


def evaluate(graph, x: Tensor, keep_all: bool = False, upto: Optional[str] = None):
    """Exact forward pass of ``graph`` at ``x`` (shape ``(..., *input_shape)``).

    Returns the output tensor, or a dict of every node's value when
    ``keep_all``.  Computed in the dtype of ``x`` and of the graph's
    constants (float64 by default: the exact real-valued function up to
    float64 rounding).
    """
    values = {graph.input: x}
    consumers = None if keep_all else _last_use(graph)
    target = upto or graph.output
    for idx, node in enumerate(graph):
        if node.op == "input":
            continue
        values[node.name] = forward_op(node, *(values[i] for i in node.inputs))
        if node.name == target and not keep_all:
            return values[node.name]
        if consumers is not None:
            for i in node.inputs:
                if consumers[i] == idx and i != target:
                    del values[i]
    return values if keep_all else values[target]


def _last_use(graph) -> dict[str, int]:
    last = {}
    for idx, node in enumerate(graph):
        for i in node.inputs:
            last[i] = idx
    return last


def gelu_exact_scalar(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
