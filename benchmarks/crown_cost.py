"""Where CROWN's time and width go on one block of the Qwen3-0.6B shape -> markdown.

1. Time against products: every CROWN pass of one block (``crown.node_bounds``
   per node, ``intermediate`` crown and cut) timed, then run again under
   ``torch.utils.flop_counter.FlopCounterMode`` for the floating-point
   operations of its matrix products.  Next to them, this machine's matmul
   rate in float32 and float64, measured in the same run.  ``floor s`` is the
   pass's product FLOPs at the float32 rate: what the pass would cost if
   every product ran at that rate and nothing else cost anything.  The
   floor of a whole block, times the number of blocks, bounds from below
   what any implementation of the same walk can take on this machine.
2. Width: what the bounds of the first spec rows of ``mlp.gate`` are made
   of in the full walk (``crown.backward``'s ``trace``): per node, the share of the width
   charged for its float32 margin, its rule's constant (relaxation remainder), or the box of
   the block input.

The model is a two-block model of the Qwen3-0.6B shape (``_models.py``, GGUF
Q8_0, written into a temporary directory); block 1 is measured (every block
of the shape costs the same).

    python benchmarks/crown_cost.py [--quick] [--out FILE] [--T 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from gamma.bounds import compute_bounds, crown, engine  # noqa: E402
from gamma.ops import evaluate  # noqa: E402
from gamma.verify import load  # noqa: E402

import _models  # noqa: E402
from _common import EPS, ROOT, fmt_s, load_avg, log, machine, table, write_markdown  # noqa: E402

BLOCKS = 28          # blocks of the real shape: the extrapolation of the floor
GATE_ROWS = 256      # spec rows of mlp.gate in the width breakdown


def matmul_rate(dtype: torch.dtype, m: int = 1024, k: int = 1024, n: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` (the walk's products are of this size)."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / statistics.median(times)


def passes(graph, x, intermediate: str, count: bool) -> tuple[list, float]:
    """[(node, op, shape, stop, seconds, product FLOPs or None)] per CROWN pass, and the call's seconds."""
    rows = []
    orig = crown.node_bounds

    def timed(ctx, target, box, chunk_elems=None, stop=frozenset()):
        fc = FlopCounterMode(display=False) if count else None
        t0 = time.perf_counter()
        if fc is None:
            out = orig(ctx, target, box, chunk_elems, stop)
        else:
            with fc:
                out = orig(ctx, target, box, chunk_elems, stop)
        node = graph[target]
        rows.append((target, node.op, tuple(node.shape), ",".join(sorted(stop)) or "-",
                     time.perf_counter() - t0, fc.get_total_flops() if fc is not None else None))
        return out

    engine.node_bounds = timed
    try:
        t0 = time.perf_counter()
        compute_bounds(graph, x, EPS, "crown", intermediate=intermediate)
        return rows, time.perf_counter() - t0
    finally:
        engine.node_bounds = orig


def gate_width(graph, x, block: str) -> tuple[float, list]:
    """{width: mean width of the first GATE_ROWS specs of mlp.gate, terms: what the traced terms
    sum to} and [(label, share)] of the width."""
    target = f"{block}.mlp.gate"
    parts: dict = {}
    orig = crown.node_bounds
    got = {}

    def grab(ctx, name, box, chunk_elems=None, stop=frozenset()):
        if name != target:
            return orig(ctx, name, box, chunk_elems, stop)
        dt, dev = box.lower.dtype, box.lower.device
        lams, bias = crown._first_step(ctx, name, torch.arange(GATE_ROWS), dt, dev)
        parts[f"{name}:margin"] = _width(bias)         # the specs' own constant (crown._linear_spec_bias)
        lb = crown.backward(ctx, lams, bias, box, stop,
                            trace=lambda label, delta: parts.__setitem__(label, parts.get(label, 0.0) + _width(delta)))
        got["width"] = float((-lb[GATE_ROWS:] - lb[:GATE_ROWS]).mean())
        raise _Done

    engine.node_bounds = grab
    try:
        compute_bounds(graph, x, EPS, "crown", intermediate="crown")
    except _Done:
        pass
    finally:
        engine.node_bounds = orig
    got["terms"] = sum(parts.values())
    return got, sorted(((k, v / got["width"]) for k, v in parts.items()), key=lambda kv: -kv[1])


class _Done(Exception):
    pass


