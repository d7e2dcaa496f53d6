"""Lazy tensor stores: a checkpoint's tensors read from its file one at a time, when asked.

:class:`LazyTensors` is a read-only mapping ``canonical name -> float32 tensor``
like the dict an eager loader builds, but it holds only where each tensor lies
in the file (:class:`FileTensor`: path, offset, source type, shape).  Indexing
it reads that tensor's bytes (``pread``, never a memory map that would keep the
pages resident), dequantizes them a slice of rows at a time, undoes llama.cpp's
q/k permutation, checks the values are finite and returns a fresh float32
tensor that nobody else keeps: a block-wise run holds one block's weights at a
time.  The values are the eager loader's bit for bit (same dequantization, row
by row: every quant block lies inside one row).

Shapes, source types and the number of parameters come from the header alone,
so ``gamma inspect`` reads no tensor data.  A store pickles as its table of
entries (a few bytes per tensor): a worker process reads its own block from
the file.  ``loads`` / ``row_loads`` count the tensors read whole / by rows (tests
use them to prove a run read only the blocks it needed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import GammaError
from .ggml import MINIMUM_AT, block_minima

CHUNK_ELEMENTS = 1 << 22          # rows dequantized per step: at most ~4M elements (16 MiB float32)

# GGUF types GGUFReader gives a typed (not byte) array, as it does (gguf_reader._build_tensors)
_GGUF_ITEM_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                    "I16": np.int16, "I32": np.int32, "I64": np.int64}
# safetensors dtypes read as numpy items (BF16 through torch)
_ST_ITEM_TYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_bytes(path: str, offset: int, nbytes: int, shown: str) -> np.ndarray:
    """``nbytes`` bytes of ``path`` from ``offset`` as a fresh uint8 array (no memory map)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    try:
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf)) if f.seek(offset) == offset else 0
            while 0 < got < nbytes:                       # readinto may return short
                n = f.readinto(memoryview(buf)[got:])
                if not n:
                    break
                got += n
    except OSError as e:
        raise GammaError(f"{shown}: cannot read: {e.strerror or e}") from None
    if got != nbytes:
        raise GammaError(f"{shown}: truncated: wanted {nbytes} bytes at offset {offset}, read {got}")
    return buf


