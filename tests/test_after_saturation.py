"""``after_saturation="ibp"`` (``--after-saturation ibp``): from the first node whose bound is
wider than SATURATION_WIDTH or unbounded, the engine stops its CROWN passes and bounds the rest
by interval rules, float32 margins and caps.

What must hold: the nodes up to the switch are bit-identical to the default run's; the switch
is at the first saturated node; every bound stays sound (samples and PGD, zero violations, in
each arithmetic mode); without saturation nothing changes; the option is checked once and shown
in the report and its JSON."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

import gamma
from gamma import cli
from gamma.bounds import compute_bounds
from gamma.bounds import engine
from gamma.bounds.engine import saturated
from gamma.errors import GammaError
from gamma.ops import evaluate
from gamma.options import SATURATION_WIDTH, BoundOptions
from gamma.verify import schema

from soundness import as_dtype, violations

EPS_SATURATING = 30.0       # the tiny Llama's nodes stay below 1e6 (its norms cap them) ...
LOW_THRESHOLD = 5e3          # ... so the tests lower the threshold: its scores q k^T are 1.9e4 wide here


@pytest.fixture(autouse=True)
def low_threshold(monkeypatch):
    monkeypatch.setattr(engine, "SATURATION_WIDTH", LOW_THRESHOLD)


@pytest.fixture(scope="module")
def llama(llama_hf_dir):
    m = gamma.load(llama_hf_dir[0])
    return m.graph(seq_len=2), m.input_point(seq_len=2).x


def _run(graph, x, eps, after, arithmetic="float32"):
    return compute_bounds(graph, x, options=BoundOptions(eps, "crown", arithmetic=arithmetic,
                                                         after_saturation=after))


@pytest.mark.parametrize("arithmetic", ["float32", "float32-probabilistic", "real"])
def test_switch_at_the_first_saturated_node_same_bounds_before_it_sound_after(llama, arithmetic):
    graph, x = llama
    full = _run(graph, x, EPS_SATURATING, "crown", arithmetic)
    fast = _run(graph, x, EPS_SATURATING, "ibp", arithmetic)
    names = [n.name for n in graph if n.op != "input"]
    first = next(n for n in names if saturated(full.nodes[n]))
    assert fast.stats["ibp_from"]["node"] == first
    w = full.nodes[first].upper - full.nodes[first].lower
    assert fast.stats["ibp_from"]["width"] == (float(w.max()) if bool(torch.isfinite(w).all()) else math.inf)
    assert fast.stats["ibp_from"]["width"] > LOW_THRESHOLD
    assert 0 < names.index(first) < len(names) - 1 and 0 < fast.stats["crown_nodes"]   # passes before it, IBP after
    for n in names[:names.index(first) + 1]:           # up to the switch: the same computation
        assert torch.equal(fast.nodes[n].lower, full.nodes[n].lower), n
        assert torch.equal(fast.nodes[n].upper, full.nodes[n].upper), n
    assert fast.stats["crown_nodes"] < full.stats["crown_nodes"]
    # after it: sound by samples and PGD, on the output and on every later node, against the float64
    # forward and (float32 modes) a float32 engine's
    engines = [graph] + ([as_dtype(graph, torch.float32)] if arithmetic != "real" else [])
    for g in engines:
        for n in names[names.index(first):]:
            fn = lambda xx, n=n, g=g: evaluate(g, xx.to(torch.float32 if g is not graph else torch.float64),
                                               upto=n).double()
            iv = fast.nodes[n] if n != graph.output else type(fast.nodes[n])(fast.lower, fast.upper)
            bad = violations(fn, x, EPS_SATURATING, iv.lower, iv.upper, n_samples=64, steps=5, restarts=1)
            assert bad == 0, (n, bad)


def test_nothing_saturates_nothing_changes(llama):
    graph, x = llama
    full = _run(graph, x, 1e-3, "crown")
    fast = _run(graph, x, 1e-3, "ibp")
    assert "ibp_from" not in fast.stats and "ibp_from" not in full.stats
    assert torch.equal(fast.lower, full.lower) and torch.equal(fast.upper, full.upper)
    assert fast.stats["crown_nodes"] == full.stats["crown_nodes"]


def test_saturated_is_wider_than_the_threshold_or_unbounded(monkeypatch):
    from gamma.bounds.interval import Interval
    monkeypatch.setattr(engine, "SATURATION_WIDTH", SATURATION_WIDTH)        # the real one: 1e6
    z = torch.zeros(3, dtype=torch.float64)
    assert not saturated(Interval(z, z + SATURATION_WIDTH))
    assert saturated(Interval(z, z + torch.tensor([0.0, 2 * SATURATION_WIDTH, 0.0], dtype=torch.float64)))
    assert saturated(Interval(z, z + torch.tensor([0.0, math.inf, 0.0], dtype=torch.float64)))
    assert not saturated(Interval(z[:0], z[:0]))


def test_option_checked_once_with_one_message():
    msg = "unknown --after-saturation 'cut' (choose from crown, ibp)"
    with pytest.raises(GammaError) as options:
        BoundOptions(1e-3, after_saturation="cut")
    with pytest.raises(GammaError) as api:
        gamma.verify("/nonexistent/model.gguf", epsilon=1e-3, after_saturation="cut")   # before the model is read
    assert str(options.value) == str(api.value) == msg


def _cli(capsys, *args):
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_reports_where_the_passes_stopped(capsys, llama_hf_dir):
    args = ("verify", llama_hf_dir[0], "--full", "--method", "crown", "--seq-len", "2", "--epsilon",
            str(EPS_SATURATING), "--no-attack", "--quiet")
    rc, out, err = _cli(capsys, *args, "--after-saturation", "ibp", "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    assert d["after_saturation"] == "ibp"
    node = d["ibp_from"]["node"]
    rc, out, err = _cli(capsys, *args, "--after-saturation", "ibp")
    assert rc == 0, err
    lines = out.splitlines()
    assert ", after saturation ibp, epsilon 30, " in next(s for s in lines if s.startswith("run      "))
    line = [s for s in lines if s.startswith("ibp from ")]
    assert len(line) == 1 and line[0].startswith(f"ibp from {node} (width ")
    assert line[0].endswith(") on: --after-saturation ibp; the nodes after it are bounded by interval rules, "
                            "float32 margins and caps, with no CROWN pass")
    rc, out, err = _cli(capsys, *args, "--json")                        # the default: no switch
    d = json.loads(out)
    assert d["after_saturation"] == "crown" and "ibp_from" not in d
    rc, out, err = _cli(capsys, "verify", "--after-saturation", "cut")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "argument --after-saturation: invalid choice: 'cut'" in err


def test_block_wise_rows_name_the_switch(capsys, llama_hf_dir):
    rc, out, err = _cli(capsys, "verify", llama_hf_dir[0], "--block-wise", "--seq-len", "2", "--epsilon",
                        str(EPS_SATURATING), "--no-attack", "--quiet", "--after-saturation", "ibp", "--json")
    assert rc == 0, err
    d = json.loads(out)
    jsonschema.validate(d, schema())
    cut = [b for b in d["blocks"] if "ibp_from" in b]
    assert cut and all(b["ibp_from"]["node"].startswith(b["block_name"] + ".") for b in cut)
    rc, out, err = _cli(capsys, "verify", llama_hf_dir[0], "--block-wise", "--seq-len", "2", "--epsilon",
                        str(EPS_SATURATING), "--no-attack", "--quiet", "--after-saturation", "ibp")
    assert rc == 0, err
    assert "ibp from (--after-saturation ibp): " + ", ".join(
        f"{b['block_name']} at {b['ibp_from']['node']}" for b in cut) in out.splitlines()
