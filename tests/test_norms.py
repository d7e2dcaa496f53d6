"""gamma.norms and ``gamma weights norms``: spectral norms against numpy's SVD,
the part table (exact per architecture), JSON fields, table output, errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from gamma.commands import weights as cmd
from gamma.errors import GammaError
from gamma.io import load_checkpoint
from gamma.norms import (LM_PARTS, WHISPER_PARTS, block_norms, lanczos_spectral, part_table, spectral_norm,
                         tensor_norms, weight_norms)


def np_spectral(w: torch.Tensor) -> float:
    return float(np.linalg.norm(w.detach().reshape(w.shape[0], -1).double().numpy(), 2))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cmd.add_parser(sub)
    args = p.parse_args(list(argv))
    rc = args.func(args)
    return rc, capsys.readouterr().out


def _check_against_numpy(report: dict, ckpt) -> None:
    assert report["tensors"], "no matrices"
    for rec in report["tensors"]:
        t = ckpt.tensors[rec["name"]]
        ref = np_spectral(t)
        assert rec["spectral"] == pytest.approx(ref, rel=1e-4), rec["name"]
        fro = float(np.linalg.norm(t.double().numpy().ravel()))
        assert rec["frobenius"] == pytest.approx(fro, rel=1e-12), rec["name"]


# ------------------------------------------------------------------ spectral norms
@pytest.mark.parametrize("fixture", ["llama_hf_dir", "qwen3_hf_dir", "whisper_hf_dir"])
def test_every_matrix_matches_numpy_svd(request, fixture):
    path, _ = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(path)
    report = weight_norms(ckpt)
    _check_against_numpy(report, ckpt)
    assert {r["method"] for r in report["tensors"]} == {"svd"}
    # every >= 2-D tensor is there, no 1-D one
    assert {r["name"] for r in report["tensors"]} == {n for n, t in ckpt.tensors.items() if t.dim() >= 2}


def test_forced_lanczos_on_tiny_model(whisper_hf_dir):
    ckpt = load_checkpoint(whisper_hf_dir[0])
    report = weight_norms(ckpt, exact_limit=8)             # every matrix has > 64 entries
    assert {r["method"] for r in report["tensors"]} == {"power"}
    _check_against_numpy(report, ckpt)


def _lanczos_case(m: int, n: int, exact_limit: int):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = spectral_norm(w, exact_limit=exact_limit)
    ref = np_spectral(w)
    assert s.method == "power" and s.iterations > 0
    assert s.rel_error_bound <= 1e-6
    assert s.value == pytest.approx(ref, rel=1e-4)
    # the stated bound holds: value <= sigma_max <= value * (1 + bound)
    assert s.value <= ref * (1 + 1e-12)
    assert ref <= s.value * (1 + s.rel_error_bound)


def test_lanczos_large_random_matrix():
    _lanczos_case(1000, 1500, exact_limit=1000)            # 1.5M entries > 1000^2


@pytest.mark.slow
def test_lanczos_3000x5000():
    _lanczos_case(3000, 5000, exact_limit=2000)            # numpy's SVD of it takes about a minute here


def test_lanczos_repeated_top_singular_value_and_low_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(400, 60, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 60, generator=g, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, 60, dtype=torch.float64)
    s[:3] = 5.0                                            # a triple top singular value
    w = u @ torch.diag(s) @ v.T                            # rank 60 < 300: Lanczos hits an invariant subspace
    res = lanczos_spectral(w)
    assert res.value == pytest.approx(5.0, rel=1e-9)
    assert res.rel_error_bound <= 1e-6
    assert lanczos_spectral(torch.zeros(50, 40)).value == 0.0


def test_exact_path_and_small_cases():
    w = torch.tensor([[3.0, 0.0], [0.0, -4.0]])
    s = spectral_norm(w)
    assert s.method == "svd" and s.value == pytest.approx(4.0, rel=1e-15)
    assert spectral_norm(torch.zeros(0, 3)).value == 0.0
    with pytest.raises(ValueError):
        spectral_norm(torch.ones(3))


# ------------------------------------------------------------------ part table
LLAMA_EXPECTED = {
    "model.layers.1.self_attn.q_proj.weight": ("decoder", 1, "attn_q"),
    "model.layers.1.self_attn.k_proj.weight": ("decoder", 1, "attn_k"),
    "model.layers.1.self_attn.v_proj.weight": ("decoder", 1, "attn_v"),
    "model.layers.1.self_attn.o_proj.weight": ("decoder", 1, "attn_o"),
    "model.layers.1.mlp.gate_proj.weight": ("decoder", 1, "mlp_gate"),
    "model.layers.1.mlp.up_proj.weight": ("decoder", 1, "mlp_up"),
    "model.layers.1.mlp.down_proj.weight": ("decoder", 1, "mlp_down"),
}


def _assigned(report: dict) -> dict:
    return {r["name"]: (r["component"], r["index"], r["part"]) for r in report["tensors"] if r["part"]}


@pytest.mark.parametrize("fixture", ["llama_hf_dir", "qwen3_hf_dir", "llama_gguf_q8_0"])
def test_parts_llama_qwen3(request, fixture):
    path, _ = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(path)
    report = weight_norms(ckpt)
    got = _assigned(report)
    expected = {n.replace("layers.1.", f"layers.{i}."): (c, i, p)
                for i in range(2) for n, (c, _, p) in LLAMA_EXPECTED.items()}
    assert got == expected                      # exact: nothing else (embeddings, lm_head) is a block part
    # q_norm / k_norm (Qwen3) and the RMSNorm vectors are in no block and not matrices
    table = part_table(ckpt.config.arch)
    for name in ckpt.tensors:
        if name.endswith(("q_norm.weight", "k_norm.weight", "layernorm.weight")):
            assert table.lookup(name) is None
            assert name not in {r["name"] for r in report["tensors"]}
    if ckpt.config.arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in ckpt.tensors
    b = report["blocks"][1]
    assert (b["component"], b["index"], b["name"]) == ("decoder", 1, "layer1")
    assert set(k for k in b if k.endswith("_spectral") and k != "max_spectral") == \
        {f"{p}_spectral" for p in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")}


def test_qwen3_q_norm_is_not_attn_q():
    table = part_table("qwen3")
    assert table.lookup("model.layers.3.self_attn.q_norm.weight") is None
    assert table.lookup("model.layers.3.self_attn.q_proj.weight") == ("decoder", 3, "attn_q")
    assert table.lookup("model.layers.3.self_attn.q_proj.bias") is None
    assert table.lookup("model.layers.12.mlp.down_proj.weight") == ("decoder", 12, "mlp_down")
    assert table.lookup("xmodel.layers.3.self_attn.q_proj.weight") is None


def test_parts_whisper_encoder_decoder(whisper_hf_dir):
    ckpt = load_checkpoint(whisper_hf_dir[0])
    report = weight_norms(ckpt)
    got = _assigned(report)
    expected = {}
    for pattern, (comp, part) in WHISPER_PARTS.items():
        for i in range(2):
            expected[pattern.replace("{i}", str(i))] = (comp, i, part)
    assert got == expected
    assert got["model.decoder.layers.0.encoder_attn.k_proj.weight"] == ("decoder", 0, "cross_k")
    assert got["model.encoder.layers.1.fc1.weight"] == ("encoder", 1, "mlp_fc1")
    names = [b["name"] for b in report["blocks"]]
    assert names == ["encoder.layer0", "encoder.layer1", "decoder.layer0", "decoder.layer1"]
    enc, dec = report["blocks"][0], report["blocks"][2]
    assert "cross_q_spectral" not in enc and "cross_q_spectral" in dec
    assert set(report["summary_by_component"]) == {"encoder", "decoder"}
    # conv weights are matrices (out, in*k) outside any block
    conv = next(r for r in report["tensors"] if r["name"] == "model.encoder.conv1.weight")
    assert conv["part"] is None and len(conv["shape"]) == 3


def test_block_totals_by_hand(llama_hf_dir):
    ckpt = load_checkpoint(llama_hf_dir[0])
    report = weight_norms(ckpt)
    b = report["blocks"][0]
    mats = [ckpt.tensors[n.replace("layers.{i}.", "layers.0.")].double() for n in LM_PARTS]
    assert b["total_frobenius"] == pytest.approx(float(torch.sqrt(sum((m ** 2).sum() for m in mats))), rel=1e-12)
    assert b["max_spectral"] == pytest.approx(max(np_spectral(m) for m in mats), rel=1e-10)
    s = report["summary"]
    fro = [x["total_frobenius"] for x in report["blocks"]]
    assert s["total_frobenius_range"] == pytest.approx(max(fro) / min(fro))
    spec = [x["max_spectral"] for x in report["blocks"]]
    assert (s["max_spectral"], s["min_spectral"]) == (max(spec), min(spec))


def test_components_filter_and_tied(whisper_hf_dir):
    ckpt = load_checkpoint(whisper_hf_dir[0])
    recs = tensor_norms(ckpt, components=["encoder"])
    assert recs and all(r["component"] == "encoder" for r in recs)
    assert [b["name"] for b in block_norms("whisper", recs)] == ["encoder.layer0", "encoder.layer1"]
    full = tensor_norms(ckpt)
    tied = [r for r in full if r["tied_to"]]
    assert [(r["name"], r["tied_to"]) for r in tied] == [("proj_out.weight", "model.decoder.embed_tokens.weight")]


# ------------------------------------------------------------------ CLI
def test_cli_json_fields(capsys, qwen3_gguf_q8_0):
    rc, out = run_cli(capsys, "weights", "norms", qwen3_gguf_q8_0[0], "--json")
    assert rc == 0
    r = json.loads(out)
    assert set(r) >= {"model", "exact_limit", "rtol", "tensors", "blocks", "summary", "notes"}
    t = r["tensors"][0]
    assert set(t) >= {"name", "shape", "source_dtype", "frobenius", "spectral", "method", "rel_error_bound",
                      "component", "index", "part", "tied_to"}
    b = r["blocks"][0]
    for part in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"):
        assert b[f"{part}_frobenius"] > 0 and b[f"{part}_spectral"] > 0
    assert set(b) >= {"component", "index", "name", "total_frobenius", "max_spectral"}
    assert set(r["summary"]) >= {"max_total_frobenius", "min_total_frobenius", "total_frobenius_range",
                                 "max_spectral", "min_spectral", "spectral_range"}
    # quantized GGUF: said in the notes
    assert any("dequantized" in n and "Q8_0" in n for n in r["notes"])


def test_cli_table(capsys, whisper_hf_dir):
    rc, out = run_cli(capsys, "weights", "norms", whisper_hf_dir[0])
    assert rc == 0
    assert "encoder blocks: spectral norm" in out and "decoder blocks: frobenius norm" in out
    assert "encoder.layer1" in out and "decoder.layer0" in out and "max spec" in out
    assert "exact SVD (float64)" in out and "dequantized" not in out
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.strip().startswith("#  block"))
    assert len(lines[header]) == len(lines[header + 1]) or lines[header + 1].strip().startswith("-")


def test_cli_table_quantized_note(capsys, llama_gguf_q8_0):
    rc, out = run_cli(capsys, "weights", "norms", llama_gguf_q8_0[0], "--exact-limit", "16")
    assert rc == 0
    assert "note     weights were dequantized" in out and "Lanczos for" in out


def test_cli_errors(capsys, tmp_path, llama_hf_dir):
    with pytest.raises(GammaError, match="no such file"):
        run_cli(capsys, "weights", "norms", str(tmp_path / "missing.gguf"))
    with pytest.raises(GammaError, match="--exact-limit"):
        run_cli(capsys, "weights", "norms", llama_hf_dir[0], "--exact-limit", "0")
    with pytest.raises(GammaError, match="weights norms"):
        run_cli(capsys, "weights")


# ------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.real
def test_real_smollm2_sampled(smollm2_checkpoint):
    ck = smollm2_checkpoint
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight",
             "model.layers.29.mlp.gate_proj.weight", "model.embed_tokens.weight"]
    for name in names:
        w = ck.tensors[name]
        s = spectral_norm(w.reshape(w.shape[0], -1))
        assert s.value == pytest.approx(np_spectral(w), rel=1e-4), name
    emb = spectral_norm(ck.tensors["model.embed_tokens.weight"])
    assert emb.method == "power"                 # 49152 x 576 > 4096^2 entries
