"""gamma.vnnverify / ``gamma verify MODEL.onnx --vnnlib``: unsat, sat with a
counterexample confirmed by onnxruntime, timeout, soundness of the spec-as-layer
graph (samples + PGD, zero violations), and bad input as one line, exit 2."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from gamma.bounds import compute_bounds
from gamma.cli import main
from gamma.ops import evaluate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gamma.vnnspec import parse_vnnlib  # noqa: E402
from gamma.vnnverify import spec_graph, verify_vnnlib  # noqa: E402
from onnx_models import TinyViT, export  # noqa: E402
from soundness import explore  # noqa: E402


def write_vnnlib(path: str, x: torch.Tensor, eps: float, label: int, n_out: int) -> str:
    """Box x +- eps; unsafe: some other class scores at least ``label`` (as the vit files)."""
    flat = x.reshape(-1).tolist()
    lines = [f"(declare-const X_{i} Real)" for i in range(len(flat))]
    lines += [f"(declare-const Y_{i} Real)" for i in range(n_out)]
    for i, v in enumerate(flat):
        lines += [f"(assert (<= X_{i} {v + eps!r}))", f"(assert (>= X_{i} {v - eps!r}))"]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{k} Y_{label}))" for k in range(n_out) if k != label) + "))")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(onnx path, centre x (1, 3, 8, 8), predicted class, folder)."""
    d = tmp_path_factory.mktemp("vnn")
    model = TinyViT()
    path = export(model, str(d / "tiny.onnx"))
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(20)) * 2 - 1
    with torch.no_grad():
        label = int(model(x)[0].argmax())
    return path, x.double(), label, d


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_small_box_is_unsat(tiny, capsys):
    path, x, label, d = tiny
    prop = write_vnnlib(str(d / "small.vnnlib"), x, 0.002, label, 4)
    rc, out, err = _run(capsys, "verify", path, "--vnnlib", prop, "--json", "--timeout", "60")
    assert rc == 0, err
    res = json.loads(out)
    assert res["result"] == "unsat" and res["arithmetic"] == "real"
    crown = [p for p in res["phases"] if p["phase"] == "crown"][0]
    assert crown["refuted"] == crown["cases"] == 3 and crown["worst_lower"] > 0
    attack = [p for p in res["phases"] if p["phase"] == "attack"][0]
    assert attack["best"] >= crown["worst_lower"]          # attacked figure beside the certified one


def test_sat_counterexample_lands_in_the_unsafe_region_under_onnxruntime(tiny, capsys):
    path, x, label, d = tiny
    prop = write_vnnlib(str(d / "big.vnnlib"), x, 1.0, label, 4)
    cex = str(d / "big.cex")
    rc, out, err = _run(capsys, "verify", path, "--vnnlib", prop, "--counterexample", cex)
    assert rc == 0, err
    assert out.splitlines()[0] == "result: sat"
    text = open(cex).read().splitlines()
    assert text[0] == "sat"
    vals = {}
    for line in text[1:]:
        name, v = line.strip().strip("()").split()
        vals[name] = float(v)
    xs = np.array([vals[f"X_{i}"] for i in range(192)], dtype=np.float64)
    region = parse_vnnlib(prop).regions[0]
    assert bool((xs >= region.lower.numpy()).all() and (xs <= region.upper.numpy()).all())
    assert np.array_equal(xs.astype(np.float32).astype(np.float64), xs)   # exactly the float32 input run
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": xs.astype(np.float32).reshape(1, 3, 8, 8)})[0].reshape(-1).astype(np.float64)
    assert [vals[f"Y_{i}"] for i in range(4)] == y.tolist()
    unsafe = [bool((region.C[c].numpy() @ y + region.d[c].numpy() <= 0).all()) for c in region.cases]
    assert any(unsafe)


def test_timeout(tiny):
    path, x, label, d = tiny
    prop = write_vnnlib(str(d / "t.vnnlib"), x, 0.002, label, 4)
    assert verify_vnnlib(path, prop, timeout=1e-4).result == "timeout"


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha"])
def test_spec_as_layer_sound(tiny, method):
    """Bounds of C y + d over the property's box contain sampled and attacked values."""
    path, x, label, d = tiny
    prop = write_vnnlib(str(d / "mid.vnnlib"), x, 0.05, label, 4)
    from gamma.io.onnx_load import load_onnx
    g = spec_graph(load_onnx(path), parse_vnnlib(prop).regions[0])
    z0 = torch.zeros(g.input_shape, dtype=torch.float64)
    r = compute_bounds(g, z0, 1.0, method, arithmetic="real", alpha_iters=5)
    emp = explore(lambda z: evaluate(g, z), z0, 1.0, r.lower, r.upper, n_samples=300, seed=21)
    assert emp.violations == 0
    assert bool((r.lower <= emp.lower).all())


