"""gamma regress: suites, the JSON Lines history, baseline comparison, soundness on the fly, report.

The end-to-end tests run real verifications of the seeded tiny Qwen3 fixture
(``fixture:tiny-qwen3``, built once per session) with a small soundness
budget, and inject the faults the suite exists to catch: a loosened
relaxation (an IBP rule widened), a tightened one (a baseline 10x looser),
and unsound bounds (shrunk after the fact).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess

import pytest

from gamma import regress as R
from gamma.regress import measure
from gamma.bounds import ibp, interval
from gamma.commands.regress import add_parser, write_report
from gamma.errors import GammaError

pytest.importorskip("transformers")

SUITE = """
[[case]]
name = "tq-ibp-blocks"
model = "fixture:tiny-qwen3"
method = "ibp"
epsilon = 1e-3
mode = "block-wise"
seq_len = 2
samples = 40
attack_steps = 3
min_seconds = 30           # timing noise on a loaded machine must not decide these tests
track = ["max_sensitivity", "median_sensitivity", "seconds"]
"""


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="gamma")
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(list(argv))
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(suite path, cache folder): the fixture model is built once for the module."""
    d = tmp_path_factory.mktemp("regress")
    suite = d / "suite.toml"
    suite.write_text(SUITE)
    cache = str(d / "cache")
    R.build_fixture("tiny-qwen3", cache)
    return str(suite), cache


def _record(case: str, **figs) -> dict:
    cfg = {k: None for k in R.CONFIG_KEYS}
    return {"case": case, "config": cfg, "model_id": {"path": "m"}, "date": "2026-01-01T00:00:00+00:00",
            "figures": figs, "nonfinite": [], "soundness": {"violations": 0, "points": 10},
            "memory_method": "vmhwm", "track": list(figs)}


def _case(**kw) -> R.Case:
    return R.Case(name=kw.pop("name", "c"), model="m", method="ibp", epsilon=1e-3, mode="full",
                  track=kw.pop("track", ("max_width", "seconds")), **kw)


# ------------------------------------------------------------------ suite files
def test_shipped_suites_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    quick = R.load_suite(os.path.join(root, "suites", "quick.toml"))
    default = R.load_suite(os.path.join(root, "suites", "default.toml"))
    assert {c.model for c in quick} == {"fixture:tiny-qwen3", "zoo:whisper_tiny_en", "zoo:smollm2_135m"}
    assert {(c.method, c.mode) for c in default} == {(m, d) for m in ("ibp", "crown")
                                                     for d in ("full", "block_wise")}
    with open(os.path.join(root, "suites", "baseline.json")) as f:
        base = json.load(f)
    assert {c.name for c in quick} <= set(base)
    for c in quick:
        assert base[c.name]["config"] == c.config() and base[c.name]["soundness"]["violations"] == 0
    prob = next(c for c in quick if c.arithmetic == "float32-probabilistic")
    assert prob.config()["arithmetic"] == "float32-probabilistic"
    assert "arithmetic" not in next(c for c in quick if c.name == "tiny-qwen3-crown-full").config()
    lv = {c.name: c.config().get("layernorm_variance") for c in quick}         # the default: not in the key
    assert lv.pop("whisper-tiny-en-crown-block0-two-pass") == "two-pass" and set(lv.values()) == {None}
    eng = {c.name: c.config().get("engine") for c in quick}
    assert eng.pop("smollm2-135m-crown-block15-llamacpp") == "llama.cpp" and set(eng.values()) == {None}


def test_suite_case_with_the_layernorm_variance_option(tmp_path):
    """A case may pin --layernorm-variance formula: it is part of the question asked (the config)."""
    p = tmp_path / "s.toml"
    p.write_text('[[case]]\nname="a"\nmodel="m"\nmethod="crown"\nepsilon=1e-3\nmode="full"\n'
                 'layernorm_variance="formula"\n')
    (case,) = R.load_suite(str(p))
    assert case.layernorm_variance == "formula" and case.config()["layernorm_variance"] == "formula"


