"""Session fixtures: tiny random HF models saved in every checkpoint format.

Fixtures named ``<model>_<format>`` return ``(path, hf_model)`` where ``hf_model``
is a transformers model (eval mode, float32) computing exactly the function
stored at ``path`` (for quantized files: transformers' own dequantization, or
the float16-rounded weights), so other tests can compare forward passes.
"""

from __future__ import annotations

import os
import shutil
import sys
import zlib

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures as F  # noqa: E402


# ---------------------------------------------------------------- HF models
@pytest.fixture(scope="session")
def whisper_model():
    return F.build("whisper")


@pytest.fixture(scope="session")
def whisper384_model():
    return F.build("whisper384")


@pytest.fixture(scope="session")
def llama_model():
    return F.build("llama")


@pytest.fixture(scope="session")
def llama_hd64_model():
    return F.build("llama_hd64")


@pytest.fixture(scope="session")
def llama256_model():
    return F.build("llama256")


@pytest.fixture(scope="session")
def qwen3_model():
    return F.build("qwen3")


@pytest.fixture(scope="session")
def qwen2_model():
    return F.build("qwen2")


def _dir(factory, name: str) -> str:
    return str(factory.mktemp(name))


# ---------------------------------------------------------------- safetensors / PyTorch
@pytest.fixture(scope="session")
def whisper_hf_dir(tmp_path_factory, whisper_model):
    return F.save_hf(whisper_model, _dir(tmp_path_factory, "whisper_hf")), whisper_model


@pytest.fixture(scope="session")
def whisper_sharded_dir(tmp_path_factory, whisper_model):
    d = F.save_hf(whisper_model, _dir(tmp_path_factory, "whisper_sharded"), max_shard_size="100KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    return d, whisper_model


@pytest.fixture(scope="session")
def whisper_pytorch_dir(tmp_path_factory, whisper_model):
    d = _dir(tmp_path_factory, "whisper_pt")
    F.save_state_dict(whisper_model, os.path.join(d, "pytorch_model.bin"))
    whisper_model.config.to_json_file(os.path.join(d, "config.json"))
    return d, whisper_model


@pytest.fixture(scope="session")
def whisper_bare_safetensors(tmp_path_factory, whisper384_model):
    """model.safetensors of a d_model=384 Whisper with no config.json (sizes inferred)."""
    d = _dir(tmp_path_factory, "whisper_bare")
    return F.save_bare_safetensors(whisper384_model, os.path.join(d, "model.safetensors")), whisper384_model


@pytest.fixture(scope="session")
def llama_hf_dir(tmp_path_factory, llama_model):
    return F.save_hf(llama_model, _dir(tmp_path_factory, "llama_hf")), llama_model


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory, llama_model):
    return F.save_hf(llama_model, _dir(tmp_path_factory, "llama_sharded"), max_shard_size="50KB"), llama_model


@pytest.fixture(scope="session")
def llama_legacy_pt_dir(tmp_path_factory, llama_model):
    """pytorch_model.bin in the legacy (pre-zip) torch.save format + config.json."""
    d = _dir(tmp_path_factory, "llama_legacy")
    F.save_state_dict(llama_model, os.path.join(d, "pytorch_model.bin"), legacy=True)
    llama_model.config.to_json_file(os.path.join(d, "config.json"))
    return d, llama_model


@pytest.fixture(scope="session")
def llama_bare_safetensors(tmp_path_factory, llama_hd64_model):
    """A head_dim=64 llama as a bare model.safetensors (head_dim inferable)."""
    d = _dir(tmp_path_factory, "llama_bare")
    return F.save_bare_safetensors(llama_hd64_model, os.path.join(d, "model.safetensors")), llama_hd64_model


@pytest.fixture(scope="session")
def qwen3_hf_dir(tmp_path_factory, qwen3_model):
    return F.save_hf(qwen3_model, _dir(tmp_path_factory, "qwen3_hf")), qwen3_model


@pytest.fixture(scope="session")
def qwen3_ddp_pt(tmp_path_factory, qwen3_model):
    """weights.pt: a DDP-style ("module."-prefixed) state dict, no config.json."""
    d = _dir(tmp_path_factory, "qwen3_pt")
    return F.save_state_dict(qwen3_model, os.path.join(d, "weights.pt"), prefix="module."), qwen3_model


@pytest.fixture(scope="session")
def qwen2_hf_dir(tmp_path_factory, qwen2_model):
    return F.save_hf(qwen2_model, _dir(tmp_path_factory, "qwen2_hf")), qwen2_model


# ---------------------------------------------------------------- CTranslate2
@pytest.fixture(scope="session")
def whisper_ct2_dir(tmp_path_factory, whisper_hf_dir):
    d, model = whisper_hf_dir
    return F.save_ct2(d, _dir(tmp_path_factory, "whisper_ct2")), model


