"""Llama-family and Qwen3 decoder graphs, as transformers computes them.

Per block (pre-norm):  h = x + o_proj(attn(rmsnorm(x)));  y = h + down(silu(gate(n)) * up(n)),
n = rmsnorm(h).  Attention: GQA with RoPE (rotate_half convention, float32
cos/sin tables as transformers builds them), Qwen3 adds RMSNorm over
head_dim on q and k before RoPE, causal mask, scores scaled by head_dim^-0.5.
"""

from __future__ import annotations

import torch

from ..io.checkpoint import LoadedCheckpoint
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


class _Block:
    """What every block of one graph shares: sizes, weights, RoPE tables, mask, constants."""

    def __init__(self, ckpt: LoadedCheckpoint, seq_len: int):
        cfg = ckpt.config
        self.cfg = cfg
        self.d, self.H, self.dh, self.ff = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
        self.Hkv = cfg.n_kv_heads or cfg.n_heads
        check_sizes(ckpt, seq_len)
        self.W = Weights(ckpt)
        self.eps = f32_const(cfg.norm_eps)
        self.cos, self.sin = rope_tables(seq_len, self.dh, cfg.rope_theta)
        self.mask = causal_mask(seq_len)
        self.scale = f32_const(self.dh ** -0.5)
        self.qwen3 = cfg.arch == "qwen3"

    def add(self, g: Graph, i: int, x: str) -> str:
        """Block ``i`` reading node ``x`` (T, d); returns its output node (T, d)."""
        W, d, H, Hkv, dh, ff, eps = self.W, self.d, self.H, self.Hkv, self.dh, self.ff, self.eps
        p, b = f"model.layers.{i}.", block_name(i)
        n = g.add(f"{b}.attn_norm", "rmsnorm", x, block=b, weight=W(p + "input_layernorm.weight", d), eps=eps)
        heads = {}
        for part, nh in (("q", H), ("k", Hkv), ("v", Hkv)):
            t = g.add(f"{b}.attn.{part}", "linear", n, block=b,
                      weight=W(p + f"self_attn.{part}_proj.weight", nh * dh, d),
                      bias=W.optional(p + f"self_attn.{part}_proj.bias", nh * dh),
                      **W.ggml(p + f"self_attn.{part}_proj.weight"))
            t = g.add(f"{b}.attn.{part}_heads", "split_heads", t, block=b, heads=nh)      # (nh, T, dh)
            if self.qwen3 and part != "v":
                t = g.add(f"{b}.attn.{part}_norm", "rmsnorm", t, block=b,
                          weight=W(p + f"self_attn.{part}_norm.weight", dh), eps=eps)
            if part != "v":
                t = g.add(f"{b}.attn.{part}_rope", "rope", t, block=b, cos=self.cos, sin=self.sin)
            if part != "q" and Hkv != H:
                t = g.add(f"{b}.attn.{part}_rep", "repeat_kv", t, block=b, n_rep=H // Hkv)  # (H, T, dh)
            heads[part] = t
        a = attention_core(g, b, f"{b}.attn", heads["q"], heads["k"], heads["v"], scale=self.scale, mask=self.mask)
        a = g.add(f"{b}.attn.o", "linear", a, block=b, weight=W(p + "self_attn.o_proj.weight", d, H * dh),
                  bias=W.optional(p + "self_attn.o_proj.bias", d), **W.ggml(p + "self_attn.o_proj.weight"))
        h = g.add(f"{b}.attn.residual", "add", x, a, block=b)
        n = g.add(f"{b}.mlp_norm", "rmsnorm", h, block=b, weight=W(p + "post_attention_layernorm.weight", d), eps=eps)
        gate = g.add(f"{b}.mlp.gate", "linear", n, block=b, weight=W(p + "mlp.gate_proj.weight", ff, d),
                     **W.ggml(p + "mlp.gate_proj.weight"))
        up = g.add(f"{b}.mlp.up", "linear", n, block=b, weight=W(p + "mlp.up_proj.weight", ff, d),
                   **W.ggml(p + "mlp.up_proj.weight"))
        act = g.add(f"{b}.mlp.act", "silu", gate, block=b)
        sw = g.add(f"{b}.mlp.swiglu", "mul", act, up, block=b)
        down = g.add(f"{b}.mlp.down", "linear", sw, block=b, weight=W(p + "mlp.down_proj.weight", d, ff),
                     **W.ggml(p + "mlp.down_proj.weight"))
        return g.add(f"{b}.mlp.residual", "add", h, down, block=b)

    def head(self, g: Graph, x: str, output: str) -> str:
        """Final norm (and the LM head for ``output == "logits"``) after node ``x``."""
        x = g.add("final_norm", "rmsnorm", x, weight=self.W("model.norm.weight", self.d), eps=self.eps)
        if output == "logits":
            head = "lm_head.weight" if "lm_head.weight" in self.W.ckpt.tensors else "model.embed_tokens.weight"
            x = g.add("lm_head", "linear", x, weight=self.W(head, self.cfg.vocab_size, self.d), **self.W.ggml(head))
        return x


def check_sizes(ckpt: LoadedCheckpoint, seq_len: int) -> None:
    cfg = ckpt.config
    H, Hkv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    if H % Hkv:
        raise GammaError(f"{ckpt.path}: {H} attention heads are not a multiple of {Hkv} kv heads")
    if seq_len > cfg.max_positions:
        raise GammaError(f"--seq-len {seq_len} exceeds the model's {cfg.max_positions} positions")


def block_name(i: int) -> str:
    return f"layer{i}"


def block_input(i: int) -> str:
    """The node block ``i`` reads: the embeddings, or block ``i - 1``'s output."""
    return "embeddings" if i == 0 else f"{block_name(i - 1)}.mlp.residual"


def output_node(output: str) -> str:
    return "lm_head" if output == "logits" else "final_norm"


def build_llama(ckpt: LoadedCheckpoint, seq_len: int, output: str = "hidden") -> Graph:
    """Graph from token embeddings (T, d) to the final hidden state (T, d) or logits (T, V)."""
    cfg = ckpt.config
    blk = _Block(ckpt, seq_len)
    g = Graph(f"{cfg.arch}-decoder", "embeddings", (seq_len, cfg.d_model))
    x = "embeddings"
    for i in range(cfg.n_layers):
        x = blk.add(g, i, x)
    blk.head(g, x, output)
    g.meta.update(arch=cfg.arch, component="decoder", seq_len=seq_len, output=output)
    return g.infer_shapes()


def build_block(ckpt: LoadedCheckpoint, i: int, seq_len: int, output: str = "hidden") -> Graph:
    """Block ``i`` alone, with only its own weights: node for node, constant for constant,
    the graph ``build_llama(ckpt, seq_len, output).block_graph(f"layer{i}")`` gives."""
    cfg = ckpt.config
    if not 0 <= i < cfg.n_layers:
        raise GammaError(f"block {i} is out of range: the model has {cfg.n_layers} blocks (0..{cfg.n_layers - 1})")
    g = Graph(block_name(i), block_input(i), (seq_len, cfg.d_model))
    _Block(ckpt, seq_len).add(g, i, g.input)
    g.meta.update(arch=cfg.arch, component="decoder", seq_len=seq_len, output=output)
    return g.infer_shapes()


def build_head(ckpt: LoadedCheckpoint, seq_len: int, output: str = "hidden") -> Graph:
    """From the last block's output to the final hidden state (or logits)."""
    cfg = ckpt.config
    g = Graph("head", block_input(cfg.n_layers), (seq_len, cfg.d_model))
    _Block(ckpt, seq_len).head(g, g.input, output)
    g.meta.update(arch=cfg.arch, component="decoder", seq_len=seq_len, output=output)
    return g.infer_shapes()
