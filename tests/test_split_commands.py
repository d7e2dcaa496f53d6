"""``--norm-splits`` in ``gamma compare`` and in regression suites: the difference network's bounds
with the split are narrower and sound under samples + PGD (float64 and float32 difference networks),
the option is checked once (one line, exit 2), shown in the run line and the JSON, and a suite case
with it runs, records it in its question (config) and is judged against baselines of the same setting."""

from __future__ import annotations

import json
import math

import pytest

from gamma import cli
from gamma import compare as C
from gamma import regress as R
from gamma.bounds import Tunings, compute_bounds
from gamma.errors import GammaError
from gamma.verify import load

from test_compare import _graphs, check_sound, lms, models  # noqa: F401 (fixtures)

EPS = 2e-2      # wide enough that the tiny Whisper's MLP norms' scales move over the box


@pytest.fixture(scope="module")
def whisper_pair(whisper_hf_dir, whisper_ct2_f16_dir):
    return load(whisper_hf_dir[0]), load(whisper_ct2_f16_dir[0])


def test_compare_narrower_and_sound(whisper_pair):
    """Whisper encoder, safetensors against its CTranslate2 fp16 export, 3 pieces: the certified
    difference is narrower than without the split, equals bound_difference's with the same tunings,
    and contains samples + PGD of the float64 and float32 difference networks."""
    ref, tgt = whisper_pair
    kw = dict(seq_len=2, samples=64, attack_steps=5, restarts=1)
    off = C.compare(ref, tgt, EPS, 1.0, **kw).report
    on = C.compare(ref, tgt, EPS, 1.0, norm_splits=3, **kw).report
    assert off["norm_splits"] == 1 and on["norm_splits"] == 3
    assert on["certified_width"] < 0.99 * off["certified_width"]
    assert on["empirical_max"] <= on["certified_max"]
    gr, gt = ref.graph("encoder", 2), tgt.graph("encoder", 2)
    x = ref.input_point("encoder", seq_len=2).x
    b = C.bound_difference(C.difference_graph(gr, gt), gr, gt, x, EPS, "crown", naive=False,
                           tunings=Tunings(norm_splits=3))
    assert float((b.upper - b.lower).max()) == pytest.approx(on["certified_width"], rel=1e-9)
    bad, _ = check_sound(gr, gt, x, EPS, b.lower, b.upper, n=100)
    assert bad == 0


@pytest.mark.parametrize("case", [("llama_hf", "llama_perturbed"), ("qwen3_F32", "qwen3_Q8_0")])
def test_merged_difference_network_sound(lms, models, case):
    """A Llama whose second layer is perturbed (its first layer merged with the reference's: the
    shared norm's pieces feed both models' nodes) and a Qwen3 against its Q8_0 export, 3 pieces:
    transformers' float32 difference and the float64 / float32 difference networks stay inside under
    samples + PGD, and no output is wider than without the split (beyond CROWN's 1e-3)."""
    ref, tgt = models[case[0]], models[case[1]]
    gr, gt, x = _graphs(ref, tgt)
    dg = C.difference_graph(gr, gt)
    stats = compute_bounds(dg.graph, x, 1e-3, "crown", tunings=Tunings(norm_splits=3)).stats
    # llama: the shared layer-0 MLP norm, each model's layer-1 MLP norm, the reference's final norm (whose
    # row-local set holds the difference); qwen3: the shared layer-0 attention norm (q and k feed Qwen3's
    # q / k norms), each model's other three, the reference's final norm
    assert stats["split_norms"] == (4 if case[1] == "llama_perturbed" else 8)
    on = C.bound_difference(dg, gr, gt, x, 1e-3, "crown", naive=False, tunings=Tunings(norm_splits=3))
    off = C.bound_difference(dg, gr, gt, x, 1e-3, "crown", naive=False)
    assert bool(((on.upper - on.lower) <= (off.upper - off.lower) * (1 + 1e-3) + 1e-12).all())
    bad, _ = check_sound(gr, gt, x, 1e-3, on.lower, on.upper, (lms[case[0]][1], lms[case[1]][1]))
    assert bad == 0


