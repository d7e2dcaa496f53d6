"""Find the weight file(s) behind a path and tell the format by its magic bytes.

Formats are told apart by content only; file *names* are used only to pick
the weight file inside a directory (the names Hugging Face and CTranslate2
write).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

from ..errors import GammaError

# Weight files looked for inside a directory, in order.
DIR_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.bin",                      # CTranslate2
)
CT2_MAX_VERSION = 6
PICKLE_PROTOCOLS = range(2, 6)


@dataclass
class Source:
    """What to load: the format, the weight file, and a config.json if any."""

    path: str                   # the path the user gave (used in messages)
    fmt: str                    # "safetensors" | "gguf" | "ct2" | "pytorch" | "index"
    file: str                   # weight file (or index json)
    config_json: Optional[str]  # config.json beside the weights, if present


def sniff(path: str) -> str:
    """The format of one file, from its first bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise GammaError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise GammaError(f"{path}: empty file")
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"PK\x03\x04"):
        return "pytorch"                          # torch.save zip archive
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "pytorch"                          # legacy torch.save pickle
    if len(head) >= 9 and head[8:9] == b"{" and head[5:8] == b"\0\0\0":
        return "safetensors"                      # u64 header length (< 2**40), then JSON
    if len(head) >= 7:
        version, name_len = struct.unpack_from("<IH", head)
        if 1 <= version <= CT2_MAX_VERSION and 2 <= name_len <= 256 and head[6:7].isalpha():
            return "ct2"                          # u32 version, u16 len, spec name
    if head.lstrip()[:1] == b"{":
        return "index"                            # sharded-checkpoint index json
    if size < 9:
        raise GammaError(f"{path}: not a recognised checkpoint (only {size} bytes)")
    if head[:1] == b"\x08" and 1 <= head[1] <= 32 or head[:2] == b"\x1f\x8b":
        # protobuf field 1 (ONNX ir_version) or gzip: ONNX models go through --vnnlib (gamma.io.onnx_load)
        raise GammaError(f"{path}: not a recognised checkpoint (an ONNX model? verify it against a standard "
                         f"VNN-LIB property: gamma verify {path} --vnnlib FILE)")
    raise GammaError(f"{path}: not a recognised checkpoint (unknown magic {head[:4]!r})")


def _config_beside(file: str) -> Optional[str]:
    cfg = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
    return cfg if os.path.isfile(cfg) else None


def resolve(path: str) -> Source:
    """Source for a file or a directory (HF, sharded or CTranslate2 layout)."""
    if not os.path.exists(path):
        raise GammaError(f"{path}: no such file")
    if os.path.isdir(path):
        for name in DIR_WEIGHT_FILES:
            file = os.path.join(path, name)
            if os.path.isfile(file):
                break
        else:
            gguf = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
            if len(gguf) != 1:
                raise GammaError(f"{path}: no checkpoint in directory (looked for {', '.join(DIR_WEIGHT_FILES)}"
                                 f"{', or exactly one .gguf' if not gguf else f'; found {len(gguf)} .gguf files'})")
            file = os.path.join(path, gguf[0])
    else:
        file = path
    fmt = sniff(file)
    return Source(path=path, fmt=fmt, file=file, config_json=_config_beside(file))