@dataclass(frozen=True)
class FileTensor:
    """Where one tensor lies in a file and how to turn its bytes into float32.

    ``shape`` is the canonical (numpy / HF) shape; ``kind`` is "gguf" or
    "safetensors"; ``dtype`` the source type name (``Q4_0``, ``F16``, ``BF16``);
    ``permute_heads`` > 0 undoes llama.cpp's q/k RoPE permutation for that many
    heads; ``source`` is the name in the file."""
    path: str
    offset: int
    nbytes: int
    kind: str
    dtype: str
    shape: tuple
    source: str
    permute_heads: int = 0

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if len(self.shape) > 1 else 1
        return self.nbytes // max(rows, 1)

    def load(self, shown: str) -> np.ndarray:
        """The whole tensor as a float32 array (shape ``self.shape``)."""
        if len(self.shape) < 2 or self.permute_heads:
            arr = self._decode(read_bytes(self.path, self.offset, self.nbytes, shown), shown)
            if self.permute_heads:
                from .gguf_fmt import reverse_permute
                arr = reverse_permute(arr, self.permute_heads)
            return _f32(arr)
        return self._rows(range(self.shape[0]), shown, contiguous=True)

    def minima(self, shown: str) -> Optional[np.ndarray]:
        """Each block's m of a GGUF Q4_1 / Q5_1 weight (:func:`gamma.io.ggml.block_minima`), else None."""
        if self.kind != "gguf" or self.dtype not in MINIMUM_AT:
            return None
        m = block_minima(read_bytes(self.path, self.offset, self.nbytes, shown), self.dtype, self.shape)
        if self.permute_heads:
            from .gguf_fmt import reverse_permute
            m = reverse_permute(m, self.permute_heads)
        return m

    def rows(self, index: Sequence[int], shown: str) -> np.ndarray:
        """Rows ``index`` (first axis) as float32, reading only those rows' bytes."""
        if self.permute_heads or len(self.shape) < 2:
            return self.load(shown)[np.asarray(index, dtype=np.int64)]
        return self._rows(index, shown, contiguous=False)

    def _rows(self, index, shown: str, contiguous: bool) -> np.ndarray:
        rb, per_row = self.row_bytes, int(np.prod(self.shape[1:]))
        out = np.empty((len(index), *self.shape[1:]), dtype=np.float32)
        step = max(1, CHUNK_ELEMENTS // max(per_row, 1)) if contiguous else 1
        index = list(index)
        for j in range(0, len(index), step):
            first, n = index[j], min(step, len(index) - j)
            raw = read_bytes(self.path, self.offset + first * rb, n * rb, shown)
            out[j:j + n] = _f32(self._decode(raw, shown, n))
        return out

    def _decode(self, raw: np.ndarray, shown: str, rows: Optional[int] = None) -> np.ndarray:
        shape = self.shape if rows is None else (rows, *self.shape[1:])
        if self.kind == "gguf":
            from .gguf_fmt import dequantize_array
            item = _GGUF_ITEM_TYPES.get(self.dtype)
            if item is not None:
                data = raw.view(item).reshape(tuple(shape))
            else:
                from gguf.quants import quant_shape_to_byte_shape
                from gguf.constants import GGMLQuantizationType
                data = raw.reshape(quant_shape_to_byte_shape(tuple(shape), GGMLQuantizationType[self.dtype]))
            return dequantize_array(shown, self.source, self.dtype, data, tuple(shape))
        data = raw.view(_ST_ITEM_TYPES[self.dtype]).reshape(tuple(shape))
        if self.dtype == "BF16":                           # exact: bf16 -> f32 appends zero bits
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).float().numpy()
        return data


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class LazyTensors(Mapping):
    """Canonical name -> float32 tensor, read from the file on every access.

    ``path`` is the checkpoint as the user named it (error messages start with
    it).  Tied names share one :class:`FileTensor`."""

    lazy = True                                    # what Checkpoint.lazy looks for

    def __init__(self, path: str, entries: dict[str, FileTensor]):
        self.path = path
        self.entries = dict(entries)
        self.loads: Counter = Counter()            # canonical name -> times read whole
        self.row_loads: Counter = Counter()        # canonical name -> times some rows were read

    def __getstate__(self):                        # a worker's copy: the table, fresh counters
        return {"path": self.path, "entries": self.entries}

    def __setstate__(self, state):
        self.__init__(state["path"], state["entries"])

    # -- Mapping ------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        t = torch.from_numpy(e.load(self.path))
        self.loads[name] += 1
        _check_finite(self.path, name, e, t)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    # -- without reading values ----------------------------------------------
    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name].shape)

    def minima(self, name: str) -> Optional[torch.Tensor]:
        m = self.entries[name].minima(self.path)
        return None if m is None else torch.from_numpy(np.ascontiguousarray(m))

    def rows(self, name: str, index: Sequence[int]) -> torch.Tensor:
        """Rows ``index`` of tensor ``name`` (an embedding lookup), reading only those rows."""
        e = self.entries[name]
        t = torch.from_numpy(e.rows(index, self.path))
        self.row_loads[name] += 1
        _check_finite(self.path, name, e, t)
        return t

    def n_params(self) -> int:
        return sum(int(np.prod(e.shape)) for e in {id(e): e for e in self.entries.values()}.values())

    def data_bytes(self) -> int:
        return sum(e.nbytes for e in {id(e): e for e in self.entries.values()}.values())


def _check_finite(path: str, name: str, e: FileTensor, t: torch.Tensor) -> None:
    # a finite sum proves every element finite (NaN and inf propagate); else look closely
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        stored = "" if e.source == name else f" (stored as '{e.source}')"
        raise GammaError(f"{path}: tensor '{name}' contains NaN or inf{stored}")
