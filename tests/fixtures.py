"""Tiny random models built with transformers and written in every format gamma reads.

Builders are plain functions (used by ``conftest.py`` fixtures); each is seeded,
so the same call gives the same weights.  Every parameter, norms and biases
included, is perturbed away from its initial value so that a swapped or
dropped tensor changes the function.  The models and the GGUF writer are
gamma's own (:mod:`gamma.io.tiny`, shared with the benchmarks and the
regression suite); this file holds the tests' shapes and the reference loaders.
"""

from __future__ import annotations

import json
import os

import torch

from gamma.io.tiny import SEED, hf_meta, hf_model, quiet_transformers, state_dict_arrays, write_gguf

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

# kind -> (architecture, config)
KINDS = {"whisper": ("whisper", WHISPER_TINY), "whisper384": ("whisper", WHISPER_384),
         "llama": ("llama", LLAMA_TINY), "llama_hd64": ("llama", LLAMA_HD64), "llama256": ("llama", LLAMA_256),
         "qwen3": ("qwen3", QWEN3_TINY), "qwen2": ("qwen2", QWEN2_TINY)}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(kind: str, seed: int = SEED) -> torch.nn.Module:
    """A seeded, perturbed, eval-mode HF model: whisper | whisper384 | llama | llama_hd64 | llama256 | qwen3 | qwen2."""
    arch, config = KINDS[kind]
    return _perturb(hf_model(arch, config, seed), seed)


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
def save_gguf(model, path: str, arch: str, qtype: str = "F32", *, extra_tensors=(), overrides=None,
              extra_kv=None, rng_seed: int = SEED) -> str:
    """Write ``model`` as llama.cpp would (:func:`gamma.io.tiny.write_gguf`: names via
    gguf-py's TensorNameMap, q/k permuted for llama).

    ``overrides``: {hf name: (array, raw_dtype)} written instead of that tensor;
    ``extra_kv``: {key: str | float} more metadata; ``extra_tensors``: [(gguf name, array, raw_dtype)].
    """
    return write_gguf(path, arch, hf_meta(model.config), state_dict_arrays(model), qtype, name=f"tiny-{arch}",
                      overrides=overrides, extra_kv=extra_kv, extra_tensors=extra_tensors, seed=rng_seed)


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
    """transformers' Whisper (float32, eager attention) holding a loaded Whisper LoadedCheckpoint's tensors."""
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
