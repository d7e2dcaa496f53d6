"""GGUF (llama.cpp) decoder LMs, read with gguf-py's memory-mapped GGUFReader.

ggml lists dimensions fastest-first (``ne``); numpy shapes are the reverse,
so a Linear weight with ``ne = [in, out]`` reads as ``(out, in)``, the HF
orientation.  For the ``llama`` family llama.cpp's converter permutes the rows
of q/k (weights and biases) to interleave RoPE pairs; we undo it exactly as
transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import torch

from .checkpoint import LoadedCheckpoint, ModelConfig
from ..errors import GammaError
from .assemble import Collected, finish, np_to_f32
from .detect import Source
from .ggml import block_minima
from .gguf_check import check_gguf
from .lazy import FileTensor
from .names import GGUF_ARCHS, GGUF_CONFIG_KEYS, GGUF_LM, GGUF_SUFFIX, GGUF_UNSUPPORTED_TENSORS, NameTable
from .validate import check_config

REQUIRED_KEYS = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
# metadata defaults, each reported in the notes when used
KEY_DEFAULTS = {"attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "context_length": 2048}
DIRECT_TYPES = {"F64": np.float64}             # plain types gguf-py's dequantize does not handle

_NAMES = NameTable(GGUF_LM, GGUF_SUFFIX)


def _reader(path: str, lazy: bool = False):
    """gguf-py's GGUFReader (eager), or for ``lazy`` the header as our own walk read it (metadata
    and tensor table in one pass of struct reads, much faster on large tokenizer arrays)."""
    import gguf
    header = check_gguf(path)
    if lazy and header.order == "<":
        return _HeaderReader(path, header)
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise GammaError(f"{path}: corrupt GGUF: {' '.join(str(e).split())[:200] or type(e).__name__}") from None


class _Field(NamedTuple):
    value: Any

    def contents(self):                     # as gguf-py's ReaderField.contents
        v = self.value
        return str(v, encoding="utf-8") if isinstance(v, bytes) else v


class _Tensor(NamedTuple):
    name: str
    tensor_type: Any                        # GGMLQuantizationType
    shape: list                             # ggml ne
    data_offset: int
    n_bytes: int


class _HeaderReader:
    """The parts of a GGUFReader that the lazy loader uses, from :func:`check_gguf`'s walk."""

    def __init__(self, path: str, header):
        from gguf.constants import GGMLQuantizationType
        self.fields = {k: _Field(v) for k, v in header.fields.items()}
        self.tensors, seen = [], set()
        for t in header.tensors:
            if t.name in seen:                # GGUFReader's own check and words
                raise GammaError(f"{path}: corrupt GGUF: Found duplicated tensor with name {t.name}")
            seen.add(t.name)
            self.tensors.append(_Tensor(t.name, GGMLQuantizationType(t.type_id), t.ne, t.data_offset, t.n_bytes))


