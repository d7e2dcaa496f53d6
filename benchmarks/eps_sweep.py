"""Where a block's certificate breaks down: certified against attacked width over a range of epsilon.

For each real Whisper tiny.en encoder block (on its nominal input +- eps, T=8, CROWN) and each eps:
the attacked max width (box samples + PGD on the widest and on random outputs), and the certified
max width and its ratio to the attack (of the max widths, and the median per attacked output) in real
arithmetic and in the default mode (float32 engines), the default mode also with ``--norm-splits K``.

Beside them, the eps at which this block's box would be as wide as the same block's inside the
whole encoder at eps 1e-4 and 1e-3: ``E * median_i(f_whole,i / f_block,i)`` over the elements i of the
block's attention norm output, f the first-order range per unit eps (``sum_j |dy_i/dx_j|``, with x
the whole encoder's input for f_whole and the block's input for f_block). That is how large a box
the block's relaxations see in a whole-model pass.

    python benchmarks/eps_sweep.py [--blocks layer0,layer2] [--eps 3e-4,1e-3,3e-3,1e-2] [--norm-splits 4]
                                   [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import depth  # noqa: E402
from first_order import first_order_range  # noqa: E402
from gamma.bounds import Tunings, compute_bounds  # noqa: E402

SECTION = "18. Where a block's certificate breaks down (epsilon sweep)"
WHOLE_EPS = (1e-4, 1e-3)


def certified(g, x, eps, arithmetic, splits):
    t0 = time.perf_counter()
    r = compute_bounds(g, x, eps, "crown", arithmetic=arithmetic, tunings=Tunings(norm_splits=splits))
    return r, time.perf_counter() - t0


def ratios(r, a) -> tuple:
    """(max-width ratio, median per attacked output) of bounds ``r`` against attack ``a``."""
    wc = (r.upper - r.lower).reshape(-1)
    wa = a.width().reshape(-1)
    t = a.targets.reshape(-1)
    per = [float(wc[i] / wa[i]) for i in t.tolist() if wa[i] > 0]
    return float(wc.max() / wa.max()), statistics.median(per) if per else float("nan")


def equivalent_eps(path, blocks) -> dict:
    """block -> {E: the block eps whose attention-norm box matches the whole encoder's at E}."""
    g, x = depth.graph_and_point(path, None)
    whole = first_order_range(g, x.double())
    out = {}
    for b in blocks:
        bg, bx = depth.graph_and_point(path, b)
        own = first_order_range(bg, bx.double())
        name = f"{b}.attn_norm"
        out[b] = equivalent(whole[name], own[name], WHOLE_EPS)
    return out


def equivalent(f_whole: torch.Tensor, f_block: torch.Tensor, whole_eps) -> dict:
    """{E: E times the median over elements of f_whole / f_block} (first-order ranges per unit eps of
    the same node in the whole model and in the block alone; elements whose f_block is below 1e-3 of
    its largest are left out)."""
    f_w, f_b = f_whole.reshape(-1), f_block.reshape(-1)
    ok = f_b > 1e-3 * f_b.max()
    m = float((f_w[ok] / f_b[ok]).median())
    return {e: e * m for e in whole_eps}


def measure(path, block, eps, splits) -> dict:
    g, x = depth.graph_and_point(path, block)
    real, t_real = certified(g, x, eps, "real", 1)
    f32, t_f32 = certified(g, x, eps, "float32", 1)
    f32k, t_f32k = certified(g, x, eps, "float32", splits)
    a = depth.attacked(path, block, eps, f32k.lower, f32k.upper)
    row = {"block": block, "eps": eps, "attacked": float(a.width().max()), "violations": a.violations,
           "seconds": (t_real, t_f32, t_f32k)}
    for key, r in (("real", real), ("f32", f32), ("f32k", f32k)):
        row[key] = float((r.upper - r.lower).max())
        row[key + "_ratio"], row[key + "_median"] = ratios(r, a)
    # every mode's bounds against the attack's points (its range): none may lie outside
    for r in (real, f32):
        lo, hi = r.lower.reshape(-1), r.upper.reshape(-1)
        row["violations"] += int(((a.lower.reshape(-1) < lo) | (a.upper.reshape(-1) > hi)).sum())
    print(f"{block} eps {eps:g}: attacked {row['attacked']:.3g}, real {row['real']:.3g} "
          f"(x{row['real_ratio']:.3g}), default {row['f32']:.3g} (x{row['f32_ratio']:.3g}), "
          f"K={splits} {row['f32k']:.3g} (x{row['f32k_ratio']:.3g})", file=sys.stderr, flush=True)
    return row


def _g(v: float) -> str:
    return f"{v:.3g}"


def section_text(args, rows, equiv, load: float) -> str:
    k = args.norm_splits
    lines = [f"## {SECTION}", "",
             f"Whisper tiny.en encoder blocks, CROWN, T={depth.T}, `python benchmarks/eps_sweep.py --blocks "
             f"{args.blocks} --eps {args.eps} --norm-splits {k}` (load average {load:.1f} at the end). A block on its "
             "nominal input +- eps. Ratios: certified / attacked max width, and the median over the attacked "
             "outputs (the attack pushes the widest and random outputs of the default mode's bounds with "
             f"`--norm-splits {k}`). Outputs of the attack outside any mode's bounds: "
             f"{sum(r['violations'] for r in rows)}.", "",
             f"| block | eps | attacked max width | certified (real) | ratio / median (real) | certified (default) "
             f"| ratio / median (default) | certified (default, --norm-splits {k}) | ratio / median "
             f"(default, --norm-splits {k}) | seconds (real / default / --norm-splits {k}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = " / ".join(f"{v:.1f}" for v in r["seconds"])
        lines.append(f"| {r['block']} | {r['eps']:g} | {_g(r['attacked'])} | {_g(r['real'])} | "
                     f"{_g(r['real_ratio'])} / {_g(r['real_median'])} | {_g(r['f32'])} | "
                     f"{_g(r['f32_ratio'])} / {_g(r['f32_median'])} | {_g(r['f32k'])} | "
                     f"{_g(r['f32k_ratio'])} / {_g(r['f32k_median'])} | {s} |")
    lines += ["", "The box a block sees inside the whole encoder, as the eps of a block-wise run with an "
              "attention-norm box as wide (median over its elements of the first-order ranges' ratio):", "",
              "| block | whole encoder at eps 1e-4 | whole encoder at eps 1e-3 |", "|---|---|---|"]
    for b, e in equiv.items():
        lines.append(f"| {b} | {e[1e-4]:.2g} | {e[1e-3]:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="layer0,layer2")
    ap.add_argument("--eps", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--norm-splits", type=int, default=4, metavar="K")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = depth.zoo.whisper_tiny_en()
    blocks = args.blocks.split(",")
    rows = [measure(path, b, float(e), args.norm_splits) for b in blocks for e in args.eps.split(",")]
    equiv = equivalent_eps(path, blocks)
    depth.emit(section_text(args, rows, equiv, os.getloadavg()[0]), args.out, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
