"""ONNX models as gamma graphs: ``load_onnx(path) -> Graph`` (batch 1).

The file (plain or gzip) is parsed with the ``onnx`` package and checked; the
graph is then walked once in its (topological) order with every tensor
either a constant (a torch tensor: initializers, ``Constant`` nodes and all
shape plumbing computed from them) or a gamma node.  An ONNX node whose
inputs are all constant is folded (:data:`onnx_ops.FOLD`); one that reads a
gamma node becomes gamma nodes (:data:`onnx_ops.BUILD`).  With a batch of 1
the class-token plumbing of a ViT (``Shape``, ``Gather``, ``Unsqueeze``,
``Concat``, ``ConstantOfShape``) folds to constants this way.

Node shapes are the whole ONNX tensor shapes, the batch axis of 1 included
(``(1, 3, 32, 32)`` for a CIFAR image).  Each new gamma node is evaluated
once on a zero input as it is added, so shapes are known during the walk and
a shape mismatch fails at the node that causes it.

Floating constants become float64: gamma bounds the real-valued function
the graph defines with its float32 constants taken as exact.  Before the
walk, the exported erf-GELU ``x * 0.5 * (1 + erf(x / c))`` is fused into one
node (:func:`fuse_gelu`).  Every problem is a one-line
:class:`~gamma.errors.GammaError` starting with the path.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import GammaError
from ..graph import Graph
from ..ops import forward_op
from . import onnx_ops

GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class ONode:
    """One ONNX node, decoded: op type, tensor names in and out, attributes."""
    op: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    name: str = ""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise GammaError("reading ONNX models needs the onnx package (pip install 'gamma-bounds[onnx]')") from None
    return onnx


def read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    if not os.path.exists(path):
        raise GammaError(f"{path}: no such file or directory")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GammaError(f"{path}: cannot read: {e.strerror or e}") from None
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error):
            raise GammaError(f"{path}: truncated or corrupt gzip stream") from None
    if not data:
        raise GammaError(f"{path}: empty file")
    return data


def read_model(path: str):
    """The checked ``onnx.ModelProto`` of ``path``."""
    onnx = _onnx()
    data = read_bytes(path)
    try:
        model = onnx.load_from_string(data)
    except Exception:               # protobuf's DecodeError and friends: the bytes are no ModelProto
        raise GammaError(f"{path}: not a valid ONNX model (truncated or corrupt protobuf)") from None
    if not model.graph.node:
        raise GammaError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:          # onnx.checker.ValidationError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GammaError(f"{path}: not a valid ONNX model ({first})") from None
    return model


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def to_tensor(arr) -> torch.Tensor:
    """A numpy array as a torch constant: floats as float64, integers as int64."""
    t = torch.from_numpy(arr.copy()) if arr.ndim else torch.tensor(arr.item())
    if t.is_floating_point():
        return t.to(torch.float64)
    if t.dtype == torch.bool:
        return t
    return t.to(torch.int64)


def decode_nodes(model) -> tuple[list, dict]:
    """(ONodes in order, constants by tensor name) from the model's graph."""
    onnx = _onnx()
    from onnx import numpy_helper
    consts = {init.name: to_tensor(numpy_helper.to_array(init)) for init in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        attrs = {}
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, onnx.TensorProto):
                v = to_tensor(numpy_helper.to_array(v))
            elif isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [x.decode("utf-8", "replace") for x in v]
            attrs[a.name] = v
        nodes.append(ONode(n.op_type, list(n.input), list(n.output), attrs, n.name or n.output[0]))
    return nodes, consts


# ---------------------------------------------------------------- GELU fusion
def _scalar(consts: dict, name: str) -> Optional[float]:
    t = consts.get(name)
    if t is None or t.numel() != 1 or not t.is_floating_point():
        return None
    return float(t.reshape(()))


def fuse_gelu(nodes: list, consts: dict, keep: set) -> list:
    """Replace every ``x * 0.5 * (1 + erf(x * s))`` chain (as torch exports
    ``F.gelu``: Div or Mul by a constant, Erf, Add 1, Mul by x, Mul 0.5, the
    0.5 either last or on x first) by one ``GeluErf(x)`` node with attribute
    ``scale`` = s.  Tensors in ``keep`` (graph outputs) are never fused away."""
    const_out = dict(consts)
    for n in nodes:
        if n.op == "Constant" and "value" in n.attrs:
            const_out[n.outputs[0]] = n.attrs["value"]
    producer = {o: n for n in nodes for o in n.outputs}
    uses: dict = {}
    for n in nodes:
        for i in n.inputs:
            uses.setdefault(i, []).append(n)

    def only_use(name):
        u = uses.get(name, [])
        return u[0] if len(u) == 1 and name not in keep else None

    def other(n, name):
        rest = [i for i in n.inputs if i != name]
        return rest[0] if len(n.inputs) == 2 and len(rest) == 1 else None

    removed, replace = set(), {}
    for e in nodes:
        if e.op != "Erf":
            continue
        d = producer.get(e.inputs[0])
        if d is None or d.op not in ("Div", "Mul") or only_use(d.outputs[0]) is not e:
            continue
        c = _scalar(const_out, d.inputs[1])
        if c is None or c == 0:
            continue
        x, s = d.inputs[0], (1.0 / c if d.op == "Div" else c)
        a = only_use(e.outputs[0])
        if a is None or a.op != "Add" or _scalar(const_out, other(a, e.outputs[0]) or "") != 1.0:
            continue
        m1 = only_use(a.outputs[0])
        if m1 is None or m1.op != "Mul":
            continue
        o = other(m1, a.outputs[0])
        chain = [d, e, a, m1]
        if o == x:                                  # (x * (1 + erf)) * 0.5
            final = only_use(m1.outputs[0])
            if final is None or final.op != "Mul" or _scalar(const_out, other(final, m1.outputs[0]) or "") != 0.5:
                continue
            chain.append(final)
        else:                                       # (x * 0.5) * (1 + erf)
            h, final = producer.get(o), m1
            if h is None or h.op != "Mul" or only_use(h.outputs[0]) is not m1 or x not in h.inputs \
                    or _scalar(const_out, other(h, x) or "") != 0.5:
                continue
            chain.append(h)
        removed.update(id(n) for n in chain)
        replace[id(final)] = ONode("GeluErf", [x], [final.outputs[0]], {"scale": s}, final.name)
    return [replace.get(id(n), n) for n in nodes if id(n) not in removed or id(n) in replace]


