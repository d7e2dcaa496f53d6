"""Whisper encoder and decoder graphs, as transformers / ctranslate2 compute them.

Encoder: mel (n_mels, 2T) -> conv1 k3 p1 -> GELU -> conv2 k3 s2 p1 -> GELU ->
transpose (T, d) -> + positional embedding -> pre-LN blocks -> ln_post.
Block: h = x + out(attn(LN1(x)));  y = h + fc2(GELU(fc1(LN2(h)))).  q is scaled
by head_dim^-0.5 right after its projection (as transformers does); k has no bias.

Decoder (component "decoder"): token embeddings (T, d) -> + positional embedding ->
blocks with causal self-attention, cross-attention on the encoder output (held
constant at its nominal value, so its keys and values are constants) and MLP ->
final LayerNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..io.checkpoint import LoadedCheckpoint
from ..errors import GammaError
from ..graph import Graph
from ..ops import split_heads
from .common import Weights, attention_core, causal_mask, f32_const


def _self_attention(g: Graph, W: Weights, p: str, b: str, prefix: str, x: str, d: int, H: int,
                    mask: Optional[torch.Tensor]) -> str:
    scale = f32_const((d // H) ** -0.5)
    heads = {}
    for part in ("q", "k", "v"):
        t = g.add(f"{prefix}.{part}", "linear", x, block=b, weight=W(p + f"{part}_proj.weight", d, d),
                  bias=W.optional(p + f"{part}_proj.bias", d))
        if part == "q":
            t = g.add(f"{prefix}.q_scaled", "mul_const", t, block=b, c=scale)
        heads[part] = g.add(f"{prefix}.{part}_heads", "split_heads", t, block=b, heads=H)
    a = attention_core(g, b, prefix, heads["q"], heads["k"], heads["v"], scale=None, mask=mask)
    return g.add(f"{prefix}.o", "linear", a, block=b, weight=W(p + "out_proj.weight", d, d),
                 bias=W.optional(p + "out_proj.bias", d))


def _mlp(g: Graph, W: Weights, p: str, b: str, x: str, d: int, ff: int) -> str:
    h = g.add(f"{b}.mlp.fc1", "linear", x, block=b, weight=W(p + "fc1.weight", ff, d), bias=W(p + "fc1.bias", ff))
    h = g.add(f"{b}.mlp.gelu", "gelu", h, block=b)
    return g.add(f"{b}.mlp.fc2", "linear", h, block=b, weight=W(p + "fc2.weight", d, ff), bias=W(p + "fc2.bias", d))


def _ln(g: Graph, W: Weights, name: str, x: str, p: str, d: int, eps: float, block=None) -> str:
    return g.add(name, "layernorm", x, block=block, weight=W(p + ".weight", d), bias=W(p + ".bias", d), eps=eps)


def build_encoder(ckpt: LoadedCheckpoint, seq_len: int) -> Graph:
    cfg = ckpt.config
    d, H, ff = cfg.d_model, cfg.encoder_heads, cfg.encoder_ffn_dim
    eps = f32_const(cfg.layer_norm_eps)
    if seq_len > cfg.max_source_positions:
        raise GammaError(f"--seq-len {seq_len} exceeds the encoder's {cfg.max_source_positions} positions")
    W = Weights(ckpt)
    e = "model.encoder."
    g = Graph("whisper-encoder", "mel", (cfg.n_mels, 2 * seq_len))
    x = g.add("stem.conv1", "conv1d", "mel", weight=W(e + "conv1.weight", d, cfg.n_mels, 3),
              bias=W(e + "conv1.bias", d), stride=1, padding=1)
    x = g.add("stem.gelu1", "gelu", x)
    x = g.add("stem.conv2", "conv1d", x, weight=W(e + "conv2.weight", d, d, 3), bias=W(e + "conv2.bias", d),
              stride=2, padding=1)
    x = g.add("stem.gelu2", "gelu", x)
    x = g.add("stem.transpose", "transpose", x)                                   # (T, d)
    pos = W(e + "embed_positions.weight", cfg.max_source_positions, d)[:seq_len]
    x = g.add("stem.pos", "add_const", x, c=pos)
    for i in range(cfg.encoder_layers):
        p, b = f"{e}layers.{i}.", f"layer{i}"
        n = _ln(g, W, f"{b}.attn_norm", x, p + "self_attn_layer_norm", d, eps, b)
        a = _self_attention(g, W, p + "self_attn.", b, f"{b}.attn", n, d, H, None)
        h = g.add(f"{b}.attn.residual", "add", x, a, block=b)
        n = _ln(g, W, f"{b}.mlp_norm", h, p + "final_layer_norm", d, eps, b)
        x = g.add(f"{b}.mlp.residual", "add", h, _mlp(g, W, p, b, n, d, ff), block=b)
    _ln(g, W, "ln_post", x, e + "layer_norm", d, eps)
    g.meta.update(arch="whisper", component="encoder", seq_len=seq_len, output="hidden")
    return g.infer_shapes()


def cross_kv(ckpt: LoadedCheckpoint, layer: int, enc_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of cross-attention (H, S, dh) from the encoder output (S, d),
    computed in float32 as the reference engine does."""
    cfg = ckpt.config
    p = f"model.decoder.layers.{layer}.encoder_attn."
    x = enc_out.float()
    k = F.linear(x, ckpt.get(p + "k_proj.weight"), ckpt.tensors.get(p + "k_proj.bias"))
    v = F.linear(x, ckpt.get(p + "v_proj.weight"), ckpt.tensors.get(p + "v_proj.bias"))
    H = cfg.decoder_heads
    return split_heads(k, H).double(), split_heads(v, H).double()


