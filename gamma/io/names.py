"""Name tables: names in checkpoint files -> canonical Hugging Face names.

Everything here is data.  A table maps a module *stem* in the file to a
canonical stem; ``{i}`` stands for a layer index.  The last component of a
name (``weight``, ``bias``, ``gamma``...) is mapped through the format's
suffix table, so one row covers both the weight and the bias of a module.
:class:`NameTable` compiles a table once; nothing else in this module is code.
"""

from __future__ import annotations

import re
from typing import Optional

# --------------------------------------------------------------------------
# GGUF (llama.cpp) decoder LMs: llama, mistral, qwen2, qwen3.
# Same names as gguf-py's tensor_mapping.py (MODEL_TENSOR -> "blk.{bid}...").
GGUF_LM = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
GGUF_SUFFIX = {"weight": "weight", "bias": "bias"}

# GGUF general.architecture -> (our arch, q/k rows permuted by llama.cpp's converter).
# llama.cpp's LlamaModel.modify_tensors permutes q/k (weights and biases) for
# RoPE; Mistral uses the Llama converter; Qwen2/Qwen3 are written unpermuted.
GGUF_ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("llama", False),
    "qwen3": ("qwen3", False),
}

# GGUF metadata key (after "<arch>.") -> ModelConfig field.
GGUF_CONFIG_KEYS = {
    "block_count": "n_layers",
    "embedding_length": "d_model",
    "feed_forward_length": "d_ff",
    "attention.head_count": "n_heads",
    "attention.head_count_kv": "n_kv_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_positions",
    "vocab_size": "vocab_size",
}
# Tensors/keys that mean "a different function than the one we model".
GGUF_UNSUPPORTED_TENSORS = {"rope_freqs.weight": "RoPE frequency factors (llama3/longrope rope scaling)"}

