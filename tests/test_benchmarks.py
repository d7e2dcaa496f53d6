"""benchmarks/: the random Qwen3 GGUF writer and the pieces of run.py that
turn timings into tables.

The writer must produce the function a reference engine computes from the
same file (else the benchmark times some other model); the IBP timer must
leave the engine as it found it; a per-block table of a subset must label
its whole-model total as an extrapolation.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import gamma
from gamma.bounds import engine

sys.path.insert(0, os.path.dirname(__file__))
import fixtures as F  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _module(name: str):
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod              # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=128, vocab_size=50)


@pytest.fixture(scope="module")
def models():
    return _module("_models")


@pytest.fixture(scope="module")
def run():
    return _module("run")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, models):
    shape = models.Qwen3Shape(**TINY)
    path = str(tmp_path_factory.mktemp("bench") / "qwen3-q8_0.gguf")
    return models.write_qwen3_gguf(path, shape, "Q8_0"), shape


def test_writer_config_and_size(tiny_gguf, models):
    path, shape = tiny_gguf
    m = gamma.load(path)
    c = m.config
    assert m.arch == "qwen3"
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == \
        (2, 64, 4, 2, 32, 128)
    assert m.ckpt.n_params == shape.params()
    assert set(m.ckpt.dtypes.values()) == {"Q8_0", "F32"}


def test_writer_matches_transformers_on_the_same_file(tiny_gguf):
    """gamma's forward on the benchmark's GGUF == transformers' own GGUF loading."""
    path, _ = tiny_gguf
    hf = F.hf_from_gguf(path)
    m = gamma.load(path)
    tokens = [3, 17, 42, 8]
    ours = m.forward(m.embed(tokens))
    with torch.no_grad():
        ref = hf.model(torch.tensor([tokens])).last_hidden_state[0].double()
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_ibp_ratio_and_breakdown_restore_the_engine(tiny_gguf, run):
    path, _ = tiny_gguf
    m = gamma.load(path)
    graph, x = m.graph(None, 1), m.input_point(None, 1).x
    rule, margin = engine.ibp_node, engine.margin_split
    r = run.ibp_ratio(graph, x, repeats=2, budget=60.0, breakdown=True)
    assert (engine.ibp_node, engine.margin_split) == (rule, margin)
    assert r["repeats"] == 2 and r["ratio"] == pytest.approx(r["ibp_s"] / r["forward_s"])
    b = r["breakdown"]
    counted = sum(n for n, _, _ in b["ops"].values())
    assert counted == sum(1 for node in graph if node.op != "input")
    assert sum(a + c for _, a, c in b["ops"].values()) <= b["total"]


def test_subset_total_is_labelled_extrapolation(run):
    rows = [{"block": k, "seconds": 2.0, "hwm_kib": 2**20, "output_width": 1.0, "status": "OK", "load": "1"}
            for k in (0, 27)]
    base = {"killed": None, "stopped": False, "not_run": [], "error": None, "skipped": None, "load_s": 1.0}
    text = "\n".join(run.block_table("m", 28, 8, {"crown": dict(base, rows=rows)}, 600))
    assert "4 s measured over 2 of 28 blocks" in text
    assert "~56.0 s" in text and "extrapolation, not measured" in text
    full = [dict(r, block=k) for k, r in enumerate(rows * 14)]
    text = "\n".join(run.block_table("m", 28, 8, {"crown": dict(base, rows=full)}, 600))
    assert "measured (all 28 blocks)" in text and "extrapolation" not in text


