"""An emulation of what llama.cpp's CPU backend (ggml) computes, for the soundness tests of
``--engine llama.cpp``: written from ggml's reference kernels, independent of gamma's bounds.

* activations of a matmul with a quantized / F16 weight: quantize_row_q8_0 / q8_1 (per block of
  32: ``d = amax / 127``, ``q = roundf(x / d)``, d stored as F16; Q8_1 also ``s = fp16(d sum q)``),
  or a rounding to F16 / BF16;
* the quantized dot: per block ``d_w d_x sum(q_w q_x) [+ m_w s_x]`` (integer sums exact), the
  blocks accumulated in float32;
* attention's products with an F16 KV cache: both operands rounded to F16, sums in float32;
* RoPE with ggml's angles: ``theta *= powf(base, -2 / dh)`` pair after pair, cosf / sinf;
* RMSNorm as ggml_rms_norm: squares in float32 summed in double, the mean rounded to float32;
* every other op in float32 (gamma's own ops on float32 tensors).

The weights' block scales and minima are read from the GGUF file's raw bytes here (gguf-py's
reader), not from gamma's loader.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from gamma.ops import forward_op

F16 = np.float16
F32 = np.float32
Q8 = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1", "F16": "F16", "BF16": "BF16"}


def quantize_q8(x: np.ndarray, with_sum: bool):
    """ggml's quantize_row_q8_0 / q8_1 reference on the last axis: (d16, q, s16 or None), with
    d16 (.., n/32), q (.., n/32, 32) int, s16 (.., n/32)."""
    xb = x.astype(F32).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = np.abs(xb).max(-1)
    d = (amax / F32(127)).astype(F32)
    inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0)).astype(F32)
    v = (xb * inv[..., None]).astype(F32)
    q = (np.sign(v) * np.floor(np.abs(v) + F32(0.5))).astype(np.int64)          # roundf: half away from zero
    s = (d * q.sum(-1).astype(F32)).astype(F32).astype(F16) if with_sum else None
    return d.astype(F16), q, s


def round_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's GGML_FP32_TO_BF16 (round to nearest even) and back to float32."""
    u = x.astype(F32).view(np.uint32).astype(np.uint64)
    u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
    return u.astype(np.uint32).view(F32)


def raw_blocks(path: str) -> dict:
    """name in the file -> (type name, raw uint8 (rows, row bytes))."""
    import gguf
    r = gguf.GGUFReader(path, "r")
    return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in r.tensors}


