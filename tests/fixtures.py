"""Tiny random models built with transformers and written in every format gamma reads.

Builders are plain functions (used by ``conftest.py`` fixtures); each is seeded,
so the same call gives the same weights.  Every parameter, norms and biases
included, is perturbed away from its initial value so that a swapped or
dropped tensor changes the function.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

SEED = 1234

WHISPER_TINY = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                    max_source_positions=32, max_target_positions=32, pad_token_id=99, bos_token_id=98,
                    eos_token_id=99, decoder_start_token_id=97)
# a standard Whisper width (384 -> 6 heads) so that head counts can be inferred from a bare file
WHISPER_384 = dict(WHISPER_TINY, d_model=384, encoder_layers=1, decoder_layers=1, encoder_attention_heads=6,
                   decoder_attention_heads=6, encoder_ffn_dim=256, decoder_ffn_dim=256,
                   max_source_positions=16, max_target_positions=16)
LM_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
LLAMA_TINY = dict(LM_TINY, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=50000.0)   # SmolLM2-like
QWEN3_TINY = dict(LM_TINY, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0)
QWEN2_TINY = dict(LM_TINY, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0)
# head_dim 64 is the only one of (64, 128) dividing q (128) and k (64) rows: inferable when bare
LLAMA_HD64 = dict(LLAMA_TINY, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=False)
# rows of 256 / 512 inputs so that every matrix can be Q6_K (block of 256)
LLAMA_256 = dict(LLAMA_TINY, vocab_size=64, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)

GGUF_LM_PARAMS = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen2": "QWEN2"}


def quiet_transformers() -> None:
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(kind: str, seed: int = SEED) -> torch.nn.Module:
    """A seeded, perturbed, eval-mode HF model: whisper | whisper384 | llama | llama_hd64 | llama256 | qwen3 | qwen2."""
    import transformers as tf
    quiet_transformers()
    torch.manual_seed(seed)
    table = {
        "whisper": (tf.WhisperConfig, tf.WhisperForConditionalGeneration, WHISPER_TINY),
        "whisper384": (tf.WhisperConfig, tf.WhisperForConditionalGeneration, WHISPER_384),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, LLAMA_TINY),
        "llama_hd64": (tf.LlamaConfig, tf.LlamaForCausalLM, LLAMA_HD64),
        "llama256": (tf.LlamaConfig, tf.LlamaForCausalLM, LLAMA_256),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, QWEN3_TINY),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, QWEN2_TINY),
    }
    cfg_cls, model_cls, kw = table[kind]
    return _perturb(model_cls(cfg_cls(**kw)), seed)


# ---------------------------------------------------------------- state dicts
def save_hf(model, folder: str, **kw) -> str:
    model.save_pretrained(folder, **kw)
    return folder


def save_state_dict(model, path: str, prefix: str = "", legacy: bool = False, drop_tied: bool = True) -> str:
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()
          if not (drop_tied and k in ("lm_head.weight", "proj_out.weight") and model.config.tie_word_embeddings)}
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_bare_safetensors(model, path: str) -> str:
    from safetensors.torch import save_file
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()
          if not (k in ("lm_head.weight", "proj_out.weight") and model.config.tie_word_embeddings)}
    save_file(sd, path)
    return path


def fp16_copy(model):
    """The same model with every weight rounded through float16 (what an fp16 file stores)."""
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


# ---------------------------------------------------------------- CTranslate2
def save_ct2(hf_dir: str, out_dir: str, quantization: str | None = None) -> str:
    from ctranslate2.converters import TransformersConverter
    quiet_transformers()
    TransformersConverter(hf_dir).convert(out_dir, quantization=quantization, force=True)
    return out_dir


# ---------------------------------------------------------------- GGUF
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


def save_gguf(model, path: str, arch: str, qtype: str = "F32", *, extra_tensors=(), overrides=None,
              extra_kv=None, rng_seed: int = SEED) -> str:
    """Write ``model`` as llama.cpp would: names via gguf-py's TensorNameMap, q/k permuted for llama.

    ``overrides``: {hf name: (array, raw_dtype)} written instead of that tensor;
    ``extra_kv``: {key: str | float} more metadata; ``extra_tensors``: [(gguf name, array, raw_dtype)].
    """
    import gguf
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_LM_PARAMS[arch]], c.num_hidden_layers)
    rng = np.random.default_rng(rng_seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    else:
        w.add_key_length(hd)
        w.add_value_length(hd)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue                                    # tied: llama.cpp writes no output.weight
        data = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, c.num_attention_heads, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, c.num_attention_heads, c.num_key_value_heads)
        arr, raw = (overrides or {}).get(name) or _encode(data, qtype, rng)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), arr, raw_dtype=raw)
    for key, value in (extra_kv or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    for name, arr, raw in extra_tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: str):
    """transformers' own GGUF loading (gguf-py dequantization, llama q/k reverse permutation).

    The same steps as ``from_pretrained(dir, gguf_file=...)`` (AutoConfig from the GGUF
    metadata, then ``load_gguf_checkpoint``) without its hard dependency on accelerate.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    quiet_transformers()
    import gguf
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # transformers maps no head_dim for qwen2/qwen3 GGUF (it assumes 128): take the stored key_length
    key_length = gguf.GGUFReader(path).fields.get(f"{config.model_type}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    return model.eval()


def whisper_hf_from_checkpoint(ck):
    """transformers' Whisper (float32, eager attention) holding a loaded Whisper Checkpoint's tensors."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    c = ck.config
    quiet_transformers()
    hf = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_attention_heads=c.encoder_heads, decoder_attention_heads=c.decoder_heads,
        encoder_ffn_dim=c.encoder_ffn_dim, decoder_ffn_dim=c.decoder_ffn_dim, num_mel_bins=c.n_mels,
        max_source_positions=c.max_source_positions, max_target_positions=c.max_target_positions,
        pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257,
        attn_implementation="eager")).eval()
    hf.load_state_dict(ck.tensors, strict=True)
    return hf


def write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path
