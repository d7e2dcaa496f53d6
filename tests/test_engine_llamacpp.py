"""``--engine llama.cpp``: bounds that hold for what ggml's CPU backend computes on a GGUF file.

Checked against an emulation of ggml's kernels written from its reference code (tests/ggml_emu.py):
the activation conversions by hand and by sampling, the block minima read from Q4_1 / Q5_1 blocks,
ggml's RoPE angles against the graph's tables, and whole graphs (samples and PGD-pushed inputs, the
emulated engine inside the bounds, zero violations) where the float32-engine bounds are left by it.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import torch

from gamma import cli
from gamma.bounds import Tunings, compute_bounds, fpggml
from gamma.bounds.interval import Interval
from gamma.io import load_checkpoint
from gamma.models import Model
from gamma.models.llama import rope_tables
from gamma.ops import evaluate
from gamma.verify import schema
from ggml_emu import Engine, ggml_rope_tables, quantize_q8, raw_blocks, round_bf16, unpermute, weight_blocks

U = 2.0 ** -24


# ---------------------------------------------------------------- the conversions, by hand and by sampling
def test_activation_error_by_hand():
    e, s = fpggml.activation_error(torch.tensor([1.0, 1e-6, 7e4], dtype=torch.float64), "F16")
    assert s is None
    assert e[0].item() == 2.0 ** -11 and e[1].item() == 2.0 ** -25 and math.isinf(e[2].item())
    e, _ = fpggml.activation_error(torch.tensor([1.0], dtype=torch.float64), "BF16")
    assert e.item() == 2.0 ** -8 + 2.0 ** -133
    a = torch.zeros(32, dtype=torch.float64)
    a[3] = 127.0                                   # one block, amax 127: d = 1 (times 1 + 2U)
    e, s = fpggml.activation_error(a, "Q8_1")
    d = 1 + 2 * U
    assert torch.equal(e, torch.full((32,), 127 * 2.0 ** -11 * d + d * (0.5 + 300 * U), dtype=torch.float64))
    assert s.shape == (1,) and s.item() == pytest.approx(4064 * d * (1 + U) * 2.0 ** -11 + 4064 * (U * d + 2.0 ** -11 * d))


@pytest.mark.parametrize("act", ["Q8_0", "Q8_1"])
def test_q8_error_contains_ggml_quantizer(act):
    """Boxes of several widths and scales (fp16-subnormal steps included): at the box's corners and
    random points, every ``x~ - x`` lies in q8_error's range and within activation_error's bound,
    every ``x~`` in its held range; Q8_1's s too."""
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-7, 1e-3, 1.0, 300.0):
        c = torch.randn(16, 128, generator=gen, dtype=torch.float64) * scale
        c[:, 5] *= 40                                                  # an outlier per block
        c = c.float().double()                                         # the engine's activations are float32
        for r in (0.0, 1e-4 * scale, 0.05 * scale):
            inf = torch.tensor(math.inf, dtype=torch.float32)
            lo32, hi32 = torch.nextafter((c - r).float(), -inf), torch.nextafter((c + r).float(), inf)
            box = Interval(lo32.double(), hi32.double())                  # float32 ends
            dx, ds = fpggml.activation_error(box.abs_max(), act)
            lo, hi, se, held = fpggml.q8_error(box, act, dx, ds)
            assert bool((lo <= hi).all()) and bool((held[0] <= held[1]).all())
            for k in range(26):
                if k < 2:                             # the box's two extreme corners, then random points
                    x = lo32 if k == 0 else hi32
                else:
                    x = (c + r * (2 * torch.rand(c.shape, generator=gen, dtype=torch.float64) - 1)).float()
                    x = torch.minimum(torch.maximum(x, lo32), hi32)           # a float32 point in the box
                d16, q, s16 = quantize_q8(x.numpy(), act == "Q8_1")
                xq = torch.from_numpy((d16.astype(np.float32)[..., None] * q).reshape(x.shape).astype(np.float64))
                err = xq - x.double()
                assert bool((err >= lo).all()) and bool((err <= hi).all()), (scale, r)
                assert bool((err.abs() <= dx).all())
                assert bool((xq >= held[0]).all()) and bool((xq <= held[1]).all()), (scale, r)
                if act == "Q8_1":
                    gap = torch.from_numpy(s16.astype(np.float64) - d16.astype(np.float64) * q.sum(-1))
                    assert bool(((gap - se[0]).abs() <= se[1]).all()) and bool((se[1] <= ds).all())