def test_crown_cost_passes_and_width_shares(tiny_gguf):
    """crown_cost.py: one row per CROWN pass with its product FLOPs, the engine
    restored afterwards, and the width shares of mlp.gate adding up to its
    width (every term of the walk accounted for)."""
    cost = _module("crown_cost")
    path, shape = tiny_gguf
    m = gamma.load(path)
    g = m.graph(seq_len=4)
    sub = g.block_graph("layer1")
    x = gamma.ops.evaluate(g, m.input_point(seq_len=4).x, keep_all=True)[sub.input]
    orig = engine.node_bounds
    rows, secs = cost.passes(sub, x, "crown", count=True)
    assert engine.node_bounds is orig
    names = [r[0] for r in rows]
    assert {"layer1.attn.residual", "layer1.mlp.gate", "layer1.mlp.up", "layer1.mlp.residual"} <= set(names)
    assert names[-1] == sub.output and all(r[5] is not None and r[5] >= 0 for r in rows)
    d, f, T, q = shape.hidden_size, shape.intermediate_size, 4, shape.num_attention_heads * shape.head_dim
    gate = rows[names.index("layer1.mlp.gate")]
    assert gate[5] >= 2 * (T * f) * d * q        # at least: each spec row through o_proj's transpose
    assert secs >= sum(r[4] for r in rows)
    got, shares = cost.gate_width(sub, x, "layer1")
    assert engine.node_bounds is orig
    assert got["terms"] == pytest.approx(got["width"], rel=1e-9)
    assert sum(v for _, v in shares) == pytest.approx(1.0, rel=1e-9)
    labels = {k for k, _ in shares}
    assert "layer1.attn.o:margin" in labels and "layer0.mlp.residual:box" in labels


def test_depth_table_shows_each_mode_s_seconds_beside_the_other_revision_s():
    """benchmarks/depth.py's table: seconds per mode (float32 / real / floor) for this code
    and, with --compare-with, for the other revision; unbounded widths read inf."""
    depth = _module("depth")
    row = {"model": "M", "scope": "whole", "eps": 1e-3, "attacked": 0.5, "f32_diff": 1e-6,
           "new_f32": float("inf"), "new_real": 2.0, "new_floor": 0.01, "new_f32_s": 51.24, "new_real_s": 140.26,
           "new_floor_s": 71.9, "median_ratio": float("inf"), "worst_ratio": float("inf"),
           "new_prob": 1.0, "new_prob_floor": 0.002, "new_prob_s": 60.04, "new_prob_floor_s": 70.0,
           "median_ratio_prob": 1.5, "worst_ratio_prob": 2.25}
    alone = depth.table([row], None)
    assert alone[0].endswith("| seconds (float32 / real / floor) | certified (probabilistic) | ratio (probabilistic) "
                             "| median / worst per output (probabilistic) | rounding floor (probabilistic) "
                             "| floor (probabilistic) / diff | seconds (probabilistic / its floor) |")
    assert alone[2].split(" | ")[4:6] == ["inf", "inf"]
    assert alone[2].endswith("| 51.2 / 140.3 / 71.9 | 1 | 2 | 1.5 / 2.25 | 0.002 | 2e+03 | 60.0 / 70.0 |")
    old = dict(row, old_f32=float("inf"), old_floor=0.02, old_f32_s=276.7, old_real_s=200.66, old_floor_s=251.6)
    both = depth.table([old], "abc123")
    assert both[0].endswith("| rounding floor at abc123 | seconds at abc123 |")
    assert both[2].endswith("| 60.0 / 70.0 | 0.02 | 276.7 / 200.7 / 251.6 |")
    # --layernorm-variance formula: the default's probabilistic bounds beside, no real arithmetic there
    ln = dict(row, old_f32=float("inf"), old_floor=0.02, old_prob=1.5, old_prob_floor=0.003, old_f32_s=50.0,
              old_floor_s=70.0, old_prob_s=61.0, old_prob_floor_s=72.0)
    lines = depth.table([ln], "--layernorm-variance any")
    assert lines[0].endswith("| rounding floor at --layernorm-variance any | certified (probabilistic) at "
                             "--layernorm-variance any | rounding floor (probabilistic) at --layernorm-variance any "
                             "| seconds at --layernorm-variance any |")
    assert lines[2].endswith("| 60.0 / 70.0 | 0.02 | 1.5 | 0.003 | 50.0 / 70.0 / 61.0 / 72.0 |")
    import argparse
    args = argparse.Namespace(models="whisper", eps="1e-4", whole=True, whole_only=False, compare_with=None,
                              layernorm_variance="formula")
    title, text = depth.section_text(args, [dict(ln, targets_from="prob", violations=0)], 2.04, False)
    assert title == "15. LayerNorm's variance by a formula (--layernorm-variance formula)"
    assert text.splitlines()[2].startswith("CROWN, T=8, `python benchmarks/depth.py --models whisper --eps 1e-4 "
                                           "--whole --layernorm-variance formula` (load average 2.0 at the end).")
    assert text.splitlines()[2].endswith("the columns marked 'at --layernorm-variance any' are the same case with "
                                         "that setting, in the same run.")
    assert text.splitlines()[6] == lines[2]
    # --layernorm-variance two-pass: beside formula, its own section
    args.layernorm_variance = "two-pass"
    title, text = depth.section_text(args, [dict(ln, targets_from="prob", violations=0)], 2.04, False)
    assert title == "16. LayerNorm's variance by two passes (--layernorm-variance two-pass)"
    assert "--whole --layernorm-variance two-pass` (load" in text.splitlines()[2]
    assert text.splitlines()[2].endswith("the columns marked 'at --layernorm-variance formula' are the same case "
                                         "with that setting, in the same run.")
    assert text.splitlines()[4].endswith("| seconds at --layernorm-variance formula |")
    # --norm-splits: named in the command and the note
    args = argparse.Namespace(models="whisper", eps="1e-3", whole=False, whole_only=False, compare_with="abc123",
                              layernorm_variance="any", norm_splits=4)
    title, text = depth.section_text(args, [dict(ln, targets_from="f32", violations=0)], 2.04, True)
    assert title == "10. Bounds through depth"
    assert "--eps 1e-3 --compare-with abc123 --norm-splits 4` (load average 2.0 at the end)" in text.splitlines()[2]
    assert text.splitlines()[2].endswith("This code's bounds at eps with `--norm-splits 4` (the rounding floors "
                                         "without: at eps 0 no norm's scale moves).")


