"""gamma.verify: full-network, layer-by-layer and block-wise runs on tiny random models.

Per-block numbers are checked against the nodes they summarise, the summary is
recomputed from the per-block numbers, saved bounds are checked to contain
gamma's own forward pass at the centre and at random points of the box, and
every JSON result is validated against gamma/schemas/verify.schema.json.
"""

from __future__ import annotations

import json
import math
import statistics

import jsonschema
import numpy as np
import pytest
import torch

import gamma
from gamma.errors import GammaError
from gamma.ops import evaluate
from gamma.verify import Width, check_epsilon, json_safe, schema, select_blocks, summarize
from gamma.vnnlib import parse_property

EPS = 1e-3
SEQ = 2


# ---------------------------------------------------------------- models and runs (computed once)
@pytest.fixture(scope="module")
def qwen3(qwen3_hf_dir):
    return gamma.load(qwen3_hf_dir[0])


@pytest.fixture(scope="module")
def llama(llama_hf_dir):
    return gamma.load(llama_hf_dir[0])


@pytest.fixture(scope="module")
def whisper(whisper_hf_dir):
    return gamma.load(whisper_hf_dir[0])


@pytest.fixture(scope="module")
def runs(qwen3, llama, whisper):
    """Block-wise CROWN runs keyed by name (each run once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, kw = {
                "qwen3": (qwen3, {}),
                "llama": (llama, {}),
                "whisper_encoder": (whisper, {"component": "encoder"}),
                "whisper_decoder": (whisper, {"component": "decoder"}),
            }[name]
            cache[name] = gamma.verify(model, EPS, "crown", block_wise=True, seq_len=SEQ, **kw)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(schema())


def _validate(validator, result):
    d = result.to_dict()
    text = json.dumps(d, allow_nan=False)          # no NaN / Infinity literals
    validator.validate(json.loads(text))
    return d


def _probe(block, suffix):
    """The max width of node <block>.<suffix> from the block's own node list."""
    name = f"{block['block_name']}.{suffix}"
    (node,) = [n for n in block["nodes"] if n["name"] == name]
    return node["output_width"]


# ---------------------------------------------------------------- block-wise
ALL = ["qwen3", "llama", "whisper_encoder", "whisper_decoder"]


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_block_wise_swiglu_models(runs, name):
    r = runs(name)
    assert r.mode == "block_wise" and r["component"] == "decoder"
    assert [b["block_name"] for b in r["blocks"]] == ["layer0", "layer1"]
    for b in r["blocks"]:
        assert b["swiglu_width"] == _probe(b, "mlp.swiglu")
        assert b["qk_matmul_width"] == _probe(b, "attn.qk")
        assert b["attn_width"] == _probe(b, "attn.o")
        assert "mlp_width" not in b and "cross_qk_width" not in b
        for key in ("swiglu_width", "qk_matmul_width", "attn_width"):
            assert math.isfinite(b[key]) and b[key] > 0


def test_block_wise_whisper_encoder(runs):
    r = runs("whisper_encoder")
    assert r["component"] == "encoder" and r["input_point"]["shape"] == [80, 2 * SEQ]
    for b in r["blocks"]:
        assert b["mlp_width"] == _probe(b, "mlp.fc2")
        assert b["qk_matmul_width"] == _probe(b, "attn.qk")
        assert "swiglu_width" not in b and "cross_qk_width" not in b


def test_block_wise_whisper_decoder(runs):
    r = runs("whisper_decoder")
    assert r["component"] == "decoder" and r["input_point"]["tokens"] is not None
    for b in r["blocks"]:
        assert b["mlp_width"] == _probe(b, "mlp.fc2")
        assert b["cross_qk_width"] == _probe(b, "cross.qk")
        assert b["cross_attn_width"] == _probe(b, "cross.o")