def _value(path: str, reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        v = field.contents()
    except Exception as e:
        raise GammaError(f"{path}: corrupt GGUF: metadata '{key}': {e}") from None
    if isinstance(v, list):                     # per-layer values: accept when all equal
        if not v or any(x != v[0] for x in v):
            raise GammaError(f"{path}: unsupported per-layer metadata '{key}' = {v[:8]}")
        v = v[0]
    return v


def _number(path: str, key: str, v, kind):
    ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
    if not ok or (kind is int and v != int(v)):
        raise GammaError(f"{path}: corrupt GGUF: metadata '{key}' = {v!r}")
    return kind(v)


def _config(path: str, reader, prefix: str, arch: str, names: set[str], notes: list[str]) -> ModelConfig:
    kw = {}
    for key, field in GGUF_CONFIG_KEYS.items():
        v = _value(path, reader, f"{prefix}.{key}")
        if v is None:
            if key in REQUIRED_KEYS:
                raise GammaError(f"{path}: corrupt GGUF: missing metadata '{prefix}.{key}'")
            if key in KEY_DEFAULTS:
                v = KEY_DEFAULTS[key]
                notes.append(f"metadata '{prefix}.{key}' absent: assumed {v}")
            else:
                continue
        kw[field] = _number(path, f"{prefix}.{key}", v, float if field in ("norm_eps", "rope_theta") else int)
    kw.setdefault("n_kv_heads", kw["n_heads"])
    if kw["n_heads"] <= 0 or kw["d_model"] <= 0:
        raise GammaError(f"{path}: corrupt GGUF: head_count={kw['n_heads']}, embedding_length={kw['d_model']}")
    kw.setdefault("head_dim", kw["d_model"] // kw["n_heads"])
    rope_dim = _value(path, reader, f"{prefix}.rope.dimension_count")
    if rope_dim is not None and rope_dim != kw["head_dim"]:
        raise GammaError(f"{path}: unsupported partial RoPE (rope.dimension_count={rope_dim}, head_dim={kw['head_dim']})")
    scaling = _value(path, reader, f"{prefix}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GammaError(f"{path}: unsupported rope_scaling type '{scaling}' (only default RoPE)")
    return ModelConfig(
        arch=arch, tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, attention_out_bias="blk.0.attn_output.bias" in names,
        extra={"source": "gguf", "general.architecture": prefix}, **kw)


def _dequantize(path: str, t) -> tuple[np.ndarray, str]:
    """(numpy float array in numpy order = reversed ggml ne, type name)."""
    qname = t.tensor_type.name
    shape = tuple(int(n) for n in reversed(t.shape))
    return dequantize_array(path, t.name, qname, t.data, shape), qname


def dequantize_array(path: str, name: str, qname: str, data: np.ndarray, shape: tuple) -> np.ndarray:
    """gguf-py's dequantization of ``data`` (GGUFReader's array for type ``qname``: typed
    items, or bytes shaped (..., rows, row bytes)) as a float array of ``shape``."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType
    try:
        if qname in DIRECT_TYPES:
            arr = np.asarray(data).view(DIRECT_TYPES[qname])
        else:
            arr = quants.dequantize(data, GGMLQuantizationType[qname])
        return arr.reshape(shape)
    except NotImplementedError:
        raise GammaError(f"{path}: unsupported quant type {qname} (tensor '{name}'; "
                         f"gguf-py cannot dequantize it)") from None
    except Exception as e:
        ne = list(reversed(shape))
        raise GammaError(f"{path}: corrupt GGUF: tensor '{name}' ({qname}, ne={ne}): "
                         f"{' '.join(str(e).split())[:160]}") from None


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute(w, n_head)`` on the rows of q/k (weights or biases).

    llama.cpp: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``;
    this is its inverse (transformers' ``_reverse_permute_weights``).
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def load_gguf(src: Source, lazy: bool = False) -> LoadedCheckpoint:
    """``lazy``: read the header only; every tensor is read from the file when it is used
    (:mod:`gamma.io.lazy`)."""
    path = src.file
    reader = _reader(path, lazy)
    lazy = lazy and isinstance(reader, _HeaderReader)      # big-endian files load eagerly
    prefix = _value(path, reader, "general.architecture")
    if prefix not in GGUF_ARCHS:
        raise GammaError(f"{src.path}: unknown architecture '{prefix}' "
                         f"(supported GGUF architectures: {', '.join(GGUF_ARCHS)})")
    arch, permuted = GGUF_ARCHS[prefix]
    names = {t.name for t in reader.tensors}
    for name, what in GGUF_UNSUPPORTED_TENSORS.items():
        if name in names:
            raise GammaError(f"{src.path}: unsupported: tensor '{name}' ({what})")
    c = Collected(src.path)
    cfg = _config(src.path, reader, prefix, arch, names, c.notes)
    vocab_from_tensor = cfg.vocab_size == 0    # no "<arch>.vocab_size": take token_embd's rows
    cfg.vocab_size = cfg.vocab_size or 1
    check_config(src.path, cfg)                 # positive sizes before heads are used as divisors
    counts: Counter = Counter()
    for t in reader.tensors:
        canonical = _NAMES.canonical(t.name)
        if canonical is None:
            raise GammaError(f"{src.path}: unrecognised tensor '{t.name}' for GGUF architecture '{prefix}'")
        qname = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))
        n = 0
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            n = cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads
        if lazy:
            entry = FileTensor(os.path.abspath(path), int(t.data_offset), int(t.n_bytes), "gguf", qname, shape,
                               t.name, n)
            if qname not in counts:                 # a type gguf-py cannot dequantize fails now, not later
                _probe(src.path, entry)
            counts[qname] += 1
            if n and shape[0] % (2 * n):
                raise GammaError(f"{src.path}: tensor '{t.name}' has {shape[0]} rows, not a multiple "
                                 f"of 2 x {n} heads")
            c.add(canonical, entry, qname, t.name)
            continue
        arr, qname = _dequantize(src.path, t)
        counts[qname] += 1
        mins = block_minima(t.data, qname, shape)
        if n:
            if arr.shape[0] % (2 * n):
                raise GammaError(f"{src.path}: tensor '{t.name}' has {arr.shape[0]} rows, not a multiple "
                                 f"of 2 x {n} heads")
            arr = reverse_permute(arr, n)
            mins = None if mins is None else reverse_permute(mins, n)
        c.add(canonical, np_to_f32(arr), qname, t.name)
        if mins is not None:
            c.block_minima[canonical] = torch.from_numpy(np.ascontiguousarray(mins))
    if vocab_from_tensor and "model.embed_tokens.weight" in c.tensors:
        cfg.vocab_size = int(c.tensors["model.embed_tokens.weight"].shape[0])
    name = _value(src.path, reader, "general.name")
    c.notes.append(f"GGUF '{prefix}'{f' ({name})' if name else ''}: "
                   + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    if permuted:
        c.notes.append("undid llama.cpp's RoPE row permutation of q/k")
    return finish(c, "gguf", cfg, lazy=lazy)


def _probe(path: str, e: FileTensor) -> None:
    """Dequantize one block of zero bytes of ``e``'s type (no file data is read): a type
    gguf-py cannot dequantize fails here, with the eager loader's message, not at first use."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    if e.dtype in DIRECT_TYPES:
        return
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType[e.dtype]][1]
    try:
        dequantize_array(path, e.source, e.dtype, np.zeros((1, type_size), np.uint8), (-1,))
    except GammaError as err:
        if "unsupported quant type" in str(err):
            raise
