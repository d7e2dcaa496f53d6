"""Bounds through depth: certified widths beside attacked ones, the rounding floor and
the float32-vs-float64 difference a float32 engine shows, per real model, scope and epsilon.

For every case (a block on its nominal input +- eps, or the whole model):

* certified max width in the default mode (``float32``: rounding of any float32 engine
  included) and with ``--arithmetic real`` (the real-valued function only), CROWN;
* attacked max width (box samples + PGD on the widest and on random outputs, both ways,
  ``gamma.attack.attack_range``) and the certified / attacked ratio: of the max widths, and the
  median and worst per attacked output;
* rounding floor: the certified max width at epsilon 0 (default mode);
* the same two (certified and floor) with ``--arithmetic float32-probabilistic`` (the dot products'
  rounding under a probabilistic model, :mod:`gamma.bounds.fpprob`), per output over the same
  attacked outputs;
* float32 difference: the largest |float32 forward - float64 forward| at the centre (gamma's own
  float32 forward of the same graph, the engine whose rounding the floor bounds);
* seconds per bound.

``--compare-with REV`` bounds every case also with the code of git revision REV (a temporary
worktree, in a subprocess, one case after the other in the same run) and shows both.
``--layernorm-variance formula`` bounds the float32 modes with that option and shows the default's
beside them (its own section); ``two-pass`` likewise, beside ``formula`` (its own section).

    python benchmarks/depth.py [--models whisper,smollm2] [--eps 1e-3] [--whole]
                               [--smollm2-blocks 0,15,29] [--compare-with REV] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OLD = os.environ.get("GAMMA_DEPTH_SRC")          # set in the subprocess that runs another revision
sys.path.insert(0, OLD or os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from gamma.bounds import compute_bounds  # noqa: E402
from gamma.io import load_checkpoint  # noqa: E402
try:
    from gamma.io import zoo  # noqa: E402
except ImportError:                               # --compare-with a revision from before zoo moved to gamma.io
    from gamma import zoo  # noqa: E402
from gamma import Model  # noqa: E402
from gamma.ops import evaluate  # noqa: E402

T = 8
PROB = "float32-probabilistic"
SECTION = "10. Bounds through depth"
WHOLE_SECTION = "13. Bounds through depth, whole model"
FORMULA_SECTION = "15. LayerNorm's variance by a formula (--layernorm-variance formula)"
TWO_PASS_SECTION = "16. LayerNorm's variance by two passes (--layernorm-variance two-pass)"
# an option's run shows this setting beside it, in the same run, and writes this section
AGAINST = {"formula": ("any", FORMULA_SECTION), "two-pass": ("formula", TWO_PASS_SECTION)}


def cases(models, whole: bool, smollm2_blocks):
    """(label, model path, scope): scope None is the whole model, else a block name."""
    out = []
    if "whisper" in models:
        path = zoo.whisper_tiny_en()
        if whole != "only":
            out += [("Whisper tiny.en", path, f"layer{i}") for i in range(4)]
        if whole:
            out.append(("Whisper tiny.en", path, None))
    if "smollm2" in models and whole != "only":
        out += [("SmolLM2-135M", zoo.smollm2_135m(), f"layer{i}") for i in smollm2_blocks]
    return out


_MODELS: dict = {}


def graph_and_point(path, scope):
    if path not in _MODELS:
        _MODELS[path] = Model(load_checkpoint(path))
    model = _MODELS[path]
    g = model.graph(seq_len=T)
    x = model.input_point(seq_len=T).x
    if scope is None:
        return g, x
    vals = evaluate(g, x, keep_all=True)
    bg = g.block_graph(scope)
    return bg, vals[bg.input].contiguous()


def bounds(path, scope, eps, layernorm_variance=None, skip=(), norm_splits=1):
    """Certified bounds of one case: default mode, real arithmetic, the rounding floor, and the
    probabilistic mode's two; ``layernorm_variance``: the option, where given (another revision
    may not have it); ``skip``: keys not to compute; ``norm_splits`` > 1: the bounds at eps with
    that many pieces of each norm's mean square (the floors without: at eps 0 no scale moves)."""
    g, x = graph_and_point(path, scope)
    extra = {} if layernorm_variance is None else {"layernorm_variance": layernorm_variance}
    out = {}
    for key, e, arith in (("f32", eps, "float32"), ("real", eps, "real"), ("floor", 0.0, "float32"),
                          ("prob", eps, PROB), ("prob_floor", 0.0, PROB)):
        if arith == PROB and OLD or key in skip:  # another revision: it may not have the mode
            continue
        t0 = time.perf_counter()
        if norm_splits > 1 and e > 0:
            from gamma.bounds import Tunings
            extra["tunings"] = Tunings(norm_splits=norm_splits)
        else:
            extra.pop("tunings", None)
        r = compute_bounds(g, x, e, "crown", arithmetic=arith, allow_zero=True, **extra)
        out[key] = {"lower": r.lower.reshape(-1).tolist(), "upper": r.upper.reshape(-1).tolist(),
                    "seconds": time.perf_counter() - t0}
    return out


