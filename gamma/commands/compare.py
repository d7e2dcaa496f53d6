"""``gamma compare`` (certified difference over a box) and ``gamma diff`` (point-wise, node by node).

``add_parser`` adds both subcommands (``gamma.cli.build_parser`` calls it).
``run_compare`` / ``run_diff`` return the exit status (0); user errors are
raised as :class:`~gamma.errors.GammaError` for the CLI to print.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from .. import compare as lib
from ..bounds import METHODS
from ..bounds.engine import INTERMEDIATE
from ..options import ARITHMETIC, ENGINES, LAYERNORM_VARIANCE
from .common import Progress, add_input_options, input_kwargs, num, print_json, seconds, table, warn_engine


def _input_options(p: argparse.ArgumentParser) -> None:
    add_input_options(p, "input point (the REFERENCE's; the centre of the box)")


def add_parser(subparsers) -> None:
    """Add the ``compare`` and ``diff`` subcommands."""
    s = subparsers.add_parser(
        "compare", help="certified max |REFERENCE - TARGET| over an L-inf box",
        description="Can two versions of a model (same architecture and sizes, any formats) differ by more "
                    "than TOLERANCE anywhere in [x - eps, x + eps]? Bounds one difference network (shared "
                    "input, identical sub-computations merged) and attacks the difference. Verdict: equivalent "
                    "(certified max <= T), not equivalent (an input with |difference| > T was found) or unknown.")
    s.add_argument("reference", metavar="REFERENCE", help="reference checkpoint (its input point is used)")
    s.add_argument("target", metavar="TARGET", help="target checkpoint")
    _input_options(s)
    s.add_argument("--epsilon", required=True, metavar="E", help="box radius (L-inf)")
    s.add_argument("--tolerance", required=True, type=float, metavar="T", help="allowed max |difference|")
    s.add_argument("--method", choices=METHODS, default="crown", help="bound method (default crown)")
    s.add_argument("--block-wise", action="store_true",
                   help="compare block by block, each fed the reference's nominal block input +- eps")
    s.add_argument("--blocks", metavar="SEL", help="blocks for --block-wise: 0:4, 3 or 0,2,5")
    s.add_argument("--save-counterexample", metavar="FILE.npy",
                   help="write an input whose |difference| exceeds the tolerance (float64), if found")
    s.add_argument("--naive", action=argparse.BooleanOptionalAction, default=False,
                   help="also bound each model on its own and report the naive bound [l_ref - u_tgt, u_ref - l_tgt] "
                        "(two more whole-model bounds: as long as gamma verify on each model; default off)")
    s.add_argument("--no-merge", dest="merge", action="store_false",
                   help="do not merge identical computations (bounds then also hold for two different engines)")
    s.add_argument("--samples", type=int, default=256, metavar="N", help="random box samples (default 256)")
    s.add_argument("--attack-steps", type=int, default=20, metavar="N", help="PGD steps (default 20; 0: none)")
    s.add_argument("--restarts", type=int, default=2, metavar="N", help="PGD restarts (default 2)")
    s.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    s.add_argument("--intermediate", choices=INTERMEDIATE, default="crown",
                   help="bounds of intermediate nodes for crown/alpha (default crown)")
    s.add_argument("--arithmetic", choices=ARITHMETIC, default="float32",
                   help="what the bounds hold for, as in gamma verify: float32 (default: float32 engines, "
                        "rounding included), float32-probabilistic or real")
    s.add_argument("--layernorm-variance", choices=LAYERNORM_VARIANCE, default="any",
                   help="as in gamma verify: formula for engines that compute LayerNorm's variance by "
                        "E[x^2] - E[x]^2 or mean((x - mean)^2) (CTranslate2, llama.cpp), two-pass for "
                        "mean((x - mean)^2) only (llama.cpp, whisper.cpp)")
    s.add_argument("--engine", choices=ENGINES, default="float32",
                   help="as in gamma verify: float32 (default) or llama.cpp (both models GGUF files as ggml's CPU "
                        "backend runs them)")
    s.add_argument("--norm-splits", type=int, default=1, metavar="K",
                   help="as in gamma verify: each norm's mean square in K pieces for the nodes after it, in both "
                        "models (default 1: no split; K > 1 needs --method crown or alpha, --intermediate crown)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--alpha-iters", type=int, default=20, metavar="N", help="alpha-CROWN iterations")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=run_compare)

    d = subparsers.add_parser(
        "diff", help="point-wise: every node of REFERENCE vs TARGET at the input point",
        description="Evaluate both models (float64) at the reference's input point and compare the output "
                    "and every intermediate node (matched by name); name the first node whose max |difference| "
                    "exceeds TOLERANCE (default 0: the first node that differs at all).")
    d.add_argument("reference", metavar="REFERENCE")
    d.add_argument("target", metavar="TARGET")
    _input_options(d)
    d.add_argument("--tolerance", type=float, default=0.0, metavar="T", help="default 0")
    d.add_argument("--json", action="store_true", help="one JSON object on stdout")
    d.set_defaults(func=run_diff)


def _progress(args):
    """On a terminal one rewritten status line; in a log a line at most every 30 s (as gamma verify)."""
    if args.quiet:
        return None, lambda: None
    p = Progress.for_stderr(True)
    return p, p.done


def run_compare(args) -> int:
    progress, done = _progress(args)
    try:
        res = lib.compare(args.reference, args.target, args.epsilon, args.tolerance, args.method,
                          block_wise=args.block_wise, blocks=args.blocks, merge=args.merge, naive=args.naive,
                          samples=args.samples, attack_steps=args.attack_steps, restarts=args.restarts,
                          seed=args.seed, intermediate=args.intermediate, device=args.device,
                          alpha_iters=args.alpha_iters, progress=progress, arithmetic=args.arithmetic,
                          layernorm_variance=args.layernorm_variance, engine=args.engine,
                          norm_splits=args.norm_splits, **input_kwargs(args))
    finally:
        done()
    for who in ("reference", "target"):
        warn_engine(res.report[who], res.report, f"{who}: ")
    saved = bool(args.save_counterexample) and res.save_counterexample(args.save_counterexample)
    res.report["counterexample_file"] = args.save_counterexample if saved else None
    if args.json:
        print_json(res.report)
    else:
        print("\n".join(compare_lines(res.report)))
    return 0


def run_diff(args) -> int:
    rep = lib.diff(args.reference, args.target, tolerance=args.tolerance, **input_kwargs(args))
    if args.json:
        print_json(rep)
    else:
        print("\n".join(diff_lines(rep)))
    return 0


# ------------------------------------------------------------------ text
def _models(r: dict) -> list[str]:
    def one(m):
        types = ", ".join(f"{k} x{v}" for k, v in sorted(m["dtypes"].items(), key=lambda kv: -kv[1]))
        return f"{m['arch']} ({m['format']}; {types}) {m['path']}"
    ip = r["input_point"]
    return [f"reference  {one(r['reference'])}", f"target     {one(r['target'])}",
            f"input      {ip['description']}, shape {tuple(ip['shape'])}, {r['component']} -> {r['output']}"]


def _ratio(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"x{v:.3g}"


def compare_lines(r: dict, top: int = 5) -> list[str]:
    mode = "block-wise" if r["mode"] == "block_wise" else "full network"
    lines = _models(r) + [f"run        {mode}, method {r['method']}, epsilon {r['epsilon']:g}, "
                          f"tolerance {num(r['tolerance'])}" + ("" if r["merged"] else ", no merging")
                          + (f", arithmetic {r['arithmetic']}" if r.get("arithmetic", "float32") != "float32" else "")
                          + (f", layernorm variance {r['layernorm_variance']}"
                             if r.get("layernorm_variance", "any") != "any" else "")
                          + (f", engine {r['engine']}" if r.get("engine", "float32") != "float32" else "")
                          + (f", norm splits {r['norm_splits']}" if r.get("norm_splits", 1) > 1 else "")]
    if r["mode"] == "full":
        g = r["difference_graph"]
        lines.append(f"network    {g['nodes']} nodes, {g['shared_nodes']} shared of {g['reference_nodes']} + "
                     f"{g['target_nodes']}" + ("; outputs identical: difference exactly 0" if g["identical"] else ""))
        lines += ["", "max |reference - target| over the box:"]
        naive = r["naive_max"] is not None
        rows = [["certified (difference network)", num(r["certified_max"]), num(r["certified_width"])]]
        rows += [["naive (independent bounds)", num(r["naive_max"]), num(r["naive_width"])]] if naive else []
        rows += [["empirical (samples + PGD)", num(r["empirical_max"]), ""],
                 ["at the input point", num(r["nominal_max"]), ""]]
        lines += ["  " + s for s in table(["", "max |diff|", "bound width"], rows, "lrr")]
        lines.append(f"  gain (naive width / certified width) {_ratio(r['gain'])}; {r['points']} points evaluated"
                     if naive else f"  {r['points']} points evaluated; naive bounds not computed (--naive)")
        if len(r["per_position"]) > 1:
            lines += ["", "per position:"]
            lines += ["  " + s for s in table(
                ["#", "certified"] + (["naive"] if naive else []) + ["empirical"],
                [[p["index"], num(p["certified_max"])] + ([num(p["naive_max"])] if naive else [])
                 + [num(p["empirical_max"])] for p in r["per_position"]], "rrrr")]
        s = r["seconds"]
        lines.append(f"time       bounds {seconds(s['bounds'])}, " + (f"naive {seconds(s['naive'])}, " if naive else "")
                     + f"attack {seconds(s['attack'])}, total {seconds(r['timings']['total'])}")
    else:
        lines += ["", "blocks by drift (max |reference - target| over each block's box):"]
        rows = sorted(r["blocks"], key=lambda b: -lib.drift_key(b["certified_max"]))
        naive = any(b["naive_max"] is not None for b in rows)
        lines += ["  " + s for s in table(
            ["#", "block", "certified"] + (["naive", "gain"] if naive else []) + ["empirical", "shared", "verdict",
                                                                                  "time"],
            [[b["block_index"], b["block_name"], num(b["certified_max"])]
             + ([num(b["naive_max"]), _ratio(b["gain"])] if naive else [])
             + [num(b["empirical_max"]), f"{b['difference_graph']['shared_nodes']}", b["verdict"] or "-",
                seconds(sum(b["seconds"].values()))] for b in rows], "rlr" + ("rr" if naive else "") + "rrlr")]
        lines.append(f"time       total {seconds(r['timings']['total'])}")
    if r.get("violations"):
        lines.append(f"WARNING    {r['violations']} attacked differences fall outside the certified bounds")
    if r.get("counterexample_file"):
        where = f" (input of {r['counterexample_block']})" if r.get("counterexample_block") else ""
        lines.append(f"counterexample written to {r['counterexample_file']}{where}")
    if r.get("verdict"):
        lines.append(f"verdict    {r['verdict'].upper()}")
    return lines


def diff_lines(r: dict) -> list[str]:
    lines = _models(r)
    lines.append(f"output     {r['output_node']}: max |reference - target| {num(r['output_max_abs_diff'])} "
                 f"(tolerance {num(r['tolerance'])})")
    f = r["first_exceeding"]
    lines.append(f"first node over tolerance: {f['name']} ({f['layer_type']}, max |diff| {num(f['max_abs_diff'])})"
                 if f else "no node exceeds the tolerance")
    if r["blocks"]:
        lines += ["", "blocks:"]
        lines += ["  " + s for s in table(
            ["block", "output diff", "max node diff", "worst node"],
            [[b["block_name"], num(b["output_diff"]), num(b["max_node_diff"]), b["worst_node"]]
             for b in r["blocks"]], "lrrl")]
    lines += ["", "nodes:"]
    lines += ["  " + s for s in table(
        ["node", "op", "max |diff|", "max |ref|", "relative"],
        [[n["name"], n["layer_type"], num(n["max_abs_diff"]), num(n["max_abs_reference"]), num(n["relative"])]
         for n in r["nodes"]], "llrrr")]
    for key, label in (("only_in_reference", "only in reference"), ("only_in_target", "only in target")):
        if r[key]:
            lines.append(f"{label}: {', '.join(r[key])}")
    return lines
