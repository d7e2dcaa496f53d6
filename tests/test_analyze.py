"""gamma.analyze and ``gamma analyze``: correlations against scipy, the top-k
overlap by hand, and the report (report.md + 3 PNGs) from a synthetic verify JSON."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from gamma.analyze import PLOTS, analyze, pearson, rankdata, spearman, top_overlap
from gamma.commands import analyze as cmd
from gamma.errors import GammaError
from gamma.io import load_checkpoint
from gamma.norms import weight_norms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cmd.add_parser(sub)
    args = p.parse_args(list(argv))
    rc = args.func(args)
    return rc, capsys.readouterr().out


# ------------------------------------------------------------------ statistics
VECTORS = [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 7.0]),
    ([1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [6.0, 5.0, 5.0, 1.0, 2.0, 2.0]),          # ties on both sides
    ([1e3, 2e5, 3e1, 4e7], [1.0, 2.5, 0.5, 9.0]),
    ([5.0, 5.0, 1.0], [0.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("x,y", VECTORS)
def test_correlations_equal_scipy(x, y):
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    lx, ly = np.log10(np.abs(x) + 1), np.log10(np.abs(y) + 1)
    assert pearson(lx, ly) == pytest.approx(scipy.stats.pearsonr(lx, ly).statistic, abs=1e-12)


def test_correlations_random_against_scipy():
    rng = np.random.default_rng(0)
    for n in (3, 7, 30, 200):
        x = rng.normal(size=n)
        y = 0.3 * x + rng.normal(size=n)
        y[: n // 3] = np.round(y[: n // 3])                    # some ties
        assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        assert np.array_equal(rankdata(y), scipy.stats.rankdata(y))


def test_correlation_degenerate_cases():
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert list(rankdata([10, 20, 10, 30])) == [1.5, 3.0, 1.5, 4.0]
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_top_overlap_by_hand():
    sens = [5.0, 1.0, 9.0, 3.0, 8.0, 2.0, 7.0]      # top 5: b2 b4 b6 b0 b3
    spec = [1.0, 6.0, 9.0, 2.0, 8.0, 7.0, 3.0]      # top 5: b2 b4 b5 b1 b6
    rows = [{"block": f"b{i}", "sensitivity": s, "max_spectral": w} for i, (s, w) in enumerate(zip(sens, spec))]
    t = top_overlap(rows, 5)
    assert t["by_sensitivity"] == ["b2", "b4", "b6", "b0", "b3"]
    assert t["by_spectral"] == ["b2", "b4", "b5", "b1", "b6"]
    assert (t["overlap"], t["overlap_blocks"]) == (3, ["b2", "b4", "b6"])
    rows[1]["sensitivity"] = math.nan                # an unknown sensitivity counts as the worst
    assert top_overlap(rows, 2)["by_sensitivity"] == ["b1", "b2"]
    assert top_overlap(rows[:3], 5)["k"] == 3


# ------------------------------------------------------------------ synthetic verify JSON
def synthetic_verify(path: str, arch: str, component: str, sens: list) -> dict:
    blocks = [{"block_index": i, "block_name": f"layer{i}", "input_width": 2e-3, "output_width": None if s is None
               else 2e-3 * s, "sensitivity": s, "status": "OK" if s is not None else "DEGRADED",
               "degraded": s is None} for i, s in enumerate(sens)]
    return {"mode": "block_wise", "model": {"path": path, "format": "safetensors", "arch": arch},
            "component": component, "method": "crown", "epsilon": 1e-3, "seq_len": 4,
            "input_point": {"description": "default tokens (seed 0)", "shape": [4, 64], "tokens": [1, 2, 3, 4]},
            "blocks": blocks, "versions": {"gamma": "0.1.0"}}


def test_analyze_joins_blocks(llama_hf_dir):
    path = llama_hf_dir[0]
    norms = weight_norms(load_checkpoint(path))
    a = analyze(synthetic_verify(path, "llama", "decoder", [12.0, 340.0]), norms)
    assert [r["block"] for r in a["blocks"]] == ["layer0", "layer1"]
    for r, nb in zip(a["blocks"], norms["blocks"]):
        assert r["max_spectral"] == nb["max_spectral"] and r["total_frobenius"] == nb["total_frobenius"]
        assert r["amplification"] == pytest.approx(r["sensitivity"] / nb["max_spectral"])
    c = a["correlation"]
    s, w = [12.0, 340.0], [b["max_spectral"] for b in norms["blocks"]]
    assert c["n"] == 2 and c["pearson"] == pytest.approx(scipy.stats.pearsonr(s, w).statistic, abs=1e-12)
    with pytest.raises(GammaError, match="is for a whisper model"):
        analyze(synthetic_verify(path, "whisper", "encoder", [1.0, 2.0]), norms)
    bad = synthetic_verify(path, "llama", "decoder", [1.0, 2.0, 3.0])      # layer2 does not exist
    with pytest.raises(GammaError, match="layer2"):
        analyze(bad, norms)


def test_analyze_from_json_writes_report(capsys, tmp_path, whisper_hf_dir):
    path = whisper_hf_dir[0]
    vj = tmp_path / "verify.json"
    vj.write_text(json.dumps(synthetic_verify(path, "whisper", "encoder", [25.0, None])))
    out = tmp_path / "rep"
    rc, text = run_cli(capsys, "analyze", "--from-json", str(vj), "--out", str(out), "--quiet")
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted(["report.md", *PLOTS.values()])
    for name in PLOTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    md = (out / "report.md").read_text()
    for needle in ("encoder.layer0", "encoder.layer1", "crown", "epsilon 0.001", "Spearman", "versions",
                   "How to read", "![scatter](sensitivity_vs_spectral.png)", "Left out"):
        assert needle in md, needle
    assert "sensitivity vs max spectral" in text and "top 2 overlap" in text


def test_analyze_cli_json_and_errors(capsys, tmp_path, llama_hf_dir):
    path = llama_hf_dir[0]
    vj = tmp_path / "verify.json"
    vj.write_text(json.dumps(synthetic_verify(path, "llama", "decoder", [3.0, 30.0])))
    rc, out = run_cli(capsys, "analyze", str(path), "--from-json", str(vj), "--out", str(tmp_path / "o"),
                      "--json", "--quiet")
    r = json.loads(out)
    assert rc == 0 and r["top"]["k"] == 2 and r["correlation"]["n"] == 2
    assert r["correlation"]["spearman"] == pytest.approx(scipy.stats.spearmanr(
        [3.0, 30.0], [b["max_spectral"] for b in r["blocks"]]).statistic)
    assert len(r["files"]) == 4
    with pytest.raises(GammaError, match="no such file"):
        run_cli(capsys, "analyze", "--from-json", str(tmp_path / "nope.json"))
    (tmp_path / "full.json").write_text(json.dumps({"mode": "full"}))
    with pytest.raises(GammaError, match="not a block-wise"):
        run_cli(capsys, "analyze", "--from-json", str(tmp_path / "full.json"))
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(GammaError, match="not JSON"):
        run_cli(capsys, "analyze", "--from-json", str(tmp_path / "junk.json"))
    with pytest.raises(GammaError, match="--method applies"):
        run_cli(capsys, "analyze", "--from-json", str(vj), "--method", "ibp")
    with pytest.raises(GammaError, match="--epsilon"):
        run_cli(capsys, "analyze", str(path), "--epsilon", "0", "--out", str(tmp_path / "e"))


def test_analyze_runs_verification(capsys, tmp_path, llama_hf_dir):
    """End to end on a tiny model: gamma.verify block-wise, then the report."""
    out = tmp_path / "rep"
    rc, text = run_cli(capsys, "analyze", llama_hf_dir[0], "--method", "ibp", "--seq-len", "3", "--out", str(out),
                       "--quiet", "--json")
    r = json.loads(text)
    assert rc == 0 and r["method"] == "ibp" and r["seq_len"] == 3
    assert [b["block"] for b in r["blocks"]] == ["layer0", "layer1"]
    assert all(b["sensitivity"] > 0 for b in r["blocks"])
    assert (out / "report.md").exists() and all((out / n).exists() for n in PLOTS.values())
    assert all(0 < b["attacked_sensitivity"] <= b["sensitivity"] for b in r["blocks"])     # verify attacks by default
    assert r["attacked"]["n"] == 2 and "## Certified and attacked" in (out / "report.md").read_text()


# ------------------------------------------------------------------ certified and attacked
def _with_attack(report: dict, attacked: list) -> dict:
    for b, a in zip(report["blocks"], attacked):
        b["attacked_sensitivity"] = a
        b["ratio"] = b["sensitivity"] / a
    return report


@pytest.mark.parametrize("attacked,agree", [([5.0, 1.0], False), ([1.0, 10.0], True)])
def test_certified_and_attacked_side_by_side(capsys, tmp_path, llama_hf_dir, attacked, agree):
    path = llama_hf_dir[0]
    vj = tmp_path / "verify.json"
    vj.write_text(json.dumps(_with_attack(synthetic_verify(path, "llama", "decoder", [3.0, 30.0]), attacked)))
    out = tmp_path / "rep"
    rc, text = run_cli(capsys, "analyze", str(path), "--from-json", str(vj), "--out", str(out), "--quiet")
    assert rc == 0
    norms = weight_norms(load_checkpoint(path))
    a = analyze(json.loads(vj.read_text()), norms)
    at = a["attacked"]
    spec = [b["max_spectral"] for b in norms["blocks"]]
    assert at["rank_agreement"] == pytest.approx(1.0 if agree else -1.0)
    assert at["correlation"]["spearman"] == pytest.approx(scipy.stats.spearmanr(attacked, spec).statistic)
    assert at["correlation"]["value"] == "attacked_sensitivity" and a["correlation"]["value"] == "sensitivity"
    assert (at["agree"], at["top_certified"], at["top_attacked"]) == (agree, "layer1", "layer1" if agree else "layer0")
    assert (at["min_ratio"], at["max_ratio"]) == (pytest.approx(0.6 if not agree else 3.0),
                                                  pytest.approx(30.0 if not agree else 3.0))
    md = (out / "report.md").read_text()
    assert "| # | block | sensitivity (certified) | attacked sensitivity | certified / attacked |" in md
    assert "| attacked | max spectral norm | 2 |" in md and "| certified | total Frobenius norm | 2 |" in md
    assert ("**The two rankings disagree** (Spearman rho -1.000 < 0.9; the top block differs: layer1 certified, "
            "layer0 attacked)" in md) == (not agree)
    assert ("The two rankings agree" in md) == agree
    assert "certified vs attacked ranking: Spearman rho" in text and ("DISAGREE" in text) == (not agree)
    assert (out / PLOTS["sensitivity"]).read_bytes().startswith(PNG_MAGIC)


def test_report_without_attack_says_so(capsys, tmp_path, llama_hf_dir):
    path = llama_hf_dir[0]
    vj = tmp_path / "verify.json"
    vj.write_text(json.dumps(synthetic_verify(path, "llama", "decoder", [3.0, 30.0])))
    out = tmp_path / "rep"
    run_cli(capsys, "analyze", str(path), "--from-json", str(vj), "--out", str(out), "--quiet")
    md = (out / "report.md").read_text()
    assert "The verify report has no attack" in md and "attacked sensitivity |" not in md