@pytest.mark.parametrize("name", ALL)
def test_block_numbers_consistent(runs, name):
    r = runs(name)
    for b in r["blocks"]:
        assert b["input_width"] == pytest.approx(2 * EPS)
        assert b["sensitivity"] == pytest.approx(b["output_width"] / (2 * EPS))
        assert b["num_nodes"] == len(b["nodes"])
        assert b["nodes"][-1]["output_width"] == b["output_width"]      # the block's output node
        for n in b["nodes"]:
            assert n["sensitivity"] == pytest.approx(n["output_width"] / (2 * EPS))
        degraded = any(n["has_nan"] or n["has_infinite"] or n["saturated"] for n in b["nodes"])
        assert b["degraded"] == degraded
        s = b["sensitivity"]
        expect = "DEGRADED" if degraded else "HIGH" if s > 1e6 else "MODERATE" if s > 1e3 else "OK"
        assert b["status"] == expect


@pytest.mark.parametrize("name", ALL)
def test_summary_recomputed(runs, name):
    r = runs(name)
    sens = [b["sensitivity"] for b in r["blocks"]]
    s = r["summary"]
    assert s["num_blocks"] == len(r["blocks"])
    assert s["max_sensitivity"] == max(sens)
    assert s["min_sensitivity"] == min(sens)
    assert s["median_sensitivity"] == pytest.approx(statistics.median(sens))
    assert s["sensitivity_range"] == pytest.approx(max(sens) / min(sens))
    assert s["degraded_blocks"] == [b["block_name"] for b in r["blocks"] if b["degraded"]]
    worst = sorted(r["blocks"], key=lambda b: -b["sensitivity"])[:5]
    assert [w["name"] for w in s["worst_blocks"]] == [b["block_name"] for b in worst]
    assert [w["output_width"] for w in s["worst_blocks"]] == [b["output_width"] for b in worst]


def test_summary_worst_k_and_nan():
    rows = [{"block_name": f"b{i}", "block_index": i, "sensitivity": v, "input_width": 2.0, "output_width": 2 * v,
             "degraded": math.isnan(v)} for i, v in enumerate([3.0, math.nan, 1.0, 7.0])]
    s = summarize(rows, worst_k=2)
    assert [w["name"] for w in s["worst_blocks"]] == ["b1", "b3"]         # NaN counts as worst
    assert s["max_sensitivity"] == math.inf and s["min_sensitivity"] == 1.0
    assert s["degraded_blocks"] == ["b1"]
    assert json_safe(s)["max_sensitivity"] is None


@pytest.mark.parametrize("name", ALL)
def test_block_wise_json_validates(runs, validator, name):
    d = _validate(validator, runs(name))
    assert d["mode"] == "block_wise" and d["method"] == "crown" and d["epsilon"] == EPS
    assert set(d["versions"]) >= {"gamma", "torch", "python"}
    assert d["model"]["arch"] in ("qwen3", "llama", "whisper")


def test_blocks_selection(llama):
    r = gamma.verify(llama, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="1:")
    assert r["selected_blocks"] == [1] and [b["block_name"] for b in r["blocks"]] == ["layer1"]
    with pytest.raises(GammaError, match=r"--blocks 5: the model has 2 blocks \(0\.\.1\); block 5 is out of range"):
        gamma.verify(llama, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="5")


def test_select_blocks():
    assert select_blocks(None, 4) == [0, 1, 2, 3]
    assert select_blocks("0:2", 4) == [0, 1]
    assert select_blocks("::2", 4) == [0, 2]
    assert select_blocks("-2:", 4) == [2, 3]
    assert select_blocks("3", 4) == [3]
    assert select_blocks("-1", 4) == [3]
    assert select_blocks("0,2,2,3", 4) == [0, 2, 3]
    assert select_blocks([1, 0], 4) == [1, 0]
    for bad, msg in [("4", "block 4 is out of range"), ("0:9", "9 is out of range"), ("2:2", "selects none"),
                     ("a", "must be a slice"), ("1:2:0", "step cannot be zero"), ("1:2:3:4", "must be a slice")]:
        with pytest.raises(GammaError, match=msg):
            select_blocks(bad, 4)


