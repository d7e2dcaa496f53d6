"""LayerNorm / RMSNorm, softmax and attention relaxations in CROWN, side by side in one process.

Six variants (engine tunings, :class:`gamma.bounds.Tunings`), alternated per case (the machine is
noisy), each adding to the one before:

* ``mean-value``: the mean-value form alone (J0 plus a remainder summed over
  the row) for norms and softmax, what gamma used before;
* ``decomposed``: norms take per row the smaller of that and the decomposed
  form (``w (c s) + b`` relaxed step by step, ``norm_decomposed``), intermediate quantities from the box;
* ``+ internals``: as decomposed, with CROWN bounds of the norms' centred
  input and mean square (``norm_internals``);
* ``+ softmax decomposed``: also softmax takes per row the smaller of its
  mean-value and decomposed forms (``exp(x_i) / sum exp``, ``softmax_decomposed``);
* ``+ row remainders``: the decomposed forms' shared remainders (inverse
  scale, mean square, 1/Z, the row sum of exp) charged once per row
  (``RowRemainder``, ``row_remainder``) instead of once per entry;
* ``+ attention planes``: the default: attention @ V by McCormick planes
  chosen per sign of Lambda instead of their half-sum (``matmul_planes``).

Cases: the pre-LN Whisper block of ``benchmarks/autolirpa.py`` (width 64, 16
tokens, where auto_LiRPA runs) at eps 1e-3 and 1e-2, Whisper tiny.en block 0
and SmolLM2-135M block 15.  Writes a markdown table
(``benchmarks/out/norm_relax.md`` by default).

    python benchmarks/norm_relax.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

from gamma.bounds import Tunings, compute_bounds  # noqa: E402
from gamma.ops import evaluate  # noqa: E402
from gamma.verify import load  # noqa: E402

from _common import ROOT, fmt_s, load_avg, log, machine, table, write_markdown, zoo_models  # noqa: E402

VARIANTS = ("mean-value", "decomposed", "+ internals", "+ softmax decomposed", "+ row remainders",
            "+ attention planes")


def tunings(variant: str) -> Tunings:
    k = VARIANTS.index(variant)
    return Tunings(norm_decomposed=k >= 1, norm_internals=k >= 2, softmax_decomposed=k >= 3, row_remainder=k >= 4,
                   matmul_planes=k >= 5)


def cases(quick: bool):
    """(label, graph, block input, eps list)."""
    import autolirpa
    cfg = autolirpa.QUICK[0]
    job = autolirpa.prepare(cfg, tempfile.mkdtemp(prefix="gamma-normrelax-"))
    yield f"pre-LN Whisper block {cfg.label}", job["graph"], job["x"], (1e-3,) if quick else (1e-3, 1e-2)
    if quick:
        return
    paths = zoo_models(["whisper", "smol"])
    for key, (block, T) in {"whisper": ("layer0", 8), "smol": ("layer15", 4)}.items():
        if key not in paths:
            log(f"{key}: not installed, skipped")
            continue
        model = load(paths[key])
        g = model.graph(seq_len=T) if key == "smol" else model.graph("encoder", T)
        x = model.input_point(seq_len=T).x if key == "smol" else model.input_point("encoder", T).x
        sub = g.block_graph(block)
        xb = evaluate(g, x, keep_all=True)[sub.input]
        yield f"{'SmolLM2-135M' if key == 'smol' else 'Whisper tiny.en'} {block}, T={T}", sub, xb, (1e-3,)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the width-64 block at eps 1e-3 only")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "norm_relax.md"))
    args = ap.parse_args(argv)
    rows = []
    for label, g, x, epss in cases(args.quick):
        for eps in epss:
            got = {}
            for v in VARIANTS:
                t0 = time.perf_counter()
                res = compute_bounds(g, x, eps, "crown", tunings=tunings(v))
                dt = time.perf_counter() - t0
                w = res.upper - res.lower
                got[v] = (float(w.mean()), float(w.max()), dt)
                log(f"{label} eps {eps:g} {v}: mean width {got[v][0]:.4g}, {dt:.1f}s")
            base = got["mean-value"]
            for v in VARIANTS:
                m, mx, dt = got[v]
                rows.append([label, f"{eps:g}", v, f"{m:.4g}", f"{mx:.4g}", f"{base[0] / m:.2f}",
                             fmt_s(dt), f"{dt / base[2]:.2f}", load_avg()])
    lines = ["### LayerNorm / RMSNorm, softmax and attention relaxations in CROWN (side by side, one process)", ""]
    lines += machine(sys.argv[1:])[:1] + [f"- command: `python benchmarks/norm_relax.py {' '.join(sys.argv[1:])}`"]
    lines += machine([])[2:6] + [""]
    lines += table(["case", "eps", "variant", "mean width", "max width", "mean-value / this (mean)",
                    "CROWN s", "time / mean-value", "load"], rows)
    lines += ["", "Bounds of the block output, `compute_bounds(..., 'crown')` (intermediate bounds by CROWN), "
              "float32 margins included. Variants alternate within each case; see the module docstring."]
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
