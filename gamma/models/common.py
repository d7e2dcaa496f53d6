"""Building blocks shared by the architecture builders."""

from __future__ import annotations

from typing import Optional

import torch

from ..float32 import register_f32
from ..graph import Graph
from ..io.checkpoint import LoadedCheckpoint


def f32_const(value: float) -> float:
    """A Python scalar as the float32 value a float32 engine multiplies by."""
    return float(torch.tensor(value, dtype=torch.float32))


class Weights:
    """Shape-checked float64 views of a checkpoint's float32 tensors."""

    def __init__(self, ckpt: LoadedCheckpoint):
        self.ckpt = ckpt

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        t = self.ckpt.get(name, shape)
        w = t.to(torch.float64)
        if t.dtype == torch.float32:
            register_f32(w, t)          # float32 products use t itself, no conversion per call
        return w

    def optional(self, name: str, *shape: int) -> Optional[torch.Tensor]:
        return self(name, *shape) if name in self.ckpt.tensors else None

    def ggml(self, name: str) -> dict:
        """A linear node's params saying how llama.cpp feeds it activations (:mod:`gamma.io.ggml`)
        where its weight ``name`` comes from a GGUF file: the weight's type, and each block's m
        for Q4_1 / Q5_1; empty for other formats."""
        if self.ckpt.format != "gguf" or self.ckpt.dtypes[name] == "F32":
            return {}                   # float32 weights: float32 activations, as any float32 engine
        out = {"ggml_type": self.ckpt.dtypes[name]}
        m = self.ckpt.minima(name)
        if m is not None:
            out["ggml_minima"] = m.to(torch.float64)
        return out


def causal_mask(t: int, s: Optional[int] = None) -> torch.Tensor:
    """(T, S) bool, True where query t may attend key s (s <= t)."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool).tril()


def attention_core(g: Graph, b: str, prefix: str, q: str, k: str, v: str, *,
                   scale: Optional[float], mask: Optional[torch.Tensor]) -> str:
    """softmax(q k^T [* scale] [masked]) v for per-head q (H,T,dh), k (H,S,dh), v (H,S,dh).

    Returns the merged output node (T, H*dh).
    """
    s = g.add(f"{prefix}.qk", "matmul", q, k, block=b)                      # (H, T, S)
    if scale is not None:
        s = g.add(f"{prefix}.scores", "mul_const", s, block=b, c=scale)
    p = g.add(f"{prefix}.softmax", "softmax", s, block=b, mask=mask)       # (H, T, S)
    vt = g.add(f"{prefix}.v_t", "transpose", v, block=b)                  # (H, dh, S)
    o = g.add(f"{prefix}.av", "matmul", p, vt, block=b, rows_sum_to_one=True)   # (H, T, dh)
    return g.add(f"{prefix}.merge", "merge_heads", o, block=b)            # (T, H*dh)
