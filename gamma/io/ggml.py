"""What llama.cpp's CPU backend (ggml) does to a matmul's activations, as data.

ggml multiplies a weight of type W by activations it first converts to W's ``vec_dot_type``
(ggml-cpu's type traits): quantized to blocks of 32 (Q8_0, Q8_1) for the legacy quants,
rounded to F16 / BF16 for those weights, kept in float32 for F32 weights.  A Q8_1 block also
carries ``s = fp16(d * sum(q))``, which the dot with a weight that has a block minimum
(Q4_1, Q5_1: ``w = d q + m``) multiplies by m; so the bounds need each weight block's m,
read from the file's raw blocks (:func:`block_minima`).

K-quants, IQ and the other types (activations as Q8_K, with their own super-block sums) are
not modelled: :func:`activation_type` says so in one line.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import GammaError

# weight type -> the type ggml converts the activations to (None: they stay float32)
VEC_DOT = {"F32": None, "F16": "F16", "BF16": "BF16",
           "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0",
           "Q4_1": "Q8_1", "Q5_1": "Q8_1"}
# activation type -> elements per block along the row (F16 / BF16: each element on its own)
BLOCK = {"Q8_0": 32, "Q8_1": 32, "F16": 1, "BF16": 1}
# weight types with a block minimum m (w = d q + m): (bytes per block of 32, byte offset of m, an F16)
MINIMUM_AT = {"Q4_1": (20, 2), "Q5_1": (24, 2)}


def activation_type(dtype: str, tensor: str) -> Optional[str]:
    """The type ggml converts a ``dtype`` weight's activations to (None: float32), or GammaError
    for a type whose activation path gamma does not model."""
    if dtype not in VEC_DOT:
        raise GammaError(f"--engine llama.cpp: tensor '{tensor}' is {dtype}, whose activation path in "
                         f"ggml is not modelled (modelled: {', '.join(VEC_DOT)})")
    return VEC_DOT[dtype]


def block_minima(raw: np.ndarray, dtype: str, shape: tuple) -> Optional[np.ndarray]:
    """(rows, cols / 32) float32: each weight block's m (signed) from the raw bytes ``raw`` (one row of
    blocks per weight row) of a ``dtype`` tensor of numpy ``shape`` (rows, cols); None for a type
    without block minima."""
    if dtype not in MINIMUM_AT:
        return None
    size, at = MINIMUM_AT[dtype]
    rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // 32, size)
    m = np.ascontiguousarray(blocks[:, :, at:at + 2]).view(np.float16)[..., 0]
    return m.astype(np.float32)


def check_checkpoint(ckpt, output: str = "hidden") -> None:
    """GammaError unless ``ckpt`` (a LoadedCheckpoint) is a GGUF file whose every weight that a
    linear layer reads (``output``: "logits" adds the LM head) has a modelled activation path."""
    if ckpt.format != "gguf":
        raise GammaError(f"--engine llama.cpp needs a GGUF checkpoint (llama.cpp runs GGUF files only); "
                         f"{ckpt.path} is {ckpt.format}")
    for name, dtype in ckpt.dtypes.items():
        if name.endswith("_proj.weight") or (output == "logits" and name == "lm_head.weight"):
            activation_type(dtype, ckpt.source_names.get(name, name))
