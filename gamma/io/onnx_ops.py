"""ONNX op rules for :mod:`.onnx_load`: constant folding and graph building.

Two tables, one rule per ONNX op type:

* :data:`FOLD`: every input constant -> the constant outputs (torch tensors);
* :data:`BUILD`: some input is a gamma node -> gamma nodes (added with
  ``b.emit``) or constants (``Shape`` of a node is its known shape).

A value is a ``torch.Tensor`` (constant) or a ``str`` (gamma node name);
``None`` stands for an omitted optional input.  An op type with no rule is
an error naming the op and the node.  Axes are made negative before they
reach a gamma node (leading batch dims never shift them); ONNX semantics
follow the model's opset where they changed (Softmax axis, Slice / Squeeze /
Unsqueeze / ReduceMean axes as attributes or inputs).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import GammaError
from ..ops_tensor import concat_offset
from .onnx_fold import (FOLD, axes_of, const_arg, ints, neg_axis, reshape_target, slice_args, squeeze_shape,
                        unsqueeze_shape, shape_of)

Tensor = torch.Tensor
SQRT2 = math.sqrt(2.0)


def convert(b, node, args: list) -> list:
    """The values of ``node``'s outputs (a list, one per output)."""
    var = any(isinstance(a, str) for a in args)
    table, kind = (BUILD, "") if var else (FOLD, " on constants")
    rule = table.get(node.op)
    if rule is None:
        raise GammaError(f"{b.path}: unsupported ONNX op '{node.op}'{kind} (node {node.name})")
    out = rule(b, node, args)
    return out if isinstance(out, list) else [out]


# ---------------------------------------------------------------- gamma node helpers
def permute(b, v: str, perm, final=None) -> str:
    perm = tuple(perm)
    r = len(perm)
    if perm == tuple(range(r)):
        return v
    if r >= 2 and perm == tuple(range(r - 2)) + (r - 1, r - 2):
        return b.emit("transpose", [v], final)
    return b.emit("permute", [v], final, perm=perm)


def reshape(b, v: str, shape, final=None) -> str:
    shape = tuple(int(s) for s in shape)
    if shape == b.shape(v):
        return v
    return b.emit("reshape", [v], final, in_shape=b.shape(v), shape=shape)


def _fits(b, v: str, c: Tensor, op: str) -> Tensor:
    """A constant operand that broadcasts to the node's shape without growing it."""
    shape = b.shape(v)
    try:
        out = torch.broadcast_shapes(shape, tuple(c.shape))
    except RuntimeError:
        raise b.error(f"a constant of shape {tuple(c.shape)} does not broadcast to {shape}") from None
    if tuple(out) != shape:
        raise b.error(f"{op} with a constant of shape {tuple(c.shape)} would grow {shape} to {tuple(out)}")
    if c.dim() > len(shape):
        c = c.reshape(c.shape[c.dim() - len(shape):])
    return c.to(torch.float64)


def _same_shape(b, x: str, y: str, op: str) -> None:
    if b.shape(x) != b.shape(y):
        raise b.error(f"{op} of two inputs with shapes {b.shape(x)} and {b.shape(y)} (broadcasting between "
                      "bounded inputs is not supported)")


# ---------------------------------------------------------------- BUILD rules
def _add(b, n, a):
    x, y = a
    out = n.outputs[0]
    if isinstance(x, str) and isinstance(y, str):
        _same_shape(b, x, y, "Add")
        return b.emit("add", [x, y], out)
    v, c = (x, y) if isinstance(x, str) else (y, x)
    return b.emit("add_const", [v], out, c=_fits(b, v, c, "Add"))


def _sub(b, n, a):
    x, y = a
    out = n.outputs[0]
    if isinstance(x, str) and isinstance(y, str):
        _same_shape(b, x, y, "Sub")
        return b.emit("add", [x, b.emit("mul_const", [y], c=-1.0)], out)
    if isinstance(x, str):
        return b.emit("add_const", [x], out, c=-_fits(b, x, y, "Sub"))
    neg = b.emit("mul_const", [y], c=-1.0)
    return b.emit("add_const", [neg], out, c=_fits(b, y, x, "Sub"))


def _mul(b, n, a):
    x, y = a
    out = n.outputs[0]
    if isinstance(x, str) and isinstance(y, str):
        _same_shape(b, x, y, "Mul")
        return b.emit("mul", [x, y], out)
    v, c = (x, y) if isinstance(x, str) else (y, x)
    return b.emit("mul_const", [v], out, c=_fits(b, v, c, "Mul"))