def bounds_elsewhere(src, path, scope, eps):
    """:func:`bounds` run by the code in ``src`` (another revision's worktree)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        dest = f.name
    cmd = [sys.executable, __file__, "--one", json.dumps([path, scope, eps]), "--json-out", dest]
    subprocess.run(cmd, check=True, env={**os.environ, "GAMMA_DEPTH_SRC": src})
    with open(dest) as f:
        got = json.load(f)
    os.unlink(dest)
    return got


def attacked(path, scope, eps, lower, upper):
    from gamma.attack import AttackConfig, attack_range
    g, x = graph_and_point(path, scope)
    fn = lambda xx: evaluate(g, xx)
    a = attack_range(fn, x, eps, lower.reshape(g.output_shape), upper.reshape(g.output_shape),
                     AttackConfig(samples=64, steps=20, restarts=2, widest=8, others=8))
    return a


def f32_difference(path, scope):
    import copy
    g, x = graph_and_point(path, scope)
    g32 = copy.deepcopy(g).to(dtype=torch.float32)
    return float((evaluate(g32, x.float()).double() - evaluate(g, x)).abs().max())


def target_mode(res) -> str:
    """The mode whose widest outputs the attack pushes: the default mode's where its bounds are
    finite everywhere, else the probabilistic mode's, else real arithmetic's (an unbounded output
    says nothing about which outputs move most, so it would leave the attack aiming at random)."""
    for key in ("f32", "prob", "real"):
        if key in res and bool(torch.isfinite(_w(res[key])).all()):
            return key
    return "real"


def outside(a, res, skip) -> int:
    """Outputs whose attacked range leaves the certified bounds of a mode other than ``skip``
    (the attack counts its own mode's violations itself), summed over the modes at eps."""
    n = 0
    for key in ("f32", "real", "prob"):
        if key in res and key != skip:
            lo = torch.tensor(res[key]["lower"], dtype=torch.float64)
            hi = torch.tensor(res[key]["upper"], dtype=torch.float64)
            n += int(((a.lower.reshape(-1) < lo) | (a.upper.reshape(-1) > hi)).sum())
    return n


def _w(b):
    return torch.tensor(b["upper"], dtype=torch.float64) - torch.tensor(b["lower"], dtype=torch.float64)


def measure(label, path, scope, eps, src, layernorm_variance=None, norm_splits=1):
    """One row.  ``layernorm_variance`` "formula" or "two-pass": every float32 mode with that option,
    and beside it ("old") the same case with :data:`AGAINST`'s setting, in the same process;
    ``norm_splits``: this code's bounds at eps with that many pieces (:func:`bounds`)."""
    new = bounds(path, scope, eps, layernorm_variance, norm_splits=norm_splits)
    if layernorm_variance not in (None, "any"):
        old = bounds(path, scope, eps, AGAINST[layernorm_variance][0], skip=("real",))  # real: no margins, the same
    else:
        old = bounds_elsewhere(src, path, scope, eps) if src else None
    w = _w(new["f32"])
    key = target_mode(new)
    a = attacked(path, scope, eps, torch.tensor(new[key]["lower"]), torch.tensor(new[key]["upper"]))
    aw = a.width().reshape(-1)
    t = a.targets
    per = (w[t] / aw[t].clamp_min(1e-300)).tolist()
    per_real = (_w(new["real"])[t] / aw[t].clamp_min(1e-300)).tolist()
    per_prob = (_w(new["prob"])[t] / aw[t].clamp_min(1e-300)).tolist()
    row = {"model": label, "scope": scope or "whole", "eps": eps, "attacked": float(aw.max()),
           "violations": a.violations + outside(a, new, skip=key), "targets_from": key,
           "f32_diff": f32_difference(path, scope)}
    for tag, res in (("new", new), ("old", old)):
        if res is None:
            continue
        for key in ("f32", "real", "floor", "prob", "prob_floor"):
            if key in res:
                row[f"{tag}_{key}"] = float(_w(res[key]).max())
                row[f"{tag}_{key}_s"] = res[key]["seconds"]
    row["median_ratio"], row["worst_ratio"] = statistics.median(per), max(per)
    row["median_ratio_real"], row["worst_ratio_real"] = statistics.median(per_real), max(per_real)
    row["median_ratio_prob"], row["worst_ratio_prob"] = statistics.median(per_prob), max(per_prob)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _g(v):
    return "inf" if v == float("inf") else f"{v:.3g}"


def _secs(r, tag, keys=("f32", "real", "floor", "prob", "prob_floor")) -> str:
    return " / ".join(f"{r[f'{tag}_{k}_s']:.1f}" for k in keys if f"{tag}_{k}_s" in r)


def _attack_note(rows) -> str:
    """Which bounds chose the attacked outputs, and the violations over every mode and row."""
    names = {"prob": "the probabilistic mode's", "real": "real arithmetic's"}
    other = [r for r in rows if r["targets_from"] != "f32"]
    text = "The attack pushes the widest outputs of the default mode's bounds"
    if other:
        text += ("; where those are unbounded, of " + " or ".join(sorted({names[r["targets_from"]] for r in other}))
                 + " (" + ", ".join(f"{r['scope']} eps {r['eps']:g}: {names[r['targets_from']]}" for r in other) + ")")
    return text + f". Outputs of the attack outside any mode's bounds: {sum(r['violations'] for r in rows)}."


def table(rows, rev) -> list[str]:
    have_old = any("old_f32" in r for r in rows)
    head = ["model", "scope", "eps", "attacked max width", "certified (float32)", "ratio", "median / worst per output",
            "certified (real)", "ratio (real)", "rounding floor", "float32 diff", "floor / diff",
            "seconds (float32 / real / floor)", "certified (probabilistic)", "ratio (probabilistic)",
            "median / worst per output (probabilistic)", "rounding floor (probabilistic)",
            "floor (probabilistic) / diff", "seconds (probabilistic / its floor)"]
    old_prob = any("old_prob" in r for r in rows)
    if have_old:
        head[4:4] = [f"certified (float32) at {rev}"]
        head += [f"rounding floor at {rev}"]
        if old_prob:
            head += [f"certified (probabilistic) at {rev}", f"rounding floor (probabilistic) at {rev}"]
        head += [f"seconds at {rev}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["scope"], f"{r['eps']:g}", _g(r["attacked"])]
        if have_old:
            cells.append(_g(r["old_f32"]))
        cells += [_g(r["new_f32"]), _g(r["new_f32"] / r["attacked"]),
                  f"{r['median_ratio']:.3g} / {r['worst_ratio']:.3g}",
                  _g(r["new_real"]), _g(r["new_real"] / r["attacked"]), _g(r["new_floor"]), _g(r["f32_diff"]),
                  _g(r["new_floor"] / max(r["f32_diff"], 1e-300)), _secs(r, "new", ("f32", "real", "floor")),
                  _g(r["new_prob"]), _g(r["new_prob"] / r["attacked"]),
                  f"{r['median_ratio_prob']:.3g} / {r['worst_ratio_prob']:.3g}", _g(r["new_prob_floor"]),
                  _g(r["new_prob_floor"] / max(r["f32_diff"], 1e-300)), _secs(r, "new", ("prob", "prob_floor"))]
        if have_old:
            cells += [_g(r["old_floor"])]
            if old_prob:
                cells += [_g(r["old_prob"]) if "old_prob" in r else "-",
                          _g(r["old_prob_floor"]) if "old_prob_floor" in r else "-"]
            cells += [_secs(r, "old")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="whisper,smollm2")
    ap.add_argument("--eps", default="1e-3")
    ap.add_argument("--whole", action="store_true", help="also the whole Whisper encoder (minutes per bound)")
    ap.add_argument("--whole-only", action="store_true", help="only the whole Whisper encoder")
    ap.add_argument("--smollm2-blocks", default="0,15,29")
    ap.add_argument("--compare-with", default=None, metavar="REV")
    ap.add_argument("--layernorm-variance", default="any", choices=("any", "formula", "two-pass"),
                    help="formula: every float32 mode with --layernorm-variance formula, beside the default's "
                         "(in place of --compare-with; its own section); two-pass likewise, beside formula")
    ap.add_argument("--norm-splits", type=int, default=1, metavar="K",
                    help="this code's bounds at eps with K pieces of each norm's mean square (--norm-splits)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:                                   # subprocess mode: bounds of one case with this code
        path, scope, eps = json.loads(args.one)
        with open(args.json_out, "w") as f:
            json.dump(bounds(path, scope, eps), f)
        return 0
    formula = args.layernorm_variance in AGAINST
    if formula and args.compare_with:
        ap.error(f"--layernorm-variance {args.layernorm_variance} compares with "
                 f"{AGAINST[args.layernorm_variance][0]} in the same run: no --compare-with")
    src = None
    if args.compare_with:
        src = tempfile.mkdtemp(prefix="gamma-rev-")
        subprocess.run(["git", "worktree", "add", "--detach", src, args.compare_with], check=True,
                       capture_output=True)
    try:
        rows = [measure(lbl, p, s, float(e), src, args.layernorm_variance if formula else None, args.norm_splits)
                for e in args.eps.split(",")
                for lbl, p, s in cases(args.models.split(","), "only" if args.whole_only else args.whole,
                                       [int(b) for b in args.smollm2_blocks.split(",")])]
    finally:
        if src:
            subprocess.run(["git", "worktree", "remove", "--force", src], check=False)
    section, text = section_text(args, rows, os.getloadavg()[0], src is not None)
    emit(text, args.out, section)
    return 0


def section_text(args, rows, load: float, compared: bool) -> tuple:
    """(section title, markdown) of the measured ``rows`` for the command line ``args``."""
    lv = args.layernorm_variance
    splits = getattr(args, "norm_splits", 1)
    formula = lv in AGAINST
    section = AGAINST[lv][1] if formula else WHOLE_SECTION if args.whole_only else SECTION
    lines = [f"## {section}", "",
             f"CROWN, T={T}, `python benchmarks/depth.py --models {args.models} --eps {args.eps}"
             + (" --whole" if args.whole else "") + (" --whole-only" if args.whole_only else "")
             + (f" --compare-with {args.compare_with}" if compared else "")
             + (f" --layernorm-variance {lv}" if formula else "")
             + (f" --norm-splits {splits}" if splits > 1 else "")
             + f"` (load average {load:.1f} at the end). Block rows: the block on its nominal input +- eps. "
             "Ratios: certified / attacked max width; per output: over the attacked outputs. Rounding floor: "
             "certified width at eps 0; float32 diff: largest |float32 - float64| of gamma's forward at the centre. "
             + _attack_note(rows)
             + (f" Every float32 mode with `--layernorm-variance {lv}`; the columns marked 'at "
                f"--layernorm-variance {AGAINST[lv][0]}' are the same case with that setting, in the same run."
                if formula else "")
             + (f" This code's bounds at eps with `--norm-splits {splits}` (the rounding floors without: at eps 0 "
                "no norm's scale moves)." if splits > 1 else ""),
             ""] + table(rows, f"--layernorm-variance {AGAINST[lv][0]}" if formula else args.compare_with) + [""]
    return section, "\n".join(lines)


def emit(text: str, out, section: str) -> None:
    """Print a benchmark's section and, with ``out``, write it into that markdown file."""
    print(text)
    if out:
        _write_section(out, text, section)


def _write_section(path, text, section):
    """Replace (or append) this script's section of the markdown file."""
    old = open(path).read() if os.path.exists(path) else ""
    start = old.find(f"## {section}\n")
    if start < 0:                                  # new: before the run log, after the other tables
        at = old.find("\n## Run time")
        new = old.rstrip("\n") + "\n\n" + text if at < 0 else old[:at] + "\n" + text + old[at:]
    else:
        end = old.find("\n## ", start + 3)
        new = old[:start] + text + ("" if end < 0 else old[end:])
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    sys.exit(main())