def test_q8_1_sum_error_is_rounding_only():
    """A Q8_1 block whose largest element spans [50, 100] (the rest 0): d moves by a factor of 2 over
    the box, but ``s - fp16(d) sum q`` (sum q = 127 throughout) is only roundings, within
    ``e16(100) + U 100 + e16(100 / 127) 127`` = 0.0977 (not d's range times 127, about 50), and the
    quantizer's own gaps at points of the box lie in it."""
    lo = torch.zeros(1, 32, dtype=torch.float64)
    hi = lo.clone()
    lo[0, 0], hi[0, 0] = 50.0, 100.0
    box = Interval(lo, hi)
    dx, ds = fpggml.activation_error(box.abs_max(), "Q8_1")
    _, _, se, _ = fpggml.q8_error(box, "Q8_1", dx, ds)
    hand = 2.0 ** -11 * 100 * (1 + 3 * U) + U * 100 / 127 * 127 * 1.01 + 2.0 ** -11 * 100 / 127 * (1 + 3 * U) * 127
    assert float(se[1].max()) <= hand and float(se[1].max()) > 0.9 * hand
    for v in torch.linspace(50, 100, 101, dtype=torch.float64):
        x = torch.zeros(1, 32, dtype=torch.float32)
        x[0, 0] = float(v)
        d16, q, s16 = quantize_q8(x.numpy(), True)
        gap = float(s16.astype(np.float64).sum() - d16.astype(np.float64).sum() * q.sum())
        assert abs(gap - float(se[0][0, 0])) <= float(se[1][0, 0])


def test_bf16_rounding_within_bound():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4096, generator=gen, dtype=torch.float64).float() * 100
    err = (torch.from_numpy(round_bf16(x.numpy())).double() - x.double()).abs()
    bound, _ = fpggml.activation_error(x.double().abs(), "BF16")
    assert bool((err <= bound).all()) and float(err.max()) > 0.5 * float(bound.max()) * 2.0 ** -3


def test_known_shift_centres_the_bound():
    """One Q8_0 linear layer at a point (eps 0): the bound sits on the engine's value, not on the
    real function's, and is far narrower than the shift between the two (a symmetric margin about
    the real value would be at least twice the shift wide)."""
    from gamma.graph import Graph
    from ggml_emu import ggml_linear
    gen = torch.Generator().manual_seed(4)
    d = torch.rand(8, 2, generator=gen, dtype=torch.float64).half().double() * 0.01 + 0.001   # fp16 block scales
    q = torch.randint(-127, 128, (8, 64), generator=gen).double()
    w = q * d.repeat_interleave(32, 1)                                                          # Q8_0 weights
    x = (torch.randn(3, 64, generator=gen, dtype=torch.float64) * 2).float().double()
    g = Graph("one", "x", (3, 64))
    g.add("lin", "linear", "x", weight=w, ggml_type="Q8_0")
    g.infer_shapes()
    r = compute_bounds(g, x, 0.0, "crown", engine="llama.cpp", allow_zero=True)
    y = torch.from_numpy(ggml_linear(x.float().numpy(), w.numpy(), None, "Q8_0", (d.float().numpy(), None))).double()
    assert bool(((y >= r.lower) & (y <= r.upper)).all())
    shift = (y - x @ w.T).abs()
    assert float(shift.max()) > 1e-3
    assert bool(((r.upper - r.lower) < 0.1 * shift.max()).all())