def test_depth_attack_aims_where_the_bounds_are_finite_and_checks_every_mode():
    """benchmarks/depth.py: where the default mode's bounds are unbounded (the whole Whisper
    encoder), the attack takes its widest outputs from the probabilistic mode, else from real
    arithmetic (an inf everywhere would leave the first outputs in index order as the
    "widest"); the attacked range is checked against every mode's bounds, exactly."""
    depth = _module("depth")
    fin = {"lower": [0.0, -1.0, 0.0], "upper": [1.0, 2.0, 3.0]}
    inf = {"lower": [0.0, -float("inf"), 0.0], "upper": [1.0, 2.0, 3.0]}
    assert depth.target_mode({"f32": fin, "real": fin, "prob": fin}) == "f32"
    assert depth.target_mode({"f32": inf, "real": fin, "prob": fin}) == "prob"
    assert depth.target_mode({"f32": inf, "real": fin, "prob": inf}) == "real"
    assert depth.target_mode({"f32": inf, "real": inf}) == "real"

    class Seen:                                   # an attack's elementwise range
        lower = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
        upper = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)

    tight = {"lower": [0.0, -1.0, 0.0], "upper": [1.0, 1.25, 3.0]}   # output 1 leaves it: 1.5 > 1.25
    assert depth.outside(Seen, {"f32": fin, "real": tight, "prob": fin}, skip="f32") == 1
    assert depth.outside(Seen, {"f32": fin, "real": tight, "prob": tight}, skip="f32") == 2
    assert depth.outside(Seen, {"f32": fin, "real": tight, "prob": fin}, skip="real") == 0
    rows = [{"targets_from": "f32", "scope": "layer0", "eps": 1e-3, "violations": 0},
            {"targets_from": "prob", "scope": "whole", "eps": 1e-4, "violations": 2}]
    assert depth._attack_note(rows) == (
        "The attack pushes the widest outputs of the default mode's bounds; where those are unbounded, of the "
        "probabilistic mode's (whole eps 0.0001: the probabilistic mode's). Outputs of the attack outside any "
        "mode's bounds: 2.")


