"""Plain state dicts: safetensors files, PyTorch ``torch.save`` files, sharded indexes.

Readers return ``{name in file: (float32 tensor, source dtype)}``; names are
made canonical with the prefix table, and the config comes from the
config.json beside the weights or is inferred from the shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import torch

from .checkpoint import LoadedCheckpoint
from ..errors import GammaError
from .assemble import Collected, finish
from .detect import Source, sniff
from .hfconfig import config_from_hf, infer_config, read_config_json
from .lazy import FileTensor
from .names import IGNORED_SUFFIXES, STATE_DICT_CONTAINERS, strip_prefixes

# safetensors dtype -> bytes per element (floating types we convert to float32)
ST_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ST_MAX_HEADER = 100 * 2**20          # the safetensors library's own limit
TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
MAX_INDEX_BYTES = 64 * 2**20

Raw = dict[str, tuple[torch.Tensor, str]]


def _short(e: BaseException) -> str:
    msg = str(e)
    cause = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)   # torch's weights_only essay: keep the cause
    msg = " ".join((cause.group(1) if cause else msg).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


# ------------------------------------------------------------------ safetensors
def safetensors_header(path: str) -> dict[str, tuple[str, tuple, int]]:
    """Parse and check a safetensors header: ``{name: (dtype, shape, offset of its data in the file)}``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise GammaError(f"{path}: truncated safetensors header")
        n = int.from_bytes(prefix, "little")
        if n > ST_MAX_HEADER:
            raise GammaError(f"{path}: corrupt safetensors header (declares {n} bytes)")
        if 8 + n > size:
            raise GammaError(f"{path}: truncated safetensors header (declares {n} bytes, file has {size - 8})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise GammaError(f"{path}: corrupt safetensors header: {_short(e)}") from None
    if not isinstance(header, dict):
        raise GammaError(f"{path}: corrupt safetensors header: not a JSON object")
    data_len, out = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, lo, hi)) and isinstance(dtype, str)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise GammaError(f"{path}: corrupt safetensors header: bad entry for tensor '{name}'")
        if dtype not in ST_FLOAT_DTYPES:
            raise GammaError(f"{path}: tensor '{name}' has unsupported dtype {dtype} "
                             f"(supported: {', '.join(ST_FLOAT_DTYPES)})")
        if hi - lo != math.prod(shape) * ST_FLOAT_DTYPES[dtype] or lo > hi:
            raise GammaError(f"{path}: corrupt safetensors header: tensor '{name}' offsets {lo}..{hi} "
                             f"do not fit shape {shape} {dtype}")
        if hi > data_len:
            raise GammaError(f"{path}: truncated safetensors data: tensor '{name}' ends at byte {hi}, "
                             f"data has {data_len}")
        out[name] = (dtype, shape, 8 + n + lo)
    return out


def lazy_safetensors(path: str) -> Raw:
    """Like :func:`read_safetensors`, reading the header only: ``{name: (FileTensor, dtype)}``."""
    out: Raw = {}
    for name, (dtype, shape, offset) in safetensors_header(path).items():
        nbytes = math.prod(shape) * ST_FLOAT_DTYPES[dtype]
        out[name] = (FileTensor(os.path.abspath(path), offset, nbytes, "safetensors", dtype, shape, name), dtype)
    return out


def read_safetensors(path: str) -> Raw:
    from safetensors import safe_open
    header = safetensors_header(path)
    out: Raw = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in header:
                    raise GammaError(f"{path}: corrupt safetensors header: unexpected tensor '{name}'")
                out[name] = (f.get_tensor(name).to(torch.float32), header[name][0])
    except GammaError:
        raise
    except Exception as e:                      # the parser's own complaint about a bad file
        raise GammaError(f"{path}: corrupt safetensors: {_short(e)}") from None
    return out


