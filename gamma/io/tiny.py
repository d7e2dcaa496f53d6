"""Seeded random checkpoints: one builder for the tests, the benchmarks and the
regression suite's ``fixture:NAME`` models.

* :func:`hf_model`: a transformers model of a supported architecture, its own
  initialisation drawn from a seeded, private random state (the global one is
  left as it was);
* :func:`init_weights`: every parameter from one seeded generator, in name
  order: embeddings N(0, 1), matrices N(0, gain^2 / fan_in), norm gains
  1 + 0.1 N(0, 1), other vectors (biases) 0.05 N(0, 1);
* :func:`write_gguf`: a decoder LM as llama.cpp writes it (gguf-py's tensor
  names, q/k rows permuted for ``llama``, 1-D tensors F32, matrices in the
  requested type) from ``(hf name, array)`` pairs, whatever built them;
* :data:`FIXTURES` / :func:`build_fixture`: the regression suite's models,
  built once into a cache folder with their weight digest.

transformers is needed only by :func:`hf_model` (and so by the fixtures).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Iterable, Optional

import numpy as np
import torch

from ..errors import GammaError
from ..extras import require

SEED = 1234

# architecture -> (transformers config class, model class)
HF_CLASSES = {
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
GGUF_ARCH = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen2": "QWEN2"}

# the regression suite's fixture:NAME models (seeded: the same function every time)
FIXTURES = {
    "tiny-qwen3": {"arch": "qwen3", "seed": 1234, "config": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0)},
}


# ------------------------------------------------------------------ transformers models
def quiet_transformers() -> None:
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def hf_model(arch: str, config: dict, seed: Optional[int] = None, feature: str = "a tiny model") -> torch.nn.Module:
    """An eval-mode transformers model of ``arch`` (:data:`HF_CLASSES`) with ``config``.

    With ``seed``, transformers' own initialisation is drawn from a private random
    state seeded with it (the same weights every call; the global state is untouched)."""
    tf = require(feature, "transformers")
    quiet_transformers()
    cfg_cls, model_cls = (getattr(tf, name) for name in HF_CLASSES[arch])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = model_cls(cfg_cls(**config))
    return model.eval()


def init_weights(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Every parameter drawn from one generator seeded with ``seed``, in name order:
    embeddings N(0, 1), matrices N(0, gain^2 / fan_in), norm gains 1 + 0.1 N(0, 1),
    other vectors 0.05 N(0, 1).  Unlike transformers' own initialisation (std 0.02),
    this keeps RMSNorm inputs at unit scale, so bounds at eps ~1e-3 stay informative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            z = torch.randn(p.shape, generator=gen)
            if "embed" in name:
                p.copy_(z)
            elif p.dim() > 1:
                p.copy_(z * gain / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_(1 + 0.1 * z)
            else:
                p.copy_(0.05 * z)
    return model.eval()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode() + str(tuple(p.shape)).encode() + p.detach().numpy().tobytes())
    return digest.hexdigest()


def state_dict_arrays(model: torch.nn.Module) -> Iterable[tuple[str, np.ndarray]]:
    """``(hf name, float32 array)`` of every tensor in ``model``'s state dict."""
    for name, t in model.state_dict().items():
        yield name, t.detach().numpy().astype(np.float32)


# ------------------------------------------------------------------ GGUF
def hf_meta(c) -> dict:
    """GGUF metadata of a decoder LM from a transformers config (or any object with
    its attribute names, such as the benchmarks' shapes)."""
    rope = getattr(c, "rope_parameters", None)
    theta = rope["rope_theta"] if isinstance(rope, dict) and "rope_theta" in rope else c.rope_theta
    return dict(n_layers=c.num_hidden_layers, context=c.max_position_embeddings, d_model=c.hidden_size,
                d_ff=c.intermediate_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                norm_eps=c.rms_norm_eps, rope_theta=theta, vocab_size=c.vocab_size,
                tied=bool(getattr(c, "tie_word_embeddings", False)))