def _mlp_graph(gen, product: bool = False):
    """x (3, 5) -> linear -> gelu -> linear (-> times a second linear branch)."""
    from gamma.graph import Graph
    g = Graph("mlp", "x", (3, 5))
    g.add("a", "linear", "x", weight=torch.randn(7, 5, generator=gen, dtype=torch.float64),
          bias=torch.randn(7, generator=gen, dtype=torch.float64))
    g.add("h", "gelu", "a")
    g.add("y", "linear", "h", weight=torch.randn(4, 7, generator=gen, dtype=torch.float64), bias=None)
    if product:
        g.add("z", "linear", "x", weight=torch.randn(4, 5, generator=gen, dtype=torch.float64), bias=None)
        g.add("p", "mul", "y", "z")
    return g.infer_shapes()


def _eval(g, x, name):
    from gamma.ops import evaluate
    return evaluate(g, x, keep_all=True)[name]


def test_first_order_range_is_the_jacobian_s_row_sums():
    """benchmarks/first_order.py: sum_j |dy_i/dx_j| at the point, for every node: by hand for
    the linear layer (|W| row sums, the same at every token), by autograd for the rest."""
    fo = _module("first_order")
    gen = torch.Generator().manual_seed(11)
    g = _mlp_graph(gen)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    got = fo.first_order_range(g, x, chunk=4)                 # chunks that do not divide 15
    w1 = g["a"].params["weight"]
    assert torch.allclose(got["a"], w1.abs().sum(1).expand(3, 7), rtol=0, atol=1e-14)
    for name in ("h", "y"):
        jac = torch.autograd.functional.jacobian(lambda xx: _eval(g, xx, name), x)   # (3, k, 3, 5)
        want = jac.abs().sum((-2, -1))
        assert torch.allclose(got[name], want, rtol=1e-12, atol=1e-14)


def test_first_order_ratio_is_one_on_an_affine_graph_and_the_diagnostic_restores_crown():
    """CROWN is exact on an affine graph: certified width = first-order range (ratio 1 for every
    output).  ``without_remainders`` narrows a product's bound inside the block (it is no bound:
    it drops |dx dy|) and leaves CROWN as it was afterwards, also after an exception."""
    from gamma.bounds import compute_bounds
    fo = _module("first_order")
    gen = torch.Generator().manual_seed(12)
    g = _mlp_graph(gen)
    lin = g.subgraph("x", "a")
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    eps = 0.01
    r = compute_bounds(lin, x, eps, "crown", arithmetic="real")
    first = fo.first_order_range(lin, x)["a"] * 2 * eps
    got = fo.ratios(r.upper - r.lower, first)
    assert abs(got["max"] - 1) < 1e-12 and abs(got["median"] - 1) < 1e-12 and abs(got["worst"] - 1) < 1e-12

    gp = _mlp_graph(torch.Generator().manual_seed(13), product=True)
    before = compute_bounds(gp, x, 0.3, "crown", arithmetic="real")
    with fo.without_remainders(elementwise=True):
        inside = compute_bounds(gp, x, 0.3, "crown", arithmetic="real")
    with pytest.raises(RuntimeError):
        with fo.without_remainders(elementwise=True):
            raise RuntimeError("boom")
    after = compute_bounds(gp, x, 0.3, "crown", arithmetic="real")
    assert bool(((inside.upper - inside.lower) < (before.upper - before.lower) - 1e-9).all())
    assert torch.equal(after.lower, before.lower) and torch.equal(after.upper, before.upper)


