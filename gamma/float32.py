"""Float64 tensors that hold float32 values, and the float32 tensors they came from.

gamma computes in float64, but checkpoint weights are float32 values (read
from float32, float16, bfloat16 or quantized files), and the bounds run
products with them in float32 where that is exact to model
(:mod:`gamma.bounds.fp`).  :func:`is_exact32` tells whether a tensor's values
are float32 values; a loader that converts a float32 tensor records its
source (:func:`register_f32`), so :func:`weight32` hands it back instead of
converting on every call.  Entries lapse when either tensor is modified in
place and are dropped when the float64 tensor dies.
"""

from __future__ import annotations

import weakref

import torch

_EXACT32: dict = {}         # id(tensor) -> (bool, version), dropped when the tensor dies


def is_exact32(w: torch.Tensor) -> bool:
    """Whether every entry of w is a finite float32 value (weights read from
    fp16 / bf16 / float32 / quantized files are).  The check runs once per
    tensor and is remembered while the tensor lives."""
    hit = _EXACT32.get(id(w))
    if hit is not None and hit[1] == w._version:
        return hit[0]
    exact = bool((w.to(torch.float32).to(w.dtype) == w).all()) and bool(torch.isfinite(w).all())
    if hit is None:
        weakref.finalize(w, _EXACT32.pop, id(w), None)
    _EXACT32[id(w)] = (exact, w._version)         # checked again if w is modified in place
    return exact


_F32_SOURCE: dict = {}      # id(float64 tensor) -> (its float32 source, both tensors' versions)


def register_f32(w: torch.Tensor, w32: torch.Tensor) -> None:
    """Record that float64 ``w`` was made as ``w32.to(float64)`` (a checkpoint's
    float32 tensor), so float32 products can use ``w32`` without converting
    ``w`` on every call.  The entry lapses when either tensor is modified in
    place (version counters) and is dropped when ``w`` dies."""
    key = id(w)
    _F32_SOURCE[key] = (w32, w._version, w32._version)
    weakref.finalize(w, _F32_SOURCE.pop, key, None)


def weight32(w: torch.Tensor):
    """w as a float32 tensor with the same values (its registered source, or a
    conversion), or None when w is not float32-valued (:func:`is_exact32`)."""
    src = _F32_SOURCE.get(id(w))
    if src is not None:
        w32, v, v32 = src
        if v == w._version and v32 == w32._version and w32.device == w.device and w32.shape == w.shape:
            return w32
    return w.to(torch.float32) if is_exact32(w) else None