def weight_blocks(raw: np.ndarray, qtype: str, shape: tuple):
    """(d (rows, nb) float32, m (rows, nb) float32 or None) of a legacy-quant weight's blocks."""
    size = {"Q4_0": 18, "Q5_0": 22, "Q8_0": 34, "Q4_1": 20, "Q5_1": 24}[qtype]
    b = np.ascontiguousarray(raw).reshape(shape[0], shape[1] // 32, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(F16)[..., 0].astype(F32)
    m = np.ascontiguousarray(b[..., 2:4]).view(F16)[..., 0].astype(F32) if qtype in ("Q4_1", "Q5_1") else None
    return d, m


def ggml_linear(x: np.ndarray, w: np.ndarray, bias, qtype: str, blocks, order: str = "sequential") -> np.ndarray:
    """One linear layer as ggml computes it; x (.., n) float32, w (out, n) the dequantized weights.
    ``order``: how the blocks' float32 pieces are summed (ggml: sequential; the others stand for SIMD
    lanes and other kernels: "reverse", "largest-first", "pairwise")."""
    act = Q8.get(qtype)
    if act is None:                                               # F32 weights: a float32 dot
        y = (x.astype(F32) @ w.astype(F32).T).astype(F32)
    elif act in ("F16", "BF16"):
        xr = x.astype(F16).astype(F32) if act == "F16" else round_bf16(x)
        y = (xr @ w.astype(F32).T).astype(F32)
    else:
        dx, q, s = quantize_q8(x, act == "Q8_1")
        dw, m = blocks
        wq = (w.astype(np.float64).reshape(w.shape[0], -1, 32) - (0 if m is None else m[..., None]))
        # d_w q_w: integer block sums, exact in float64; then fl32(fl32(d_w d_x) I) and float32 sums
        I = np.einsum("obk,...bk->...ob", wq / dw[..., None], q.astype(np.float64))   # (.., out, nb): integers
        I = np.round(I)
        scale = (dw * dx.astype(F32)[..., None, :]).astype(F32)                        # (.., out, nb)
        terms = (scale * I.astype(F32)).astype(F32)
        if m is not None:
            terms = np.concatenate([terms, (m * s.astype(F32)[..., None, :]).astype(F32)], -1)
        if order == "reverse":
            terms = terms[..., ::-1]
        elif order == "largest-first":
            terms = np.take_along_axis(terms, np.argsort(-np.abs(terms), axis=-1), -1)
        if order == "pairwise":
            while terms.shape[-1] > 1:
                if terms.shape[-1] % 2:
                    terms = np.concatenate([terms, np.zeros_like(terms[..., :1])], -1)
                terms = (terms[..., 0::2] + terms[..., 1::2]).astype(F32)
            y = terms[..., 0]
        else:
            y = np.zeros(terms.shape[:-1], dtype=F32)
            for k in range(terms.shape[-1]):                     # sequential float32 accumulation
                y = (y + terms[..., k]).astype(F32)
    if bias is not None:
        y = (y + bias.astype(F32)).astype(F32)
    return y


def ggml_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm, then the weight: squares in float32 summed in double, the mean rounded to
    float32, ``1 / sqrtf(mean + eps)``, the two products in float32."""
    x = x.astype(F32)
    mean = ((x * x).astype(F32).astype(np.float64).sum(-1, keepdims=True) / x.shape[-1]).astype(F32)
    scale = (F32(1.0) / np.sqrt((mean + F32(eps)).astype(F32))).astype(F32)
    return ((x * scale).astype(F32) * w.astype(F32)).astype(F32)


def ggml_rope_tables(T: int, dh: int, base: float):
    """cos, sin (T, dh) as ggml's rope cache computes them (NEOX layout: pair i at i, i + dh/2)."""
    scale = np.power(F32(base), F32(-2.0) / F32(dh)).astype(F32)
    cos = np.zeros((T, dh), F32)
    sin = np.zeros((T, dh), F32)
    for p in range(T):
        theta = F32(p)
        for i in range(dh // 2):
            cos[p, i] = cos[p, i + dh // 2] = np.cos(theta, dtype=F32)
            sin[p, i] = sin[p, i + dh // 2] = np.sin(theta, dtype=F32)
            theta = F32(theta * scale)
    return cos, sin


GGUF_PARTS = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def gguf_name(node: str, raw: dict) -> str:
    """The file's name of a gamma Llama graph's linear node's weight (llama.cpp's naming)."""
    if node == "lm_head":
        return "output.weight" if "output.weight" in raw else "token_embd.weight"
    layer, part = node.split(".", 1)
    return f"blk.{int(layer[len('layer'):])}.{GGUF_PARTS[part]}.weight"


def unpermute(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter's row permutation of q / k (rows interleaved per head)."""
    dim = a.shape[0] // n_head // 2
    return a.reshape(n_head, dim, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


class Engine:
    """llama.cpp's CPU arithmetic on a gamma graph built from the GGUF file ``path``."""

    def __init__(self, graph, path: str, base: float, permuted: bool = True):
        self.g32 = copy.deepcopy(graph).to(dtype=torch.float32)
        raw = raw_blocks(path)
        self.blocks = {}
        for node in graph:
            if node.op == "linear" and "ggml_type" in node.params:
                qtype = node.params["ggml_type"]
                if qtype in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
                    src = gguf_name(node.name, raw)
                    w = node.params["weight"]
                    d, m = weight_blocks(raw[src][1], qtype, tuple(w.shape))
                    if permuted and any(k in src for k in (".attn_q.", ".attn_k.")):
                        heads = next(n.params["heads"] for n in graph
                                     if n.op == "split_heads" and n.inputs[0] == node.name)
                        d = unpermute(d, heads)
                        m = None if m is None else unpermute(m, heads)
                    self.blocks[node.name] = (d, m)
        self.base = base

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vals = {self.g32.input: x.to(torch.float32)}
        for node in self.g32:
            if node.op == "input":
                continue
            ins = [vals[i] for i in node.inputs]
            vals[node.name] = self.op(node, ins)
        return vals[self.g32.output].double()

    def op(self, node, ins):
        if node.op == "linear" and "ggml_type" in node.params:
            b = node.params.get("bias")
            y = ggml_linear(ins[0].numpy(), node.params["weight"].numpy(), None if b is None else b.numpy(),
                            node.params["ggml_type"], self.blocks.get(node.name))
            return torch.from_numpy(y)
        if node.op == "matmul":                                    # F16 KV cache: both sides in F16
            x, y = (t.half().float() for t in ins)
            return x @ y.transpose(-1, -2)
        if node.op == "rmsnorm":
            return torch.from_numpy(ggml_rms_norm(ins[0].numpy(), node.params["weight"].numpy(), node.params["eps"]))
        if node.op == "rope":
            T, dh = node.params["cos"].shape
            c, s = (torch.from_numpy(a) for a in ggml_rope_tables(T, dh, self.base))
            n = copy.copy(node)
            n.params = {**node.params, "cos": c, "sin": s}
            return forward_op(n, *ins)
        return forward_op(node, *ins)