def test_first_order_table_cells():
    fo = _module("first_order")
    row = {"label": "M", "scope": "layer0", "eps": 1e-3, "first": 4.02, "certified": 30.9, "max": 7.69,
           "median": 7.45, "worst": 17.9, "node": ("layer0.attn.residual", 2.17), "seconds": 8.8,
           "jacobian_s": 4.6, "ideal": 16.1, "ideal_all": 9.59}
    lines = fo.table([row])
    assert lines[2] == ("| M | layer0 | 0.001 | 4.02 | 30.9 | **7.69** | 7.45 / 17.9 | layer0.attn.residual (2.17) "
                        "| 16.1 | 9.59 | 8.8 / 4.6 |")
    plain = {k: v for k, v in row.items() if not k.startswith("ideal")}
    assert "not a bound" not in fo.table([plain])[0]


def test_engines_table_shows_both_floors_against_the_largest_difference():
    """benchmarks/engines.py: the default and the probabilistic floor, each over the largest
    engine difference of its row; rows without a floor say so."""
    eng = _module("engines")
    rows = [{"model": "M", "scope": "layer0", "T": 8, "transformers": 2e-6, "gamma": 1e-6,
             "floor": 0.02, "prob_floor": 0.0002},
            {"model": "M", "scope": "whole", "T": 1500, "ctranslate2": 4e-4, "transformers": 1e-3, "gamma": 5e-4}]
    lines = eng.table(rows)
    assert lines[0].endswith("| rounding floor (probabilistic) | floor (probabilistic) / largest |")
    assert lines[2] == "| M | layer0 | 8 | - | 2e-06 | 1e-06 | 2e-06 | 0.02 | 1e+04 | 0.0002 | 100 |"
    assert lines[3] == "| M | whole | 1500 | 0.0004 | 0.001 | 0.0005 | 0.001 | - | - | - | - |"


def test_eps_sweep_ratios_equivalent_eps_and_table():
    """benchmarks/eps_sweep.py: the ratios over the attacked outputs, the equivalent block eps, and
    a table row's cells, by hand."""
    sw = _module("eps_sweep")
    from types import SimpleNamespace
    from gamma.attack import AttackRange
    r = SimpleNamespace(lower=torch.tensor([0.0, 0.0, -1.0]), upper=torch.tensor([2.0, 3.0, 1.0]))
    a = AttackRange(torch.tensor([0.5, 0.0, -0.5]), torch.tensor([1.5, 1.0, 0.0]), 10, 0, torch.tensor([0, 2]), 0.1)
    assert sw.ratios(r, a) == (3.0, 3.0)            # max widths 3 / 1; outputs 0 and 2: 2 / 1, 2 / 0.5 -> median 3
    e = sw.equivalent(torch.tensor([2.0, 6.0, 9.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 1e-9]), (1e-4, 1e-3))
    assert e[1e-4] == pytest.approx(3e-4) and e[1e-3] == pytest.approx(3e-3)   # ratios 2, 3, 3 (the last left out)
    args = SimpleNamespace(blocks="layer2", eps="1e-3", norm_splits=4)
    row = {"block": "layer2", "eps": 1e-3, "attacked": 0.207, "violations": 0, "seconds": (3.3, 3.9, 12.5),
           "real": 0.399, "real_ratio": 1.93, "real_median": 2.14, "f32": 0.444, "f32_ratio": 2.14,
           "f32_median": 2.4, "f32k": 0.409, "f32k_ratio": 1.97, "f32k_median": 2.2}
    text = sw.section_text(args, [row], {"layer2": {1e-4: 1e-3, 1e-3: 1e-2}}, 1.5)
    lines = text.splitlines()
    assert lines[0] == "## " + sw.SECTION
    assert ("| layer2 | 0.001 | 0.207 | 0.399 | 1.93 / 2.14 | 0.444 | 2.14 / 2.4 | 0.409 | 1.97 / 2.2 "
            "| 3.3 / 3.9 / 12.5 |") in lines
    assert "| layer2 | 0.001 | 0.01 |" in lines
    assert "Outputs of the attack outside any mode's bounds: 0." in text
