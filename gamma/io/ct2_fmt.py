"""CTranslate2 Whisper ``model.bin``: our own parser of the CT2 binary layout.

Layout (``ctranslate2/specs/model_spec.py``, ``ModelSpec._serialize``), little endian::

    u32 binary_version (4..6)
    str spec_name, u32 spec_revision             # str = u16 length incl. NUL, bytes, NUL
    u32 n_variables
      n_variables x { str name; u8 rank; u32 dims[rank]; u8 dtype; u32 n_bytes; bytes }
    u32 n_aliases
      n_aliases x { str alias; str variable_name }

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.  Quantized
weights ``X/weight`` come with ``X/weight_scale`` (int8: one scale per output
row; int16: one scalar) and dequantize as ``weight / scale``.  Every length is
checked against the bytes left before anything is read or allocated.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import torch

from .checkpoint import LoadedCheckpoint, ModelConfig
from ..errors import GammaError
from .assemble import Collected, finish
from .detect import Source
from .hfconfig import WHISPER_HEADS_BY_WIDTH
from .names import (CT2_DROPPED_PARTS, CT2_FUSED, CT2_HEAD_SCALARS, CT2_SUFFIX, CT2_WHISPER,
                    CT2_WHISPER_SCALARS, NameTable)

CT2_VERSIONS = (4, 5, 6)
CT2_DTYPES = {0: ("F32", "<f4"), 1: ("I8", "i1"), 2: ("I16", "<i2"), 3: ("I32", "<i4"),
              4: ("F16", "<f2"), 5: ("BF16", "<u2")}
MAX_RANK = 8
MIN_VARIABLE_BYTES = 2 + 1 + 1 + 1 + 4          # empty name, rank, dtype, n_bytes
SUPPORTED_SPECS = ("WhisperSpec",)

_NAMES = NameTable(CT2_WHISPER, CT2_SUFFIX, sep="/")


class _Cursor:
    """Bounds-checked little-endian reads over a read-only memory map."""

    def __init__(self, path: str, buf: np.ndarray):
        self.path, self.buf, self.pos = path, buf, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GammaError(f"{self.path}: truncated CTranslate2 model: {what} needs {n} bytes "
                             f"at offset {self.pos}, file has {len(self.buf)}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out if len(out) > 1 else out[0]

    def string(self, what: str) -> str:
        n = self.unpack("<H", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        if n == 0 or raw[-1:] != b"\0":
            raise GammaError(f"{self.path}: corrupt CTranslate2 model: {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise GammaError(f"{self.path}: corrupt CTranslate2 model: {what} is not UTF-8") from None

    def array(self, n_bytes: int, dtype: str, shape: tuple, what: str) -> np.ndarray:
        self._need(n_bytes, what)
        out = self.buf[self.pos:self.pos + n_bytes].view(dtype).reshape(shape)
        self.pos += n_bytes
        return out


def parse_ct2(path: str) -> tuple[str, dict[str, tuple[np.ndarray, str]]]:
    """(spec name, {variable or alias name: (raw array, dtype name)}); arrays view the file."""
    size = os.path.getsize(path)
    if size < 16:
        raise GammaError(f"{path}: truncated CTranslate2 model ({size} bytes)")
    cur = _Cursor(path, np.memmap(path, dtype=np.uint8, mode="r"))
    version = cur.unpack("<I", "version")
    if version not in CT2_VERSIONS:
        raise GammaError(f"{path}: unsupported CTranslate2 binary version {version} (supported: 4-6)")
    spec = cur.string("spec name")
    cur.unpack("<I", "spec revision")
    n_vars = cur.unpack("<I", "variable count")
    if n_vars * MIN_VARIABLE_BYTES > size:
        raise GammaError(f"{path}: corrupt CTranslate2 model: {n_vars} variables in a {size}-byte file")
    variables: dict[str, tuple[np.ndarray, str]] = {}
    for _ in range(n_vars):
        name = cur.string("variable name")
        rank = cur.unpack("<B", f"rank of '{name}'")
        if rank > MAX_RANK:
            raise GammaError(f"{path}: corrupt CTranslate2 model: variable '{name}' has rank {rank}")
        shape = cur.unpack(f"<{rank}I", f"shape of '{name}'") if rank else ()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        type_id, n_bytes = cur.unpack("<BI", f"dtype of '{name}'")
        if type_id not in CT2_DTYPES:
            raise GammaError(f"{path}: corrupt CTranslate2 model: variable '{name}' has dtype id {type_id}")
        dname, np_dtype = CT2_DTYPES[type_id]
        if n_bytes != math.prod(shape) * np.dtype(np_dtype).itemsize:
            raise GammaError(f"{path}: corrupt CTranslate2 model: variable '{name}' has {n_bytes} bytes "
                             f"for shape {shape} {dname}")
        if name in variables:
            raise GammaError(f"{path}: corrupt CTranslate2 model: duplicate variable '{name}'")
        variables[name] = (cur.array(n_bytes, np_dtype, shape, f"data of '{name}'"), dname)
    n_alias = cur.unpack("<I", "alias count")
    if n_alias * 6 > size:
        raise GammaError(f"{path}: corrupt CTranslate2 model: {n_alias} aliases in a {size}-byte file")
    for _ in range(n_alias):
        alias, target = cur.string("alias name"), cur.string("alias target")
        if target not in variables or alias in variables:
            raise GammaError(f"{path}: corrupt CTranslate2 model: bad alias '{alias}' -> '{target}'")
        variables[alias] = variables[target]
        if target + "_scale" in variables:      # a quantized alias shares its target's scale
            variables.setdefault(alias + "_scale", variables[target + "_scale"])
    if cur.pos != size:
        raise GammaError(f"{path}: corrupt CTranslate2 model: {size - cur.pos} trailing bytes")
    return spec, variables


def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _dequantize(path: str, variables: dict) -> dict[str, tuple[np.ndarray, str]]:
    """Float32 arrays for every non-scalar variable; ``*_scale`` folded into its weight."""
    out, done = {}, {}
    for name, (a, dtype) in variables.items():
        if a.ndim == 0 or name.endswith("_scale"):
            continue
        scale = variables.get(name + "_scale")
        key = (id(a), id(scale[0]) if scale else None)
        if key in done:                         # an alias: share the converted array
            out[name] = done[key]
            continue
        w = _to_f32(a, dtype)
        if scale is not None:
            s = _to_f32(*scale)
            if s.ndim == 1 and s.shape[0] == w.shape[0]:
                s = s.reshape((-1,) + (1,) * (w.ndim - 1))
            elif s.ndim != 0:
                raise GammaError(f"{path}: corrupt CTranslate2 model: scale of '{name}' has shape {s.shape}")
            w = w / s
        elif dtype not in ("F32", "F16", "BF16"):
            raise GammaError(f"{path}: variable '{name}' is {dtype} without a '{name}_scale'")
        out[name] = done[key] = (w, dtype)
    return out


def _scalar(variables: dict, name: str):
    a = variables.get(name)
    return None if a is None or a[0].ndim != 0 else a[0].item()


def load_ct2(src: Source) -> LoadedCheckpoint:
    path = src.file
    spec, variables = parse_ct2(path)
    if spec not in SUPPORTED_SPECS:
        raise GammaError(f"{src.path}: CTranslate2 model '{spec}' is not supported (only {', '.join(SUPPORTED_SPECS)})")
    for name, want in CT2_WHISPER_SCALARS.items():
        got = _scalar(variables, name)
        if got is not None and got != want:
            raise GammaError(f"{src.path}: unsupported CTranslate2 setting {name}={got} (expected {want})")
    c = Collected(src.path)
    tensors: dict[int, torch.Tensor] = {}       # id(array) -> tensor, so aliases stay one object

    def owned(a: np.ndarray) -> torch.Tensor:
        if id(a) not in tensors:
            tensors[id(a)] = torch.from_numpy(np.ascontiguousarray(a))
        return tensors[id(a)]

    for name, (w, dtype) in _dequantize(src.path, variables).items():
        canonical = _NAMES.canonical(name)
        if canonical is None:
            raise GammaError(f"{src.path}: unrecognised CTranslate2 variable '{name}'")
        stem, _, param = canonical.rpartition(".")
        module, _, proj = stem.rpartition(".")
        parts = CT2_FUSED.get(proj)
        if parts is None:
            c.add(canonical, owned(w), dtype, name)
            continue
        if w.shape[0] % len(parts):
            raise GammaError(f"{src.path}: fused variable '{name}' has {w.shape[0]} rows, "
                             f"not divisible into {len(parts)} parts")
        for part, chunk in zip(parts, np.split(w, len(parts), axis=0)):
            if f"{part}.{param}" in CT2_DROPPED_PARTS:
                if np.any(chunk != 0):
                    c.notes.append(f"dropped nonzero {module}.{part}.{param} from '{name}' "
                                   f"(a key bias is cancelled exactly by softmax)")
                continue
            c.add(f"{module}.{part}.{param}", torch.from_numpy(np.ascontiguousarray(chunk)), dtype, name)
    cfg = _whisper_config(src.path, variables, c)
    return finish(c, "ct2", cfg)


def _whisper_config(path: str, variables: dict, c: Collected) -> ModelConfig:
    shapes = c.shapes()

    def dim(name: str, axis: int) -> int:
        s = shapes.get(name)
        if s is None or len(s) <= axis:
            raise GammaError(f"{path}: missing tensor '{name}' for whisper")
        return s[axis]

    def layers(prefix: str) -> int:
        idx = {int(n[len(prefix):].split(".")[0]) for n in shapes if n.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    d = dim("model.encoder.conv1.weight", 0)
    heads = {}
    for name, field in CT2_HEAD_SCALARS.items():
        h = _scalar(variables, name)
        if h is None:
            h = WHISPER_HEADS_BY_WIDTH.get(d)
            if h is None:
                raise GammaError(f"{path}: '{name}' is not stored and d_model={d} is not a standard Whisper width")
            c.notes.append(f"'{name}' not stored: assumed {h} (standard Whisper heads for width {d})")
        heads[field] = int(h)
    c.notes.append("CTranslate2 Whisper: sizes read from tensor shapes, head counts from "
                   "encoder/num_heads and decoder/num_heads; layer_norm_eps=1e-5 (Whisper's)")
    return ModelConfig(
        arch="whisper", d_model=d, n_mels=dim("model.encoder.conv1.weight", 1),
        vocab_size=dim("model.decoder.embed_tokens.weight", 0),
        encoder_layers=layers("model.encoder.layers."), decoder_layers=layers("model.decoder.layers."),
        encoder_ffn_dim=dim("model.encoder.layers.0.fc1.weight", 0),
        decoder_ffn_dim=dim("model.decoder.layers.0.fc1.weight", 0),
        max_source_positions=dim("model.encoder.embed_positions.weight", 0),
        max_target_positions=dim("model.decoder.embed_positions.weight", 0),
        tie_word_embeddings=True, layer_norm_eps=1e-5,
        extra={"source": "ct2", "spec": "WhisperSpec"}, **heads)
