"""Tightness per method on real blocks: certified width / empirical width.

For each block and method, the empirical width of an output element is the
spread (max - min) of that element over box samples and a PGD attack that
pushes it up and down; the attack targets the K elements with the largest
certified width.  1.0 is the limit; larger means looser.

    python benchmarks/tightness.py [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gamma.io import zoo                      # noqa: E402
from gamma.attack import pgd_points, sample_points   # noqa: E402
from gamma.bounds import compute_bounds    # noqa: E402
from gamma.io import load_checkpoint       # noqa: E402
from gamma import Model                     # noqa: E402
from gamma.ops import evaluate             # noqa: E402


def tightness(bg, x, eps, method, k=8, **kw):
    r = compute_bounds(bg, x, eps, method, **kw)
    w = r.width().reshape(-1)
    fn = lambda xx: evaluate(bg, xx)
    gen = torch.Generator().manual_seed(0)
    targets = torch.topk(torch.nan_to_num(w, posinf=1e300), k).indices
    pts = torch.cat([sample_points(x, eps, 256, gen),
                     pgd_points(fn, x, eps, w.numel(), gen, targets=targets, steps=30, restarts=2)])
    with torch.no_grad():
        ys = torch.cat([fn(c).reshape(len(c), -1) for c in torch.split(pts, 64)])
    emp = ys.max(0).values - ys.min(0).values
    inside = bool(((ys >= r.lower.reshape(-1)) & (ys <= r.upper.reshape(-1))).all())
    ratio_max = (w.max() / emp.max()).item()
    per = (w[targets] / emp[targets].clamp_min(1e-300))
    return dict(cert=w.max().item(), emp=emp.max().item(), ratio=ratio_max, median_target_ratio=per.median().item(),
                seconds=r.seconds, sound=inside)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--methods", default="ibp,zonotope,crown,alpha")
    ap.add_argument("--models", default="whisper,smollm2", help="which real models (comma-separated)")
    ap.add_argument("--smollm2-seq-len", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = [("whisper-tiny.en encoder", zoo.whisper_tiny_en(), 8, ["layer0", "layer3"]),
             ("SmolLM2-135M Q4_1", zoo.smollm2_135m(), args.smollm2_seq_len, ["layer1", "layer15", "layer29"])]
    keep = {"whisper": "whisper", "smollm2": "SmolLM2"}
    cases = [c for c in cases if any(keep[m] in c[0] for m in args.models.split(",") if m in keep)]
    if args.quick:
        cases = [(n, p, t, b[:1]) for n, p, t, b in cases]
    rows = []
    for name, path, T, blocks in cases:
        model = Model(load_checkpoint(path))
        ip = model.input_point(seq_len=T)
        g = model.graph(seq_len=T)
        vals = evaluate(g, ip.x, keep_all=True)
        for blk in blocks:
            bg = g.block_graph(blk)
            x = vals[bg.input]
            for method in args.methods.split(","):
                kw = {"intermediate": "cut"} if method in ("crown", "alpha") and "Smol" in name else {}
                t = tightness(bg, x, args.eps, method, alpha_iters=10, **kw)
                rows.append((name, T, blk, method, kw.get("intermediate", ""), t))
                print(f"{name} T={T} {blk} {method}: cert {t['cert']:.4g} emp {t['emp']:.4g} "
                      f"ratio {t['ratio']:.3g} median {t['median_target_ratio']:.3g} {t['seconds']:.1f}s "
                      f"sound={t['sound']}", file=sys.stderr, flush=True)
    lines = [f"### Tightness at epsilon {args.eps:g} (certified max width / empirical max width; 1.0 is the limit)", "",
             "| model | T | block | method | certified max width | empirical max width | ratio | median ratio (top-8 outputs) | seconds | samples inside |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, T, blk, method, inter, t in rows:
        m = method + (f" ({inter})" if inter else "")
        lines.append(f"| {name} | {T} | {blk} | {m} | {t['cert']:.4g} | {t['emp']:.4g} | {t['ratio']:.3g} | "
                     f"{t['median_target_ratio']:.3g} | {t['seconds']:.1f} | {'yes' if t['sound'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