@pytest.mark.parametrize("qtype,one_sign", [("Q8_0", False), ("Q8_0", True), ("Q4_1", False)])
def test_pieces_in_any_order_within_the_bound(qtype, one_sign):
    """One quantized layer at a point, its blocks' pieces summed in float32 in four orders (ggml's
    sequential one, reversed, largest first, pairwise), with terms of both signs or of one sign:
    every result inside the bound, whose pieces' part uses their cancellation (dot_error_signed)."""
    from gamma.graph import Graph
    from ggml_emu import ggml_linear
    gen = torch.Generator().manual_seed(7)
    n, out = 256, 16
    d = torch.rand(out, n // 32, generator=gen, dtype=torch.float64).half().double() * 0.01 + 0.001
    x = (torch.randn(2, n, generator=gen, dtype=torch.float64) * 3).float().double()
    g = Graph("one", "x", (2, n))
    if qtype == "Q4_1":                                            # w = d q + m, q in 0..15, m the block minimum
        m = (-8 * d).half().double()
        w = torch.randint(0, 16, (out, n), generator=gen).double() * d.repeat_interleave(32, 1) \
            + m.repeat_interleave(32, 1)
        g.add("lin", "linear", "x", weight=w, ggml_type=qtype, ggml_minima=m)
    else:
        m = None
        q = torch.randint(-127, 128, (out, n), generator=gen).double()
        if one_sign:
            q, x = q.abs(), x.abs()
        w = q * d.repeat_interleave(32, 1)
        g.add("lin", "linear", "x", weight=w, ggml_type=qtype)
    g.infer_shapes()
    r = compute_bounds(g, x, 0.0, "crown", engine="llama.cpp", allow_zero=True)
    blocks = (d.float().numpy(), None if m is None else m.float().numpy())
    for order in ("sequential", "reverse", "largest-first", "pairwise"):
        y = torch.from_numpy(ggml_linear(x.float().numpy(), w.numpy(), None, qtype, blocks, order)).double()
        assert bool(((y >= r.lower) & (y <= r.upper)).all()), order


def test_pinned_conversions_stop_the_box(monkeypatch):
    """Two Q8_0 layers on a box narrow next to the blocks' steps: most conversions are pinned, so
    the walk takes those activations as constants (slope 0, ``Extra.walk``) and the input's range
    never reaches the layer.  The bound is then far narrower than with slope 1 throughout, and the
    emulated engine stays inside it at the corners, random points and gradient-pushed points."""
    from gamma.graph import Graph
    from ggml_emu import ggml_linear
    gen = torch.Generator().manual_seed(5)
    ds = [torch.rand(16, 2, generator=gen, dtype=torch.float64).half().double() * 0.01 + 0.002 for _ in range(2)]
    ws = [(torch.randint(-127, 128, (64, 64), generator=gen).double() * torch.cat([d, d, d, d]).repeat_interleave(32, 1))
          for d in ds]
    x = (torch.randn(3, 64, generator=gen, dtype=torch.float64) * 2).float().double()
    g = Graph("two", "x", (3, 64))
    g.add("lin1", "linear", "x", weight=ws[0], ggml_type="Q8_0")
    g.add("lin2", "linear", "lin1", weight=ws[1], ggml_type="Q8_0")
    g.infer_shapes()
    eps = 1e-4
    r = compute_bounds(g, x, eps, "crown", engine="llama.cpp")
    for name, box in (("lin1", Interval(x - eps, x + eps)), ("lin2", r.nodes["lin1"])):
        ex = fpggml.extra(g[name], [box])
        assert ex.walk is not None and float((~ex.walk[0]).double().mean()) > 0.9, name   # most inputs pinned
    extra = fpggml.extra
    monkeypatch.setattr(fpggml, "extra", lambda node, ins: extra(node, ins)._replace(walk=None))
    sloped = compute_bounds(g, x, eps, "crown", engine="llama.cpp")
    monkeypatch.undo()
    w, ws1 = r.upper - r.lower, sloped.upper - sloped.lower
    assert bool((w <= ws1 + 1e-12).all()) and float(w.median()) < 0.2 * float(ws1.median())   # 0.074 against 1.18

    def engine(u):
        h = u.float().numpy()
        for w, d in zip(ws, ds):
            h = ggml_linear(h, w.numpy(), None, "Q8_0", (torch.cat([d, d, d, d]).float().numpy(), None))
        return torch.from_numpy(h).double()
    pts = [x - eps, x + eps] + [x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) for _ in range(64)]
    pts += _pushed(g, x, eps, n=4, steps=8)                 # pushed along the real function's gradients
    for u in pts:
        y = engine(torch.minimum(torch.maximum(u, x - eps), x + eps))
        assert bool(((y >= r.lower) & (y <= r.upper)).all())