def _div(b, n, a):
    x, y = a
    if not isinstance(x, str) or isinstance(y, str):
        raise b.error("division by a bounded tensor is not supported (only division by a constant)")
    c = _fits(b, x, y, "Div")
    if bool((c == 0).any()):
        raise b.error("division by zero")
    return b.emit("mul_const", [x], n.outputs[0], c=1.0 / c)       # 1/c rounded once, in float64


def _neg_rule(b, n, a):
    return b.emit("mul_const", [a[0]], n.outputs[0], c=-1.0)


def _matmul(b, n, a):
    x, y = a
    out = n.outputs[0]
    if isinstance(x, str) and isinstance(y, str):
        sx, sy = b.shape(x), b.shape(y)
        if len(sx) < 2 or len(sy) < 2 or sx[:-2] != sy[:-2] or sx[-1] != sy[-2]:
            raise b.error(f"MatMul of bounded inputs with shapes {sx} and {sy} (needs (..., n, k) @ (..., k, m))")
        yt = permute(b, y, tuple(range(len(sy) - 2)) + (len(sy) - 1, len(sy) - 2))
        return b.emit("matmul", [x, yt], out, rows_sum_to_one=b.graph[x].op == "softmax")
    if isinstance(x, str):
        if y.dim() == 2 and len(b.shape(x)) >= 1 and b.shape(x)[-1] == y.shape[0]:
            return b.emit("linear", [x], out, weight=y.T.contiguous().to(torch.float64))
        if y.dim() < 2:
            raise b.error(f"MatMul with a constant of shape {tuple(y.shape)} is not supported")
        return b.emit("matmul_const", [x], out, c=y.to(torch.float64))
    # constant @ node: (x^T y^T)^T
    r = len(b.shape(y))
    sw = tuple(range(r - 2)) + (r - 1, r - 2)
    t = b.emit("matmul_const", [permute(b, y, sw)], c=x.transpose(-1, -2).contiguous().to(torch.float64))
    return permute(b, t, sw, out)


def _gemm(b, n, a):
    x, w = a[0], const_arg(b, a[1], "Gemm's B")
    if not isinstance(x, str) or len(b.shape(x)) != 2:
        raise b.error("Gemm needs a bounded 2-D A and constant B, C")
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    if n.attrs.get("transA", 0):
        x = permute(b, x, (1, 0))
    w = w if n.attrs.get("transB", 0) else w.T                      # (out, in)
    bias = None
    if len(a) > 2 and a[2] is not None:
        c = const_arg(b, a[2], "Gemm's C")
        bias = (beta * c.to(torch.float64)).expand(b.shape(x)[0], w.shape[0])
        if bool((bias == bias[:1]).all()):
            bias = bias[0].contiguous()
        else:
            lin = b.emit("linear", [x], weight=alpha * w.to(torch.float64))
            return b.emit("add_const", [lin], n.outputs[0], c=bias.contiguous())
    return b.emit("linear", [x], n.outputs[0], weight=(alpha * w.to(torch.float64)).contiguous(), bias=bias)