def config_meta(c) -> dict:
    """GGUF metadata of a decoder LM from gamma's :class:`~gamma.io.checkpoint.ModelConfig`."""
    return dict(n_layers=c.n_layers, context=c.max_positions, d_model=c.d_model, d_ff=c.d_ff,
                n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, vocab_size=c.vocab_size, tied=c.tie_word_embeddings)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (q: (H, H), k: (H, KV))."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_q6_k(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Valid random Q6_K blocks for a float (rows, cols) tensor (gguf-py cannot quantize Q6_K)."""
    import gguf
    block, type_size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    # ql[128] qh[64] scales[16] (int8) d (f16): keep d small and finite
    d = (rng.uniform(0.5, 1.5, size=n_blocks) * 1e-3).astype(np.float16)
    raw[:, -2:] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(shape[0], shape[1] // block * type_size)


def _encode(data: np.ndarray, qtype: str, rng: np.random.Generator):
    """(array to write, raw_dtype) the way llama.cpp does: 1-D tensors stay F32."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == "F32":
        return data.astype(np.float32), None
    if qtype == "F16":
        return data.astype(np.float16), None
    if qtype == "Q6_K":
        return random_q6_k(data.shape, rng), Q.Q6_K
    return gguf.quants.quantize(data.astype(np.float32), Q[qtype]), Q[qtype]


def write_gguf(path: str, arch: str, meta: dict, tensors: Iterable[tuple[str, np.ndarray]], qtype: str = "F32", *,
               name: Optional[str] = None, overrides: Optional[dict] = None, extra_kv: Optional[dict] = None,
               extra_tensors=(), seed: int = SEED) -> str:
    """Write a decoder LM (``arch``: llama, qwen3, qwen2) as llama.cpp would.

    ``meta``: :func:`hf_meta` or :func:`config_meta`; ``tensors``: ``(hf name, float
    array)`` pairs, (out, in) matrices as in transformers' state dict (a tied
    ``lm_head.weight`` is left out, as llama.cpp does); ``qtype``: F32, F16, Q6_K
    (random valid blocks from ``seed``) or any type gguf-py quantizes.
    ``overrides``: {hf name: (array, raw_dtype)} written instead of that tensor;
    ``extra_kv``: {key: str | float} more metadata; ``extra_tensors``: [(gguf name, array, raw_dtype)].
    """
    import gguf
    m = meta
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[arch]], m["n_layers"])
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    if name:
        w.add_name(name)
    w.add_block_count(m["n_layers"])
    w.add_context_length(m["context"])
    w.add_embedding_length(m["d_model"])
    w.add_feed_forward_length(m["d_ff"])
    w.add_head_count(m["n_heads"])
    w.add_head_count_kv(m["n_kv_heads"])
    w.add_layer_norm_rms_eps(m["norm_eps"])
    w.add_rope_freq_base(m["rope_theta"])
    w.add_vocab_size(m["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(m["head_dim"])
    else:
        w.add_key_length(m["head_dim"])
        w.add_value_length(m["head_dim"])
    for hf_name, data in tensors:
        if hf_name == "lm_head.weight" and m["tied"]:
            continue                                    # tied: llama.cpp writes no output.weight
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_cpp_permute(data, m["n_heads"], m["n_heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_cpp_permute(data, m["n_heads"], m["n_kv_heads"])
        arr, raw = (overrides or {}).get(hf_name) or _encode(data, qtype, rng)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), arr, raw_dtype=raw)
    for key, value in (extra_kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    for gguf_name, arr, raw in extra_tensors:
        w.add_tensor(gguf_name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------ regression fixtures
def build_fixture(name: str, cache_dir: str) -> tuple[str, str]:
    """(folder, weight digest) of a :data:`FIXTURES` model (transformers safetensors
    folder), built once into ``cache_dir``; weights from :func:`init_weights`."""
    if name not in FIXTURES:
        raise GammaError(f"unknown fixture '{name}' (known: {', '.join(FIXTURES)})")
    spec = FIXTURES[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f"{name}-{key}")
    meta = os.path.join(folder, "fixture.json")
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            return folder, json.load(f)["digest"]
    model = init_weights(hf_model(spec["arch"], spec["config"], feature=f"fixture:{name}"), spec["seed"])
    digest = weights_digest(model)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    os.chmod(tmp, 0o755)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "fixture.json"), "w", encoding="utf-8") as f:
        json.dump({**spec, "name": name, "digest": digest}, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:                      # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest
