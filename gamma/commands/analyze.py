"""``gamma analyze [MODEL]``: block-wise sensitivity against weight norms, as report.md + plots."""

from __future__ import annotations

import argparse
import os

from ..analyze import analyze, check_verify_report, load_verify_json, write_report
from ..errors import GammaError
from ..extras import require
from ..norms import DEFAULT_EXACT_LIMIT, weight_norms
from ..options import METHODS, BoundOptions
from ..verify import InputSpec, RunSpec, load, run as run_verification
from .common import Progress, print_json, table

DEFAULT_OUT = "gamma-report"
# verify options: (attribute, default when analyze runs the verification itself)
VERIFY_DEFAULTS = {"method": "crown", "epsilon": "1e-3", "component": None, "seq_len": 8, "tokens": None,
                   "center": None, "blocks": None}


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "analyze", help="why blocks differ: sensitivity vs weight norms (report.md + plots)",
        description="Run a block-wise verification (or read one with --from-json), compute the weight norms "
                    "of the same blocks, and correlate: per block sensitivity, max spectral norm, total "
                    "Frobenius norm, amplification; across blocks Pearson r (raw, log10), Spearman rho and "
                    "the top-5 overlap.  Writes report.md and three PNG plots.  Without MODEL: Whisper tiny.en.")
    s.add_argument("model", metavar="MODEL", nargs="?",
                   help="checkpoint (default: the --from-json report's model, else Whisper tiny.en)")
    g = s.add_argument_group("verification (when not --from-json)")
    g.add_argument("--method", choices=METHODS, default=None, help="bound method (default crown)")
    g.add_argument("--epsilon", default=None, metavar="E", help="box radius (default 1e-3)")
    g.add_argument("--component", choices=("encoder", "decoder"), help="Whisper: encoder (default) or decoder")
    g.add_argument("--seq-len", type=int, default=None, metavar="T", help="sequence length (default 8)")
    g.add_argument("--tokens", metavar="IDS", help="decoder token ids, e.g. 1,2,3 (sets --seq-len)")
    g.add_argument("--center", choices=("zeros", "default"), help="zeros: all-zero input point")
    g.add_argument("--blocks", metavar="SEL", help="blocks to verify: 0:4, 3 or 0,2,5 (default all)")
    s.add_argument("--from-json", metavar="FILE", help="use this `gamma verify --block-wise --json` output")
    s.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT}/)")
    s.add_argument("--exact-limit", type=int, default=DEFAULT_EXACT_LIMIT, metavar="N",
                   help=f"exact SVD up to N*N entries, Lanczos above (default {DEFAULT_EXACT_LIMIT})")
    s.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    s.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=run)


def _verify_report(args, progress) -> tuple[dict, object]:
    """(block-wise verify report, loaded model)."""
    given = [k for k, v in VERIFY_DEFAULTS.items() if getattr(args, k) is not None]
    if args.from_json:
        if given:
            raise GammaError(f"--{given[0].replace('_', '-')} applies when analyze runs the verification; "
                             f"{args.from_json} already holds one")
        report = load_verify_json(args.from_json)
        path = args.model or (report.get("model") or {}).get("path")
        if not path or not os.path.exists(path):
            raise GammaError(f"{args.from_json}: its model {path!r} is not here; give MODEL")
        progress("loading model")
        return report, load(path)
    opts = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in VERIFY_DEFAULTS.items()}
    options = BoundOptions(opts["epsilon"], opts["method"])
    inputs = InputSpec(opts["component"], opts["seq_len"], opts["tokens"],
                       center=None if opts["center"] == "default" else opts["center"])
    spec = RunSpec("block_wise", opts["blocks"])
    progress("loading model")
    model = load(args.model)
    result = run_verification(model, options, inputs, spec, progress)
    report = result.to_dict()
    check_verify_report(report)
    return report, model


def run(args) -> int:
    require("gamma analyze", "matplotlib")      # before the verification, not after it
    if args.exact_limit < 1:
        raise GammaError(f"--exact-limit must be a positive integer, got {args.exact_limit}")
    progress = Progress.for_stderr(not args.quiet)
    try:
        report, model = _verify_report(args, progress)
        norms = weight_norms(model.ckpt, exact_limit=args.exact_limit, components=[report["component"]],
                             progress=progress)
        result = analyze(report, norms)
        progress("writing report")
        paths = write_report(result, args.out)
    finally:
        progress.done()
    if args.json:
        print_json({**result, "files": paths})
    else:
        print("\n".join(summary_lines(result, paths)))
    return 0


def _e(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3e}"


def _r(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.3f}"


def _x(v) -> str:
    return "n/a" if v is None or v != v else "inf" if v == float("inf") else f"x{v:.3g}"


def summary_lines(a: dict, paths: list[str]) -> list[str]:
    m = a["model"]
    lines = [f"model    {m.get('arch')} {a['component']} ({m.get('format')}) {m.get('path')}",
             f"run      block-wise, method {a['method']}, epsilon {a['epsilon']:g}, seq_len {a['seq_len']}", ""]
    at = a.get("attacked")
    lines += table(["#", "block", "sensitivity"] + (["attacked", "ratio"] if at else [])
                   + ["max spectral", "part", "total fro", "amplification"],
                   [[r["index"], r["block"], _e(r["sensitivity"])]
                    + ([_e(r["attacked_sensitivity"]), _x(r["ratio"])] if at else [])
                    + [f"{r['max_spectral']:.4g}", r["max_spectral_part"], f"{r['total_frobenius']:.4g}",
                       _e(r["amplification"])] for r in a["blocks"]], "rlr" + ("rr" if at else "") + "rlrr")
    lines.append("")
    sources = [("certified", a)] + ([("attacked", at)] if at else [])
    for which, src in sources:
        for key, label in (("correlation", "max spectral"), ("correlation_frobenius", "total Frobenius")):
            c = src[key]
            lines.append(f"{which} sensitivity vs {label}: Pearson r {_r(c['pearson'])}, "
                         f"log10 {_r(c['pearson_log10'])}, Spearman rho {_r(c['spearman'])} (n={c['n']})")
    if at:
        verdict = {True: "agree", False: "DISAGREE", None: "n/a"}[at["agree"]]
        lines.append(f"certified vs attacked ranking: Spearman rho {_r(at['rank_agreement'])} (n={at['n']}), "
                     f"{verdict}; top block {at['top_certified']} certified, {at['top_attacked']} attacked")
    t = a["top"]
    lines.append(f"top {t['k']} overlap: {t['overlap']}/{t['k']}"
                 + (f" ({', '.join(t['overlap_blocks'])})" if t["overlap_blocks"] else ""))
    lines.append(f"wrote {', '.join(paths)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only this command."""
    p = argparse.ArgumentParser(prog="gamma")
    add_parser(p.add_subparsers(dest="command"))
    return p