def _width(delta) -> float:
    """What a term of the walk adds to the mean width of the spec rows ([lower rows; upper rows])."""
    return float(-(delta[:GATE_ROWS] + delta[GATE_ROWS:]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=1 (a smoke run)")
    ap.add_argument("--T", type=int, default=8, help="tokens (default 8, the issue's configuration)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "crown_cost.md"))
    args = ap.parse_args(argv)
    T = 1 if args.quick else args.T
    shape = dataclasses.replace(_models.QWEN3_0_6B, num_hidden_layers=2)
    path = _models.write_qwen3_gguf(os.path.join(tempfile.mkdtemp(prefix="gamma-cost-"), "qwen3-2.gguf"), shape)
    model = load(path)
    g = model.graph(seq_len=T)
    block = "layer1"
    sub = g.block_graph(block)
    x = evaluate(g, model.input_point(seq_len=T).x, keep_all=True)[sub.input]
    r32, r64 = matmul_rate(torch.float32), matmul_rate(torch.float64)
    log(f"matmul rate: float32 {r32 / 1e9:.1f}, float64 {r64 / 1e9:.1f} GFLOP/s")

    lines = ["### Where CROWN's time and width go (Qwen3-0.6B shape, one block)", ""]
    lines += machine(sys.argv[1:])[:1] + [f"- command: `python benchmarks/crown_cost.py {' '.join(sys.argv[1:])}`"]
    lines += machine([])[2:6] + [""]
    lines += [f"Block {block} of a two-block model of the Qwen3-0.6B shape (random, GGUF Q8_0), T={T}, "
              f"epsilon {EPS:g}. Matmul rate of this machine in this run, `(1024, 1024) @ (1024, 2048)`, "
              f"median of 7: float32 **{r32 / 1e9:.1f} GFLOP/s**, float64 **{r64 / 1e9:.1f} GFLOP/s**.", ""]
    totals = {}
    for inter in ("crown", "cut"):
        timed_rows, secs = passes(sub, x, inter, count=False)
        log(f"{inter}: {secs:.1f} s ({load_avg()})")
        counted, _ = passes(sub, x, inter, count=True)
        flops = {r[0]: r[5] for r in counted}
        rows, tot_f = [], 0.0
        for name, op, shp, stop, s, _ in timed_rows:
            f = flops.get(name, 0.0)
            tot_f += f
            rows.append([name, op, "x".join(map(str, shp)), stop, fmt_s(s), f"{f / 1e9:.1f}",
                         f"{f / s / 1e9:.1f}" if s > 0 else "-", fmt_s(f / r32), f"{s / (f / r32):.1f}x" if f else "-"])
        totals[inter] = (secs, tot_f)
        lines += [f"**intermediate {inter}**: whole `compute_bounds` call {fmt_s(secs)} s, "
                  f"products {tot_f / 1e9:.0f} GFLOP, floor {fmt_s(tot_f / r32)} s ({load_avg()}).", ""]
        lines += table(["pass (node)", "op", "shape", "stops at", "seconds", "product GFLOP", "GFLOP/s",
                        "floor s", "seconds / floor"], rows) + [""]
    lines += [f"Over the {BLOCKS} blocks of the real shape, the products alone need at least "
              + "; ".join(f"{inter}: {fmt_s(BLOCKS * f / r32)} s ({BLOCKS * f / r32 / 60:.1f} min; measured "
                          f"{fmt_s(BLOCKS * s)} s, {BLOCKS * s / 60:.1f} min, per-block time x {BLOCKS})"
                          for inter, (s, f) in totals.items())
              + " at this machine's float32 matmul rate, with nothing else costing anything.", ""]

    got, shares = gate_width(sub, x, block)
    log(f"gate width {got['width']:.4g} (terms {got['terms']:.4g})")
    lines += [f"**Width of `{block}.mlp.gate`** (first {GATE_ROWS} spec rows, full walk, float32 margins): "
              f"mean {got['width']:.4g} (the traced terms sum to {got['terms']:.4g}). Share of it per term "
              f"the walk charges (`crown.backward(..., trace=)`):", ""]
    lines += table(["term", "share"], [[k, f"{100 * v:.1f}%"] for k, v in shares[:10]])
    lines += ["", "`:margin`: the node's float32 rounding margin (plus the error of gamma's own float32 "
              "transpose of a linear node); `:rule`: the constant of the node's rule (the remainder of its "
              "linear relaxation); `:box`: the block input's box (epsilon)."]
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
