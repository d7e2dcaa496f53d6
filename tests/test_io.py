"""Every checkpoint format loads to the same tensors transformers holds, with the right config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fixtures as F
from gamma.io import expected_shapes, load_checkpoint, reverse_permute
from gamma.io.tiny import llama_cpp_permute


def assert_same_tensors(ck, hf_model, atol: float = 0.0):
    """ck.tensors has exactly the keys of hf_model.state_dict(), equal within atol."""
    ref = hf_model.state_dict()
    assert set(ck.tensors) == set(ref)
    for name, want in ref.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.device.type == "cpu", name
        assert tuple(got.shape) == tuple(want.shape), name
        if atol == 0.0:
            assert torch.equal(got, want.float()), name
        else:
            torch.testing.assert_close(got, want.float(), atol=atol, rtol=0, msg=name)


def assert_lm_config(cfg, hf_config, arch: str):
    c = hf_config
    assert cfg.arch == arch
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.intermediate_size, c.vocab_size)
    assert cfg.head_dim == (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert cfg.norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert cfg.rope_theta == pytest.approx(c.rope_parameters["rope_theta"], rel=1e-6)
    assert cfg.tie_word_embeddings == c.tie_word_embeddings


def assert_whisper_config(cfg, c):
    assert cfg.arch == "whisper"
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_heads, cfg.decoder_heads,
            cfg.encoder_ffn_dim, cfg.decoder_ffn_dim, cfg.vocab_size, cfg.n_mels,
            cfg.max_source_positions, cfg.max_target_positions) == (
        c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads,
        c.encoder_ffn_dim, c.decoder_ffn_dim, c.vocab_size, c.num_mel_bins,
        c.max_source_positions, c.max_target_positions)


# ---------------------------------------------------------------- safetensors and PyTorch: exact
STATE_DICT_CASES = [
    ("whisper_hf_dir", "safetensors"), ("whisper_sharded_dir", "safetensors"),
    ("whisper_pytorch_dir", "pytorch"), ("whisper_bare_safetensors", "safetensors"),
    ("llama_hf_dir", "safetensors"), ("llama_sharded_dir", "safetensors"),
    ("llama_legacy_pt_dir", "pytorch"), ("llama_bare_safetensors", "safetensors"),
    ("qwen3_hf_dir", "safetensors"), ("qwen3_ddp_pt", "pytorch"), ("qwen2_hf_dir", "safetensors"),
]


@pytest.mark.parametrize("fixture,fmt", STATE_DICT_CASES)
def test_state_dict_formats_exact(request, fixture, fmt):
    path, model = request.getfixturevalue(fixture)
    ck = load_checkpoint(path)
    assert ck.format == fmt
    assert_same_tensors(ck, model)
    if ck.config.arch == "whisper":
        assert_whisper_config(ck.config, model.config)
    else:
        arch = {"llama": "llama", "qwen2": "llama", "qwen3": "qwen3"}[model.config.model_type]
        if ck.config.extra["source"] == "inferred":     # sizes exact, eps/theta assumed (and said so)
            assert any("ASSUMED" in n for n in ck.notes)
            assert (ck.config.n_heads, ck.config.n_kv_heads, ck.config.head_dim) == (
                model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim)
        else:
            assert_lm_config(ck.config, model.config, arch)
    assert all(ck.dtypes[n] == "F32" for n in ck.tensors)
    assert set(expected_shapes(ck.config)) == set(ck.tensors)


def test_tied_output_is_the_embedding(llama_hf_dir, whisper_hf_dir):
    ck = load_checkpoint(llama_hf_dir[0])
    assert ck.config.tie_word_embeddings
    assert ck.tensors["lm_head.weight"] is ck.tensors["model.embed_tokens.weight"]
    assert ck.source_names["lm_head.weight"] == "model.embed_tokens.weight"
    ck = load_checkpoint(whisper_hf_dir[0])
    assert ck.tensors["proj_out.weight"] is ck.tensors["model.decoder.embed_tokens.weight"]


def test_qwen2_maps_to_llama_with_qkv_bias(qwen2_hf_dir):
    cfg = load_checkpoint(qwen2_hf_dir[0]).config
    assert cfg.arch == "llama" and cfg.attention_bias and not cfg.attention_out_bias


def test_file_inside_hf_dir_uses_config_json(whisper_hf_dir):
    import os
    ck = load_checkpoint(os.path.join(whisper_hf_dir[0], "model.safetensors"))
    assert ck.config.extra["source"] == "config.json"


def test_bare_notes_say_what_was_inferred(whisper_bare_safetensors, qwen3_ddp_pt):
    ck = load_checkpoint(whisper_bare_safetensors[0])
    assert ck.config.extra["source"] == "inferred"
    assert any("6 heads" in n for n in ck.notes)
    ck = load_checkpoint(qwen3_ddp_pt[0])
    assert ck.source_names["model.norm.weight"] == "module.model.norm.weight"
    assert any("head_dim=16 (from q_norm)" in n for n in ck.notes)


def test_bf16_and_f16_safetensors(tmp_path, llama_model):
    from safetensors.torch import save_file
    sd = {k: v for k, v in llama_model.state_dict().items() if k != "lm_head.weight"}
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        llama_model.config.to_json_file(str(d / "config.json"))
        ck = load_checkpoint(str(d))
        for k, v in sd.items():
            assert torch.equal(ck.tensors[k], v.to(dtype).float()), k
            assert ck.dtypes[k] == name


# ---------------------------------------------------------------- CTranslate2 Whisper
def test_ct2_f32_exact(whisper_ct2_dir):
    path, model = whisper_ct2_dir
    ck = load_checkpoint(path)
    assert ck.format == "ct2"
    assert_same_tensors(ck, model)
    assert_whisper_config(ck.config, model.config)


def test_ct2_f16_exact_after_rounding(whisper_ct2_f16_dir):
    path, model = whisper_ct2_f16_dir
    ck = load_checkpoint(path)
    assert_same_tensors(ck, model)
    assert ck.dtypes["model.encoder.layers.0.self_attn.q_proj.weight"] == "F16"


def test_ct2_int8_within_a_quant_step(whisper_ct2_int8_dir):
    path, model = whisper_ct2_int8_dir
    ck = load_checkpoint(path)
    ref = model.state_dict()
    assert set(ck.tensors) == set(ref)
    for name, w in ref.items():
        if ck.dtypes[name] == "I8":     # per-row scale 127/amax: error <= amax/254 per row
            step = w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127
            err = (ck.tensors[name] - w).reshape(w.shape[0], -1).abs().amax(dim=1)
            assert bool((err <= step / 2 * 1.001 + 1e-7).all()), name
        else:
            assert torch.equal(ck.tensors[name], w), name
    assert "I8" in ck.dtypes.values()


def test_ct2_encoder_matches_ctranslate2_runtime(whisper_ct2_dir):
    """HF Whisper encoder with our loaded weights == ctranslate2's own encoder output."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    path, model = whisper_ct2_dir
    ck = load_checkpoint(path)
    hf = WhisperForConditionalGeneration(WhisperConfig(**{**F.WHISPER_TINY})).eval()
    hf.load_state_dict(ck.tensors, strict=True)
    feats = torch.randn(1, 80, 2 * ck.config.max_source_positions, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = hf.model.encoder(feats).last_hidden_state
    ct2 = ctranslate2.models.Whisper(path, device="cpu", compute_type="float32")
    theirs = torch.from_numpy(np.array(ct2.encode(ctranslate2.StorageView.from_array(feats.numpy()))))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- GGUF
GGUF_CASES = ["llama_gguf_f32", "llama_gguf_f16", "llama_gguf_q8_0", "llama_gguf_q6_k",
              "qwen3_gguf_f32", "qwen3_gguf_q8_0", "qwen2_gguf_f16"]


@pytest.mark.parametrize("fixture", GGUF_CASES)
def test_gguf_equals_transformers_gguf_loading(request, fixture):
    """Our GGUF weights == transformers' GGUF loader's (same dequantization, same un-permutation)."""
    path, hf_model = request.getfixturevalue(fixture)
    ck = load_checkpoint(path)
    assert ck.format == "gguf"
    assert_same_tensors(ck, hf_model)
    arch = "qwen3" if "qwen3" in fixture else "llama"
    assert_lm_config(ck.config, hf_model.config, arch)


@pytest.mark.parametrize("fixture,model_fixture,tol", [
    ("llama_gguf_f32", "llama_model", 0.0), ("llama_gguf_f16", "llama_model", 1e-3),
    ("llama_gguf_q8_0", "llama_model", 1 / 127), ("qwen3_gguf_q8_0", "qwen3_model", 1 / 127),
])
def test_gguf_close_to_original_float_model(request, fixture, model_fixture, tol):
    """Quantized: each weight within its quant error (relative to the tensor's max |w|) of the original."""
    path, _ = request.getfixturevalue(fixture)
    model = request.getfixturevalue(model_fixture)
    ck = load_checkpoint(path)
    for name, w in model.state_dict().items():
        err = (ck.tensors[name] - w).abs().max().item()
        assert err <= tol * w.abs().max().item() + 1e-12, (name, err)


def test_gguf_matches_gguf_py_dequantization(llama_gguf_q6_k):
    """Unpermuted tensors are gguf-py's dequantization, reshaped (ne reversed) to (out, in)."""
    import gguf
    path, _ = llama_gguf_q6_k
    ck = load_checkpoint(path)
    reader = gguf.GGUFReader(path)
    canonical: dict = {}
    for k, v in ck.source_names.items():        # file name -> first canonical name (not the tied alias)
        canonical.setdefault(v, k)
    for t in reader.tensors:
        if ".attn_q." in t.name or ".attn_k." in t.name:     # permuted: checked against transformers
            continue
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))
        assert np.array_equal(ck.tensors[canonical[t.name]].numpy(), want), t.name
        assert ck.dtypes[canonical[t.name]] == t.tensor_type.name
    assert ck.dtypes["model.layers.0.mlp.down_proj.weight"] == "Q6_K"


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3), (8, 1)])
def test_reverse_permute_inverts_llama_cpp(n_head, n_kv):
    hd, d = 16, 32
    rng = np.random.default_rng(0)
    for heads, src in ((n_head, n_head), (n_kv, n_head)):      # q then k
        w = rng.standard_normal((heads * hd, d)).astype(np.float32)
        permuted = llama_cpp_permute(w, src, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(reverse_permute(permuted, heads), w)
        b = rng.standard_normal(heads * hd).astype(np.float32)
        assert np.array_equal(reverse_permute(llama_cpp_permute(b, src, heads), heads), b)


def test_gguf_tied_when_output_absent(llama_gguf_f32):
    ck = load_checkpoint(llama_gguf_f32[0])
    assert ck.config.tie_word_embeddings
    assert ck.tensors["lm_head.weight"] is ck.tensors["model.embed_tokens.weight"]
    assert ck.source_names["model.layers.1.self_attn.q_proj.weight"] == "blk.1.attn_q.weight"


def test_format_detected_by_content_not_extension(tmp_path, llama_gguf_f32, whisper_ct2_dir, qwen3_ddp_pt):
    import os
    import shutil
    for src, fmt in ((llama_gguf_f32[0], "gguf"), (os.path.join(whisper_ct2_dir[0], "model.bin"), "ct2"),
                     (qwen3_ddp_pt[0], "pytorch")):
        d = tmp_path / fmt
        d.mkdir()
        dst = str(d / "weights.safetensors")
        shutil.copy(src, dst)
        assert load_checkpoint(dst).format == fmt


# ---------------------------------------------------------------- real models
@pytest.mark.real
def test_real_smollm2_q4_1(smollm2_checkpoint):
    ck = smollm2_checkpoint
    c = ck.config
    assert (c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.head_dim, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 1536, 64, 49152)
    assert c.tie_word_embeddings and ck.tensors["lm_head.weight"] is ck.tensors["model.embed_tokens.weight"]
    assert c.rope_theta == 100000.0 and c.norm_eps == pytest.approx(1e-5)
    assert ck.dtypes["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert ck.dtypes["model.embed_tokens.weight"] == "Q8_0"
    assert ck.n_params == 134515008


@pytest.mark.real
def test_real_smollm2_equals_transformers_gguf_loader(real_smollm2, smollm2_checkpoint):
    """Layer 0 and the embedding, dequantized and un-permuted by transformers' own code."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    ck = smollm2_checkpoint
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    checked = 0
    for t in gguf.GGUFReader(real_smollm2).tensors:
        if not (t.name.startswith("blk.0.") or t.name == "token_embd.weight"):
            continue
        want = proc.process(gguf.dequantize(t.data, t.tensor_type), t.name).weights
        name = next(k for k, v in ck.source_names.items() if v == t.name)
        assert np.array_equal(ck.tensors[name].numpy(), want), t.name
        checked += 1
    assert checked == 10


@pytest.mark.real
def test_real_whisper_tiny_en_ct2(whisper_tiny_en_checkpoint):
    ck = whisper_tiny_en_checkpoint
    c = ck.config
    assert (c.arch, c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_heads, c.decoder_heads) == (
        "whisper", 384, 4, 4, 6, 6)
    assert (c.encoder_ffn_dim, c.vocab_size, c.n_mels, c.max_source_positions, c.max_target_positions) == (
        1536, 51864, 80, 1500, 448)
    assert set(ck.dtypes.values()) == {"F16"}
    assert ck.tensors["proj_out.weight"] is ck.tensors["model.decoder.embed_tokens.weight"]


@pytest.mark.real
def test_real_whisper_tiny_en_encoder_matches_ctranslate2(real_whisper_tiny_en, whisper_tiny_en_checkpoint):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    F.quiet_transformers()
    ck = whisper_tiny_en_checkpoint
    c = ck.config
    hf = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_attention_heads=c.encoder_heads, decoder_attention_heads=c.decoder_heads,
        encoder_ffn_dim=c.encoder_ffn_dim, decoder_ffn_dim=c.decoder_ffn_dim, num_mel_bins=c.n_mels,
        pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257)).eval()
    hf.load_state_dict(ck.tensors, strict=True)
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = hf.model.encoder(feats).last_hidden_state
    ct2 = ctranslate2.models.Whisper(real_whisper_tiny_en, device="cpu", compute_type="float32")
    theirs = torch.from_numpy(np.array(ct2.encode(ctranslate2.StorageView.from_array(feats.numpy()))))
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