# ---------------------------------------------------------------- bad input: one line, exit 2
def _sin_model(path: str) -> str:
    from onnx import TensorProto, helper
    node = helper.make_node("Sin", ["x"], ["y"], name="sin0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_bad_input_one_line_exit_2(tiny, capsys):
    path, x, label, d = tiny
    prop = write_vnnlib(str(d / "ok.vnnlib"), x, 0.002, label, 4)
    data = open(path, "rb").read()
    trunc = d / "trunc.onnx"
    trunc.write_bytes(data[:len(data) // 2])
    trunc_gz = d / "trunc.onnx.gz"
    trunc_gz.write_bytes(gzip.compress(data)[:1000])
    sin = _sin_model(str(d / "sin.onnx"))
    syntax = d / "syntax.vnnlib"
    syntax.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)\n")
    small = write_vnnlib(str(d / "two.vnnlib"), torch.zeros(2), 0.1, 0, 4)
    cases = [
        ((str(trunc), prop), f"{trunc}: not a valid ONNX model (truncated or corrupt protobuf)"),
        ((str(trunc_gz), prop), f"{trunc_gz}: truncated or corrupt gzip stream"),
        ((sin, prop), f"{sin}: unsupported ONNX op 'Sin' (node sin0)"),
        ((path, str(syntax)), f"{syntax}:2: '(' is never closed"),
        ((path, small), f"{small}: the property declares 2 input variables but {path} has 192 input values"),
        ((path, str(d / "none.vnnlib")), f"{d / 'none.vnnlib'}: no such file or directory"),
    ]
    for (model, vnnlib), message in cases:
        rc, out, err = _run(capsys, "verify", model, "--vnnlib", vnnlib)
        assert (rc, out, err) == (2, "", f"gamma: error: {message}\n")
    rc, out, err = _run(capsys, "verify", path, "--vnnlib", prop, "--timeout", "-1")
    assert (rc, err) == (2, "gamma: error: --timeout must be a finite number of seconds > 0, got -1\n")
    rc, out, err = _run(capsys, "verify", path, "--vnnlib", prop, "--property", prop)
    assert (rc, err) == (2, "gamma: error: --property does not apply with --vnnlib\n")


def test_vnncomp_runner(tiny, capsys):
    """Two instances, each in its own process; rows in VNN-COMP's CSV layout; summary vs a reference."""
    path, x, label, d = tiny
    bench = d / "bench"
    os.makedirs(bench / "onnx", exist_ok=True)
    os.makedirs(bench / "vnnlib", exist_ok=True)
    (bench / "onnx" / "tiny.onnx.gz").write_bytes(gzip.compress(open(path, "rb").read()))
    write_vnnlib(str(bench / "vnnlib" / "a.vnnlib"), x, 0.002, label, 4)
    write_vnnlib(str(bench / "vnnlib" / "b.vnnlib"), x, 1.0, label, 4)
    (bench / "instances.csv").write_text("onnx/tiny.onnx,vnnlib/a.vnnlib,60\nonnx/tiny.onnx,vnnlib/b.vnnlib,60\n")
    (bench / "results-ref.csv").write_text("b,x/onnx/tiny.onnx,x/vnnlib/a.vnnlib,1.0,unsat,2.0\n"
                                           "b,x/onnx/tiny.onnx,x/vnnlib/b.vnnlib,1.0,timeout,100.0\n")
    out_csv = d / "results.csv"
    rc, out, err = _run(capsys, "vnncomp", str(bench), "--out", str(out_csv), "--quiet")
    assert rc == 0, err
    rows = [line.split(",") for line in out_csv.read_text().splitlines()]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("bench", "tiny.onnx", "a.vnnlib", "unsat"),
                                                         ("bench", "tiny.onnx", "b.vnnlib", "sat")]
    assert "| unsat | 1 | 1 |" in out and "| sat | 1 | 0 |" in out and "| timeout | 0 | 1 |" in out
    assert "sat/unsat disagreements: none" in out


def test_onnx_without_vnnlib_says_how(tiny, capsys):
    path = tiny[0]
    rc, out, err = _run(capsys, "verify", path)
    assert (rc, err) == (2, f"gamma: error: {path}: not a recognised checkpoint (an ONNX model? verify it against "
                            f"a standard VNN-LIB property: gamma verify {path} --vnnlib FILE)\n")