# ---------------------------------------------------------------- the walk
class Builder:
    """The gamma graph under construction, with each node's value at the zero input."""

    def __init__(self, path: str, graph: Graph, opset: int):
        self.path, self.graph, self.opset = path, graph, opset
        self.probe = {graph.input: torch.zeros(graph.input_shape, dtype=torch.float64)}
        self.onode: Optional[ONode] = None

    def error(self, what: str) -> GammaError:
        n = self.onode
        where = f" (node {n.name})" if n is not None else ""
        return GammaError(f"{self.path}: {n.op if n else 'graph'}{where}: {what}")

    def shape(self, var: str) -> tuple:
        return tuple(self.probe[var].shape)

    def emit(self, op: str, inputs: list, final: Optional[str] = None, **params) -> str:
        """Add a gamma node; ``final``: its name (an ONNX tensor name), else a fresh one."""
        base = final or f"{self.onode.outputs[0]}:{op}"
        name, k = base, 1
        while name in self.graph.nodes:
            name, k = f"{base}:{k}", k + 1
        self.graph.add(name, op, *inputs, **params)
        node = self.graph[name]
        try:
            with torch.no_grad():
                value = forward_op(node, *(self.probe[i] for i in inputs))
        except (RuntimeError, IndexError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self.error(f"shapes do not fit ({msg})") from None
        self.probe[name] = value
        node.shape = tuple(value.shape)
        return name


def _input_shape(path: str, vi) -> tuple:
    dims = []
    for k, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif k == 0:
            dims.append(1)                                   # the batch axis: one input at a time
        else:
            sym = d.dim_param or "?"
            raise GammaError(f"{path}: input {vi.name} has a symbolic dimension '{sym}' at axis {k}; "
                             "gamma needs a fixed shape")
    return tuple(dims)


def load_onnx(path) -> Graph:
    """The ONNX model at ``path`` (``.onnx`` or ``.onnx.gz``) as a gamma Graph."""
    path = os.fspath(path)
    model = read_model(path)
    nodes, consts = decode_nodes(model)
    g = model.graph
    inputs = [vi for vi in g.input if vi.name not in consts]
    if len(inputs) != 1:
        raise GammaError(f"{path}: the model has {len(inputs)} inputs; gamma needs exactly one")
    if len(g.output) != 1:
        raise GammaError(f"{path}: the model has {len(g.output)} outputs; gamma needs exactly one")
    vi, out_name = inputs[0], g.output[0].name
    shape = _input_shape(path, vi)
    graph = Graph(os.path.basename(path), vi.name, shape)
    graph.nodes[vi.name].shape = shape
    b = Builder(path, graph, opset_of(model))
    env: dict[str, Any] = dict(consts)
    env[vi.name] = vi.name
    for node in fuse_gelu(nodes, consts, keep={out_name}):
        b.onode = node
        args = [env.get(i) if i else None for i in node.inputs]
        missing = [i for i, a in zip(node.inputs, args) if i and a is None]
        if missing:
            raise b.error(f"input {missing[0]} is not defined before the node")
        outs = onnx_ops.convert(b, node, args)
        for name, value in zip(node.outputs, outs):
            if name:
                env[name] = value
    b.onode = None
    result = env.get(out_name)
    if not isinstance(result, str) or result == graph.input:
        raise GammaError(f"{path}: output {out_name} does not depend on the input")
    return _finish(graph, result, model, vi.name, out_name, path)


def _finish(graph: Graph, result: str, model, in_name: str, out_name: str, path: str) -> Graph:
    """Point the output at ``result``, drop nodes it does not read, record where it came from."""
    keep = graph.ancestors(result)
    for name in [n for n in graph.nodes if n not in keep]:
        del graph.nodes[name]
    graph.output = result
    graph.meta.update({"format": "onnx", "path": path, "opset": opset_of(model), "onnx_input": in_name,
                       "onnx_output": out_name})
    for node in graph:
        if node.op != "input" and not all(math.isfinite(float(v.abs().max())) for v in node.params.values()
                                          if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()):
            raise GammaError(f"{path}: node {node.name} has a non-finite constant")
    return graph
