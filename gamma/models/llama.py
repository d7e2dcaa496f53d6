"""Llama-family and Qwen3 decoder graphs, as transformers computes them.

Per block (pre-norm):  h = x + o_proj(attn(rmsnorm(x)));  y = h + down(silu(gate(n)) * up(n)),
n = rmsnorm(h).  Attention: GQA with RoPE (rotate_half convention, float32
cos/sin tables as transformers builds them), Qwen3 adds RMSNorm over
head_dim on q and k before RoPE, causal mask, scores scaled by head_dim^-0.5.
"""

from __future__ import annotations

import torch

from ..config import Checkpoint
from ..errors import GammaError
from ..graph import Graph
from .common import Weights, attention_core, causal_mask, f32_const


def rope_tables(t: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim), computed in float32 exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(t, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().double(), emb.sin().double()


def build_llama(ckpt: Checkpoint, seq_len: int, output: str = "hidden") -> Graph:
    """Graph from token embeddings (T, d) to the final hidden state (T, d) or logits (T, V)."""
    cfg = ckpt.config
    d, H, Hkv, dh, ff = cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.head_dim, cfg.d_ff
    if H % Hkv:
        raise GammaError(f"{ckpt.path}: {H} attention heads are not a multiple of {Hkv} kv heads")
    if seq_len > cfg.max_positions:
        raise GammaError(f"--seq-len {seq_len} exceeds the model's {cfg.max_positions} positions")
    W = Weights(ckpt)
    eps = f32_const(cfg.norm_eps)
    cos, sin = rope_tables(seq_len, dh, cfg.rope_theta)
    mask = causal_mask(seq_len)
    scale = f32_const(dh ** -0.5)
    qwen3 = cfg.arch == "qwen3"

    g = Graph(f"{cfg.arch}-decoder", "embeddings", (seq_len, d))
    x = "embeddings"
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"layer{i}"
        n = g.add(f"{b}.attn_norm", "rmsnorm", x, block=b, weight=W(p + "input_layernorm.weight", d), eps=eps)
        heads = {}
        for part, nh in (("q", H), ("k", Hkv), ("v", Hkv)):
            t = g.add(f"{b}.attn.{part}", "linear", n, block=b,
                      weight=W(p + f"self_attn.{part}_proj.weight", nh * dh, d),
                      bias=W.optional(p + f"self_attn.{part}_proj.bias", nh * dh))
            t = g.add(f"{b}.attn.{part}_heads", "split_heads", t, block=b, heads=nh)      # (nh, T, dh)
            if qwen3 and part != "v":
                t = g.add(f"{b}.attn.{part}_norm", "rmsnorm", t, block=b,
                          weight=W(p + f"self_attn.{part}_norm.weight", dh), eps=eps)
            if part != "v":
                t = g.add(f"{b}.attn.{part}_rope", "rope", t, block=b, cos=cos, sin=sin)
            if part != "q" and Hkv != H:
                t = g.add(f"{b}.attn.{part}_rep", "repeat_kv", t, block=b, n_rep=H // Hkv)  # (H, T, dh)
            heads[part] = t
        a = attention_core(g, b, f"{b}.attn", heads["q"], heads["k"], heads["v"], scale=scale, mask=mask)
        a = g.add(f"{b}.attn.o", "linear", a, block=b, weight=W(p + "self_attn.o_proj.weight", d, H * dh),
                  bias=W.optional(p + "self_attn.o_proj.bias", d))
        h = g.add(f"{b}.attn.residual", "add", x, a, block=b)
        n = g.add(f"{b}.mlp_norm", "rmsnorm", h, block=b, weight=W(p + "post_attention_layernorm.weight", d), eps=eps)
        gate = g.add(f"{b}.mlp.gate", "linear", n, block=b, weight=W(p + "mlp.gate_proj.weight", ff, d))
        up = g.add(f"{b}.mlp.up", "linear", n, block=b, weight=W(p + "mlp.up_proj.weight", ff, d))
        act = g.add(f"{b}.mlp.act", "silu", gate, block=b)
        sw = g.add(f"{b}.mlp.swiglu", "mul", act, up, block=b)
        down = g.add(f"{b}.mlp.down", "linear", sw, block=b, weight=W(p + "mlp.down_proj.weight", d, ff))
        x = g.add(f"{b}.mlp.residual", "add", h, down, block=b)
    x = g.add("final_norm", "rmsnorm", x, weight=W("model.norm.weight", d), eps=eps)
    if output == "logits":
        head = "lm_head.weight" if "lm_head.weight" in ckpt.tensors else "model.embed_tokens.weight"
        g.add("lm_head", "linear", x, weight=W(head, cfg.vocab_size, d))
    g.meta.update(arch=cfg.arch, component="decoder", seq_len=seq_len, output=output)
    return g.infer_shapes()


def embed_tokens(ckpt: Checkpoint, tokens: list[int]) -> torch.Tensor:
    """(T, d) float64 token embeddings."""
    emb = ckpt.get("model.embed_tokens.weight")
    bad = [t for t in tokens if not 0 <= t < emb.shape[0]]
    if bad:
        raise GammaError(f"token ids {bad} out of range [0, {emb.shape[0]})")
    return emb[torch.tensor(tokens, dtype=torch.long)].double()