# ------------------------------------------------------------------ PyTorch
def _unwrap(path: str, obj) -> Mapping:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            key = next((k for k in STATE_DICT_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
            if key is not None:
                obj = obj[key]
                continue
        break
    if not isinstance(obj, Mapping):
        raise GammaError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    return obj


def read_torch(path: str) -> Raw:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
        # torch.load picks safetensors by a ".safetensors" name: give it the open file then
        # (mmap needs a path, and only the zip format can be mapped)
        by_path = is_zip and not path.endswith(".safetensors")
        f.seek(0)
        try:
            obj = torch.load(path if by_path else f, map_location="cpu", weights_only=True, mmap=by_path)
        except Exception as e:
            raise GammaError(f"{path}: corrupt PyTorch checkpoint: {_short(e)}") from None
    out: Raw = {}
    for name, t in _unwrap(path, obj).items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise GammaError(f"{path}: not a state dict (entry {name!r} is a {type(t).__name__})")
        if t.dtype not in TORCH_DTYPES:
            raise GammaError(f"{path}: tensor '{name}' has unsupported dtype {t.dtype}")
        if t.layout != torch.strided or t.is_quantized:
            raise GammaError(f"{path}: tensor '{name}' is not a dense tensor")
        out[name] = (t.to(torch.float32), TORCH_DTYPES[t.dtype])
    return out


FILE_READERS = {"safetensors": read_safetensors, "pytorch": read_torch}
LAZY_READERS = {"safetensors": lazy_safetensors}     # PyTorch files load eagerly


# ------------------------------------------------------------------ shards
def read_index(path: str, lazy: bool = False) -> tuple[Raw, str]:
    """A sharded checkpoint: ``*.index.json`` with a ``weight_map`` of shard files
    (``lazy``: safetensors shards by their headers only)."""
    try:
        if os.path.getsize(path) > MAX_INDEX_BYTES:
            raise ValueError("index file too large")
        with open(path, "rb") as f:
            index = json.loads(f.read())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GammaError(f"{path}: not a recognised checkpoint index ({_short(e)})") from None
    folder, out, fmts = os.path.dirname(os.path.abspath(path)), {}, set()
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise GammaError(f"{path}: shard name '{shard}' must be a file name in the same directory")
        file = os.path.join(folder, shard)
        if not os.path.isfile(file):
            raise GammaError(f"{file}: no such file (shard listed in {os.path.basename(path)})")
        fmt = sniff(file)
        if fmt not in FILE_READERS:
            raise GammaError(f"{file}: shard is a {fmt} file, expected safetensors or PyTorch")
        fmts.add(fmt)
        reader = LAZY_READERS[fmt] if lazy and fmt in LAZY_READERS else FILE_READERS[fmt]
        for name, v in reader(file).items():
            if name in out:
                raise GammaError(f"{file}: tensor '{name}' appears in more than one shard")
            out[name] = v
    missing = [n for n in weight_map if n not in out]
    if missing:
        raise GammaError(f"{path}: tensor '{missing[0]}' listed in the index is in no shard")
    if len(fmts) != 1:
        raise GammaError(f"{path}: shards must all be safetensors or all PyTorch files")
    return out, fmts.pop()


def load_state_dict(src: Source, lazy: bool = False) -> LoadedCheckpoint:
    """A LoadedCheckpoint from a safetensors / PyTorch / sharded state dict (+ config.json).

    ``lazy``: safetensors files by their headers only (tensors read when used, :mod:`gamma.io.lazy`);
    PyTorch files (and shards) load eagerly."""
    if src.fmt == "index":
        raw, fmt = read_index(src.file, lazy)
    else:
        reader = LAZY_READERS[src.fmt] if lazy and src.fmt in LAZY_READERS else FILE_READERS[src.fmt]
        raw, fmt = reader(src.file), src.fmt
    lazy = lazy and all(isinstance(t, FileTensor) for t, _ in raw.values())
    c = Collected(src.path)
    for name, (t, dtype) in raw.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        c.add(strip_prefixes(name), t, dtype, name)
    cfg_json = read_config_json(src.config_json) if src.config_json else None
    if cfg_json is not None and "model_type" in cfg_json:
        cfg = config_from_hf(src.config_json, cfg_json)
        c.notes.append(f"config from {src.config_json}")
    else:
        cfg, notes = infer_config(src.path, c.shapes())
        c.notes.extend(notes)
    return finish(c, fmt, cfg, lazy=lazy)
