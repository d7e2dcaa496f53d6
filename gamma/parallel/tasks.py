"""What a block-wise task is and what comes back: :class:`BlockTask` (one block,
its nominal input and the bound options; pickled for a worker by
:func:`task_bytes`, the graph compacted to its own weights or left to a portable
source) and :class:`BlockOutcome` (the record and bounds, or the error)."""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..graph import Graph
from ..options import BoundOptions


@dataclass
class BlockTask:
    index: int                   # block index in the model (layer3 -> 3)
    name: str                    # "layer3"
    graph: Optional[Graph]       # the block's subgraph: only its own weights; None: built from source
    center: torch.Tensor         # float64 nominal input of the block, graph.input_shape
    options: BoundOptions        # how to bound it (epsilon included): frozen, checked, picklable
    source: Any = None           # without a graph: a recipe with build() -> Graph and portable
                                 # (gamma.models.blocks.BlockSource: the worker reads its block from the file)

    def block_graph(self) -> Graph:
        """The block's graph: the one given, or built now from the source (its weights read
        here, freed with the graph)."""
        return self.graph if self.graph is not None else self.source.build()


@dataclass
class BlockOutcome:
    index: int
    name: str
    row: Optional[dict]          # the block's record from solve; None when it failed
    lower: Optional[np.ndarray]  # float64 output bounds of the block
    upper: Optional[np.ndarray]
    error: Optional[str] = None  # "ValueError: ..." after the last failed attempt
    attempts: int = 1
    seconds: float = 0.0         # wall time of the last attempt (as seen by the scheduler)
    resumed: bool = False        # read from the resume file, not computed
    pid: Optional[int] = None    # the process that computed it (this one when serial)
    peak_rss_mb: Optional[float] = None   # that process's peak resident memory after the block

    @property
    def failed(self) -> bool:
        return self.error is not None


Solve = Callable[..., tuple]     # solve(task, progress) -> (row, lower ndarray, upper ndarray)


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and text[0] else type(e).__name__


def outcome(task: BlockTask, result, attempts: int, seconds: float, where=(None, None)) -> BlockOutcome:
    row, lower, upper = result
    return BlockOutcome(task.index, task.name, row, lower, upper, None, attempts, seconds,
                        pid=where[0], peak_rss_mb=where[1])


def failure(task: BlockTask, error: str, attempts: int, seconds: float) -> BlockOutcome:
    return BlockOutcome(task.index, task.name, None, None, None, error, attempts, seconds)


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory so far, in MiB (None where unknown)."""
    try:
        import resource
    except ImportError:          # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024     # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------ what a worker gets
def compact_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` whose tensors own exactly their data.

    A block's weights may be views into a larger storage (a memory-mapped
    file, a fused tensor); pickling a view would send the whole storage."""
    out = Graph(graph.name, graph.input, graph.input_shape)
    out.nodes = {}
    for name, node in graph.nodes.items():
        params = {k: _own(v) for k, v in node.params.items()}
        out.nodes[name] = type(node)(node.name, node.op, node.inputs, params, node.block, node.shape)
    out.output = graph.output
    out.meta = dict(graph.meta)
    return out


def _own(v):
    if isinstance(v, torch.Tensor):
        if v.untyped_storage().nbytes() != v.numel() * v.element_size() or not v.is_contiguous():
            return v.detach().clone(memory_format=torch.contiguous_format)
        return v.detach()
    return v


def task_bytes(task: BlockTask) -> bytes:
    """The pickled task a worker receives: a portable source (the worker reads its block's
    weights from the checkpoint file), else the graph compacted to its own weights."""
    graph, source = task.graph, task.source
    if graph is None and not getattr(source, "portable", False):
        graph, source = task.block_graph(), None          # weights in this process's memory: send them
    t = BlockTask(task.index, task.name, None if graph is None else compact_graph(graph),
                  _own(task.center).cpu(), task.options, source)
    return pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)


def solve_bytes(solve: Solve, blob: bytes, threads: Optional[int] = None):
    """Worker side: unpickle the task and solve it (no progress callback); returns the
    result, the seconds and (pid, peak resident MiB) of this worker."""
    if threads is not None:
        torch.set_num_threads(threads)
    task = pickle.loads(blob)
    t0 = time.perf_counter()
    result = solve(task, None)
    return result, time.perf_counter() - t0, (os.getpid(), peak_rss_mb())
