"""Expected tensor shapes per canonical name, and the checks every loader runs.

``expected_shapes(cfg)`` is the single source of truth for which tensors an
architecture has; a loaded checkpoint must have exactly these names, each
with exactly this shape, and only finite values.
"""

from __future__ import annotations

import torch

from .checkpoint import ModelConfig
from ..errors import GammaError


def _lm_shapes(c: ModelConfig) -> dict[str, tuple]:
    d, hd = c.d_model, c.head_dim
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    out = {
        "model.embed_tokens.weight": (c.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (c.vocab_size, d),
    }
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d),      # (H*hd, d)
            "self_attn.k_proj.weight": (kv, d),     # (KV*hd, d)
            "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (c.d_ff, d),
            "mlp.up_proj.weight": (c.d_ff, d),
            "mlp.down_proj.weight": (d, c.d_ff),
        }
        if c.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
        if c.attention_out_bias:
            layer["self_attn.o_proj.bias"] = (d,)
        if c.arch == "qwen3":
            layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        out.update({p + k: v for k, v in layer.items()})
    return out


def _attn(prefix: str, d: int) -> dict[str, tuple]:
    # HF WhisperAttention: k_proj has no bias
    return {
        f"{prefix}.q_proj.weight": (d, d), f"{prefix}.q_proj.bias": (d,),
        f"{prefix}.k_proj.weight": (d, d),
        f"{prefix}.v_proj.weight": (d, d), f"{prefix}.v_proj.bias": (d,),
        f"{prefix}.out_proj.weight": (d, d), f"{prefix}.out_proj.bias": (d,),
    }


def _ln(prefix: str, d: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def _ffn(prefix: str, d: int, f: int) -> dict[str, tuple]:
    return {f"{prefix}.fc1.weight": (f, d), f"{prefix}.fc1.bias": (f,),
            f"{prefix}.fc2.weight": (d, f), f"{prefix}.fc2.bias": (d,)}


def _whisper_shapes(c: ModelConfig) -> dict[str, tuple]:
    d = c.d_model
    out = {
        "model.encoder.conv1.weight": (d, c.n_mels, 3), "model.encoder.conv1.bias": (d,),
        "model.encoder.conv2.weight": (d, d, 3), "model.encoder.conv2.bias": (d,),
        "model.encoder.embed_positions.weight": (c.max_source_positions, d),
        **_ln("model.encoder.layer_norm", d),
        "model.decoder.embed_tokens.weight": (c.vocab_size, d),
        "model.decoder.embed_positions.weight": (c.max_target_positions, d),
        **_ln("model.decoder.layer_norm", d),
        "proj_out.weight": (c.vocab_size, d),
    }
    for i in range(c.encoder_layers):
        p = f"model.encoder.layers.{i}"
        out.update({**_attn(p + ".self_attn", d), **_ln(p + ".self_attn_layer_norm", d),
                    **_ffn(p, d, c.encoder_ffn_dim), **_ln(p + ".final_layer_norm", d)})
    for i in range(c.decoder_layers):
        p = f"model.decoder.layers.{i}"
        out.update({**_attn(p + ".self_attn", d), **_ln(p + ".self_attn_layer_norm", d),
                    **_attn(p + ".encoder_attn", d), **_ln(p + ".encoder_attn_layer_norm", d),
                    **_ffn(p, d, c.decoder_ffn_dim), **_ln(p + ".final_layer_norm", d)})
    return out


SHAPE_BUILDERS = {"whisper": _whisper_shapes, "llama": _lm_shapes, "qwen3": _lm_shapes}


def check_config(path: str, c: ModelConfig) -> None:
    """Sizes must be positive and heads must divide the widths they split."""
    if c.arch == "whisper":
        sizes = {"d_model": c.d_model, "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
                 "encoder_heads": c.encoder_heads, "decoder_heads": c.decoder_heads, "vocab_size": c.vocab_size}
    else:
        sizes = {"d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                 "head_dim": c.head_dim, "d_ff": c.d_ff, "vocab_size": c.vocab_size}
    for k, v in sizes.items():
        if not isinstance(v, int) or v <= 0:
            raise GammaError(f"{path}: bad config: {k}={v!r} (must be a positive integer)")
    if c.arch == "whisper":
        for k in ("encoder_heads", "decoder_heads"):
            if c.d_model % getattr(c, k):
                raise GammaError(f"{path}: bad config: d_model={c.d_model} not divisible by {k}={getattr(c, k)}")
    elif c.n_heads % c.n_kv_heads:
        raise GammaError(f"{path}: bad config: n_heads={c.n_heads} not divisible by n_kv_heads={c.n_kv_heads}")


def _stored(name: str, source_names: dict[str, str]) -> str:
    src = source_names.get(name, name)
    return "" if src == name else f" (stored as '{src}')"


def validate(path: str, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
             source_names: dict[str, str], values: bool = True) -> None:
    """Exactly the expected names, each with the expected shape, float32, finite.

    ``values=False``: names and shapes only (a lazy store checks values when it reads them)."""
    check_config(path, cfg)
    expected = expected_shapes(cfg)
    for name in tensors:
        if name not in expected:
            raise GammaError(f"{path}: unexpected tensor '{name}'{_stored(name, source_names)} "
                             f"for {cfg.arch} with this config")
    for name, shape in expected.items():
        if name not in tensors:
            raise GammaError(f"{path}: missing tensor '{name}' for {cfg.arch}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise GammaError(f"{path}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}"
                             f"{_stored(name, source_names)}")
    if not values:
        return
    checked: set[int] = set()
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise RuntimeError(f"loader bug: tensor '{name}' is {t.dtype}, not float32")
        if id(t) in checked:      # tied tensors share one object
            continue
        checked.add(id(t))
        # a finite sum proves every element finite (NaN and inf propagate); else look closely
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise GammaError(f"{path}: tensor '{name}' contains NaN or inf{_stored(name, source_names)}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Canonical tensor name -> shape for ``cfg`` (the names a LoadedCheckpoint must hold)."""
    return SHAPE_BUILDERS[cfg.arch](cfg)