def _conv(b, n, a):
    x, w = a[0], const_arg(b, a[1], "Conv's weight")
    if w.dim() != 4:
        raise b.error(f"only 2-D convolutions are supported (weight of shape {tuple(w.shape)})")
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise b.error(f"auto_pad {n.attrs['auto_pad']} is not supported")
    pads = ints(n.attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise b.error(f"asymmetric pads {pads} are not supported")
    bias = None if len(a) < 3 or a[2] is None else const_arg(b, a[2], "Conv's bias").to(torch.float64)
    return b.emit("conv2d", [x], n.outputs[0], weight=w.to(torch.float64), bias=bias,
                  stride=tuple(ints(n.attrs.get("strides", [1, 1]))), padding=tuple(pads[:2]),
                  dilation=tuple(ints(n.attrs.get("dilations", [1, 1]))), groups=int(n.attrs.get("group", 1)))


def _batchnorm(b, n, a):
    if n.attrs.get("training_mode", 0):
        raise b.error("BatchNormalization in training mode is not supported")
    x = a[0]
    scale, bias, mean, var = (const_arg(b, t, "BatchNormalization's statistics").to(torch.float64) for t in a[1:5])
    eps = float(n.attrs.get("epsilon", 1e-5))
    r = len(b.shape(x))
    s = scale / torch.sqrt(var + eps)                       # y = x s + (bias - mean s), per channel (axis 1)
    t = bias - mean * s
    shape = (-1,) + (1,) * (r - 2)
    m = b.emit("mul_const", [x], c=s.reshape(shape))
    return b.emit("add_const", [m], n.outputs[0], c=t.reshape(shape))


def _layernorm(b, n, a):
    x = a[0]
    r = len(b.shape(x))
    if neg_axis(int(n.attrs.get("axis", -1)), r) != -1:
        raise b.error("LayerNormalization over more than the last axis is not supported")
    d = b.shape(x)[-1]
    w = const_arg(b, a[1], "LayerNormalization's scale").to(torch.float64).expand(d).contiguous()
    bias = a[2] if len(a) > 2 and a[2] is not None else torch.zeros(d)
    bias = const_arg(b, bias, "LayerNormalization's bias").to(torch.float64).expand(d).contiguous()
    if len(n.outputs) > 1 and any(n.outputs[1:]):
        raise b.error("LayerNormalization's mean / inverse std outputs are not supported")
    return b.emit("layernorm", [x], n.outputs[0], weight=w, bias=bias, eps=float(n.attrs.get("epsilon", 1e-5)))


def _softmax(b, n, a):
    x = a[0]
    shape = b.shape(x)
    r = len(shape)
    out = n.outputs[0]
    if b.opset < 13:                # softmax over the flattened axes [axis:]
        axis = int(n.attrs.get("axis", 1)) % r
        if axis == r - 1:
            return b.emit("softmax", [x], out)
        flat = reshape(b, x, shape[:axis] + (math.prod(shape[axis:]),))
        return reshape(b, b.emit("softmax", [flat]), shape, out)
    axis = int(n.attrs.get("axis", -1)) % r
    if axis == r - 1:
        return b.emit("softmax", [x], out)
    perm = [i for i in range(r) if i != axis] + [axis]
    s = b.emit("softmax", [permute(b, x, perm)])
    return permute(b, s, [perm.index(i) for i in range(r)], out)


def _gelu(b, n, a):
    approx = n.attrs.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise b.error(f"Gelu approximate='{approx}' is not supported")
    return b.emit("gelu" if approx == "none" else "gelu_tanh", [a[0]], n.outputs[0])


def _gelu_erf(b, n, a):
    """``0.5 x (1 + erf(s x)) = gelu(k x) / k`` with ``k = sqrt(2) s`` (exact: gelu(z) =
    0.5 z (1 + erf(z / sqrt 2))); k = 1 needs no scaling."""
    k = SQRT2 * float(n.attrs["scale"])
    x = a[0]
    if k == 1.0:
        return b.emit("gelu", [x], n.outputs[0])
    g = b.emit("gelu", [b.emit("mul_const", [x], c=k)])
    return b.emit("mul_const", [g], n.outputs[0], c=1.0 / k)


def _reduce_mean(b, n, a):
    x = a[0]
    r = len(b.shape(x))
    axes = axes_of(b, n, a, 1)
    if axes is None:
        if n.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(r))
    axes = tuple(sorted({neg_axis(ax, r) for ax in axes}))
    return b.emit("reduce_mean", [x], n.outputs[0], axes=axes, keepdim=bool(n.attrs.get("keepdims", 1)))


def _transpose(b, n, a):
    r = len(b.shape(a[0]))
    perm = ints(n.attrs.get("perm", list(range(r))[::-1]))
    out = permute(b, a[0], perm, n.outputs[0])
    return out


def _reshape(b, n, a):
    target = ints(const_arg(b, a[1], "Reshape's shape"))
    shape = reshape_target(b, b.shape(a[0]), target, bool(n.attrs.get("allowzero", 0)))
    return reshape(b, a[0], shape, n.outputs[0])


def _flatten(b, n, a):
    shape = b.shape(a[0])
    axis = int(n.attrs.get("axis", 1)) % (len(shape) + 1) if shape else 0
    return reshape(b, a[0], (math.prod(shape[:axis]), math.prod(shape[axis:])), n.outputs[0])


def _squeeze(b, n, a):
    return reshape(b, a[0], squeeze_shape(b, n, a, b.shape(a[0])), n.outputs[0])


def _unsqueeze(b, n, a):
    return reshape(b, a[0], unsqueeze_shape(b, n, a, b.shape(a[0])), n.outputs[0])