def test_compare_bad_values_one_message(whisper_pair):
    ref, _ = whisper_pair
    with pytest.raises(GammaError) as e:
        C.compare(ref, ref, EPS, 1.0, norm_splits=0)
    assert str(e.value) == "--norm-splits must be an integer from 1 to 64, got 0"
    with pytest.raises(GammaError) as e:
        C.compare(ref, ref, EPS, 1.0, "ibp", norm_splits=2)
    assert str(e.value) == "--norm-splits needs --method crown or alpha with --intermediate crown"


def test_compare_cli(capsys, whisper_hf_dir, whisper_ct2_f16_dir):
    args = ["compare", whisper_hf_dir[0], whisper_ct2_f16_dir[0], "--epsilon", "1e-3", "--tolerance", "1",
            "--seq-len", "2", "--samples", "16", "--attack-steps", "2", "--quiet", "--norm-splits", "2"]
    assert cli.main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["norm_splits"] == 2 and math.isfinite(d["certified_max"])
    assert cli.main(args) == 0
    run = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
    assert run.endswith(", norm splits 2")
    assert cli.main(args[:-1] + ["65"]) == 2
    assert capsys.readouterr().err == "gamma: error: --norm-splits must be an integer from 1 to 64, got 65\n"


# ------------------------------------------------------------------ regression suites
def _suite(tmp_path, extra: str, method: str = "crown") -> list:
    p = tmp_path / "s.toml"
    p.write_text(f'[[case]]\nname="a"\nmodel="fixture:tiny-qwen3"\nmethod="{method}"\nepsilon=1e-3\n'
                 f'mode="full"\n{extra}\n')
    return R.load_suite(str(p))


def test_suite_case_takes_the_option(tmp_path):
    """norm_splits is part of the question asked where it is not 1 (older records: 1)."""
    (case,) = _suite(tmp_path, "norm_splits=4")
    assert case.norm_splits == 4 and case.config()["norm_splits"] == 4
    (plain,) = _suite(tmp_path, "norm_splits=1")
    assert plain.norm_splits == 1 and "norm_splits" not in plain.config()


@pytest.mark.parametrize("extra, method, message", [
    ("norm_splits=0", "crown", "'norm_splits' must be an integer from 1 to 64, got 0"),
    ('norm_splits="3"', "crown", "'norm_splits' must be an integer from 1 to 64, got '3'"),
    ("norm_splits=2.5", "crown", "'norm_splits' must be an integer from 1 to 64, got 2.5"),
    ("norm_splits=2", "ibp", "'norm_splits' > 1 needs method crown or alpha with intermediate crown"),
    ('norm_splits=2\nintermediate="cut"', "crown",
     "'norm_splits' > 1 needs method crown or alpha with intermediate crown"),
])
def test_suite_errors_name_the_case(tmp_path, extra, method, message):
    with pytest.raises(GammaError) as e:
        _suite(tmp_path, extra, method)
    assert str(e.value).endswith(f"s.toml: case 'a': {message}")


def test_suite_case_runs_narrower_and_sound(tmp_path):
    """The tiny Qwen3 fixture block by block, eps 0.01: the case with 3 pieces records a narrower
    max width than the same case without, zero violations in both, and a baseline of the other
    setting is CHANGED, not compared."""
    models = R.Models(str(tmp_path / "cache"))
    recs = {}
    for k in (1, 3):
        case = R.Case(name="a", model="fixture:tiny-qwen3", method="crown", epsilon=1e-2, mode="block_wise",
                      track=("max_sensitivity", "ratio", "seconds"), samples=40, attack_steps=4, norm_splits=k)
        rec = R.run_case(case, models)
        assert "error" not in rec, rec.get("error")
        assert rec["soundness"]["violations"] == 0
        recs[k] = (case, rec)
    (c1, r1), (c3, r3) = recs[1], recs[3]
    assert r3["config"]["norm_splits"] == 3 and "norm_splits" not in r1["config"]
    assert r3["figures"]["max_width"] < 0.99 * r1["figures"]["max_width"]
    rows = R.compare([c3], {"a": r3}, {"a": r1})
    assert rows[-1]["status"] == "CHANGED" and rows[-1]["note"].endswith("norm_splits"), rows
    assert {r["status"] for r in R.compare([c3], {"a": r3}, {"a": r3})} == {"OK"}