def test_ggml_rms_norm_within_its_margin():
    """ggml_rms_norm (squares in float32, summed in double, the mean rounded to float32; the
    emulator's) stays within the engine's RMSNorm margin (``fpggml.RMS_SUMS``) at and around rows of
    several scales with an outlier, and that margin is far below the one any float32 summation order
    needs."""
    from gamma.bounds.fpmargin import margin_split
    from gamma.bounds.ibp import ibp_node
    from gamma.graph import Graph
    from ggml_emu import ggml_rms_norm
    gen = torch.Generator().manual_seed(6)
    d = 576
    w = (1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).float().double()
    g = Graph("norm", "x", (4, d))
    g.add("n", "rmsnorm", "x", weight=w, eps=1e-5)
    g.infer_shapes()
    for scale in (1e-3, 1.0, 300.0):
        c = torch.randn(4, d, generator=gen, dtype=torch.float64) * scale
        c[:, 7] *= 50
        c = c.float().double()
        box = Interval(c - 1e-6 * scale, c + 1e-6 * scale)
        out = ibp_node(g["n"], box)
        m, _ = margin_split(g["n"], [box], out, None, fpggml.RMS_SUMS)
        any_order, _ = margin_split(g["n"], [box], out)
        assert float(m.max()) < 0.15 * float(any_order.max())        # 0.06-0.12 of it
        for k in range(16):
            x = (c + 1e-6 * scale * (2 * torch.rand(c.shape, generator=gen, dtype=torch.float64) - 1)).float()
            x = torch.minimum(torch.maximum(x, box.lower.float()), box.upper.float())
            y = torch.from_numpy(ggml_rms_norm(x.numpy(), w.numpy(), 1e-5)).double()
            exact = x.double() * torch.rsqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-5) * w
            assert bool(((y - exact).abs() <= m).all()), (scale, k)


