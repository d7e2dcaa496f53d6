"""ModelConfig from a Hugging Face ``config.json``, or inferred from tensor shapes."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from .checkpoint import ModelConfig
from ..errors import GammaError
from .names import ARCH_SIGNATURES

# model_type -> (arch, q/k/v bias, o_proj bias); None = read config's "attention_bias".
LM_MODEL_TYPES = {
    "llama": ("llama", None, None),       # SmolLM2 is a llama
    "mistral": ("llama", None, None),
    "qwen2": ("llama", True, False),      # Qwen2: q/k/v biases, no o_proj bias
    "qwen3": ("qwen3", None, None),
}
MODEL_TYPES = ("whisper",) + tuple(LM_MODEL_TYPES)

# ModelConfig field -> config.json key (value required unless it has a default here)
LM_FIELDS = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "d_ff": "intermediate_size",
    "norm_eps": "rms_norm_eps", "max_positions": "max_position_embeddings", "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}
LM_DEFAULTS = {"n_kv_heads": None, "head_dim": None, "norm_eps": 1e-6, "max_positions": 2048,
               "tie_word_embeddings": False}
WHISPER_FIELDS = {
    "d_model": "d_model", "vocab_size": "vocab_size", "n_mels": "num_mel_bins",
    "encoder_layers": "encoder_layers", "encoder_heads": "encoder_attention_heads",
    "encoder_ffn_dim": "encoder_ffn_dim", "decoder_layers": "decoder_layers",
    "decoder_heads": "decoder_attention_heads", "decoder_ffn_dim": "decoder_ffn_dim",
    "max_source_positions": "max_source_positions", "max_target_positions": "max_target_positions",
}
WHISPER_DEFAULTS = {"n_mels": 80, "max_source_positions": 1500, "max_target_positions": 448}

# config.json settings under which the checkpoint computes a different function
# than the one gamma models: key -> (allowed values, transformers' default when absent).
REQUIRED_VALUES = {
    "whisper": {"activation_function": (("gelu",), "gelu"), "scale_embedding": ((False,), False)},
    "llama": {"hidden_act": (("silu",), "silu"), "mlp_bias": ((False,), False)},
    "mistral": {"hidden_act": (("silu",), "silu"), "sliding_window": ((None,), 4096)},
    "qwen2": {"hidden_act": (("silu",), "silu"), "use_sliding_window": ((False,), False)},
    "qwen3": {"hidden_act": (("silu",), "silu"), "use_sliding_window": ((False,), False)},
}
SUPPORTED_LAYER_TYPES = ("full_attention",)     # transformers 5 "layer_types"
SUPPORTED_ROPE_TYPES = (None, "default")

# Standard Whisper widths -> attention heads (tiny, base, small, medium, large).
WHISPER_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
# head_dim candidates for bare Llama checkpoints (only used when exactly one fits)
LLAMA_HEAD_DIM_CANDIDATES = (64, 128)
# defaults assumed for bare LM checkpoints (reported in notes)
BARE_LM_DEFAULTS = {"llama": {"norm_eps": 1e-5, "rope_theta": 10000.0},
                    "qwen3": {"norm_eps": 1e-6, "rope_theta": 1000000.0}}


def read_config_json(path: str) -> Optional[dict]:
    """The parsed config.json at ``path``, or None when there is none."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read(16 * 2**20))
    except (OSError, ValueError) as e:
        raise GammaError(f"{path}: cannot read config.json: {e}") from None
    if not isinstance(d, dict):
        raise GammaError(f"{path}: config.json is not a JSON object")
    return d


