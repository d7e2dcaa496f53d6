"""``gamma compare`` with ``--arithmetic`` and ``--layernorm-variance`` (as ``gamma verify``):
the difference network's bounds hold for what each option says, are sound under samples + PGD
(float64 and float32 difference networks), order as the options' guarantees do, and the option
is checked once, shown in the report and its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from gamma import cli
from gamma import compare as C
from gamma.errors import GammaError
from gamma.verify import load

from test_compare import check_sound

EPS = 1e-4


@pytest.fixture(scope="module")
def whisper_pair(whisper_hf_dir, whisper_ct2_f16_dir):
    return load(whisper_hf_dir[0]), load(whisper_ct2_f16_dir[0])


def test_each_mode_is_sound_and_the_guarantees_order_the_widths(whisper_pair):
    """Whisper encoder, safetensors against its CTranslate2 fp16 export: the certified difference in
    each mode contains samples + PGD of the float64 and float32 difference networks; real arithmetic
    is the narrowest, the default float32 mode the widest, --layernorm-variance formula in between."""
    ref, tgt = whisper_pair
    widths = {}
    for arith, lnv in (("float32", "any"), ("float32", "formula"), ("float32-probabilistic", "formula"),
                       ("real", "any")):
        res = C.compare(ref, tgt, EPS, 1.0, arithmetic=arith, layernorm_variance=lnv, seq_len=2, samples=64,
                        attack_steps=5, restarts=1)
        r = res.report
        assert r["arithmetic"] == arith and r["layernorm_variance"] == lnv
        assert r["empirical_max"] <= r["certified_max"]
        widths[(arith, lnv)] = r["certified_width"]
        gr, gt = ref.graph("encoder", 2), tgt.graph("encoder", 2)
        x = ref.input_point("encoder", seq_len=2).x
        b = C.bound_difference(C.difference_graph(gr, gt), gr, gt, x, EPS, "crown", naive=False, arithmetic=arith,
                               layernorm_variance=lnv)
        assert float((b.upper - b.lower).max()) == pytest.approx(r["certified_width"], rel=1e-9)
        bad, _ = check_sound(gr, gt, x, EPS, b.lower, b.upper, n=100)
        assert bad == 0
    assert widths[("real", "any")] < widths[("float32", "formula")] < widths[("float32", "any")]
    assert widths[("float32-probabilistic", "formula")] < widths[("float32", "formula")]


def test_bad_values_one_message(whisper_pair):
    ref, _ = whisper_pair
    with pytest.raises(GammaError) as e:
        C.compare(ref, ref, EPS, 1.0, arithmetic="float16")
    assert str(e.value) == "unknown --arithmetic 'float16' (choose from float32, float32-probabilistic, real)"
    with pytest.raises(GammaError) as e:
        C.compare(ref, ref, EPS, 1.0, layernorm_variance="welford")
    assert str(e.value) == "unknown --layernorm-variance 'welford' (choose from any, formula, two-pass)"


def test_cli_json_and_text_say_what_the_bounds_hold_for(capsys, whisper_hf_dir, whisper_ct2_f16_dir):
    args = ["compare", whisper_hf_dir[0], whisper_ct2_f16_dir[0], "--epsilon", "1e-4", "--tolerance", "1",
            "--seq-len", "2", "--samples", "16", "--attack-steps", "2", "--quiet",
            "--arithmetic", "float32-probabilistic", "--layernorm-variance", "formula"]
    assert cli.main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["arithmetic"] == "float32-probabilistic" and d["layernorm_variance"] == "formula"
    assert cli.main(args) == 0
    run = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
    assert run.endswith(", arithmetic float32-probabilistic, layernorm variance formula")
    assert cli.main(args[:-4] + ["--layernorm-variance", "welford"]) == 2
    assert "invalid choice: 'welford'" in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(d["certified_max"]))
