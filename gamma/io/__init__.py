"""Checkpoint loaders: ``load_checkpoint(path)`` for every supported format.

The format is told by the file's magic bytes, never by its extension:

* safetensors (single file, sharded with ``model.safetensors.index.json``, HF directory)
* GGUF (llama.cpp; every type gguf-py can dequantize), llama / mistral / qwen2 / qwen3
* CTranslate2 Whisper ``model.bin``
* PyTorch state dicts (``torch.save`` zip or legacy pickle; ``pytorch_model.bin``)

Tensors come back as float32 CPU tensors under canonical Hugging Face names,
each shape checked against the config; every problem with the input is a
one-line :class:`~gamma.errors.GammaError` that starts with the path.
"""

from __future__ import annotations

import os

from .checkpoint import LoadedCheckpoint
from ..errors import GammaError
from .ct2_fmt import load_ct2
from .detect import Source, resolve, sniff
from .gguf_fmt import load_gguf, reverse_permute
from .statedict import load_state_dict
from .validate import expected_shapes

__all__ = ["load_checkpoint", "sniff", "expected_shapes", "reverse_permute"]

# format -> loader (one entry per format; "index" is a sharded state dict)
LOADERS = {
    "safetensors": load_state_dict,
    "pytorch": load_state_dict,
    "index": load_state_dict,
    "gguf": load_gguf,
    "ct2": load_ct2,
}


# formats whose loader can leave the tensors in the file (lazy=True); the others load eagerly
LAZY_FORMATS = ("gguf", "safetensors", "index")


def load_checkpoint(path: str | os.PathLike, lazy: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint file or directory into a validated :class:`LoadedCheckpoint`.

    ``lazy``: read names, shapes and metadata only; ``LoadedCheckpoint.tensors`` is then a
    :class:`~gamma.io.lazy.LazyTensors` that reads each tensor from the file when it is
    used (GGUF, safetensors; other formats load eagerly)."""
    path = os.fspath(path)
    src: Source = resolve(path)
    try:
        if lazy and src.fmt in LAZY_FORMATS:
            return LOADERS[src.fmt](src, lazy=True)
        return LOADERS[src.fmt](src)
    except GammaError as e:
        msg = str(e)
        if msg.isprintable():
            raise
        # names read from a corrupt file can hold control bytes: show them escaped
        raise GammaError("".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in msg)) from None
    except MemoryError:
        raise GammaError(f"{path}: out of memory while loading") from None
    except OSError as e:
        raise GammaError(f"{path}: cannot read: {e.strerror or e}") from None
