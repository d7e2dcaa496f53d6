"""Block-wise runs one block at a time: where each block's graph and nominal input come from.

Which plan an architecture gets is data (:mod:`.archs`).

A *plan* gives a block-wise verification what it needs without the whole model
in memory: the block names, the network's output node and shape, each block's
graph (:meth:`block`) and the nominal forward pass (:meth:`nominal`) that
yields each selected block's input and output.

* :class:`StreamPlan` (Llama, Qwen3): each block is built alone from its own
  weights (:func:`gamma.models.llama.build_block`) and the forward pass streams
  block by block, each block's graph dropped before the next is built: with a
  lazy checkpoint (:mod:`gamma.io.lazy`) one block's weights are in memory at a
  time, float32 and their float64 copies.  The values are the whole graph's,
  bit for bit (the same float64 ops on the same inputs; tested).
* :class:`GraphPlan` (Whisper): the whole graph, cut with ``Graph.block_graph``.

:class:`BlockSource` is one block's recipe for a worker process or a Ray task: a
lazy checkpoint's table of where its tensors lie (no tensor data), the block
index, the sequence length and the output; the worker reads its block's weights
from the checkpoint file itself (by its absolute path: on a Ray cluster of several
machines the file must be at that path on each of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..graph import Graph
from ..io.checkpoint import LoadedCheckpoint
from ..ops import evaluate
from . import llama as _llama

Progress = Optional[Callable[[str], None]]


@dataclass
class Nominal:
    """The exact float64 forward pass, as far as a block-wise run needs it."""
    centers: dict[int, torch.Tensor] = field(default_factory=dict)   # selected block -> its nominal input
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)   # selected block -> its nominal output
    output: Optional[torch.Tensor] = None     # the network's output; None when the pass stopped earlier


@dataclass
class BlockSource:
    """Block ``index`` of a Llama / Qwen3 checkpoint, built where the task runs."""
    ckpt: LoadedCheckpoint
    index: int
    seq_len: int
    output: str = "hidden"

    @property
    def portable(self) -> bool:
        """True when pickling this sends no tensor data (a lazy checkpoint's table of offsets)."""
        return self.ckpt.lazy

    def build(self) -> Graph:
        return _llama.build_block(self.ckpt, self.index, self.seq_len, self.output)


class StreamPlan:
    """Llama / Qwen3: every block built alone, the forward pass streamed block by block."""

    def __init__(self, ckpt: LoadedCheckpoint, seq_len: int, output: str = "hidden"):
        cfg = ckpt.config
        _llama.check_sizes(ckpt, seq_len)
        self.ckpt, self.seq_len, self.output = ckpt, seq_len, output
        self.names = [_llama.block_name(i) for i in range(cfg.n_layers)]
        self.output_node = _llama.output_node(output)
        self.output_shape = (seq_len, cfg.vocab_size if output == "logits" else cfg.d_model)

    def block(self, k: int) -> Graph:
        return self.source(k).build()

    def source(self, k: int) -> Optional[BlockSource]:
        return BlockSource(self.ckpt, k, self.seq_len, self.output)

    def nominal(self, x: torch.Tensor, picked: Sequence[int], progress: Progress = None) -> Nominal:
        """Blocks 0 .. max(picked) in turn, one block's graph alive at a time; the head too
        when the last block is selected (the pass then reaches the network's output)."""
        out, picked, h = Nominal(), set(picked), x
        last = max(picked)
        for k in range(last + 1):
            if progress:
                progress(f"forward pass {k + 1}/{last + 1} {self.names[k]}")
            g = self.block(k)
            if k in picked:
                out.centers[k] = h
            h = evaluate(g, h)
            if k in picked:
                out.outputs[k] = h
            del g
        if last == len(self.names) - 1:
            out.output = evaluate(_llama.build_head(self.ckpt, self.seq_len, self.output), h)
        return out


class GraphPlan:
    """Any graph with blocks (Whisper): the whole graph, each block cut from it."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names = graph.blocks()
        self.output_node = graph.output
        self.output_shape = tuple(graph.output_shape)

    def block(self, k: int) -> Graph:
        return self.graph.block_graph(self.names[k])

    def source(self, k: int) -> Optional[BlockSource]:
        return None

    def nominal(self, x: torch.Tensor, picked: Sequence[int], progress: Progress = None) -> Nominal:
        values = evaluate(self.graph, x, keep_all=True)
        out = Nominal(output=values[self.graph.output])
        for k in picked:
            i, o = self.graph.block_io(self.names[k])
            out.centers[k], out.outputs[k] = values[i], values[o]
        return out