def build_decoder(ckpt: LoadedCheckpoint, seq_len: int, enc_out: torch.Tensor, output: str = "hidden") -> Graph:
    """Decoder graph from token embeddings (T, d); ``enc_out`` (S, d) is a constant."""
    cfg = ckpt.config
    d, H, ff = cfg.d_model, cfg.decoder_heads, cfg.decoder_ffn_dim
    eps = f32_const(cfg.layer_norm_eps)
    if seq_len > cfg.max_target_positions:
        raise GammaError(f"--seq-len {seq_len} exceeds the decoder's {cfg.max_target_positions} positions")
    W = Weights(ckpt)
    dec = "model.decoder."
    g = Graph("whisper-decoder", "embeddings", (seq_len, d))
    pos = W(dec + "embed_positions.weight", cfg.max_target_positions, d)[:seq_len]
    x = g.add("stem.pos", "add_const", "embeddings", c=pos)
    mask = causal_mask(seq_len)
    scale = f32_const((d // H) ** -0.5)
    for i in range(cfg.decoder_layers):
        p, b = f"{dec}layers.{i}.", f"layer{i}"
        n = _ln(g, W, f"{b}.attn_norm", x, p + "self_attn_layer_norm", d, eps, b)
        a = _self_attention(g, W, p + "self_attn.", b, f"{b}.attn", n, d, H, mask)
        h = g.add(f"{b}.attn.residual", "add", x, a, block=b)
        n = _ln(g, W, f"{b}.cross_norm", h, p + "encoder_attn_layer_norm", d, eps, b)
        k, v = cross_kv(ckpt, i, enc_out)                                          # (H, S, dh)
        c = f"{b}.cross"
        q = g.add(f"{c}.q", "linear", n, block=b, weight=W(p + "encoder_attn.q_proj.weight", d, d),
                  bias=W.optional(p + "encoder_attn.q_proj.bias", d))
        q = g.add(f"{c}.q_scaled", "mul_const", q, block=b, c=scale)
        q = g.add(f"{c}.q_heads", "split_heads", q, block=b, heads=H)
        s = g.add(f"{c}.qk", "matmul_const", q, block=b, c=k.transpose(-1, -2).contiguous())   # (H, T, S)
        s = g.add(f"{c}.softmax", "softmax", s, block=b, mask=None)
        o = g.add(f"{c}.av", "matmul_const", s, block=b, c=v)                                   # (H, T, dh)
        o = g.add(f"{c}.merge", "merge_heads", o, block=b)
        o = g.add(f"{c}.o", "linear", o, block=b, weight=W(p + "encoder_attn.out_proj.weight", d, d),
                  bias=W.optional(p + "encoder_attn.out_proj.bias", d))
        h = g.add(f"{c}.residual", "add", h, o, block=b)
        n = _ln(g, W, f"{b}.mlp_norm", h, p + "final_layer_norm", d, eps, b)
        x = g.add(f"{b}.mlp.residual", "add", h, _mlp(g, W, p, b, n, d, ff), block=b)
    x = _ln(g, W, "final_norm", x, dec + "layer_norm", d, eps)
    if output == "logits":
        head = "proj_out.weight" if "proj_out.weight" in ckpt.tensors else dec + "embed_tokens.weight"
        g.add("lm_head", "linear", x, weight=W(head, cfg.vocab_size, d))
    g.meta.update(arch="whisper", component="decoder", seq_len=seq_len, output=output)
    return g.infer_shapes()