@pytest.fixture(scope="session")
def whisper_ct2_f16_dir(tmp_path_factory, whisper_hf_dir):
    d, model = whisper_hf_dir
    return F.save_ct2(d, _dir(tmp_path_factory, "whisper_ct2_f16"), "float16"), F.fp16_copy(model)


@pytest.fixture(scope="session")
def whisper_ct2_int8_dir(tmp_path_factory, whisper_hf_dir):
    """int8 weights with per-row scales; hf_model is the float original (compare within a quant step)."""
    d, model = whisper_hf_dir
    return F.save_ct2(d, _dir(tmp_path_factory, "whisper_ct2_int8"), "int8"), model


# ---------------------------------------------------------------- GGUF
def _gguf(factory, model, arch: str, qtype: str):
    path = F.save_gguf(model, os.path.join(_dir(factory, f"{arch}_gguf_{qtype}"), f"{arch}-{qtype}.gguf"),
                       arch, qtype)
    return path, F.hf_from_gguf(path)


@pytest.fixture(scope="session")
def llama_gguf_f32(tmp_path_factory, llama_model):
    return _gguf(tmp_path_factory, llama_model, "llama", "F32")


@pytest.fixture(scope="session")
def llama_gguf_f16(tmp_path_factory, llama_model):
    return _gguf(tmp_path_factory, llama_model, "llama", "F16")


@pytest.fixture(scope="session")
def llama_gguf_q8_0(tmp_path_factory, llama_model):
    return _gguf(tmp_path_factory, llama_model, "llama", "Q8_0")


@pytest.fixture(scope="session")
def llama_gguf_q4_1(tmp_path_factory, llama_model):
    return _gguf(tmp_path_factory, llama_model, "llama", "Q4_1")


@pytest.fixture(scope="session")
def llama_gguf_q5_1(tmp_path_factory, llama_model):
    return _gguf(tmp_path_factory, llama_model, "llama", "Q5_1")


@pytest.fixture(scope="session")
def llama_gguf_q6_k(tmp_path_factory, llama256_model):
    """Random valid Q6_K blocks (gguf-py cannot quantize Q6_K): hf_model holds their dequantization."""
    return _gguf(tmp_path_factory, llama256_model, "llama", "Q6_K")


@pytest.fixture(scope="session")
def qwen3_gguf_f32(tmp_path_factory, qwen3_model):
    return _gguf(tmp_path_factory, qwen3_model, "qwen3", "F32")


@pytest.fixture(scope="session")
def qwen3_gguf_q8_0(tmp_path_factory, qwen3_model):
    return _gguf(tmp_path_factory, qwen3_model, "qwen3", "Q8_0")


@pytest.fixture(scope="session")
def qwen2_gguf_f16(tmp_path_factory, qwen2_model):
    return _gguf(tmp_path_factory, qwen2_model, "qwen2", "F16")


# ---------------------------------------------------------------- real models (PyPI packages)
@pytest.fixture(scope="session")
def real_smollm2():
    from gamma.io import zoo
    from gamma.errors import GammaError
    try:
        return zoo.smollm2_135m()
    except GammaError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_whisper_tiny_en():
    from gamma.io import zoo
    from gamma.errors import GammaError
    try:
        return zoo.whisper_tiny_en()
    except GammaError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(real_smollm2):
    """The real SmolLM2-135M Q4_1 GGUF, loaded once (about 10 s)."""
    from gamma.io import load_checkpoint
    return load_checkpoint(real_smollm2)


@pytest.fixture(scope="session")
def whisper_tiny_en_checkpoint(real_whisper_tiny_en):
    """The real Whisper tiny.en CTranslate2 fp16 model, loaded once."""
    from gamma.io import load_checkpoint
    return load_checkpoint(real_whisper_tiny_en)


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(path) -> a private copy (file or directory) that a test may corrupt."""
    def _copy(path: str) -> str:
        dst = os.path.join(tmp_path, os.path.basename(path.rstrip("/")) or "copy")
        if os.path.isdir(path):
            shutil.copytree(path, dst)
        else:
            shutil.copy(path, dst)
        return dst
    return _copy


# ---------------------------------------------------------------- random values
@pytest.fixture
def test_seed(request) -> int:
    """A seed of this test's own (from its name, parameters included): the values a
    test draws do not depend on which tests ran before it."""
    return zlib.crc32(request.node.name.encode())


@pytest.fixture(autouse=True)
def _reseed_draw(test_seed):
    """draw.rnd's generator, reseeded from this test's own seed (tests/draw.py)."""
    import draw
    draw.G.manual_seed(test_seed)
