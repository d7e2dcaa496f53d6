"""Constant folding of ONNX ops (:data:`FOLD`) and the argument helpers that
the graph-building rules (:mod:`.onnx_ops`) share with it.

Every rule takes ``(b, node, args)`` with every arg a torch tensor (or None
for an omitted optional input) and returns the output tensor(s).  With a
batch of 1 the shape plumbing of exported models (``Shape``, ``Gather``,
``Unsqueeze``, ``Concat``, ``ConstantOfShape``, ``Reshape``, ...) ends up
here.  Floats are float64, integers int64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor

# ONNX TensorProto element types
_FLOAT_TYPES = {1, 10, 11, 16}          # float, float16, double, bfloat16
_BOOL = 9


def neg_axis(axis: int, rank: int) -> int:
    """An ONNX axis (either sign) as a negative axis."""
    return axis - rank if axis >= 0 else axis


def ints(t) -> list:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, Tensor) else t)]


def axes_of(b, node, args, k: int, attr: str = "axes"):
    """Axes from the attribute (older opsets) or input ``k`` (newer ones), or None."""
    if attr in node.attrs:
        return ints(node.attrs[attr])
    if len(args) > k and args[k] is not None:
        if isinstance(args[k], str):
            raise b.error("axes must be constant")
        return ints(args[k])
    return None


def const_arg(b, value, what: str) -> Tensor:
    if isinstance(value, str):
        raise b.error(f"{what} must be a constant")
    return value


def reshape_target(b, in_shape, target, allowzero: bool) -> tuple:
    target = list(target)
    for i, s in enumerate(target):
        if s == 0 and not allowzero:
            target[i] = in_shape[i]
    n = math.prod(in_shape)
    if target.count(-1) == 1:
        rest = math.prod(s for s in target if s != -1)
        target[target.index(-1)] = n // rest if rest else 0
    if math.prod(target) != n or any(s < 0 for s in target):
        raise b.error(f"cannot reshape {tuple(in_shape)} to {tuple(target)}")
    return tuple(target)


def slice_params(dim: int, start: int, stop: int, step: int) -> tuple:
    """ONNX Slice bounds (negative, out of range, INT_MAX) clamped as python slicing does."""
    return slice(start, stop, step).indices(dim)


def squeeze_shape(b, n, a, shape) -> tuple:
    axes = axes_of(b, n, a, 1)
    r = len(shape)
    if axes is None:
        return tuple(s for s in shape if s != 1)
    axes = {ax % r for ax in axes}
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def unsqueeze_shape(b, n, a, shape) -> tuple:
    axes = axes_of(b, n, a, 1)
    r = len(shape) + len(axes)
    out, it = [], iter(shape)
    norm = {ax % r for ax in axes}
    for i in range(r):
        out.append(1 if i in norm else next(it))
    return tuple(out)


def slice_args(b, n, a, shape):
    """[(axis, start, stop, step)] of an ONNX Slice, clamped to ``shape``."""
    r = len(shape)
    if "starts" in n.attrs:                                     # opset < 10
        starts, ends = ints(n.attrs["starts"]), ints(n.attrs["ends"])
        axes = ints(n.attrs.get("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    else:
        starts, ends = (ints(const_arg(b, t, "Slice's bounds")) for t in a[1:3])
        axes = ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    out = []
    for ax, s, e, st in zip(axes, starts, ends, steps):
        ax = ax % r
        out.append((ax,) + slice_params(shape[ax], s, e, st))
    return out




def shape_of(b, n, a):
    """Shape of a gamma node (its known shape) or of a constant, as int64."""
    shape = b.shape(a[0]) if isinstance(a[0], str) else tuple(a[0].shape)
    start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
    return torch.tensor(shape[slice(start, None if end is None else int(end))], dtype=torch.int64)


# ---------------------------------------------------------------- FOLD rules
def _constant(b, n, a):
    at = n.attrs
    if "value" in at:
        return at["value"]
    if "value_float" in at:
        return torch.tensor(float(at["value_float"]), dtype=torch.float64)
    if "value_floats" in at:
        return torch.tensor([float(v) for v in at["value_floats"]], dtype=torch.float64)
    if "value_int" in at:
        return torch.tensor(int(at["value_int"]), dtype=torch.int64)
    if "value_ints" in at:
        return torch.tensor(ints(at["value_ints"]), dtype=torch.int64)
    raise b.error(f"Constant with attributes {sorted(at)} is not supported")


def _cast(b, n, a):
    to = int(n.attrs.get("to", 1))
    if to in _FLOAT_TYPES:
        return a[0].to(torch.float64)
    if to == _BOOL:
        return a[0].to(torch.bool)
    return a[0].to(torch.int64)


def _gather(b, n, a):
    data, idx = a[0], a[1].to(torch.int64)
    ax = int(n.attrs.get("axis", 0)) % data.dim()
    idx = idx % data.shape[ax]
    picked = data.movedim(ax, 0)[idx]                          # (*idx.shape, *rest)
    return picked.movedim(tuple(range(idx.dim())), tuple(range(ax, ax + idx.dim()))) if idx.dim() else \
        picked


def _slice(b, n, a):
    x = a[0]
    for ax, s, e, st in slice_args(b, n, a, tuple(x.shape)):     # clamped as python slicing clamps
        x = x.index_select(ax, torch.arange(s, e, st))
    return x


def _constant_of_shape(b, n, a):
    v = n.attrs.get("value", torch.zeros(1, dtype=torch.float64))
    return v.reshape(-1)[0].expand(*ints(a[0])).clone()


def _reshape(b, n, a):
    return a[0].reshape(reshape_target(b, tuple(a[0].shape), ints(a[1]), bool(n.attrs.get("allowzero", 0))))


def _transpose(b, n, a):
    perm = ints(n.attrs.get("perm", list(range(a[0].dim()))[::-1]))
    return a[0].permute(*perm)


def _flatten(b, n, a):
    x = a[0]
    axis = int(n.attrs.get("axis", 1)) % (x.dim() + 1)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _div(b, n, a):
    x, y = a
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _range(b, n, a):
    start, limit, delta = (t.reshape(()).item() for t in a)
    dtype = a[0].dtype
    return torch.arange(start, limit, delta, dtype=dtype)


def _binary(fn):
    return lambda b, n, a: fn(a[0], a[1])


FOLD: dict[str, Callable] = {
    "Constant": _constant, "Identity": lambda b, n, a: a[0], "Dropout": lambda b, n, a: a[0], "Cast": _cast,
    "Shape": shape_of, "Gather": _gather, "Slice": _slice, "ConstantOfShape": _constant_of_shape,
    "Unsqueeze": lambda b, n, a: a[0].reshape(unsqueeze_shape(b, n, a, tuple(a[0].shape))),
    "Squeeze": lambda b, n, a: a[0].reshape(squeeze_shape(b, n, a, tuple(a[0].shape))),
    "Concat": lambda b, n, a: torch.cat([t for t in a if t is not None], dim=int(n.attrs["axis"])),
    "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "MatMul": _binary(torch.matmul), "Pow": _binary(torch.pow), "Equal": _binary(torch.eq),
    "Min": _binary(torch.minimum), "Max": _binary(torch.maximum),
    "Neg": lambda b, n, a: -a[0], "Sqrt": lambda b, n, a: torch.sqrt(a[0]), "Relu": lambda b, n, a: a[0].clamp(min=0),
    "Where": lambda b, n, a: torch.where(a[0].to(torch.bool), a[1], a[2]),
    "Expand": lambda b, n, a: a[0].expand(torch.broadcast_shapes(tuple(a[0].shape), tuple(ints(a[1])))).clone(),
    "Range": _range,
}
