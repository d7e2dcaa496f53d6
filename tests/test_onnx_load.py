"""gamma.io.onnx_load: parity with onnxruntime and soundness of imported graphs.

Parity: the float64 forward pass of the imported graph matches onnxruntime
(float32) to 1e-5 relative (max abs difference over max |output|) on random
inputs, for both VNN-COMP 2023 vit models (shared folder; skipped when it is
missing) and for a small transformer exported by torch.onnx.export at test
time.  Soundness: every bound method's bounds of the imported graphs contain
sampled and PGD-attacked outputs (zero violations).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gamma.bounds import compute_bounds
from gamma.ops import evaluate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gamma.io.onnx_load import load_onnx, read_bytes  # noqa: E402
from onnx_models import VIT_DIR, TinyViT, export, vit_onnx  # noqa: E402
from soundness import explore  # noqa: E402

PARITY_RTOL = 1e-5
needs_vit = pytest.mark.skipif(not os.path.isdir(VIT_DIR), reason=f"vit benchmark folder {VIT_DIR} is missing")


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    """onnxruntime (float32) on a batch (B, *input_shape[1:])."""
    sess = ort.InferenceSession(read_bytes(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.float().numpy()})[0]


def _parity(path: str, n: int, seed: int) -> float:
    g = load_onnx(path)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *g.input_shape), generator=gen, dtype=torch.float64) * 2 - 1   # (n, 1, C, H, W)
    ours = evaluate(g, x).numpy().reshape(n, -1)
    ref = _ort(path, x.reshape(n, *g.input_shape[1:])).reshape(n, -1)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_vit_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return export(TinyViT(), str(d / "tiny_vit.onnx"))


@needs_vit
@pytest.mark.parametrize("name", ["ibp_3_3_8", "pgd_2_3_16"])
def test_vit_parity_with_onnxruntime(name):
    assert _parity(vit_onnx(name), n=4, seed=1) <= PARITY_RTOL


@pytest.mark.parametrize("opset", [17, 20])
def test_exported_transformer_parity(tmp_path, opset):
    """opset 17: erf-GELU fused from Div/Erf/Add/Mul/Mul; opset 20: the Gelu op."""
    model = TinyViT()
    path = export(model, str(tmp_path / f"tv{opset}.onnx"), opset=opset)
    assert _parity(path, n=5, seed=2) <= PARITY_RTOL
    g = load_onnx(path)
    ops = g.summary()
    assert ops["gelu"] == 1 and ops["layernorm"] == 1 and ops["softmax"] == 1 and ops["relu"] == 1
    x = torch.randn(3, 1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x.float().reshape(3, 3, 8, 8)).double()
    assert float((evaluate(g, x)[:, 0] - ref).abs().max()) <= PARITY_RTOL * float(ref.abs().max())


def test_gz_and_plain_give_the_same_graph(tmp_path, tiny_vit_path):
    import gzip
    gz = tmp_path / "m.onnx.gz"
    gz.write_bytes(gzip.compress(open(tiny_vit_path, "rb").read()))
    a, b = load_onnx(tiny_vit_path), load_onnx(str(gz))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(evaluate(a, x), evaluate(b, x))


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha", "zonotope"])
@pytest.mark.parametrize("arithmetic", ["real", "float32"])
def test_exported_transformer_sound(tiny_vit_path, method, arithmetic):
    g = load_onnx(tiny_vit_path)
    x = torch.rand(g.input_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 0.02
    r = compute_bounds(g, x, eps, method, arithmetic=arithmetic, alpha_iters=3)
    assert torch.isfinite(r.lower).all() and torch.isfinite(r.upper).all()
    emp = explore(lambda z: evaluate(g, z), x, eps, r.lower, r.upper, n_samples=300, seed=6)
    assert emp.violations == 0
    if method in ("crown", "alpha"):              # not vacuous: within 50x of the attacked spread
        assert float((r.upper - r.lower).max()) < 50 * float((emp.upper - emp.lower).max())


@needs_vit
def test_vit_crown_sound():
    g = load_onnx(vit_onnx("pgd_2_3_16"))
    x = torch.rand(g.input_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eps = 1 / 255
    r = compute_bounds(g, x, eps, "crown", arithmetic="real")
    emp = explore(lambda z: evaluate(g, z), x, eps, r.lower, r.upper, n_samples=200, seed=8, steps=10)
    assert emp.violations == 0
    assert float((r.upper - r.lower).max()) < 5 * float((emp.upper - emp.lower).max())
