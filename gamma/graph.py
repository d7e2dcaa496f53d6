"""The model as a graph of named primitive nodes.

A :class:`Graph` is a list of :class:`Node` in topological order.  Each node
names one primitive op (a key of the rule tables in :mod:`gamma.ops` and
:mod:`gamma.bounds`), its input nodes, its constant parameters (float64
tensors and attributes) and the block it belongs to (``layer3``), so that
block-wise verification can cut the graph at block boundaries.

The graph knows nothing about bounds; bound methods walk it with their own
per-op rule tables.  Values are unbatched: a node's value has shape
``node.shape`` (e.g. ``(T, d)`` for the residual stream, ``(H, T, dh)`` for
per-head tensors); every op also accepts extra leading batch dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from .errors import GammaError
from .ops import evaluate


@dataclass
class Node:
    name: str                          # stable, human readable: "layer3.attn.qk"
    op: str                            # primitive op, key of the rule tables
    inputs: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    block: Optional[str] = None        # "layer3"; None for stem / head nodes
    shape: tuple[int, ...] = ()        # unbatched output shape, filled by infer_shapes

    @property
    def layer_type(self) -> str:
        return self.op


class Graph:
    """Nodes in topological order, one input node, one output node."""

    def __init__(self, name: str, input_name: str, input_shape: tuple[int, ...]):
        self.name = name
        self.nodes: dict[str, Node] = {}
        self.input = input_name
        self.nodes[input_name] = Node(input_name, "input", shape=tuple(input_shape))
        self.output: str = input_name
        self.meta: dict[str, Any] = {}

    # -- building ---------------------------------------------------------
    def add(self, name: str, op: str, *inputs: str, block: Optional[str] = None, **params) -> str:
        if name in self.nodes:
            raise ValueError(f"duplicate node name {name}")
        for i in inputs:
            if i not in self.nodes:
                raise ValueError(f"node {name}: unknown input {i}")
        self.nodes[name] = Node(name, op, tuple(inputs), params, block)
        self.output = name
        return name

    def infer_shapes(self) -> "Graph":
        """Fill ``Node.shape`` by one float64 evaluation at zero input."""
        x = torch.zeros(self.nodes[self.input].shape, dtype=torch.float64)
        values = evaluate(self, x, keep_all=True)
        for name, v in values.items():
            self.nodes[name].shape = tuple(v.shape)
        return self

    # -- queries ----------------------------------------------------------
    def __iter__(self):
        return iter(self.nodes.values())

    def __len__(self):
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[self.input].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.nodes[self.output].shape

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for i in node.inputs:
                out[i].append(node.name)
        return out

    def ancestors(self, name: str, stop: Optional[str] = None) -> set[str]:
        """``name`` and every node it depends on (not looking past ``stop``)."""
        seen, stack = {name}, [name]
        while stack:
            cur = stack.pop()
            if cur == stop:
                continue
            for i in self.nodes[cur].inputs:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return seen

    def blocks(self) -> list[str]:
        """Block names in order of appearance (``layer0``, ``layer1``, ...)."""
        seen: list[str] = []
        for node in self.nodes.values():
            if node.block is not None and node.block not in seen:
                seen.append(node.block)
        return seen

    def block_io(self, block: str) -> tuple[str, str]:
        """(input node, output node) of a block: the one external node it
        reads and its last node."""
        names = [n.name for n in self.nodes.values() if n.block == block]
        if not names:
            raise GammaError(f"no block named '{block}'")
        inside = set(names)
        external = {i for n in names for i in self.nodes[n].inputs if i not in inside}
        if len(external) != 1:
            raise ValueError(f"block {block} reads {sorted(external)}; expected one input")
        return external.pop(), names[-1]

    def subgraph(self, input_name: str, output_name: str, name: Optional[str] = None) -> "Graph":
        """The part of the graph between ``input_name`` (which becomes the
        input node) and ``output_name``."""
        keep = self.ancestors(output_name, stop=input_name)
        sub = Graph(name or f"{self.name}[{input_name}->{output_name}]", input_name,
                    self.nodes[input_name].shape)
        for node in self.nodes.values():
            if node.name == input_name or node.name not in keep:
                continue
            if node.op == "input":
                raise GammaError(f"{output_name} depends on input {node.name} outside {input_name}")
            sub.nodes[node.name] = Node(node.name, node.op, node.inputs, node.params, node.block, node.shape)
        missing = [i for n in sub.nodes.values() for i in n.inputs if i not in sub.nodes]
        if missing:
            raise ValueError(f"subgraph {input_name}->{output_name} misses {sorted(set(missing))}")
        sub.output = output_name
        sub.meta = dict(self.meta)
        return sub

    def block_graph(self, block: str) -> "Graph":
        i, o = self.block_io(block)
        return self.subgraph(i, o, name=block)

    def to(self, device=None, dtype=None) -> "Graph":
        """Move every constant tensor (in place) and return self."""
        for node in self.nodes.values():
            for k, v in node.params.items():
                if isinstance(v, torch.Tensor):
                    if v.is_floating_point():
                        node.params[k] = v.to(device=device, dtype=dtype or v.dtype)
                    else:
                        node.params[k] = v.to(device=device)
        return self

    def on(self, device) -> "Graph":
        """This graph with every constant tensor on ``device``, leaving ``self`` as it is:
        ``self`` when they are all there already, else a copy (new nodes, each tensor moved)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if all(v.device == device for node in self.nodes.values() for v in node.params.values()
               if isinstance(v, torch.Tensor)):
            return self
        out = Graph(self.name, self.input, self.input_shape)
        out.nodes = {name: Node(n.name, n.op, n.inputs, dict(n.params), n.block, n.shape)
                     for name, n in self.nodes.items()}
        out.output, out.meta = self.output, dict(self.meta)
        return out.to(device)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def names_with_prefix(graph: Graph, prefix: str) -> Iterable[str]:
    return (n for n in graph.nodes if n.startswith(prefix))