@pytest.mark.parametrize("body, message", [
    ('name="a"\nmodel="m"\nmethod="ibp"\nepsilon=1e-3\nmode="full"\nspeed=1', "unknown key(s) speed"),
    ('name="a"\nmodel="m"\nmethod="magic"\nepsilon=1e-3\nmode="full"', "unknown method 'magic'"),
    ('name="a"\nmodel="m"\nmethod="ibp"\nepsilon=0\nmode="full"', "must be a finite number > 0"),
    ('name="a"\nmodel="m"\nmethod="ibp"\nepsilon=1e-3\nmode="full"\ntrack=["median_sensitivity"]',
     "median_sensitivity is a block-wise figure"),
    ('name="a"\nmodel="m"\nmethod="ibp"\nepsilon=1e-3\nmode="sideways"', "mode must be 'full' or 'block-wise'"),
    ('name="a"\nmodel="m"\nmethod="ibp"\nepsilon=1e-3\nmode="full"\ntolerance=-1', "'tolerance' must be"),
    ('name="a"\nmethod="ibp"\nepsilon=1e-3\nmode="full"', "'model' is required"),
    ('name="a"\nmodel="m"\nmethod="crown"\nepsilon=1e-3\nmode="full"\nintermediate="half"',
     "unknown intermediate 'half' (choose from crown, cut, ibp)"),
    ('name="a"\nmodel="m"\nmethod="crown"\nepsilon=1e-3\nmode="full"\narithmetic="float16"',
     "unknown arithmetic 'float16' (choose from float32, float32-probabilistic, real)"),
    ('name="a"\nmodel="m"\nmethod="crown"\nepsilon=1e-3\nmode="full"\nlayernorm_variance="welford"',
     "unknown layernorm_variance 'welford' (choose from any, formula, two-pass)"),
    ('name="a"\nmodel="m"\nmethod="crown"\nepsilon=1e-3\nmode="full"\nengine="ggml"',
     "unknown engine 'ggml' (choose from float32, llama.cpp)"),
])
def test_suite_errors_name_the_case_and_key(tmp_path, body, message):
    p = tmp_path / "s.toml"
    p.write_text("[[case]]\n" + body + "\n")
    with pytest.raises(GammaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        R.load_suite(str(p))


def test_options_are_part_of_the_question():
    """engine, arithmetic and layernorm_variance: in a case's config where not the default, and a
    baseline under another setting (or from before the key, read as its default) is CHANGED."""
    assert "engine" not in _case().config() and _case(engine="llama.cpp").config()["engine"] == "llama.cpp"
    base = {"c": _record("c", max_width=1.0, seconds=2.0)}           # an old record: no option keys
    for opt in ({"engine": "llama.cpp"}, {"arithmetic": "real"}, {"layernorm_variance": "two-pass"}):
        rec = _record("c", max_width=1.0, seconds=2.0)
        rec["config"].update(opt)
        rows = R.compare([_case(**opt)], {"c": rec}, base)
        assert rows[-1]["status"] == "CHANGED" and rows[-1]["note"].endswith(next(iter(opt))), opt
        same = R.compare([_case(**opt)], {"c": rec}, {"c": rec})
        assert [r["status"] for r in same] == ["OK", "OK", "OK"], opt


def test_engine_case_is_measured_but_not_judged_by_the_float64_attack(llama_gguf_q4_1, tmp_path):
    """A llama.cpp-engine case (a GGUF file) runs end to end: its bounds are recorded, the float64
    attack's points outside them are ``float64_outside`` (not violations), the soundness row says
    the check was not made, and an attacked width above the certified one is no UNSOUND verdict."""
    case = R.Case(name="e", model=llama_gguf_q4_1[0], method="crown", epsilon=1e-4, mode="full",
                  track=("max_width", "ratio", "seconds"), seq_len=2, samples=20, attack_steps=2, engine="llama.cpp")
    rec = R.run_case(case, R.Models(str(tmp_path / "cache")))
    assert "error" not in rec, rec.get("error")
    assert rec["config"]["engine"] == "llama.cpp" and math.isfinite(rec["figures"]["max_width"])
    snd = rec["soundness"]
    assert snd["checked"] is False and snd["violations"] == 0 and snd["float64_outside"] >= 0
    rec["figures"]["attacked_max_width"] = 2 * rec["figures"]["max_width"]
    assert R.unsound(rec) is None
    row = R.compare([case], {"e": rec}, {"e": rec})[0]
    assert row["status"] == "OK" and row["note"].startswith("not checked: bounds for llama.cpp, the attack runs float64")
    from gamma.commands.regress import _summary
    assert "soundness not checked (float64 attack; " in _summary(rec)


# ------------------------------------------------------------------ history store
def test_truncated_last_line_is_skipped_and_reported(tmp_path):
    h = str(tmp_path / "h.jsonl")
    R.append_record(h, _record("a", max_width=1.0))
    R.append_record(h, _record("b", max_width=2.0))
    with open(h, "ab") as f:                       # an interrupted write: half a record, no newline
        f.write(json.dumps(_record("c", max_width=3.0)).encode()[:40])
    hist = R.read_history(h)
    assert [r["case"] for r in hist.records] == ["a", "b"]
    assert len(hist.warnings) == 1 and "h.jsonl:3: truncated last line skipped" in hist.warnings[0]
    R.append_record(h, _record("c", max_width=3.0))   # the next append starts on a fresh line
    hist = R.read_history(h)
    assert [r["case"] for r in hist.records] == ["a", "b", "c"]
    assert "h.jsonl:3: not a history record, skipped" in hist.warnings[0]
    assert hist.newest()["c"]["figures"]["max_width"] == 3.0


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        R.append_record(path, {**_record(f"w{worker}"), "i": i, "pad": str(worker) * 200_000})


def test_concurrent_appends_do_not_interleave(tmp_path):
    h = str(tmp_path / "h.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(h, w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    hist = R.read_history(h)
    assert not hist.warnings and len(hist.records) == 40
    for r in hist.records:                          # each record whole: its padding is one worker's digit
        assert r["pad"] == r["case"][1] * 200_000
    for w in range(4):
        assert [r["i"] for r in hist.records if r["case"] == f"w{w}"] == list(range(10))


# ------------------------------------------------------------------ comparison rules
def test_compare_rules():
    base = {"c": _record("c", max_width=1.0, seconds=2.0)}
    case = _case()

    def status(**figs):
        rows = R.compare([case], {"c": _record("c", **figs)}, base)
        return {r["figure"]: r["status"] for r in rows}

    assert status(max_width=1.005, seconds=5.9) == {"soundness": "OK", "max_width": "OK", "seconds": "OK"}
    assert status(max_width=1.02, seconds=2.0)["max_width"] == "REGRESSION"
    assert status(max_width=0.5, seconds=2.0)["max_width"] == "IMPROVED"
    assert status(max_width=1.0, seconds=6.1)["seconds"] == "REGRESSION"
    inf = _record("c", max_width=None, seconds=2.0)
    inf["nonfinite"] = ["max_width"]
    rows = R.compare([case], {"c": inf}, base)
    assert [r["note"] for r in rows if r["figure"] == "max_width"] == ["finite bound became infinite"]
    assert R.failed(rows) == ["c"]
    # a baseline under a different question is not compared
    other = _record("c", max_width=1.0, seconds=2.0)
    other["config"]["epsilon"] = 0.01
    assert [r["status"] for r in R.compare([case], {"c": other}, base)][-1] == "CHANGED"
    assert R.compare([case], {}, base)[0]["status"] == "MISSING"
    assert R.compare([case], {"c": _record("c", max_width=1.0)}, {})[-1]["status"] == "NEW"
    # sub-second timings never regress
    fast = {"c": _record("c", max_width=1.0, seconds=0.1)}
    assert R.failed(R.compare([case], {"c": _record("c", max_width=1.0, seconds=0.9)}, fast)) == []


# ------------------------------------------------------------------ end to end, with injected faults
def _widened(rule, factor):
    def wide(node, *xs):
        out = rule(node, *xs)
        r = out.radius * factor
        return interval.Interval(out.lower - r, out.upper + r)
    return wide


def test_loosened_relaxation_is_a_regression(env, tmp_path, capsys, monkeypatch):
    suite, cache = env
    h = str(tmp_path / "h.jsonl")
    rc, _, err = cli(capsys, "regress", "run", suite, "--history", h, "--cache", cache)
    assert rc == 0, err
    assert "tq-ibp-blocks: max_sensitivity" in err and "sound (" in err
    rec = R.read_history(h).records[0]
    assert rec["soundness"]["violations"] == 0 and rec["soundness"]["points"] > 40
    f, att = rec["figures"], rec["soundness"]["attacked_blocks"]
    assert set(att) == set(rec["blocks"]) and all(0 < att[b] <= rec["blocks"][b] for b in att)
    assert f["attacked_max_width"] == max(att.values()) <= f["max_width"]
    assert f["attacked_max_sensitivity"] == pytest.approx(f["attacked_max_width"] / 2e-3)
    assert f["ratio"] == pytest.approx(f["max_width"] / f["attacked_max_width"]) and f["ratio"] >= 1
    assert "certified / attacked x" in err and R.unsound(rec) is None
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(R.__file__), capture_output=True,
                          text=True)
    if head.returncode == 0:                       # (HEAD may move while the test runs: check the form)
        assert len(rec["git_commit"]) == 40 and isinstance(rec["git_dirty"], bool)
    else:
        assert "git_commit" not in rec
    assert {"platform", "cpu_count"} <= set(rec["machine"]) and rec["date"].endswith("+00:00")
    base = str(tmp_path / "base.json")
    rc, out, _ = cli(capsys, "regress", "baseline", suite, "--history", h, "--out", base)
    assert rc == 0 and "1 cases" in out

    # the same code again: no regression
    rc, out, _ = cli(capsys, "regress", "check", suite, "--baseline", base, "--cache", cache, "--quiet")
    assert rc == 0 and "no regression" in out

    # every linear layer's IBP interval 10% wider: sound, but looser
    monkeypatch.setitem(ibp.IBP, "linear", _widened(ibp.IBP["linear"], 0.1))
    rc, out, _ = cli(capsys, "regress", "check", suite, "--baseline", base, "--cache", cache, "--quiet")
    assert rc == 1
    assert "REGRESSION in 1 case(s): tq-ibp-blocks" in out
    row = [line for line in out.splitlines() if "max_sensitivity" in line][0]
    assert "REGRESSION" in row and "looser by more than 0.01" in row


def test_tightened_relaxation_is_improved(env, tmp_path, capsys):
    suite, cache = env
    h = str(tmp_path / "h.jsonl")
    rc, _, _ = cli(capsys, "regress", "run", suite, "--history", h, "--cache", cache, "--quiet")
    assert rc == 0
    rec = R.read_history(h).records[0]
    for k in ("max_sensitivity", "median_sensitivity"):     # a baseline 10x looser than today's bounds
        rec["figures"][k] *= 10
    base = str(tmp_path / "base.json")
    R.write_baseline(base, {rec["case"]: rec})
    rc, out, _ = cli(capsys, "regress", "check", suite, "--baseline", base, "--history", h)
    assert rc == 0
    assert "IMPROVED: tq-ibp-blocks: update the baseline" in out
    assert [line for line in out.splitlines() if "median_sensitivity" in line][0].count("IMPROVED") == 1
    rc, out, _ = cli(capsys, "regress", "check", suite, "--baseline", base, "--history", h, "--json")
    data = json.loads(out)
    assert rc == 0 and data["ok"] and data["improved"] == ["tq-ibp-blocks"]
    assert {r["status"] for r in data["rows"] if r["figure"].endswith("sensitivity")} == {"IMPROVED"}
    # and the other way round: today's figures against a baseline 10x tighter
    for k in ("max_sensitivity", "median_sensitivity"):
        rec["figures"][k] /= 100
    R.write_baseline(base, {rec["case"]: rec})
    rc, out, _ = cli(capsys, "regress", "check", suite, "--baseline", base, "--history", h, "--json")
    data = json.loads(out)
    assert rc == 1 and data["failed"] == ["tq-ibp-blocks"] and not data["ok"]


def test_unsound_bounds_are_caught(env, tmp_path, capsys, monkeypatch):
    suite, cache = env
    real_verify = measure.verify

    def shrunk(*a, **kw):                   # bounds shrunk to 1% of their width around the midpoint
        res = real_verify(*a, **kw)
        for k in [k for k in res.arrays if k.endswith("lower")]:
            lo, hi = res.arrays[k], res.arrays[k[:-5] + "upper"]
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            res.arrays[k], res.arrays[k[:-5] + "upper"] = mid - 0.01 * rad, mid + 0.01 * rad
        return res

    monkeypatch.setattr(measure, "verify", shrunk)
    h = str(tmp_path / "h.jsonl")
    rc, _, err = cli(capsys, "regress", "run", suite, "--history", h, "--cache", cache)
    assert rc == 1 and "UNSOUND" in err and "FAILED: tq-ibp-blocks" in err
    rec = R.read_history(h).records[0]
    assert rec["soundness"]["violations"] > 0
    rows = R.compare(R.load_suite(suite), {rec["case"]: rec}, {rec["case"]: rec})
    assert [r["status"] for r in rows if r["figure"] == "soundness"] == ["REGRESSION"]


def test_failing_case_is_recorded_not_fatal(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('[[case]]\nname="gone"\nmodel="nowhere.gguf"\nmethod="ibp"\nepsilon=1e-3\nmode="full"\n')
    h = str(tmp_path / "h.jsonl")
    rc, _, err = cli(capsys, "regress", "run", str(suite), "--history", h)
    assert rc == 1 and "no such file" in err
    rec = R.read_history(h).records[0]
    assert "no such file" in rec["error"]
    with pytest.raises(GammaError, match="the newest record of gone is an error"):
        cli(capsys, "regress", "baseline", str(suite), "--history", h, "--out", str(tmp_path / "b.json"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(GammaError, match="no record of gone"):
        cli(capsys, "regress", "baseline", str(suite), "--history", str(tmp_path / "empty.jsonl"),
            "--out", str(tmp_path / "b.json"))


# ------------------------------------------------------------------ report
def test_report_writes_markdown_and_pngs(tmp_path):
    recs = []
    for i, w in enumerate([1.0, 0.9, math.inf]):
        r = _record("case/one", max_width=None if math.isinf(w) else w, seconds=1.0 + i)
        r["nonfinite"] = ["max_width"] if math.isinf(w) else []
        r["date"] = f"2026-01-0{i + 1}T00:00:00+00:00"
        r["config"].update(method="ibp", mode="full", epsilon=1e-3)
        recs.append(r)
    files = write_report(recs, str(tmp_path / "rep"))
    assert [os.path.basename(f) for f in files] == ["report.md", "case_one.png"]
    with open(files[1], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(files[0]).read()
    assert "## case/one" in md and "![case/one](case_one.png)" in md and "| inf |" in md


# ------------------------------------------------------------------ attacked above certified
def test_attacked_width_above_certified_fails_the_check(tmp_path, capsys):
    """An attacked width above the certified one cannot happen with sound bounds: UNSOUND, exit 1."""
    case = _case(track=("max_width", "ratio", "seconds"))
    good = _record("c", max_width=1.0, attacked_max_width=0.4, ratio=2.5, seconds=1.0)
    assert R.compare([case], {"c": good}, {"c": good})[-1]["status"] == "OK"
    bad = _record("c", max_width=1.0, attacked_max_width=1.2, ratio=1 / 1.2, seconds=1.0)
    rows = R.compare([case], {"c": bad}, {"c": good})
    row = [r for r in rows if r["figure"] == "attacked<=certified"][0]
    assert row["status"] == "UNSOUND" and row["note"] == "attacked max width 1.2 > certified 1"
    assert R.failed(rows) == ["c"]
    ratio = [r for r in rows if r["figure"] == "ratio"][0]
    assert ratio["status"] == "OK" and ratio["note"] == "tracked"         # the ratio alone never fails
    blocks = _record("c", max_width=1.0, attacked_max_width=0.5, seconds=1.0)       # per block, too
    blocks["blocks"] = {"layer0": 1.0, "layer1": 0.3}
    blocks["soundness"]["attacked_blocks"] = {"layer0": 0.5, "layer1": 0.31}
    assert R.unsound(blocks) == "layer1: attacked 0.31 > certified 0.3"
    suite = tmp_path / "s.toml"
    suite.write_text('[[case]]\nname="c"\nmodel="m"\nmethod="ibp"\nepsilon=1e-3\nmode="full"\n'
                     'track=["max_width", "ratio", "seconds"]\n')
    h, base = str(tmp_path / "h.jsonl"), str(tmp_path / "b.json")
    bad["config"] = good["config"] = R.load_suite(str(suite))[0].config()
    R.append_record(h, bad)
    R.write_baseline(base, {"c": good})
    rc, out, _ = cli(capsys, "regress", "check", str(suite), "--baseline", base, "--history", h)
    assert rc == 1 and "UNSOUND" in out and "REGRESSION in 1 case(s): c" in out
    files = write_report([good, bad], str(tmp_path / "rep"))
    md = open(files[0]).read()
    assert "attacked_max_width | attacked_max_sensitivity | ratio |" in md
    assert "0 / 10 UNSOUND (attacked max width 1.2 > certified 1)" in md