# ---------------------------------------------------------------- saved bounds are sound
def _samples(center: torch.Tensor, eps: float, n: int, seed: int = 0) -> torch.Tensor:
    """n points of the box: random corners and uniform interior points, (n, *shape)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n, *center.shape), generator=g, dtype=torch.float64) * 2 - 1
    u[: n // 2] = u[: n // 2].sign()
    return center + eps * u


def _check_inside(lower, upper, values, tol=1e-9):
    scale = tol * (1 + np.abs(values))
    assert np.all(values >= lower - scale) and np.all(values <= upper + scale)


def test_saved_block_bounds_contain_forward(whisper, runs, tmp_path):
    r = runs("whisper_encoder")
    path = tmp_path / "bounds.npz"
    r.save_bounds(str(path))
    z = np.load(path)
    graph = whisper.graph("encoder", SEQ)
    x = whisper.input_point("encoder", SEQ).x
    assert np.array_equal(z["input"], x.numpy())
    assert np.allclose(z["nominal"], whisper.forward(x, "encoder").numpy(), rtol=0, atol=0)
    for k, name in enumerate(graph.blocks()):
        sub = graph.block_graph(name)
        centre = torch.from_numpy(z[f"block{k}_input"])
        lo, hi, nom = z[f"block{k}_lower"], z[f"block{k}_upper"], z[f"block{k}_nominal"]
        assert np.array_equal(nom, evaluate(sub, centre).numpy())
        _check_inside(lo, hi, nom)
        _check_inside(lo, hi, evaluate(sub, _samples(centre, EPS, 32)).numpy())
        assert (hi - lo).max() == pytest.approx(r["blocks"][k]["output_width"])


GENEROUS = "(declare-const Y_0 Real)\n(assert (<= Y_0 1e6)) ; comment\n(assert (>= Y_5 -1e6))\n"
MIXED = "(assert (<= Y_0 1e300))\n(assert (>= Y_3 1e300))\n"      # the second can never be proved


@pytest.fixture(scope="module")
def whisper_full(whisper, tmp_path_factory):
    """Full-network CROWN on the tiny Whisper encoder, with a tolerance it meets and a property it
    proves only half of."""
    prop = tmp_path_factory.mktemp("prop") / "mixed.vnnlib"
    prop.write_text(MIXED)
    return gamma.verify(whisper, EPS, "crown", seq_len=SEQ, tolerance=1.0, property=str(prop))


def test_full_network_bounds(whisper, whisper_full, tmp_path, validator):
    r = whisper_full
    d = _validate(validator, r)
    graph = whisper.graph("encoder", SEQ)
    assert [n["name"] for n in d["nodes"]] == [n.name for n in graph if n.op != "input"]
    assert d["nodes"][-1]["output_width"] == d["max_width"]
    assert all(n["block"] == graph[n["name"]].block and n["layer_type"] == graph[n["name"]].op for n in d["nodes"])
    path = tmp_path / "full.npz"
    r.save_bounds(str(path))
    z = np.load(path)
    assert set(z.files) == {"input", "lower", "upper", "nominal"}
    x = torch.from_numpy(z["input"])
    assert np.array_equal(z["nominal"], whisper.forward(x, "encoder").numpy())
    _check_inside(z["lower"], z["upper"], z["nominal"])
    _check_inside(z["lower"], z["upper"], evaluate(graph, _samples(x, EPS, 32)).numpy())
    assert (z["upper"] - z["lower"]).max() == pytest.approx(d["max_width"])
    assert d["max_width"] <= 1.0 and d["within_tolerance"]
    assert d["property"]["proved"] == 1 and d["property"]["total"] == 2
    assert d["verdict"] == "unknown"              # every check must pass


def test_tolerance_verdict_block_wise(whisper, validator):
    kw = dict(block_wise=True, seq_len=SEQ)
    r = gamma.verify(whisper, EPS, "ibp", **kw)
    assert r.verdict is None and "within_tolerance" not in r["blocks"][0]
    widths = [b["output_width"] for b in r["blocks"]]
    assert all(math.isfinite(w) for w in widths)
    ok = gamma.verify(whisper, EPS, "ibp", tolerance=max(widths), **kw)
    assert ok.verdict == "verified" and all(b["within_tolerance"] for b in ok["blocks"])
    tight = gamma.verify(whisper, EPS, "ibp", tolerance=min(widths) * 0.999, **kw)
    assert tight.verdict == "unknown" and not any(b["within_tolerance"] for b in tight["blocks"])
    _validate(validator, tight)


# ---------------------------------------------------------------- properties
def test_property_verdict(whisper_full):
    lo, hi = whisper_full.arrays["lower"].ravel(), whisper_full.arrays["upper"].ravel()
    a0, a1 = whisper_full.to_dict()["property"]["assertions"]
    assert (a0["index"], a0["op"], a0["bound"], a0["proved"]) == (0, "<=", 1e300, True)
    assert (a1["index"], a1["op"], a1["bound"], a1["proved"]) == (3, ">=", 1e300, False)
    assert (a0["lower"], a0["upper"]) == (float(lo[0]), float(hi[0]))
    assert (a1["lower"], a1["upper"]) == (float(lo[3]), float(hi[3]))


def test_property_errors(whisper, tmp_path):
    p = tmp_path / "p.vnnlib"
    p.write_text("(declare-const Y_0 Real)\n\n(assert (< Y_0 1.0))\n")
    with pytest.raises(GammaError, match=r"p\.vnnlib:3: unsupported property line '\(assert \(< Y_0 1\.0\)\)'"):
        parse_property(str(p))
    p.write_text("(assert (<= Y_0 nan))\n")
    with pytest.raises(GammaError, match=r"p\.vnnlib:1: bound must be a finite number, got 'nan'"):
        parse_property(str(p))
    p.write_text("; nothing\n")
    with pytest.raises(GammaError, match="no assertions"):
        parse_property(str(p))
    with pytest.raises(GammaError, match="no such file"):
        parse_property(str(tmp_path / "missing.vnnlib"))
    p.write_text("(assert (>= Y_100000 0))\n")       # index checked before any bound is computed
    with pytest.raises(GammaError, match=r"p\.vnnlib:1: Y_100000 is out of range \(the output has 128 values\)"):
        gamma.verify(whisper, EPS, seq_len=SEQ, property=str(p))
    with pytest.raises(GammaError, match="--property needs a full-network run"):
        gamma.verify(whisper, EPS, seq_len=SEQ, property=str(p), block_wise=True)


# ---------------------------------------------------------------- layer by layer
def test_layer_by_layer_names_first_degraded(llama, validator):
    r = gamma.verify(llama, 10.0, "ibp", layer_by_layer=True, seq_len=SEQ)
    d = _validate(validator, r)
    flagged = [n for n in d["nodes"] if n["has_nan"] or n["has_infinite"] or n["saturated"]]
    assert flagged, "epsilon 10 with IBP must degrade somewhere"
    fd = d["first_degraded"]
    assert fd["name"] == flagged[0]["name"]
    reason = "nan" if flagged[0]["has_nan"] else "infinite" if flagged[0]["has_infinite"] else "saturated"
    assert fd["reason"] == reason
    assert [b["block_name"] for b in d["block_growth"]] == ["layer0", "layer1"]
    for n in d["nodes"]:
        if n["input_width"] and n["output_width"] is not None and n["growth"] is not None:
            assert n["growth"] == pytest.approx(n["output_width"] / n["input_width"])
    b0 = d["block_growth"][0]
    assert b0["input_width"] == pytest.approx(20.0)     # layer0 reads the input box directly


def test_layer_by_layer_clean_run(whisper, validator, tmp_path):
    prop = tmp_path / "generous.vnnlib"
    prop.write_text(GENEROUS)
    r = gamma.verify(whisper, EPS, "crown", layer_by_layer=True, seq_len=SEQ, tolerance=1.0, property=str(prop))
    d = _validate(validator, r)
    assert d["first_degraded"] is None and not d["has_nan"] and not d["has_infinite"]
    assert all(b["degraded"] is False for b in d["block_growth"])
    assert d["property"]["proved"] == d["property"]["total"] == 2 and d["within_tolerance"]
    assert d["verdict"] == "verified"


def test_width_flags():
    inf, nan = math.inf, math.nan
    w = Width.of(torch.tensor([0.0, -1e308]), torch.tensor([1.0, 1e308]))      # width overflows
    assert w.max == inf and w.has_infinite and not w.has_nan
    w = Width.of(torch.tensor([0.0, -inf]), torch.tensor([1.0, -inf]))
    assert w.max == inf and w.has_infinite
    w = Width.of(torch.tensor([0.0, nan]), torch.tensor([1.0, 2.0]))
    assert math.isnan(w.max) and w.has_nan
    w = Width.of(torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.75]))
    assert (w.max, w.mean, w.has_nan, w.has_infinite) == (1.0, 0.625, False, False)
    assert Width(0.995, 0.5, False, False).saturated("softmax")
    assert not Width(0.98, 0.5, False, False).saturated("softmax")
    assert Width(2e6, 1.0, False, False).saturated("linear") and not Width(2e5, 1.0, False, False).saturated("linear")


def test_json_safe():
    d = json_safe({"a": math.nan, "b": [math.inf, 1.5, np.float32(2.0)], "c": (np.int64(3), np.bool_(True))})
    assert d == {"a": None, "b": [None, 1.5, 2.0], "c": [3, True]}
    json.dumps(d, allow_nan=False)


# ---------------------------------------------------------------- inputs and options
@pytest.mark.parametrize("eps", [0, -1, math.nan, math.inf, "x"])
def test_bad_epsilon(llama, eps):
    with pytest.raises(GammaError, match=r"--epsilon must be a finite number > 0, got "):
        gamma.verify(llama, eps)


def test_check_epsilon_shows_user_text():
    with pytest.raises(GammaError, match=r"^--epsilon must be a finite number > 0, got -1e0$"):
        check_epsilon("-1e0", shown="-1e0")
    assert check_epsilon("2e-3") == 2e-3


def test_bad_options(llama):
    with pytest.raises(GammaError, match="unknown method 'foo'"):
        gamma.verify(llama, EPS, "foo")
    with pytest.raises(GammaError, match="--blocks applies to --block-wise"):
        gamma.verify(llama, EPS, blocks="0")
    with pytest.raises(GammaError, match="exclusive"):
        gamma.verify(llama, EPS, block_wise=True, layer_by_layer=True)
    with pytest.raises(GammaError, match="--worst-k must be >= 1"):
        gamma.verify(llama, EPS, worst_k=0)
    with pytest.raises(GammaError, match="--tolerance must be a finite number >= 0"):
        gamma.verify(llama, EPS, tolerance=-1.0)
    with pytest.raises(GammaError, match="llama has no component 'encoder'"):
        gamma.verify(llama, EPS, component="encoder")
    with pytest.raises(GammaError, match="--tokens must be comma-separated integers"):
        gamma.verify(llama, EPS, tokens="1,x")
    with pytest.raises(GammaError, match="no such file"):
        gamma.load("/nonexistent/model.safetensors")
    with pytest.raises(GammaError, match=r"^unknown --arithmetic 'float16' \(choose from float32, float32-probabilistic, real\)$"):
        gamma.verify(llama, EPS, arithmetic="float16")


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_real_arithmetic_sound_for_the_real_function_and_within_float32(whisper, validator, method):
    """--arithmetic real: no float32 margins.  The bounds still contain the
    float64 function (samples + PGD), lie inside the float32-sound bounds and
    are tighter; the report says which arithmetic it bounds, and block-wise
    checkpoints keep the two apart (run key)."""
    from gamma import parallel
    from soundness import graph_fn, violations
    kw = dict(method=method, seq_len=2, epsilon=1e-4)
    f32 = gamma.verify(whisper, **kw)
    real = gamma.verify(whisper, arithmetic="real", **kw)
    assert real.report["arithmetic"] == "real" and f32.report["arithmetic"] == "float32"
    _validate(validator, real)
    lo, hi = (torch.from_numpy(real.arrays[k]) for k in ("lower", "upper"))
    flo, fhi = (torch.from_numpy(f32.arrays[k]) for k in ("lower", "upper"))
    assert torch.all(lo >= flo) and torch.all(hi <= fhi)
    assert float((hi - lo).sum()) < float((fhi - flo).sum())
    g = whisper.graph("encoder", 2)
    x = whisper.input_point("encoder", 2).x
    assert violations(graph_fn(g), x, 1e-4, lo, hi, n_samples=500, steps=10, restarts=1) == 0
    keys = [parallel.run_key(r.report, 20, x) for r in (f32, real)]
    assert keys[0] != keys[1]


def test_tokens_set_sequence_length(llama):
    r = gamma.verify(llama, EPS, "ibp", block_wise=True, tokens="3,1,4", blocks="0")
    assert r["seq_len"] == 3 and r["input_point"]["tokens"] == [3, 1, 4]
    assert r["input_point"]["shape"] == [3, 64] and r["output_shape"] == [3, 64]


def test_forward_matches_model(llama):
    out = gamma.forward(llama, seq_len=3, output="logits")
    assert tuple(out.output.shape) == (3, 96)
    assert torch.equal(out.output, llama.forward(out.input, output="logits"))
    assert out.point.tokens is not None and out.seq_len == 3


# ---------------------------------------------------------------- grouped arguments
def _no_times(d):
    if isinstance(d, list):
        return [_no_times(v) for v in d]
    if not isinstance(d, dict):
        return d
    return {k: _no_times(v) for k, v in d.items() if k not in ("seconds", "timings", "memory")}


@pytest.mark.parametrize("kw", [dict(block_wise=True, blocks="1", tolerance=10.0),
                                dict(layer_by_layer=True, method="ibp", tokens="3,1")])
def test_run_with_grouped_arguments_is_verify(llama, kw):
    """gamma.verify(**keywords) is run(model, BoundOptions, InputSpec, RunSpec): the same report
    and the same arrays, bit for bit."""
    from gamma.options import BoundOptions
    from gamma.verify import InputSpec, RunSpec, mode_of, run
    a = gamma.verify(llama, EPS, kw.get("method", "crown"), seq_len=SEQ, attack=False, **{
        k: v for k, v in kw.items() if k != "method"})
    spec = RunSpec(mode_of(kw.get("block_wise", False), kw.get("layer_by_layer", False)), kw.get("blocks"),
                   kw.get("tolerance"), attack=False)
    b = run(llama, BoundOptions(EPS, kw.get("method", "crown")), InputSpec(seq_len=SEQ, tokens=kw.get("tokens")),
            spec)
    assert _no_times(a.report) == _no_times(b.report)
    assert a.arrays.keys() == b.arrays.keys()
    assert all(a.arrays[k].tobytes() == b.arrays[k].tobytes() for k in a.arrays)


def test_specs_are_checked_when_made():
    from gamma.options import BoundOptions
    from gamma.verify import InputSpec, RunSpec, run
    with pytest.raises(GammaError, match=r"^--seq-len must be >= 1, got 0$"):
        InputSpec(seq_len=0)
    with pytest.raises(GammaError, match=r"^unknown --output 'x' \(choose hidden or logits\)$"):
        InputSpec(output="x")
    with pytest.raises(GammaError, match=r"^--blocks applies to --block-wise runs$"):
        RunSpec("full", blocks="0")
    with pytest.raises(GammaError, match=r"^unknown mode 'fast'"):
        RunSpec("fast")
    assert InputSpec(tokens="1, 2").tokens == (1, 2)
    assert RunSpec("block_wise").attack_config() is not None and RunSpec("full").attack_config() is None
    with pytest.raises(GammaError, match=r"^expected a BoundOptions, got dict$"):
        run(None, {"epsilon": EPS})


# ---------------------------------------------------------------- real models (slow)
@pytest.mark.slow
@pytest.mark.real
def test_real_whisper_tiny_en_block_wise(real_whisper_tiny_en, validator):
    r = gamma.verify(real_whisper_tiny_en, 1e-3, "crown", block_wise=True, seq_len=2, blocks="0:2")
    d = _validate(validator, r)
    assert d["model"]["format"] == "ct2" and [b["block_name"] for b in d["blocks"]] == ["layer0", "layer1"]
    for b in d["blocks"]:
        assert b["output_width"] is not None and b["mlp_width"] is not None and b["qk_matmul_width"] is not None


@pytest.mark.slow
@pytest.mark.real
def test_real_smollm2_block_wise(real_smollm2, validator):
    r = gamma.verify(real_smollm2, 1e-3, "crown", block_wise=True, seq_len=2, blocks="0,29")
    d = _validate(validator, r)
    assert d["model"]["format"] == "gguf" and d["model"]["arch"] == "llama"
    assert [b["block_name"] for b in d["blocks"]] == ["layer0", "layer29"]
    for b in d["blocks"]:
        assert b["swiglu_width"] is not None and b["qk_matmul_width"] is not None
