"""What the float32 bounds do not cover, said where it applies: llama.cpp's CPU matmuls with
quantized (or F16) GGUF weights quantize (or round) their activations first, which no float32
margin covers.  The note's claim is checked against an emulation of ggml's Q8_0 activation
quantization on a linear layer: the result leaves the layer's float32 margin."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import torch

from gamma import cli
from gamma.bounds import fp
from gamma.commands.common import activation_note
from gamma.io import load_checkpoint
from gamma.verify import schema

NOTE = ("llama.cpp's CPU matmuls with {} weights quantize or round their activations (to Q8_0/Q8_1/Q8_K "
        "or F16), which the float32 margins do not cover: the bounds hold for the dequantized weights in "
        "float32 engines (transformers); --engine llama.cpp covers llama.cpp")


def test_activation_note_names_the_rounded_types_only():
    def note(dtypes, fmt="gguf", arith="float32"):
        return activation_note({"format": fmt, "arch": "llama", "dtypes": dtypes}, {"arithmetic": arith})
    assert note({"Q4_1": 210, "F32": 61, "Q6_K": 1}) == NOTE.format("Q4_1/Q6_K")
    assert note({"F16": 3, "F32": 2}) == NOTE.format("F16")
    assert note({"BF16": 3, "IQ4_NL": 1}) == NOTE.format("BF16/IQ4_NL")
    assert note({"Q8_0": 5}, arith="float32-probabilistic") == NOTE.format("Q8_0")
    assert note({"F32": 9}) is None                                  # float32 weights: float32 activations
    assert note({"Q8_0": 5}, arith="real") is None                   # real arithmetic assumes no engine
    assert note({"F16": 5}, fmt="safetensors") is None               # transformers computes in float32
    assert note({}) is None


def _ggml_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's reference quantize_row_q8_0 then dequantized: per block of 32, d = amax / 127,
    q = roundf(x / d) (half away from zero), d stored as F16."""
    xb = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = xb * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def test_q8_0_activations_leave_the_float32_margin(llama_gguf_q8_0):
    """One q_proj row by the dequantized Q8_0 weights: with the activations as ggml quantizes them
    the product moves by far more than the float32 margin of that dot product (so the note is
    needed), while a float32 evaluation stays inside it."""
    ck = load_checkpoint(llama_gguf_q8_0[0])
    w = ck.tensors["model.layers.0.self_attn.q_proj.weight"].double()            # (out, in)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(w.shape[1], generator=gen, dtype=torch.float64).float().double()
    exact = w @ x
    s = w.abs() @ x.abs()
    margin = fp.dot_error_signed(s, exact.abs(), w.shape[1])
    f32 = (w.float() @ x.float()).double()
    assert bool(((f32 - exact).abs() <= margin).all())
    xq = torch.from_numpy(_ggml_q8_0(x.float().numpy())).double()
    llama = w @ xq                         # ggml: sum_b d_w d_x sum q_w q_x = dequant(w) . dequant(x)
    assert float(((llama - exact).abs() / margin).max()) > 100


def test_verify_warns_for_a_quantized_gguf_and_reports_its_types(capsys, llama_gguf_q8_0, llama_gguf_f32):
    args = ["--seq-len", "2", "--epsilon", "1e-3", "--no-attack", "--quiet", "--json"]
    assert cli.main(["verify", llama_gguf_q8_0[0], *args]) == 0
    out = capsys.readouterr()
    rep = json.loads(out.out)
    jsonschema.validate(rep, schema())
    types = "/".join(sorted(t for t in rep["model"]["dtypes"] if t != "F32"))
    assert "Q8_0" in rep["model"]["dtypes"]
    assert out.err.strip() == "gamma: warning: " + NOTE.format(types)
    assert cli.main(["verify", llama_gguf_q8_0[0], *args, "--arithmetic", "real"]) == 0
    assert capsys.readouterr().err.strip() == ""
    assert cli.main(["verify", llama_gguf_f32[0], *args]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == ""
    assert set(json.loads(out.out)["model"]["dtypes"]) == {"F32"}
