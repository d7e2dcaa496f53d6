"""Bounds for llama.cpp's arithmetic (``--engine llama.cpp``) on the real SmolLM2-135M (Q4_1).

Per block (on its nominal input +- eps, T=8, CROWN, default mode): the float32-engine bounds and the
llama.cpp-engine bounds, at eps 0 (the floor) and at eps; llama.cpp's output as ggml computes it
(tests/ggml_emu.py, an emulation of ggml's reference kernels) at the centre, its largest difference
from the float64 function, whether each bound contains it, and the emulated engine's attacked width
(its range over the centre and random points of the box) with certified / attacked.

``--compare-with REV`` also bounds every block with the llama.cpp engine of git revision REV (a
temporary worktree, in a subprocess, in the same run) and shows its widths beside today's.

    python benchmarks/llamacpp.py [--blocks 0,15,29] [--eps 1e-3] [--samples 16] [--compare-with REV]
                                  [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

OLD = os.environ.get("GAMMA_LLAMACPP_SRC")        # set in the subprocess that runs another revision
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if OLD:
    sys.path.insert(0, OLD)

import torch  # noqa: E402

from _common import load_avg, table  # noqa: E402
from depth import emit, graph_and_point  # noqa: E402
from gamma.bounds import compute_bounds  # noqa: E402
from gamma.io import load_checkpoint, zoo  # noqa: E402
from gamma.ops import evaluate  # noqa: E402
from ggml_emu import Engine  # noqa: E402

SECTION = "17. llama.cpp's arithmetic (--engine llama.cpp)"


def measure(path, ck, block: int, eps: float, samples: int) -> dict:
    g, x = graph_and_point(path, f"layer{block}")
    engine = Engine(g, path, ck.config.rope_theta)
    centre = engine(x)
    gen = torch.Generator().manual_seed(0)
    ys = [centre] + [engine(x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1))
                     for _ in range(samples)]
    stack = torch.stack(ys)
    attacked = float((stack.amax(0) - stack.amin(0)).max())
    row = {"block": block, "diff": float((centre - evaluate(g, x)).abs().max()), "attacked": attacked}
    for tag, e in (("floor", 0.0), ("eps", eps)):
        for name in ("float32", "llama.cpp"):
            t0 = time.perf_counter()
            r = compute_bounds(g, x, e, "crown", engine=name, allow_zero=True)
            w = r.upper - r.lower
            pts = ys if e else [centre]
            row[f"{name} {tag}"] = {"max": float(w.max()), "median": float(w.median()),
                                    "outside": sum(int(((y < r.lower) | (y > r.upper)).sum()) for y in pts),
                                    "seconds": time.perf_counter() - t0}
    return row


def engine_widths(path, block: int, eps: float) -> dict:
    """The llama.cpp engine's max / median widths at the floor and at eps (another revision's code
    where this process runs it)."""
    g, x = graph_and_point(path, f"layer{block}")
    out = {}
    for tag, e in (("floor", 0.0), ("eps", eps)):
        r = compute_bounds(g, x, e, "crown", engine="llama.cpp", allow_zero=True)
        w = r.upper - r.lower
        out[tag] = {"max": float(w.max()), "median": float(w.median())}
    return out


def widths_elsewhere(src: str, block: int, eps: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        dest = f.name
    subprocess.run([sys.executable, __file__, "--one", json.dumps([block, eps]), "--json-out", dest], check=True,
                   env={**os.environ, "GAMMA_LLAMACPP_SRC": src, "GAMMA_DEPTH_SRC": src})
    with open(dest) as f:
        got = json.load(f)
    os.unlink(dest)
    return got


def _w(d) -> str:
    return f"{d['max']:.3g} / {d['median']:.3g}"


def section(rows, eps: float, samples: int, load: str, rev=None) -> str:
    head = ["block", "llama.cpp - float64 at the centre", "float32 engine: floor", f"float32 engine: eps {eps:g}",
            "llama.cpp outside the float32 bounds", "llama.cpp engine: floor", f"llama.cpp engine: eps {eps:g}",
            "llama.cpp outside its bounds", "attacked (llama.cpp emulation)", "certified / attacked (llama.cpp)",
            "seconds (float32 / llama.cpp, eps)"]
    if rev:
        head += [f"llama.cpp engine at {rev}: floor", f"llama.cpp engine at {rev}: eps {eps:g}"]
    body = []
    for r in rows:
        f0, fe, l0, le = r["float32 floor"], r["float32 eps"], r["llama.cpp floor"], r["llama.cpp eps"]
        ratio = le["max"] / r["attacked"] if r["attacked"] > 0 else float("inf")
        body.append([f"layer{r['block']}", f"{r['diff']:.3g}", _w(f0), _w(fe), f0["outside"] + fe["outside"],
                     _w(l0), _w(le), l0["outside"] + le["outside"], f"{r['attacked']:.3g}", f"{ratio:.3g}",
                     f"{fe['seconds']:.1f} / {le['seconds']:.1f}"])
        if rev:
            body[-1] += [_w(r["before"]["floor"]), _w(r["before"]["eps"])]
    lines = [f"## {SECTION}", "",
             f"Real SmolLM2-135M (Q4_1), CROWN, T=8, default mode, a block on its nominal input +- eps, "
             f"`python benchmarks/llamacpp.py` (load average {load} at the end). Widths: max / median. "
             f"llama.cpp: tests/ggml_emu.py's emulation of ggml's CPU kernels (Q8_1 activations, F16 KV cache, "
             f"ggml's RoPE angles and RMSNorm); its outputs at the centre and {samples} random points of the box are "
             f"checked against both bounds (elements outside, summed over the floor and eps), and their range "
             f"is the attacked width."
             + (f" The last two columns: the llama.cpp engine of revision {rev}, in the same run." if rev else ""), ""]
    lines += table(head, body)
    lines += ["", "* The float32-engine bounds (transformers' arithmetic) do not contain llama.cpp's outputs: its "
                  "activation quantization moves them far beyond float32 rounding. The llama.cpp-engine bounds "
                  "contain them and are vacuous on this model: docs/depth.md, fourteenth and fifteenth rounds.",
              "* What narrows them (fifteenth round): a Q8 conversion whose box pins it is a constant in the CROWN "
              "walk, the pieces' rounding (by their cancellation) replaces a quantized linear layer's float32 margin, Q8_1's sum error is charged for its roundings only, and RMSNorm's margin "
              "follows ggml_rms_norm's double sum. They stay vacuous because the conversions that the box does "
              "not pin (a rounding boundary inside it) are charged at up to half a step each with the worst sign: "
              "with those spreads set to zero (a diagnostic, not a bound) block 15's floor would be 0.057.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--compare-with", metavar="REV")
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)               # [block, eps]: engine_widths only (a subprocess)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = zoo.smollm2_135m()
    if args.one:
        block, eps = json.loads(args.one)
        with open(args.json_out, "w") as f:
            json.dump(engine_widths(path, block, eps), f)
        return 0
    ck = load_checkpoint(path)
    src = None
    if args.compare_with:
        src = tempfile.mkdtemp(prefix="gamma-rev-")
        subprocess.run(["git", "worktree", "add", "--detach", src, args.compare_with], check=True, capture_output=True)
    rows = []
    try:
        for b in (int(v) for v in args.blocks.split(",")):
            rows.append(measure(path, ck, b, args.eps, args.samples))
            if src:
                rows[-1]["before"] = widths_elsewhere(src, b, args.eps)
            print(rows[-1], flush=True)
    finally:
        if src:
            subprocess.run(["git", "worktree", "remove", "--force", src], check=False)
    emit(section(rows, args.eps, args.samples, load_avg(), args.compare_with), args.out, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