# ---------------------------------------------------------------- the weights' block minima
@pytest.mark.parametrize("fixture", ["llama_gguf_q4_1", "llama_gguf_q5_1"])
def test_block_minima_from_the_file(request, fixture):
    """Eager and lazy loads give each block's m as the file holds it (q / k rows unpermuted)."""
    path = request.getfixturevalue(fixture)[0]
    raw = raw_blocks(path)
    eager, lazy = load_checkpoint(path), load_checkpoint(path, lazy=True)
    heads = eager.config.n_heads
    for canonical, src in (("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
                           ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight")):
        qtype, data = raw[src]
        shape = tuple(eager.tensors[canonical].shape)
        _, m = weight_blocks(data, qtype, shape)
        if "attn_q" in src:
            m = unpermute(m, heads)                                   # the emulator's own
        want = torch.from_numpy(m)
        assert torch.equal(eager.minima(canonical), want)
        assert torch.equal(lazy.minima(canonical), want)
    assert eager.minima("model.layers.0.input_layernorm.weight") is None


# ---------------------------------------------------------------- RoPE's angles
@pytest.mark.parametrize("dh,base", [(16, 10000.0), (64, 10000.0), (128, 1e6)])
def test_rope_table_difference_within_margin(dh, base):
    """ggml's cos / sin (iterated angle, float32) against the graph's tables, 512 positions:
    within the margin fpggml charges per unit input."""
    T = 512
    cos, sin = rope_tables(T, dh, base)
    node = SimpleNamespace(op="rope", params={"cos": cos, "sin": sin})
    one = torch.ones(1, T, dh, dtype=torch.float64)
    m = fpggml.extra(node, [Interval(-one, one)])[1][0]                  # (|x| + |rot x|) d = 2 d
    cg, sg = (torch.from_numpy(a).double() for a in ggml_rope_tables(T, dh, base))
    diff = (cg - cos).abs() + (sg - sin).abs()
    assert bool((diff <= m).all())
    assert float(diff.max()) > 0                                        # the tables do differ


# ---------------------------------------------------------------- whole graphs
def _pushed(g, x, eps, n=3, steps=8, seed=0):
    """Inputs pushed by signed-gradient steps on the float64 forward along random output directions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randn(g.output_shape, generator=gen, dtype=torch.float64)
        u = (x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1)).detach()
        for _ in range(steps):
            u.requires_grad_(True)
            (evaluate(g, u) * w).sum().backward()
            u = (x + (u + eps / 3 * u.grad.sign() - x).clamp(-eps, eps)).detach()
        out.append(u)
    return out


def _inside(r, y) -> int:
    return int(((y < r.lower) | (y > r.upper)).sum())


CASES = [("llama_gguf_q4_1", True, "layer1"), ("llama_gguf_q8_0", True, None), ("llama_gguf_f16", True, "layer0"),
         ("qwen3_gguf_q8_0", False, "layer1"), ("llama_gguf_q5_1", True, "layer0")]


@pytest.mark.parametrize("fixture,permuted,scope", CASES)
def test_llamacpp_bounds_contain_the_emulated_engine(request, fixture, permuted, scope):
    path = request.getfixturevalue(fixture)[0]
    ck = load_checkpoint(path)
    model = Model(ck)
    g, x = model.graph(seq_len=4), model.input_point(seq_len=4).x
    if scope is not None:
        vals = evaluate(g, x, keep_all=True)
        g = g.block_graph(scope)
        x = vals[g.input].contiguous()
    engine = Engine(g, path, ck.config.rope_theta, permuted=permuted)
    gen = torch.Generator().manual_seed(3)
    left = 0
    for eps in (1e-4, 0.0):
        pts = [x] + [x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) for _ in range(12)]
        if eps:
            pts += _pushed(g, x, eps, n=2, steps=6)
        ys = [engine(u) for u in pts]
        plain = compute_bounds(g, x, eps, "crown", allow_zero=True)
        left += sum(_inside(plain, y) for y in ys)
        for arith in ("float32", "float32-probabilistic"):
            r = compute_bounds(g, x, eps, "crown", arithmetic=arith, engine="llama.cpp", allow_zero=True)
            assert sum(_inside(r, y) for y in ys) == 0, (arith, eps)
        r = compute_bounds(g, x, eps, "crown", intermediate="cut", engine="llama.cpp", allow_zero=True)
        assert sum(_inside(r, y) for y in ys) == 0, ("cut", eps)
        if eps:                   # each norm's mean square in pieces (split.py) under ggml's arithmetic
            r = compute_bounds(g, x, eps, "crown", engine="llama.cpp", tunings=Tunings(norm_splits=3))
            assert r.stats["split_norms"] >= 1 and sum(_inside(r, y) for y in ys) == 0, ("norm splits", eps)
        for method in ("ibp", "zonotope", "alpha") if scope is not None else ():
            r = compute_bounds(g, x, eps, method, engine="llama.cpp", allow_zero=True, alpha_iters=3)
            assert sum(_inside(r, y) for y in ys) == 0, (method, eps)
    if "f16" not in fixture:
        assert left > 0           # the engine leaves the float32 bounds: the option is needed


# ---------------------------------------------------------------- the command line
def _run(capsys, *args):
    code = cli.main(["verify", *args, "--seq-len", "2", "--epsilon", "1e-4", "--no-attack", "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_engine_llamacpp(capsys, llama_gguf_q4_1):
    code, out, err = _run(capsys, llama_gguf_q4_1[0], "--engine", "llama.cpp", "--json")
    assert code == 0 and err == ""                     # no note: the engine is covered
    rep = json.loads(out)
    jsonschema.validate(rep, schema())
    assert rep["engine"] == "llama.cpp"
    code, out, err = _run(capsys, llama_gguf_q4_1[0], "--engine", "llama.cpp")
    assert code == 0
    assert ("engine   llama.cpp's CPU backend (--engine llama.cpp): matmul activations quantized or rounded to "
            "the weights' vec_dot types, an F16 KV cache without flash attention, ggml's RoPE angles") in out
    code, out, err = _run(capsys, llama_gguf_q4_1[0], "--engine", "llama.cpp", "--block-wise", "--blocks", "1",
                          "--json")
    assert code == 0 and json.loads(out)["engine"] == "llama.cpp"


def test_cli_engine_llamacpp_bad_input(capsys, llama_hf_dir, llama_gguf_q6_k, llama_gguf_q4_1):
    code, out, err = _run(capsys, llama_hf_dir[0], "--engine", "llama.cpp")
    assert code == 2 and out == ""
    assert err == (f"gamma: error: --engine llama.cpp needs a GGUF checkpoint (llama.cpp runs GGUF files only); "
                   f"{llama_hf_dir[0]} is safetensors\n")
    code, out, err = _run(capsys, llama_gguf_q4_1[0], "--engine", "llama.cpp", "--arithmetic", "real")
    assert code == 2 and err == ("gamma: error: --engine llama.cpp bounds a float32 engine: it needs --arithmetic "
                                 "float32 or float32-probabilistic, not real\n")
    code, out, err = _run(capsys, llama_gguf_q6_k[0], "--engine", "llama.cpp")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("gamma: error: --engine llama.cpp: tensor 'blk.") and err.endswith(
        " is Q6_K, whose activation path in ggml is not modelled (modelled: F32, F16, BF16, Q4_0, Q5_0, Q8_0, "
        "Q4_1, Q5_1)\n")
    code, out, err = _run(capsys, llama_gguf_q4_1[0], "--engine", "llama")
    assert code == 2 and "invalid choice: 'llama'" in err
    code = cli.main(["verify", llama_gguf_q4_1[0], "--vnnlib", "p.vnnlib", "--engine", "llama.cpp"])
    assert code == 2 and capsys.readouterr().err == "gamma: error: --engine llama.cpp does not apply with --vnnlib\n"


def test_resume_key_names_the_engine():
    from gamma.parallel.resume import run_key
    base = {"model": {"path": "m"}, "component": "decoder", "output": "hidden", "seq_len": 2, "method": "crown",
            "intermediate": "crown", "epsilon": 1e-3, "arithmetic": "float32"}
    x = torch.zeros(2, 2, dtype=torch.float64)
    assert "engine" not in run_key({**base, "engine": "float32"}, 20, x)
    assert run_key({**base, "engine": "llama.cpp"}, 20, x)["engine"] == "llama.cpp"


def test_compare_under_llamacpp(capsys, llama_gguf_q8_0, llama_gguf_q4_1, llama_hf_dir):
    """Two GGUF quantizations of one model as llama.cpp runs both: the certified difference contains
    the emulated engines' difference at the centre and at sampled points; a non-GGUF side is refused."""
    from gamma import compare as C
    ref, tgt = llama_gguf_q8_0[0], llama_gguf_q4_1[0]
    res = C.compare(ref, tgt, 1e-4, 1.0, engine="llama.cpp", seq_len=2, samples=16, attack_steps=2, restarts=1)
    r = res.report
    assert r["engine"] == "llama.cpp"
    from gamma.verify import load
    mr, mt = load(ref), load(tgt)
    gr, gt = mr.graph("decoder", 2), mt.graph("decoder", 2)
    x = mr.input_point("decoder", seq_len=2).x
    b = C.bound_difference(C.difference_graph(gr, gt), gr, gt, x, 1e-4, "crown", naive=False, engine="llama.cpp")
    er = Engine(gr, ref, mr.ckpt.config.rope_theta)
    et = Engine(gt, tgt, mt.ckpt.config.rope_theta)
    gen = torch.Generator().manual_seed(5)
    for u in [x] + [x + 1e-4 * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) for _ in range(8)]:
        d = er(u) - et(u)
        assert bool(((d >= b.lower) & (d <= b.upper)).all())
    code = cli.main(["compare", ref, llama_hf_dir[0], "--epsilon", "1e-4", "--tolerance", "1", "--seq-len", "2",
                     "--engine", "llama.cpp", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"gamma: error: --engine llama.cpp needs a GGUF checkpoint (llama.cpp runs GGUF "
                                 f"files only); {llama_hf_dir[0]} is safetensors\n")


def test_float64_attack_is_no_violation_of_llamacpp_bounds(capsys, llama_gguf_q8_0):
    """The attack evaluates gamma's float64 forward: under --engine llama.cpp its points outside the
    bounds are reported apart (float64_outside), never as violations, and the text says why."""
    from gamma.verify.api import _float64_attack
    rep = {"attack": {"violations": 3}, "blocks": [{"attack_violations": 2}, {"status": "FAILED"}]}
    _float64_attack(rep)
    assert rep == {"attack": {"violations": 0, "float64_outside": 3},
                   "blocks": [{"attack_violations": 0, "float64_outside": 2}, {"status": "FAILED"}]}
    code = cli.main(["verify", llama_gguf_q8_0[0], "--seq-len", "2", "--epsilon", "1e-4", "--quiet", "--engine",
                     "llama.cpp", "--attack", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    jsonschema.validate(r, schema())
    assert r["attack"]["violations"] == 0 and r["attack"]["float64_outside"] >= 0
    from gamma.commands.verify import _violations
    assert _violations(0, 4) == ["note     4 attacked outputs of gamma's float64 forward lie outside the bounds, "
                                 "which hold for the engine named above instead: the attack does not evaluate "
                                 "that engine"]
    assert _violations(0, 0) == ["note     the attack evaluates gamma's float64 forward, not the engine named above: "
                                 "its widths are the real function's (none of its points lies outside the bounds)"]
    assert _violations(0) == [] and _violations(2) == ["UNSOUND  2 attacked outputs fall outside the certified bounds"]


def test_inspect_says_whether_the_engine_models_the_file(capsys, llama_gguf_q4_1, llama_gguf_q6_k, llama_hf_dir):
    def info(path):
        assert cli.main(["inspect", path, "--json"]) == 0
        return json.loads(capsys.readouterr().out)
    assert info(llama_gguf_q4_1[0])["llama_cpp_engine"] == "modelled"
    got = info(llama_gguf_q6_k[0])["llama_cpp_engine"]
    assert got.startswith("not modelled: tensor 'blk.") and " is Q6_K, whose activation path in ggml" in got
    assert info(llama_hf_dir[0])["llama_cpp_engine"] is None
    assert cli.main(["inspect", llama_gguf_q4_1[0]]) == 0
    assert "llama.cpp     --engine llama.cpp: modelled\n" in capsys.readouterr().out
    assert cli.main(["inspect", llama_hf_dir[0]]) == 0
    assert "llama.cpp" not in capsys.readouterr().out
