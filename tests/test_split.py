"""Norms split on their mean square (gamma.bounds.split): which nodes take the pieces, that
the pieces cover the norm's interval, narrower and never (beyond CROWN's own non-monotonicity) wider, soundness (samples + PGD against float64 and float32 engines, every arithmetic mode, tiny
pre-norm blocks and the tiny Whisper encoder), and the option's checks."""

from __future__ import annotations

import json

import pytest
import torch

from gamma.bounds import Tunings, compute_bounds, split
from gamma.bounds.engine import needs_bounds
from gamma.errors import GammaError
from gamma.graph import Graph
from gamma.options import BoundOptions
from draw import G, rnd
from soundness import graph_fn, violations
from test_score_side import attention


def block(style: str, seed: int) -> Graph:
    """A pre-norm block: attention (test_score_side's) then an MLP, Whisper's (LayerNorm, fc1,
    GELU, fc2) or Llama's (RMSNorm, gate / up, SiLU, product, down), each with its residual add."""
    G.manual_seed(seed)
    llama = style == "llama"
    g = attention(rope=llama, rep=2 if llama else 1, d=32, heads=4)
    if llama:
        g.add("n2", "rmsnorm", "y", weight=1 + rnd(32, scale=0.2), eps=1e-5)
        g.add("gate", "linear", "n2", weight=rnd(64, 32, scale=0.3))
        g.add("up", "linear", "n2", weight=rnd(64, 32, scale=0.3))
        g.add("act", "silu", "gate")
        g.add("h", "mul", "act", "up")
    else:
        g.add("n2", "layernorm", "y", weight=1 + rnd(32, scale=0.2), bias=rnd(32, scale=0.1), eps=1e-5)
        g.add("f1", "linear", "n2", weight=rnd(64, 32, scale=0.3), bias=rnd(64, scale=0.1))
        g.add("h", "gelu", "f1")
    g.add("down", "linear", "h", weight=rnd(32, 64, scale=0.3))
    g.add("z", "add", "y", "down")
    return g.infer_shapes()


def test_plan_picks_the_row_local_nodes():
    """The MLP after the second norm and its residual add are row-local; the attention's norm has
    none worth splitting (q, k, v feed products that mix the tokens, and their linear bounds are
    kept).  A node that also reads the norm through a token-mixing path is not row-local, nor is
    anything after it."""
    g = block("llama", 1)
    need = needs_bounds(g)
    assert split.plan(g, need, {"q", "k", "v"}, 3) == {"n2": ["gate", "up", "act", "h", "down", "z"]}
    assert split.plan(g, need, set(), 1) == {}
    h = Graph("mix", "x", (4, 8))
    h.add("n", "rmsnorm", "x", weight=torch.ones(8, dtype=torch.float64), eps=1e-5)
    h.add("f", "linear", "n", weight=rnd(8, 8))
    h.add("fh", "split_heads", "f", heads=1)
    h.add("s", "matmul", "fh", "fh")
    h.add("p", "softmax", "s")
    h.add("av", "matmul", "p", h.add("ft", "transpose", "fh"), rows_sum_to_one=True)
    h.add("m", "merge_heads", "av")
    h.add("a", "add", "f", "m")                 # f (row-local) + the tokens' mix of f: not row-local
    h.add("g", "gelu", "a")
    h.infer_shapes()
    assert split.plan(h, needs_bounds(h), set(), 2) == {"n": ["f"]}


def test_pieces_cover_the_mean_square(monkeypatch):
    """The pieces' intervals of q share their edges, run from the refined interval's lower end to
    its upper end, and each is an interval."""
    seen = []
    orig = split._piece

    def spy(ctx, norm, own, facts):
        seen.append((norm.name, facts["q"]))
        return orig(ctx, norm, own, facts)
    monkeypatch.setattr(split, "_piece", spy)
    g = block("whisper", 2)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    compute_bounds(g, x0, 0.05, "crown", arithmetic="real", tunings=Tunings(norm_splits=5))
    assert [n for n, _ in seen] == ["n2"] * 5
    pieces = [q for _, q in seen]
    for (lo, hi), (lo2, _) in zip(pieces, pieces[1:]):
        assert torch.equal(hi, lo2)
    assert all(bool((lo <= hi).all()) for lo, hi in pieces)
    assert bool((pieces[0][0] < pieces[-1][1]).all())          # a box of radius 0.05 moves every row's q
    lo, hi = pieces[0][0], pieces[-1][1]
    inner = torch.stack([p[1] for p in pieces[:-1]])
    assert bool(((inner >= lo) & (inner <= hi)).all())
    e = torch.stack([split._edge(lo, hi, 1e-5, f / 5) for f in range(6)])
    assert bool((e[1:] >= e[:-1]).all()) and bool((e >= lo).all()) and bool((e <= hi).all())


def test_pieces_by_hand():
    """q in [0, 3], eps 1: s runs from 1 down to 1/2.  An edge at half the way in s is s = 3/4, so
    q = 16/9 - 1 = 7/9; two pieces at SKEW 1.3 put it at 2^-1.3 of the way.  A row whose interval
    is not finite is whole in every piece, and the pieces of the others cover them with shared edges."""
    lo, hi = torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    assert split._edge(lo, hi, 1.0, 0.5).item() == pytest.approx(7 / 9, rel=1e-14)
    s = 1 - 0.5 * 0.5 ** split.SKEW
    (a0, b0), (a1, b1) = split.pieces(lo, hi, 1.0, 2)
    assert (a0.item(), a1.item(), b1.item()) == (0.0, b0.item(), 3.0)
    assert b0.item() == pytest.approx(s ** -2 - 1, rel=1e-14)
    lo2 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    hi2 = torch.tensor([[3.0], [float("inf")]], dtype=torch.float64)
    ps = split.pieces(lo2, hi2, 1.0, 3)
    assert all(p[0][1].item() == 1.0 and p[1][1].item() == float("inf") for p in ps)
    assert ps[0][0][0].item() == 0.0 and ps[-1][1][0].item() == 3.0
    assert all(torch.equal(ps[i][1][0], ps[i + 1][0][0]) for i in range(2))