# --------------------------------------------------------------------------
# CTranslate2 WhisperSpec (ctranslate2/converters/transformers.py, WhisperLoader).
# ``qkv_proj``/``kv_proj`` are fused tensors split by CT2_FUSED below.
CT2_WHISPER = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/position_encodings": "model.encoder.embed_positions",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "encoder/layer_{i}/self_attention/layer_norm": "model.encoder.layers.{i}.self_attn_layer_norm",
    "encoder/layer_{i}/self_attention/linear_0": "model.encoder.layers.{i}.self_attn.qkv_proj",
    "encoder/layer_{i}/self_attention/linear_1": "model.encoder.layers.{i}.self_attn.out_proj",
    "encoder/layer_{i}/ffn/layer_norm": "model.encoder.layers.{i}.final_layer_norm",
    "encoder/layer_{i}/ffn/linear_0": "model.encoder.layers.{i}.fc1",
    "encoder/layer_{i}/ffn/linear_1": "model.encoder.layers.{i}.fc2",
    "decoder/embeddings": "model.decoder.embed_tokens",
    "decoder/position_encodings": "model.decoder.embed_positions",
    "decoder/layer_norm": "model.decoder.layer_norm",
    "decoder/projection": "proj_out",
    "decoder/layer_{i}/self_attention/layer_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "decoder/layer_{i}/self_attention/linear_0": "model.decoder.layers.{i}.self_attn.qkv_proj",
    "decoder/layer_{i}/self_attention/linear_1": "model.decoder.layers.{i}.self_attn.out_proj",
    "decoder/layer_{i}/attention/layer_norm": "model.decoder.layers.{i}.encoder_attn_layer_norm",
    "decoder/layer_{i}/attention/linear_0": "model.decoder.layers.{i}.encoder_attn.q_proj",
    "decoder/layer_{i}/attention/linear_1": "model.decoder.layers.{i}.encoder_attn.kv_proj",
    "decoder/layer_{i}/attention/linear_2": "model.decoder.layers.{i}.encoder_attn.out_proj",
    "decoder/layer_{i}/ffn/layer_norm": "model.decoder.layers.{i}.final_layer_norm",
    "decoder/layer_{i}/ffn/linear_0": "model.decoder.layers.{i}.fc1",
    "decoder/layer_{i}/ffn/linear_1": "model.decoder.layers.{i}.fc2",
}
CT2_SUFFIX = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}
# fused projection -> parts, split in equal chunks along dim 0 (output rows)
CT2_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "kv_proj": ("k_proj", "v_proj")}
# parts HF Whisper does not have: CT2 stores zeros for them when fusing.  A key
# bias adds q.b_k to every logit of a query, which softmax cancels exactly.
CT2_DROPPED_PARTS = ("k_proj.bias",)
# CT2 scalar settings that must have these values for the HF Whisper function.
CT2_WHISPER_SCALARS = {
    "decoder/activation": 3,             # common_spec.Activation.GELU
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
CT2_HEAD_SCALARS = {"encoder/num_heads": "encoder_heads", "decoder/num_heads": "decoder_heads"}

# --------------------------------------------------------------------------
# Plain state dicts (PyTorch .bin/.pt, safetensors): prefixes to rewrite so
# that every name is canonical.  Applied in order, repeatedly, first match wins.
STATE_DICT_PREFIXES = (
    ("module.", ""),                      # DistributedDataParallel
    ("_orig_mod.", ""),                   # torch.compile
    ("model.model.", "model."),           # double-wrapped causal LMs
    ("encoder.", "model.encoder."),       # WhisperModel (no "model." prefix)
    ("decoder.", "model.decoder."),
    ("layers.", "model.layers."),         # LlamaModel / Qwen3Model (no lm_head)
    ("embed_tokens.", "model.embed_tokens."),
    ("norm.", "model.norm."),
)
# Keys that hold a nested state dict inside a training checkpoint.
STATE_DICT_CONTAINERS = ("state_dict", "model_state_dict", "model")
# Buffers some checkpoints carry that are not weights (recomputed from config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Canonical name whose presence identifies the architecture (checked in order).
ARCH_SIGNATURES = (
    ("whisper", "model.encoder.conv1.weight"),
    ("qwen3", "model.layers.0.self_attn.q_norm.weight"),
    ("llama", "model.layers.0.self_attn.q_proj.weight"),
)

# Output projection tied to the input embedding when absent from the file.
TIED_OUTPUT = {
    "whisper": ("proj_out.weight", "model.decoder.embed_tokens.weight"),
    "llama": ("lm_head.weight", "model.embed_tokens.weight"),
    "qwen3": ("lm_head.weight", "model.embed_tokens.weight"),
}


class NameTable:
    """A compiled name table: ``canonical(name)`` or ``None`` when not in it."""

    def __init__(self, table: dict[str, str], suffixes: dict[str, str], sep: str = "."):
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern, str]] = []
        self._suffixes = suffixes
        self._sep = sep
        for src, dst in table.items():
            if "{i}" in src:
                rx = r"(\d+)".join(re.escape(part) for part in src.split("{i}"))
                self._patterns.append((re.compile(rx + r"\Z"), dst))
            else:
                self._exact[src] = dst

    def canonical(self, name: str) -> Optional[str]:
        stem, sep, suffix = name.rpartition(self._sep)
        if not sep or suffix not in self._suffixes:
            return None
        out = self._exact.get(stem)
        if out is None:
            for rx, dst in self._patterns:
                m = rx.match(stem)
                if m:
                    out = dst.replace("{i}", str(int(m.group(1))))
                    break
        return None if out is None else f"{out}.{self._suffixes[suffix]}"


def strip_prefixes(name: str) -> str:
    """Rewrite a plain state-dict key with STATE_DICT_PREFIXES until canonical."""
    for _ in range(8):          # a few wrappers deep at most
        for prefix, repl in STATE_DICT_PREFIXES:
            if name.startswith(prefix):
                name = repl + name[len(prefix):]
                break
        else:
            return name
    return name
