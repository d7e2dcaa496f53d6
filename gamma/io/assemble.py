"""Shared last step of every loader: tie outputs, validate, build the LoadedCheckpoint."""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import LoadedCheckpoint, ModelConfig
from ..errors import GammaError
from .lazy import FileTensor, LazyTensors
from .names import TIED_OUTPUT
from .validate import validate


def np_to_f32(a: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor; copies only what is not already a writable float32 array
    (read-only views of a memory-mapped file are copied so the tensor owns its data)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


class Collected:
    """Canonical tensors gathered by a loader, with where each came from."""

    def __init__(self, path: str):
        self.path = path
        self.tensors: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, str] = {}
        self.source_names: dict[str, str] = {}
        self.block_minima: dict[str, torch.Tensor] = {}   # GGUF Q4_1 / Q5_1: each block's m (gamma.io.ggml)
        self.notes: list[str] = []

    def add(self, name: str, t: torch.Tensor, dtype: str, source: str) -> None:
        if name in self.tensors:
            raise GammaError(f"{self.path}: tensors '{self.source_names[name]}' and '{source}' "
                             f"both map to '{name}'")
        self.tensors[name] = t
        self.dtypes[name] = dtype
        self.source_names[name] = source

    def shapes(self) -> dict[str, tuple]:
        return {n: tuple(t.shape) for n, t in self.tensors.items()}


def _tie(c: Collected, cfg: ModelConfig) -> None:
    out, emb = TIED_OUTPUT[cfg.arch]
    if emb not in c.tensors:
        return                                   # validate reports it missing
    if out not in c.tensors:
        if cfg.tie_word_embeddings:
            c.tensors[out] = c.tensors[emb]      # the same object, as in HF's tied state_dict
            c.dtypes[out] = c.dtypes[emb]
            c.source_names[out] = c.source_names[emb]
            if emb in c.block_minima:
                c.block_minima[out] = c.block_minima[emb]
        return
    if cfg.tie_word_embeddings and c.tensors[out] is not c.tensors[emb]:
        a, b = (_values(c, n) for n in (out, emb))
        if a.shape != b.shape or not torch.equal(a, b):
            raise GammaError(f"{c.path}: config ties '{out}' to '{emb}' but the file stores a different '{out}'")
        c.tensors[out] = c.tensors[emb]


def _values(c: Collected, name: str) -> torch.Tensor:
    t = c.tensors[name]
    return torch.from_numpy(t.load(c.path)) if isinstance(t, FileTensor) else t


def finish(c: Collected, fmt: str, cfg: ModelConfig, lazy: bool = False) -> LoadedCheckpoint:
    """Tie the output projection if needed, validate everything, return the LoadedCheckpoint.

    ``lazy``: ``c.tensors`` holds :class:`~gamma.io.lazy.FileTensor` entries; names and
    shapes are checked now, values (finite) when each tensor is read."""
    _tie(c, cfg)
    validate(c.path, cfg, c.tensors, c.source_names, values=not lazy)
    tensors = LazyTensors(c.path, c.tensors) if lazy else c.tensors
    return LoadedCheckpoint(path=c.path, format=fmt, config=cfg, tensors=tensors, dtypes=c.dtypes,
                      notes=c.notes, source_names=c.source_names, block_minima=c.block_minima)
