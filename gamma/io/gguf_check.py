"""Walk a GGUF header with bounds checks before gguf-py's GGUFReader sees it.

GGUFReader trusts the lengths in the file: a bogus array length makes it loop
(for ever, on zero-width reads past the end), so every count and length is
checked here against the bytes that are left, with plain ``struct`` reads over
a read-only memory map.  Also checks that each tensor's data lies in the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import GammaError

GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                                    # GGML_MAX_DIMS
MAX_NESTING = 4
# GGUFValueType id -> struct code of a scalar
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
SMALL_ARRAY = 1 << 16                           # numeric arrays kept as values (per-layer metadata)


class TensorInfo(NamedTuple):
    name: str
    ne: list                                    # ggml dimensions, fastest first
    type_id: int
    data_offset: int                            # absolute offset of the data in the file
    n_bytes: int


@dataclass
class GGUFHeader:
    """What the walk read: metadata values (strings as bytes; None for long arrays and arrays
    of strings), the tensor table and the byte order ("<" or ">")."""
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    order: str = "<"


class _Walker:
    def __init__(self, path: str, buf, order: str):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def fail(self, what: str):
        raise GammaError(f"{self.path}: corrupt GGUF: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"{what} at offset {self.pos} runs past the end of the file ({len(self.buf)} bytes)")

    def scalar(self, code: str, what: str):
        n = struct.calcsize(code)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", what)
        self.need(n, what)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def skip_strings(self, n: int) -> bool:
        """Skip ``n`` strings if they all lie in the file (a tokenizer's 150k in a tight loop);
        False, the position kept, otherwise."""
        unpack, buf, pos, end, fmt = struct.unpack_from, self.buf, self.pos, len(self.buf), self.order + "Q"
        for _ in range(n):
            if pos + 8 > end:
                return False
            pos += 8 + unpack(fmt, buf, pos)[0]
            if pos > end:
                return False
        self.pos = pos
        return True

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], f"value of '{key}'")
        if vtype == STRING:
            return self.string(f"value of '{key}'")
        if vtype != ARRAY or depth >= MAX_NESTING:
            self.fail(f"bad value type {vtype} for '{key}'")
        itype = self.scalar("I", f"array type of '{key}'")
        n = self.scalar("Q", f"array length of '{key}'")
        if itype in SCALARS:                    # fixed-size items: skip in one step
            self.need(n * struct.calcsize(SCALARS[itype]), f"array '{key}' of {n} items")
            items = list(struct.unpack_from(f"{self.order}{n}{SCALARS[itype]}", self.buf, self.pos)) \
                if n <= SMALL_ARRAY else None
            self.pos += n * struct.calcsize(SCALARS[itype])
            return items
        self.need(n * 8, f"array '{key}' of {n} items")   # every item takes 8 bytes or more
        if itype == STRING and self.skip_strings(n):     # a tokenizer's strings, in a tight loop
            return None
        for _ in range(n):                      # item by item (a bad array: names the exact place)
            self.value(itype, key, depth + 1)
        return None


def check_gguf(path: str) -> GGUFHeader:
    """Raise GammaError unless the header and tensor table of ``path`` are consistent;
    return what was read (no tensor data is touched)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    size = os.path.getsize(path)
    if size < 24:
        raise GammaError(f"{path}: corrupt GGUF: truncated header ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for order in "<>":
            if struct.unpack_from(order + "I", buf, 4)[0] in GGUF_VERSIONS:
                break
        else:
            raise GammaError(f"{path}: corrupt GGUF: unsupported version {struct.unpack_from('<I', buf, 4)[0]}")
        w = _Walker(path, buf, order)
        w.pos = 8
        n_tensors, n_kv = w.scalar("Q", "tensor count"), w.scalar("Q", "key count")
        if n_tensors * 24 > size or n_kv * 12 > size:
            w.fail(f"header declares {n_tensors} tensors and {n_kv} keys in a {size}-byte file")
        alignment = DEFAULT_ALIGNMENT
        header = GGUFHeader(order=order)
        for _ in range(n_kv):
            key = w.string("key").decode("utf-8", "replace")
            v = header.fields[key] = w.value(w.scalar("I", f"type of '{key}'"), key)
            if key == "general.alignment":
                if not isinstance(v, int) or v <= 0 or v & (v - 1):
                    w.fail(f"general.alignment = {v!r} is not a power of two")
                alignment = v
        infos = []
        for _ in range(n_tensors):
            name = w.string("tensor name").decode("utf-8", "replace")
            n_dims = w.scalar("I", f"rank of '{name}'")
            if n_dims > MAX_DIMS:
                w.fail(f"tensor '{name}' has {n_dims} dimensions")
            dims = [w.scalar("Q", f"shape of '{name}'") for _ in range(n_dims)]
            infos.append((name, dims, w.scalar("I", f"type of '{name}'"), w.scalar("Q", f"offset of '{name}'")))
        data_start = -(-w.pos // alignment) * alignment
        for name, dims, type_id, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            except (ValueError, KeyError):
                w.fail(f"tensor '{name}' has unknown type id {type_id}")
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block:
                w.fail(f"tensor '{name}' row length {dims[0]} is not a multiple of its block size {block}")
            end = data_start + offset + n // block * type_size
            if end > size:
                raise GammaError(f"{path}: truncated GGUF: tensor '{name}' ends at byte {end}, file has {size}")
            header.tensors.append(TensorInfo(name, dims, type_id, data_start + offset, n // block * type_size))
    return header