def _get(path: str, d: dict, key: str, defaults: dict, field: str, kind=int) -> Any:
    if d.get(key) is None:
        if field in defaults:
            return defaults[field]
        raise GammaError(f"{path}: config.json lacks '{key}'")
    v = d[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise GammaError(f"{path}: config.json '{key}' is {v!r}, expected an integer")
    if kind is float and not isinstance(v, (int, float)):
        raise GammaError(f"{path}: config.json '{key}' is {v!r}, expected a number")
    return v


def _rope(path: str, d: dict) -> float:
    """rope_theta; raises on any RoPE scaling (transformers 4 or 5 layout)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        if not isinstance(p, dict):
            raise GammaError(f"{path}: config.json rope settings are {p!r}, expected an object")
        kind = p.get("rope_type", p.get("type"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise GammaError(f"{path}: unsupported rope_scaling type '{kind}' (only default RoPE)")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise GammaError(f"{path}: unsupported partial_rotary_factor {p['partial_rotary_factor']}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise GammaError(f"{path}: config.json rope_theta is {theta!r}")
    return float(theta)


def config_from_hf(path: str, d: dict) -> ModelConfig:
    """ModelConfig from a parsed HF config.json (``path`` is for messages)."""
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise GammaError(f"{path}: unknown architecture '{mt}' (supported model_type: {', '.join(MODEL_TYPES)})")
    for key, (allowed, default) in REQUIRED_VALUES[mt].items():
        value = d.get(key, default)
        if value not in allowed:
            raise GammaError(f"{path}: unsupported {key}={value!r} for {mt} (supported: {allowed[0]!r})")
    layer_types = d.get("layer_types") or []
    bad = [t for t in layer_types if t not in SUPPORTED_LAYER_TYPES] if isinstance(layer_types, list) else [layer_types]
    if bad:
        raise GammaError(f"{path}: unsupported layer type {bad[0]!r} for {mt} (supported: full_attention)")
    extra = {"source": "config.json", "model_type": mt}
    if mt == "whisper":
        kw = {f: _get(path, d, k, WHISPER_DEFAULTS, f) for f, k in WHISPER_FIELDS.items()}
        return ModelConfig(arch="whisper", tie_word_embeddings=True, extra=extra, **kw)
    arch, bias, out_bias = LM_MODEL_TYPES[mt]
    kw = {}
    for f, k in LM_FIELDS.items():
        kind = float if f == "norm_eps" else bool if f == "tie_word_embeddings" else int
        kw[f] = _get(path, d, k, LM_DEFAULTS, f, kind)
    if kw["n_kv_heads"] is None:
        kw["n_kv_heads"] = kw["n_heads"]
    if kw["head_dim"] is None:
        kw["head_dim"] = kw["d_model"] // kw["n_heads"] if kw["n_heads"] > 0 else 0
    cfg_bias = bool(d.get("attention_bias", False))
    return ModelConfig(arch=arch, rope_theta=_rope(path, d),
                       attention_bias=cfg_bias if bias is None else bias,
                       attention_out_bias=cfg_bias if out_bias is None else out_bias,
                       extra=extra, **kw)


# ---------------------------------------------------------------- inference
def _count_layers(shapes: dict[str, tuple], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for n in shapes if (m := rx.match(n))}
    return max(idx) + 1 if idx else 0


def _shape(path: str, shapes: dict[str, tuple], name: str, rank: int) -> tuple:
    s = shapes.get(name)
    if s is None or len(s) != rank:
        raise GammaError(f"{path}: cannot infer the config: tensor '{name}' is "
                         f"{'missing' if s is None else f'of shape {s}'}; put config.json beside the weights")
    return s


def infer_config(path: str, shapes: dict[str, tuple]) -> tuple[ModelConfig, list[str]]:
    """Architecture and sizes from canonical tensor names and shapes (no config.json)."""
    arch = next((a for a, sig in ARCH_SIGNATURES if sig in shapes), None)
    if arch is None:
        raise GammaError(f"{path}: cannot tell the architecture from the tensor names "
                         f"and there is no config.json beside the weights")
    if arch == "whisper":
        return _infer_whisper(path, shapes)
    return _infer_lm(path, shapes, arch)


def _infer_whisper(path: str, shapes: dict[str, tuple]) -> tuple[ModelConfig, list[str]]:
    d, n_mels, _ = _shape(path, shapes, "model.encoder.conv1.weight", 3)
    heads = WHISPER_HEADS_BY_WIDTH.get(d)
    if heads is None:
        raise GammaError(f"{path}: d_model={d} is not a standard Whisper width "
                         f"({', '.join(map(str, WHISPER_HEADS_BY_WIDTH))}); cannot infer the head count, "
                         f"put config.json beside the weights")
    cfg = ModelConfig(
        arch="whisper", d_model=d, n_mels=n_mels,
        vocab_size=_shape(path, shapes, "model.decoder.embed_tokens.weight", 2)[0],
        encoder_layers=_count_layers(shapes, "model.encoder.layers."),
        decoder_layers=_count_layers(shapes, "model.decoder.layers."),
        encoder_heads=heads, decoder_heads=heads,
        encoder_ffn_dim=_shape(path, shapes, "model.encoder.layers.0.fc1.weight", 2)[0],
        decoder_ffn_dim=_shape(path, shapes, "model.decoder.layers.0.fc1.weight", 2)[0],
        max_source_positions=_shape(path, shapes, "model.encoder.embed_positions.weight", 2)[0],
        max_target_positions=_shape(path, shapes, "model.decoder.embed_positions.weight", 2)[0],
        tie_word_embeddings=True, extra={"source": "inferred"})
    note = (f"no config.json: inferred whisper d_model={d}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, "
            f"{heads} heads (standard Whisper head count for width {d}), n_mels={n_mels}, vocab={cfg.vocab_size}")
    return cfg, [note]


def _infer_lm(path: str, shapes: dict[str, tuple], arch: str) -> tuple[ModelConfig, list[str]]:
    vocab, d = _shape(path, shapes, "model.embed_tokens.weight", 2)
    q_rows = _shape(path, shapes, "model.layers.0.self_attn.q_proj.weight", 2)[0]
    k_rows = _shape(path, shapes, "model.layers.0.self_attn.k_proj.weight", 2)[0]
    if arch == "qwen3":
        hd = _shape(path, shapes, "model.layers.0.self_attn.q_norm.weight", 1)[0]
        how = "from q_norm"
    else:
        fits = [h for h in LLAMA_HEAD_DIM_CANDIDATES if q_rows % h == 0 and k_rows % h == 0]
        if len(fits) != 1:
            raise GammaError(f"{path}: cannot infer head_dim of a bare llama checkpoint (q_proj has {q_rows} rows, "
                             f"k_proj {k_rows}; candidates {fits or 'none'}); put config.json beside the weights")
        hd, how = fits[0], f"the only one of {LLAMA_HEAD_DIM_CANDIDATES} dividing q/k rows"
    if q_rows % hd or k_rows % hd or hd <= 0:
        raise GammaError(f"{path}: q_proj rows {q_rows} / k_proj rows {k_rows} are not multiples of head_dim {hd}")
    defaults = BARE_LM_DEFAULTS[arch]
    cfg = ModelConfig(
        arch=arch, d_model=d, vocab_size=vocab, n_layers=_count_layers(shapes, "model.layers."),
        n_heads=q_rows // hd, n_kv_heads=k_rows // hd, head_dim=hd,
        d_ff=_shape(path, shapes, "model.layers.0.mlp.gate_proj.weight", 2)[0],
        tie_word_embeddings="lm_head.weight" not in shapes,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
        attention_out_bias="model.layers.0.self_attn.o_proj.bias" in shapes,
        extra={"source": "inferred"}, **defaults)
    note = (f"no config.json: inferred {arch} d_model={d}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"{cfg.n_kv_heads} kv heads, head_dim={hd} ({how}), d_ff={cfg.d_ff}, vocab={vocab}; "
            f"ASSUMED norm_eps={defaults['norm_eps']}, rope_theta={defaults['rope_theta']} (not stored in the weights)")
    return cfg, [note]
