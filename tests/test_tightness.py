"""gamma.tightness / gamma verify --attack: the attacked width is never above the certified one,
the attacked points never leave the certified bounds, and the figures agree with the arrays."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch

import gamma
from gamma import cli
from gamma.commands import verify as verify_cmd
from gamma.attack import AttackConfig, AttackRange
from gamma.stats import spearman
from gamma.tightness import block_summary, figures, per_position, ratio
from gamma.verify import schema

EPS = 1e-3
SEQ = 2


@pytest.fixture(scope="module")
def models(qwen3_hf_dir, llama_hf_dir, whisper_hf_dir):
    return {"qwen3": gamma.load(qwen3_hf_dir[0]), "llama": gamma.load(llama_hf_dir[0]),
            "whisper": gamma.load(whisper_hf_dir[0])}


def _validate(result) -> dict:
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    jsonschema.Draft202012Validator(schema()).validate(d)
    return d


@pytest.mark.parametrize("name,method", [("qwen3", "crown"), ("llama", "ibp"), ("whisper", "crown")])
def test_block_wise_attack_never_above_certified(models, name, method):
    res = gamma.verify(models[name], EPS, method, block_wise=True, seq_len=SEQ)     # attack on by default
    d = _validate(res)
    a = res.arrays
    for b in res["blocks"]:
        k = b["block_index"]
        lo, hi = a[f"block{k}_lower"], a[f"block{k}_upper"]
        alo, ahi = a[f"block{k}_attacked_lower"], a[f"block{k}_attacked_upper"]
        assert np.all(lo <= alo) and np.all(alo <= ahi) and np.all(ahi <= hi)
        assert b["attack_violations"] == 0
        assert b["attacked_width"] == pytest.approx(float((ahi - alo).max()), rel=1e-12)
        assert 0 < b["attacked_width"] <= b["output_width"]
        assert b["ratio"] == pytest.approx(b["output_width"] / b["attacked_width"]) and b["ratio"] >= 1
        assert b["attacked_sensitivity"] == pytest.approx(b["attacked_width"] / (2 * EPS))
        assert np.all(alo <= a[f"block{k}_nominal"]) and np.all(a[f"block{k}_nominal"] <= ahi)
    s = d["attack"]
    rows = res["blocks"]
    assert s["violations"] == 0 and s["blocks"] == len(rows)
    want = spearman([r["sensitivity"] for r in rows], [r["attacked_sensitivity"] for r in rows])
    assert s["spearman"] == (None if math.isnan(want) else pytest.approx(want))
    assert [w["name"] for w in s["worst_ratio_blocks"]] == \
        [r["block_name"] for r in sorted(rows, key=lambda r: -r["ratio"])][:len(s["worst_ratio_blocks"])]


def test_full_attack_and_per_position(models, tmp_path):
    res = gamma.verify(models["llama"], EPS, "crown", seq_len=SEQ, attack=True)
    d = _validate(res)
    a, att = res.arrays, d["attack"]
    assert np.all(a["lower"] <= a["attacked_lower"]) and np.all(a["attacked_upper"] <= a["upper"])
    assert att["violations"] == 0 and 0 < att["max_width"] <= d["max_width"]
    assert att["ratio"] == pytest.approx(d["max_width"] / att["max_width"])
    assert len(att["per_position"]) == SEQ
    for p in att["per_position"]:
        i = p["index"]
        assert p["certified_width"] == pytest.approx(float((a["upper"][i] - a["lower"][i]).max()))
        assert p["attacked_width"] == pytest.approx(float((a["attacked_upper"][i] - a["attacked_lower"][i]).max()))
        assert p["attacked_width"] <= p["certified_width"]
    assert max(p["attacked_width"] for p in att["per_position"]) == pytest.approx(att["max_width"])
    off = gamma.verify(models["llama"], EPS, "ibp", seq_len=SEQ)                     # full: off by default
    assert off["attack"] is None and "attacked_lower" not in off.arrays
    _validate(off)
    path = tmp_path / "b.npz"
    res.save_bounds(str(path))
    with np.load(path) as z:
        assert {"attacked_lower", "attacked_upper"} <= set(z.files)


def test_layer_by_layer_attack_validates(models):
    res = gamma.verify(models["llama"], EPS, "crown", layer_by_layer=True, seq_len=SEQ,
                       attack=AttackConfig(samples=8, steps=3, restarts=1, widest=2, others=2))
    d = _validate(res)
    assert d["attack"]["config"] == {"samples": 8, "steps": 3, "restarts": 1, "widest": 2, "others": 2, "seed": 0}
    assert d["attack"]["max_width"] <= d["max_width"]


def test_bad_attack_config_is_a_user_error(models):
    with pytest.raises(gamma.GammaError, match="^attack restarts must be an integer >= 0, got -2$"):
        gamma.verify(models["llama"], EPS, "ibp", seq_len=SEQ, attack=AttackConfig(restarts=-2))


def test_cli_tables(models, llama_hf_dir, capsys, tmp_path):
    path = llama_hf_dir[0]
    assert cli.main(["verify", path, "--block-wise", "--method", "ibp", "--seq-len", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    header = [l for l in out.splitlines() if "sensitivity" in l and "block" in l][0].split()
    assert header[:9] == ["#", "block", "in", "width", "out", "width", "sensitivity", "attacked", "att"]
    assert "rank agreement of certified and attacked sensitivity: Spearman" in out
    assert "loosest blocks (certified / attacked): layer" in out
    assert cli.main(["verify", path, "--block-wise", "--method", "ibp", "--seq-len", "2", "--quiet",
                     "--no-attack", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["attack"] is None and "attacked_width" not in d["blocks"][0]
    npz = str(tmp_path / "b.npz")
    assert cli.main(["verify", path, "--method", "ibp", "--seq-len", "2", "--quiet", "--attack",
                     "--save-bounds", npz]) == 0
    out = capsys.readouterr().out
    assert "attack   max width" in out and "per output position:" in out
    with np.load(npz) as z:
        assert np.all(z["attacked_upper"] <= z["upper"]) and np.all(z["lower"] <= z["attacked_lower"])


# ---------------------------------------------------------------- the figures, by hand
def _range(lo, hi) -> AttackRange:
    return AttackRange(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), 10, 0,
                       torch.tensor([0]), 0.1)


def test_ratio_edge_cases():
    assert ratio(4.0, 2.0) == 2.0 and ratio(0.0, 0.0) == 0.0 and ratio(1.0, 0.0) == math.inf
    assert math.isnan(ratio(math.nan, 1.0)) and math.isnan(ratio(1.0, math.nan))


def test_figures_and_per_position_by_hand():
    att = _range([[0.0, 1.0], [2.0, 2.0]], [[0.5, 1.5], [2.1, 3.0]])            # widths [[.5, .5], [.1, 1]]
    f = figures(4.0, att, 0.25)
    assert f == {"attacked_width": 1.0, "attacked_mean_width": pytest.approx(0.525), "attacked_sensitivity": 2.0,
                 "ratio": 4.0, "attack_violations": 0}
    lo = torch.zeros(2, 2, dtype=torch.float64)
    hi = torch.tensor([[1.0, 2.0], [math.inf, 1.0]], dtype=torch.float64)
    assert per_position(lo, hi, att) == [
        {"index": 0, "certified_width": 2.0, "attacked_width": 0.5, "ratio": 4.0},
        {"index": 1, "certified_width": math.inf, "attacked_width": 1.0, "ratio": math.inf}]


def test_block_summary_by_hand():
    rows = [{"block_name": f"layer{i}", "block_index": i, "sensitivity": s, "attacked_sensitivity": a,
             "attacked_width": a, "ratio": s / a, "attack_violations": 0}
            for i, (s, a) in enumerate([(10.0, 1.0), (20.0, 4.0), (30.0, 2.0), (40.0, 8.0)])]
    rows.append({"block_name": "layer4", "block_index": 4, "sensitivity": math.nan, "status": "FAILED"})
    s = block_summary(rows, AttackConfig(), 2, 100, 1.5)
    # certified ranks 1 2 3 4, attacked ranks 1 3 2 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert s["spearman"] == pytest.approx(0.8) and s["spearman_n"] == 4 and s["blocks"] == 4
    assert [w["name"] for w in s["worst_ratio_blocks"]] == ["layer2", "layer0"]           # x15, x10
    assert (s["max_ratio"], s["median_ratio"], s["min_ratio"]) == (15.0, 7.5, 5.0)
    lines = verify_cmd._block_attack_lines(s)
    assert lines[1] == "rank agreement of certified and attacked sensitivity: Spearman +0.80 over 4 blocks"
    assert lines[2] == "loosest blocks (certified / attacked): layer2 (x15), layer0 (x10)"


# ---------------------------------------------------------------- real models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("which,blocks", [("whisper", "0,3"), ("smollm2", "0,29")])
def test_real_models_attacked_never_above_certified(real_whisper_tiny_en, real_smollm2, which, blocks):
    path = real_whisper_tiny_en if which == "whisper" else real_smollm2
    res = gamma.verify(path, EPS, "crown", block_wise=True, seq_len=2, blocks=blocks)
    _validate(res)
    for b in res["blocks"]:
        k = b["block_index"]
        a = res.arrays
        assert np.all(a[f"block{k}_lower"] <= a[f"block{k}_attacked_lower"])
        assert np.all(a[f"block{k}_attacked_upper"] <= a[f"block{k}_upper"])
        assert b["attack_violations"] == 0 and 0 < b["attacked_width"] <= b["output_width"]
        print(f"\n{which} {b['block_name']}: certified {b['output_width']:.4g}, attacked {b['attacked_width']:.4g}, "
              f"x{b['ratio']:.3g}")