def _slice(b, n, a):
    v = a[0]
    r = len(b.shape(v))
    args = slice_args(b, n, a, b.shape(v))
    for k, (ax, s, e, st) in enumerate(args):
        if st <= 0:
            raise b.error("Slice with a negative step is not supported")
        final = n.outputs[0] if k == len(args) - 1 else None
        if (s, e, st) == (0, b.shape(v)[ax], 1):
            continue
        v = b.emit("slice", [v], final, axis=ax - r, start=s, stop=e, step=st)
    return v


def _gather(b, n, a):
    v, idx = a[0], const_arg(b, a[1], "Gather's indices")
    shape = b.shape(v)
    r = len(shape)
    ax = int(n.attrs.get("axis", 0)) % r
    ids = [i % shape[ax] for i in ints(idx)]
    if idx.dim() > 1 or not ids or ids != list(range(ids[0], ids[0] + len(ids))):
        raise b.error("Gather of a bounded tensor needs a scalar index or consecutive indices")
    s = b.emit("slice", [v], None, axis=ax - r, start=ids[0], stop=ids[0] + len(ids), step=1) \
        if (ids[0], len(ids)) != (0, shape[ax]) else v
    target = shape[:ax] + ((len(ids),) if idx.dim() == 1 else ()) + shape[ax + 1:]
    return reshape(b, s, target, n.outputs[0]) if target != b.shape(s) else s


def _concat(b, n, a):
    vars_ = [x for x in a if isinstance(x, str)]
    r = len(b.shape(vars_[0]))
    axis = neg_axis(int(n.attrs["axis"]), r)
    pieces, inputs = [], []
    for x in a:
        if isinstance(x, str):
            pieces.append((len(inputs), b.shape(x)[axis], None))
            inputs.append(x)
        elif x.numel() and x.shape[axis] > 0:
            pieces.append((-1, int(x.shape[axis]), x.to(torch.float64)))
    if len(inputs) == 1 and len(pieces) == 1:
        return inputs[0]
    out_shape = list(b.shape(vars_[0]))
    out_shape[axis] = sum(p[1] for p in pieces)
    return b.emit("concat", inputs, n.outputs[0], axis=axis, pieces=tuple(pieces),
                  offset=concat_offset(pieces, axis, out_shape))


def split_sizes(b, n, a, dim: int) -> list:
    """Sizes of the parts of an ONNX Split along an axis of ``dim`` entries."""
    if "split" in n.attrs:
        return ints(n.attrs["split"])
    if len(a) > 1 and a[1] is not None:
        return ints(const_arg(b, a[1], "Split's sizes"))
    k = int(n.attrs.get("num_outputs", len(n.outputs)))
    step = -(-dim // k)
    return [min(step, dim - i * step) for i in range(k)]


def _split(b, n, a):
    v = a[0]
    shape = b.shape(v)
    r = len(shape)
    ax = int(n.attrs.get("axis", 0)) % r
    outs, pos = [], 0
    for size, name in zip(split_sizes(b, n, a, shape[ax]), n.outputs):
        outs.append(b.emit("slice", [v], name or None, axis=ax - r, start=pos, stop=pos + size, step=1))
        pos += size
    return outs


def _identity(b, n, a):
    return a[0]


def _cast(b, n, a):
    if int(n.attrs.get("to", 1)) not in (1, 11):
        raise b.error("Cast of a bounded tensor to a type other than float / double is not supported")
    return a[0]


def _expand(b, n, a):
    shape = tuple(torch.broadcast_shapes(b.shape(a[0]), tuple(ints(const_arg(b, a[1], "Expand's shape")))))
    if shape != b.shape(a[0]):
        raise b.error(f"Expand of a bounded tensor {b.shape(a[0])} to {shape} is not supported")
    return a[0]


def _unary(op):
    return lambda b, n, a: b.emit(op, [a[0]], n.outputs[0])


BUILD: dict[str, Callable] = {
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Neg": _neg_rule,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm,
    "Softmax": _softmax, "Relu": _unary("relu"), "Gelu": _gelu, "GeluErf": _gelu_erf,
    "ReduceMean": _reduce_mean,
    "Transpose": _transpose, "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Slice": _slice, "Gather": _gather, "Concat": _concat, "Expand": _expand,
    "Split": _split,
    "Identity": _identity, "Dropout": _identity, "Cast": _cast, "Shape": shape_of,
}