@pytest.mark.parametrize("style", ["whisper", "llama"])
@pytest.mark.parametrize("arithmetic", ["real", "float32", "float32-probabilistic"])
def test_sound_and_narrower(style, arithmetic):
    """A tiny pre-norm block, eps wide enough that the second norm's scale moves: with 3 pieces
    the output's widest bound is narrower than without, and samples + PGD of float64 and float32
    engines find no point outside."""
    g = block(style, 4)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(g.input_shape, generator=gen, dtype=torch.float64)
    eps = 0.01
    on = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic, tunings=Tunings(norm_splits=3))
    off = compute_bounds(g, x0, eps, "crown", arithmetic=arithmetic)
    assert on.stats["split_norms"] == 1 and "split_norms" not in off.stats
    assert float(on.width().max()) < 0.99 * float(off.width().max())
    for name in on.nodes:                    # (CROWN is not monotone in its intermediate boxes: up to 1e-3)
        assert bool((on.nodes[name].width() <= off.nodes[name].width() * (1 + 1e-3) + 1e-9).all()), name
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), x0, eps, on.lower, on.upper, steps=30) == 0


def test_whisper_encoder_sound(whisper_hf_dir):
    """The tiny Whisper encoder (stem and two blocks, transformers' weights), default mode, three
    pieces for each block's MLP norm: its bounds contain gamma's float64 and float32 forwards under
    samples + PGD."""
    from gamma import Model
    from gamma.io import load_checkpoint
    model = Model(load_checkpoint(whisper_hf_dir[0]))
    ip = model.input_point("encoder", seq_len=4)
    g = model.graph("encoder", seq_len=4)
    eps = 1e-3
    on = compute_bounds(g, ip.x, options=BoundOptions(eps, norm_splits=3))
    assert on.stats["split_norms"] == 2
    for dtype in (torch.float64, torch.float32):
        assert violations(graph_fn(g, dtype), ip.x, eps, on.lower, on.upper, steps=20) == 0


@pytest.mark.parametrize("value", [0, 65, -1, 2.5, True, "3"])
def test_bad_values(value):
    with pytest.raises(GammaError, match=rf"^--norm-splits must be an integer from 1 to 64, got {value}$"):
        BoundOptions(1e-3, norm_splits=value)


@pytest.mark.parametrize("method,intermediate", [("ibp", "crown"), ("zonotope", "crown"), ("crown", "cut"),
                                                 ("crown", "ibp")])
def test_needs_crown_passes_to_the_input(method, intermediate):
    with pytest.raises(GammaError, match=r"^--norm-splits needs --method crown or alpha with --intermediate crown$"):
        BoundOptions(1e-3, method, intermediate, norm_splits=2)
    assert BoundOptions(1e-3, method, intermediate, norm_splits=1).norm_splits == 1


def test_cli(capsys, whisper_hf_dir):
    """``--norm-splits``: one line and exit 2 when bad; in the run line and the JSON when used."""
    from gamma.cli import main
    assert main(["verify", whisper_hf_dir[0], "--norm-splits", "0"]) == 2
    assert capsys.readouterr().err == "gamma: error: --norm-splits must be an integer from 1 to 64, got 0\n"
    assert main(["verify", whisper_hf_dir[0], "--block-wise", "--blocks", "0", "--seq-len", "4", "--no-attack",
                 "--norm-splits", "2", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["norm_splits"] == 2
    assert main(["verify", whisper_hf_dir[0], "--block-wise", "--blocks", "0", "--seq-len", "4", "--no-attack",
                 "--norm-splits", "2", "--quiet"]) == 0
    assert "norm splits 2" in capsys.readouterr().out


def test_resume_key_names_the_option():
    """A checkpoint written with --norm-splits is resumed only with the same number of pieces; keys
    written before the option (no field) stay valid at 1."""
    from gamma.parallel.resume import run_key
    report = {"model": {"path": None}, "component": "encoder", "output": "hidden", "seq_len": 4, "method": "crown",
              "intermediate": "crown", "epsilon": 1e-3}
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert "norm_splits" not in run_key(report, 20, x)
    assert "norm_splits" not in run_key(dict(report, norm_splits=1), 20, x)
    assert run_key(dict(report, norm_splits=4), 20, x)["norm_splits"] == 4


@pytest.mark.parametrize("style", ["whisper", "llama"])
def test_alpha_with_pieces(style):
    """alpha-CROWN optimises the output over the bounds the pieces gave: never looser than CROWN with
    the same pieces (measured: Llama-style 38.36 -> 38.02, Whisper-style equal), split as CROWN is,
    and sound under samples + PGD of a float32 engine."""
    g = block(style, 4)
    x0 = torch.randn(g.input_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = compute_bounds(g, x0, 0.01, "alpha", alpha_iters=5, tunings=Tunings(norm_splits=3))
    c = compute_bounds(g, x0, 0.01, "crown", tunings=Tunings(norm_splits=3))
    assert a.stats["split_norms"] == 1
    assert torch.all(a.lower >= c.lower) and torch.all(a.upper <= c.upper)
    assert violations(graph_fn(g, torch.float32), x0, 0.01, a.lower, a.upper, steps=20) == 0
