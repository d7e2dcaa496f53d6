"""The ``gamma`` command line: exit codes, exact error lines, JSON output, files written.

A few runs go through ``python -m gamma`` in a subprocess (the real entry
point, stderr and exit status as a user sees them); the rest call
``gamma.cli.main`` in-process, which is the same code without paying for a
fresh interpreter each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

import gamma
from gamma import cli
from gamma.commands import common
from gamma.errors import GammaError, UnsupportedOp
from gamma.options import BoundOptions
from gamma.verify import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gamma", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def main(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def llama_dir(llama_hf_dir):
    return llama_hf_dir[0]


@pytest.fixture(scope="module")
def whisper_dir(whisper_hf_dir):
    return whisper_hf_dir[0]


# ---------------------------------------------------------------- errors (subprocess)
@pytest.mark.parametrize("eps", ["0", "-1", "nan", "inf"])
def test_bad_epsilon_subprocess(eps):
    p = run("verify", f"--epsilon={eps}", "--quiet")
    assert p.returncode == 2
    assert p.stderr == f"gamma: error: --epsilon must be a finite number > 0, got {eps}\n"
    assert p.stdout == ""


def test_missing_model_subprocess(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    p = run("verify", missing)
    assert p.returncode == 2
    assert p.stderr == f"gamma: error: {missing}: no such file or directory\n"


def test_unknown_method_subprocess():
    p = run("verify", "--method", "magic")
    assert p.returncode == 2
    assert p.stderr == ("gamma: error: argument --method: invalid choice: 'magic' "
                        "(choose from ibp, crown, alpha, zonotope)\n") or \
        p.stderr == ("gamma: error: argument --method: invalid choice: 'magic' "
                     "(choose from 'ibp', 'crown', 'alpha', 'zonotope')\n")


def test_bad_block_range_subprocess(llama_dir):
    p = run("verify", llama_dir, "--block-wise", "--blocks", "0:7", "--seq-len", "2")
    assert p.returncode == 2
    assert p.stderr == "gamma: error: --blocks 0:7: the model has 2 blocks (0..1); 7 is out of range\n"


# ---------------------------------------------------------------- errors (in-process)
@pytest.mark.parametrize("eps", ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e999", "abc"])
def test_bad_epsilon(capsys, eps):
    rc, out, err = main(capsys, "verify", "--epsilon", eps)
    assert rc == 2 and out == ""
    assert err == f"gamma: error: --epsilon must be a finite number > 0, got {eps}\n"


@pytest.mark.parametrize("blocks, msg", [
    ("5", "--blocks 5: the model has 2 blocks (0..1); block 5 is out of range"),
    ("-3", "--blocks -3: the model has 2 blocks (0..1); block -3 is out of range"),
    ("1:1", "--blocks 1:1: the model has 2 blocks (0..1); '1:1' selects none"),
    ("x", "--blocks must be a slice (0:4), an index (3) or a list (0,2,5), got 'x'"),
])
def test_bad_blocks(capsys, llama_dir, blocks, msg):
    rc, out, err = main(capsys, "verify", llama_dir, "--block-wise", "--blocks", blocks, "--seq-len", "2")
    assert rc == 2 and err == f"gamma: error: {msg}\n"


@pytest.mark.parametrize("args, msg", [
    (["verify", "--block-wise", "--layer-by-layer"],
     "argument --layer-by-layer: not allowed with argument --block-wise"),
    (["verify", "--seq-len", "two"], "argument --seq-len: invalid int value: 'two'"),
    (["verify", "--device", "tpu"], "unknown --device 'tpu' (choose cpu or cuda)"),
    (["verify", "--arithmetic", "float16"],
     "argument --arithmetic: invalid choice: 'float16' (choose from 'float32', 'float32-probabilistic', 'real')"),
    (["frobnicate"], None),
    ([], "choose a command: inspect, forward, verify, weights, analyze, compare, diff, regress or vnncomp (gamma --help)"),
    (["forward"], "the following arguments are required: --out"),
    (["verify", "--save-bounds", "/nonexistent/dir/b.npz"],
     "/nonexistent/dir/b.npz: cannot write (no such directory /nonexistent/dir)"),
    (["verify", "--tolerance", "-1", "/nonexistent/m.gguf"], "--tolerance must be a finite number >= 0, got -1.0"),
])
def test_bad_options(capsys, args, msg):
    rc, out, err = main(capsys, *args)
    assert rc == 2
    _no_traceback(err)
    assert err.startswith("gamma: error: ")
    if msg:
        assert err == f"gamma: error: {msg}\n"


def test_option_errors_after_load(capsys, llama_dir, tmp_path):
    rc, _, err = main(capsys, "verify", llama_dir, "--component", "encoder")
    assert rc == 2 and err == "gamma: error: llama has no component 'encoder' (choose from decoder)\n"
    rc, _, err = main(capsys, "verify", llama_dir, "--tokens", "1,500", "--method", "ibp")
    assert rc == 2 and err == "gamma: error: token ids [500] out of range [0, 96)\n"
    rc, _, err = main(capsys, "verify", llama_dir, "--input", str(tmp_path / "x.npy"))
    assert rc == 2 and err == f"gamma: error: {tmp_path / 'x.npy'}: no such file\n"
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(assert (<= Y_0 1))\n(assert (== Y_1 2))\n")
    rc, _, err = main(capsys, "verify", llama_dir, "--property", str(prop), "--seq-len", "2")
    assert rc == 2 and err.startswith(f"gamma: error: {prop}:2: unsupported property line '(assert (== Y_1 2))'")
    rc, _, err = main(capsys, "verify", llama_dir, "--blocks", "0")
    assert rc == 2 and err == "gamma: error: --blocks applies to --block-wise runs\n"


def test_unsupported_op_exits_2(capsys, llama_dir, monkeypatch):
    import gamma.bounds

    def refuse(graph, center, *, options, **kw):
        raise UnsupportedOp("softmax", options.method, "layer0.attn.softmax")
    monkeypatch.setattr(gamma.bounds, "compute_bounds", refuse)
    rc, out, err = main(capsys, "verify", llama_dir, "--method", "zonotope", "--seq-len", "2")
    assert rc == 2 and out == ""
    assert err == "gamma: error: method 'zonotope' has no rule for op 'softmax' (node layer0.attn.softmax)\n"


# ---------------------------------------------------------------- inspect
def test_inspect_json_subprocess(llama_dir):
    p = run("inspect", llama_dir, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["format"] == "safetensors" and info["arch"] == "llama"
    assert info["layers"] == {"decoder": 2} and info["hidden_size"] == 64
    assert info["heads"] == {"decoder": 4} and info["kv_heads"] == {"decoder": 2}
    assert info["head_dim"] == 16 and info["ffn"] == {"decoder": 128} and info["vocab_size"] == 96
    model = gamma.load(llama_dir)
    assert info["parameters"] == model.ckpt.n_params
    assert sum(info["dtypes"].values()) == len(model.ckpt.dtypes)
    assert isinstance(info["notes"], list) and info["components"] == ["decoder"]


def test_inspect_whisper_text(capsys, whisper_dir):
    rc, out, _ = main(capsys, "inspect", whisper_dir)
    assert rc == 0
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert "whisper" in out and "encoder 2, decoder 2" in out
    assert lines["format"].strip() == "safetensors"


# ---------------------------------------------------------------- forward
def test_forward_subprocess(llama_dir, tmp_path):
    y, x = tmp_path / "y.npy", tmp_path / "x.npy"
    p = run("forward", llama_dir, "--seq-len", "3", "--out", str(y), "--save-input", str(x))
    assert p.returncode == 0, p.stderr
    out, inp = np.load(y), np.load(x)
    assert out.shape == (3, 64) and out.dtype == np.float32
    assert inp.shape == (3, 64) and inp.dtype == np.float64
    model = gamma.load(llama_dir)
    expect = model.forward(__import__("torch").from_numpy(inp)).numpy().astype(np.float32)
    assert np.array_equal(out, expect)


def test_forward_logits_and_input_roundtrip(capsys, llama_dir, tmp_path):
    y, x = tmp_path / "y.npy", tmp_path / "x.npy"
    rc, out, _ = main(capsys, "forward", llama_dir, "--tokens", "1,2,3,4", "--output", "logits",
                      "--out", str(y), "--save-input", str(x))
    assert rc == 0 and np.load(y).shape == (4, 96)
    y2 = tmp_path / "y2.npy"
    rc, _, _ = main(capsys, "forward", llama_dir, "--input", str(x), "--seq-len", "4", "--output", "logits",
                    "--out", str(y2))
    assert rc == 0 and np.array_equal(np.load(y), np.load(y2))


def test_forward_whisper_components(capsys, whisper_dir, tmp_path):
    y = tmp_path / "enc.npy"
    assert main(capsys, "forward", whisper_dir, "--seq-len", "3", "--out", str(y))[0] == 0
    assert np.load(y).shape == (3, 64)
    assert main(capsys, "forward", whisper_dir, "--component", "decoder", "--seq-len", "2",
                "--output", "logits", "--out", str(y))[0] == 0
    assert np.load(y).shape == (2, 100)


# ---------------------------------------------------------------- verify
def test_verify_json_subprocess(whisper_dir, tmp_path):
    npz = tmp_path / "b.npz"
    p = run("verify", whisper_dir, "--block-wise", "--method", "ibp", "--seq-len", "2", "--json",
            "--save-bounds", str(npz), "--native")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                      # no progress line when stderr is not a TTY
    assert "NaN" not in p.stdout and "Infinity" not in p.stdout
    d = json.loads(p.stdout)
    jsonschema.validate(d, schema())
    assert d["mode"] == "block_wise" and d["method"] == "ibp" and d["epsilon"] == 1e-3
    assert len(d["blocks"]) == 2 and d["component"] == "encoder"
    z = np.load(npz)
    assert {"input", "nominal", "block0_input", "block0_lower", "block0_upper", "block0_nominal",
            "block1_upper"} <= set(z.files)


@pytest.mark.parametrize("mode", ["--full", "--layer-by-layer"])
def test_verify_json_modes(capsys, whisper_dir, mode):
    rc, out, err = main(capsys, "verify", whisper_dir, mode, "--method", "ibp", "--seq-len", "2", "--json",
                        "--epsilon", "1e-3", "--tolerance", "1")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["mode"] == mode.lstrip("-").replace("-", "_")
    assert d["verdict"] in ("verified", "unknown")


def test_verify_table(capsys, llama_dir, tmp_path):
    npz = tmp_path / "full.npz"
    rc, out, err = main(capsys, "verify", llama_dir, "--block-wise", "--method", "ibp", "--seq-len", "2",
                        "--worst-k", "1", "--save-bounds", str(npz))
    assert rc == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if "sensitivity" in line and "block" in line)
    assert all(h in header for h in ("in width", "out width", "qk", "attn", "swiglu", "status"))
    rows = [line for line in lines if "layer0" in line or "layer1" in line]
    assert sum(row.startswith("*") for row in rows[:2]) == 1       # --worst-k 1 marks one block
    assert "worst blocks (*)" in out and f"bounds written to {npz}" in out
    assert os.path.exists(npz)


def test_verify_real_arithmetic_said(capsys, llama_dir):
    """--arithmetic real is in the JSON and in the table's header, with what it does not cover."""
    rc, out, err = main(capsys, "verify", llama_dir, "--method", "ibp", "--seq-len", "2", "--arithmetic", "real",
                        "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["arithmetic"] == "real"
    rc, out, err = main(capsys, "verify", llama_dir, "--method", "ibp", "--seq-len", "2", "--arithmetic", "real")
    assert rc == 0, err
    assert out.splitlines()[2] == ("bounds   of the real-valued function only (--arithmetic real): no float32 "
                                   "margins, not a guarantee for a float32 engine")
    default = main(capsys, "verify", llama_dir, "--method", "ibp", "--seq-len", "2")[1]
    assert "--arithmetic" not in "\n".join(default.splitlines()[:3])
    assert default.splitlines()[2] == ("bounds   hold for every float32 engine: its rounding included, in any "
                                       "summation order (assumed: math functions within a few ulp, LayerNorm's "
                                       "running moments within twice the derived allowance)")


@pytest.mark.parametrize("mode", [[], ["--block-wise"]])
def test_verify_probabilistic_arithmetic_said(capsys, llama_dir, mode):
    """--arithmetic float32-probabilistic: in the JSON with the failure probability (block-wise:
    per block and their sum), and in the table's header with what it assumes."""
    args = ["verify", llama_dir, "--method", "crown", "--seq-len", "2", "--arithmetic", "float32-probabilistic",
            "--no-attack"] + mode
    rc, out, err = main(capsys, *args, "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["arithmetic"] == "float32-probabilistic" and 0 < d["rounding_failure"] < 1e-12
    if mode:
        assert d["rounding_failure"] == pytest.approx(sum(b["rounding_failure"] for b in d["blocks"]))
    rc, out, err = main(capsys, *args)
    assert rc == 0, err
    p = f"{d['rounding_failure']:.1e}"
    assert out.splitlines()[2] == ("bounds   hold for float32 engines with the rounding of dot products and of "
                                   "norms' sums under a probabilistic model (--arithmetic float32-probabilistic: independent mean-zero "
                                   f"rounding errors, any summation order); under it they fail with probability <= {p}; "
                                   "the other ops' rounding as in the default mode (LayerNorm's running moments "
                                   "within twice the derived allowance)")


def test_verify_unbounded_output_says_where_and_what_narrows_it(capsys, whisper_dir):
    """A whole-network bound that is unbounded names the first unbounded node and the options
    that bound narrower for its arithmetic mode; the JSON carries first_degraded (schema-valid)."""
    args = ("verify", whisper_dir, "--full", "--method", "ibp", "--seq-len", "2", "--epsilon", "1000")
    rc, out, err = main(capsys, *args, "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["max_width"] is None and d["has_infinite"]
    assert d["first_degraded"]["name"] == "layer0.attn_norm" and d["first_degraded"]["reason"] == "infinite"
    rc, out, err = main(capsys, *args)
    assert rc == 0, err
    assert ("unbounded from layer0.attn_norm (layernorm) on: the float32 rounding allowance and the relaxations "
            "widen each other through depth here; --arithmetic float32-probabilistic (a rounding model; its "
            "failure probability is reported) or --arithmetic real (no rounding) bound narrower, and so do a "
            "smaller --epsilon and --block-wise") in out.splitlines()
    rc, out, err = main(capsys, *args, "--arithmetic", "float32-probabilistic")
    assert rc == 0, err
    assert ("unbounded from layer0.attn_norm (layernorm) on: the relaxations widen through depth here; "
            "--arithmetic real (no rounding), a smaller --epsilon or --block-wise bound narrower") in out.splitlines()
    rc, out, err = main(capsys, *args, "--arithmetic", "real", "--json")
    real = json.loads(out)
    assert rc == 0 and real["max_width"] is not None and not real["has_infinite"] and not real["has_nan"]
    assert "unbounded" not in main(capsys, *args, "--arithmetic", "real")[1]


def test_verify_products_option(capsys, llama_dir):
    """--products half-sum turns the product's polarization off: said in the JSON and the header,
    never tighter than the default; a bad value is one line and exit code 2."""
    args = ("verify", llama_dir, "--full", "--seq-len", "2", "--epsilon", "0.05")
    rc, out, err = main(capsys, *args, "--json")
    assert rc == 0, err
    polar = json.loads(out)
    rc, out, err = main(capsys, *args, "--products", "half-sum", "--json")
    assert rc == 0, err
    half = json.loads(out)
    jsonschema.validate(half, schema())
    assert (polar["products"], half["products"]) == ("polar", "half-sum")
    assert polar["max_width"] <= half["max_width"]
    rc, out, _ = main(capsys, *args, "--products", "half-sum")
    assert rc == 0 and ", products half-sum" in out.splitlines()[1]
    assert ", products" not in main(capsys, *args)[1].splitlines()[1]
    rc, _, err = main(capsys, *args, "--products", "exact")
    assert rc == 2
    _no_traceback(err)
    with pytest.raises(GammaError, match=r"unknown --products 'exact' \(choose from polar, half-sum\)"):
        BoundOptions(1e-3, products="exact")


def test_verify_full_table_and_layer_growth(capsys, llama_dir):
    rc, out, _ = main(capsys, "verify", llama_dir, "--layer-by-layer", "--method", "ibp", "--epsilon", "10",
                      "--seq-len", "2")
    assert rc == 0
    assert "width growth, node by node:" in out and "width growth, block by block:" in out
    assert "first degraded node: " in out
    d = gamma.verify(llama_dir, 10, "ibp", layer_by_layer=True, seq_len=2).to_dict()
    assert f"first degraded node: {d['first_degraded']['name']} " in out


def test_default_model_is_block_wise_whisper(monkeypatch, capsys, whisper_dir):
    """No MODEL: block-wise CROWN at 1e-3 on zoo.whisper_tiny_en() (here pointed at the tiny model)."""
    from gamma.io import zoo
    monkeypatch.setattr(zoo, "whisper_tiny_en", lambda: whisper_dir)
    rc, out, err = main(capsys, "verify", "--json", "--seq-len", "2", "--blocks", "0")
    assert rc == 0, err
    d = json.loads(out)
    assert d["mode"] == "block_wise" and d["method"] == "crown" and d["epsilon"] == 1e-3
    assert d["model"]["path"] == whisper_dir and d["component"] == "encoder"


def test_help_lists_every_method(capsys):
    from gamma.bounds import METHODS
    assert main(capsys, "verify", "--help")[0] == 0
    assert main(capsys, "--version")[0] == 0
    rc, out, _ = main(capsys, "verify", "--help")
    assert "{" + ",".join(METHODS) + "}" in out and "--native" in out


def test_progress_line(capsys):
    p = common.Progress(enabled=True)
    p("block 1/2 layer0")
    p.done()
    err = capsys.readouterr().err
    line, clear = err[1:].split("\r", 1)
    assert err.startswith("\r") and line.startswith("gamma: block 1/2 layer0 [") and line.endswith("s]")
    assert clear == " " * len(line) + "\r"          # done() blanks the line
    quiet = common.Progress(enabled=False)
    quiet("block 1/2 layer0")
    quiet.done()
    assert capsys.readouterr().err == ""


def test_progress_to_a_log(capsys, monkeypatch):
    """Not a terminal: plain lines, at most one per interval and none before the first
    interval has passed (short runs, and every error test, stay silent)."""
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    p = common.Progress(enabled=True, live=False, every=30.0)
    p("loading model")
    now[0] = 129.0
    p("1/28 blocks: layer0 done")
    now[0] = 131.0
    p("layer1: crown layer1.mlp.gate")
    p("layer1: crown layer1.mlp.up")
    now[0] = 162.0
    p("2/28 blocks: layer1 done")
    p.done()
    assert capsys.readouterr().err == ("gamma: layer1: crown layer1.mlp.gate [31.0s]\n"
                                       "gamma: 2/28 blocks: layer1 done [62.0s]\n")


def test_saturation_note_reaches_a_log_at_once(capsys, monkeypatch):
    """The estimate's one-time 'NODE saturated: ...' goes through Progress.note: written to a log
    at once, between heartbeats; the heartbeat then restarts from it."""
    from gamma.graph import Graph
    from gamma.progress import BoundsEstimate
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    p = common.Progress(enabled=True, live=False, every=30.0)
    g = Graph("chain", "x", (2,))
    g.add("a", "relu", "x")
    g.add("b", "relu", "a")
    est = BoundsEstimate(p, g, "bounds", clock=lambda: now[0])
    est("crown a")
    now[0] = 105.0
    est("saturated a")
    now[0] = 120.0
    est("crown b")                                   # within 30 s of the note: silent
    now[0] = 136.0
    est("crown b")
    assert capsys.readouterr().err == (
        "gamma: bounds: a saturated: the bounds after it will come from caps (--after-saturation ibp would "
        "finish from here) [5.0s]\n"
        "gamma: bounds: node 2/2 b, about 1m12s left, saturated from a [36.0s]\n")


def test_verify_saturated_but_finite_output_says_where(capsys, llama_dir):
    """A finite whole-network bound behind a saturated node (softmax at [0, 1]; the output then
    held by RMSNorm's cap) says so, naming the first saturated node and what bounds narrower."""
    args = ("verify", llama_dir, "--full", "--method", "crown", "--seq-len", "2", "--epsilon", "30",
            "--no-attack")
    rc, out, err = main(capsys, *args, "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["max_width"] is not None and not d["has_infinite"] and not d["has_nan"]
    fd = d["first_degraded"]
    assert fd["reason"] == "saturated"
    rc, out, err = main(capsys, *args)
    assert rc == 0, err
    assert fd["name"] == "layer0.attn.softmax" and fd["output_width"] == pytest.approx(1.0)
    line = [s for s in out.splitlines() if s.startswith("saturated from ")]
    assert line == ["saturated from layer0.attn.softmax (softmax, width 1.000e+00) on: the bounds after it come "
                    "from the ops' ranges and caps, not from the input region; the float32 rounding allowance and "
                    "the relaxations widen each other through depth here; --arithmetic float32-probabilistic (a "
                    "rounding model; its failure probability is reported) or --arithmetic real (no rounding) bound "
                    "narrower, and so do a smaller --epsilon and --block-wise"]
    rc, out, err = main(capsys, *args[:-3], "--epsilon", "1e-4", "--no-attack")      # nothing saturates
    assert rc == 0, err
    assert not [s for s in out.splitlines() if s.startswith("saturated from ")]
