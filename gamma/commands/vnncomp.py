"""VNN-COMP style commands.

* ``gamma verify MODEL.onnx --vnnlib PROP.vnnlib [--timeout S] [--counterexample FILE] [--json]``:
  one instance (:mod:`gamma.vnnverify`); the options are added to ``verify``'s parser.
* ``gamma vnncomp DIR [--every K] [--out results.csv] [--reference CSV]``: a
  benchmark folder's ``instances.csv``, one subprocess per instance with a hard
  timeout (:mod:`gamma.vnncomp`), VNN-COMP result rows and a summary against
  a published results CSV.
"""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import GammaError
from ..vnncomp import run_benchmark, summary_lines
from ..vnnverify import result_lines, verify_vnnlib, write_counterexample
from .common import Progress, check_writable, print_json


def add_verify_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("standard VNN-LIB (VNN-COMP)")
    g.add_argument("--vnnlib", metavar="FILE", help="standard VNN-LIB property (plain or .gz): its assertions state "
                   "the UNSAFE region; answers unsat (verified), sat (counterexample), unknown or timeout. MODEL "
                   "is an ONNX file; the pipeline is PGD attack, CROWN with the property as the last layer, "
                   "then alpha-CROWN if time remains, on the real-valued network")
    g.add_argument("--timeout", default=None, metavar="S", help="seconds for --vnnlib (default 100)")
    g.add_argument("--counterexample", metavar="FILE", help="write the VNN-COMP result file (the result line, and "
                   "for sat the confirmed counterexample)")


# options of plain verify that mean nothing with --vnnlib
_NOT_WITH_VNNLIB = (("property", "--property"), ("block_wise", "--block-wise"),
                    ("layer_by_layer", "--layer-by-layer"), ("save_bounds", "--save-bounds"),
                    ("tolerance", "--tolerance"))


def _timeout(raw) -> float:
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise GammaError(f"--timeout must be a finite number of seconds > 0, got {raw}")
    return t


def run_verify(args) -> int:
    """``gamma verify MODEL --vnnlib FILE``."""
    for attr, flag in _NOT_WITH_VNNLIB:
        if getattr(args, attr, None):
            raise GammaError(f"{flag} does not apply with --vnnlib")
    if getattr(args, "engine", "float32") != "float32":          # an ONNX graph has no GGUF weights
        raise GammaError(f"--engine {args.engine} does not apply with --vnnlib")
    if args.model is None:
        raise GammaError("--vnnlib needs MODEL (an ONNX file)")
    timeout = _timeout("100" if args.timeout is None else args.timeout)
    if args.counterexample:
        check_writable(args.counterexample)
    progress = None
    if not args.quiet and sys.stderr.isatty():
        progress = Progress(enabled=True, live=True)
    try:
        result = verify_vnnlib(args.model, args.vnnlib, timeout=timeout, alpha_iters=args.alpha_iters,
                               progress=progress)
    finally:
        if progress is not None:
            progress.done()
    if args.counterexample:
        write_counterexample(args.counterexample, result)
    if args.json:
        print_json(result.to_dict())
    else:
        print("\n".join(result_lines(result)))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "vnncomp", help="run a VNN-COMP benchmark folder (instances.csv)",
        description="Run every (or every K-th) instance of a VNN-COMP benchmark folder, each in its own process "
                    "with the instance's timeout, and summarise the results against a published results CSV.")
    s.add_argument("dir", metavar="DIR", help="benchmark folder with instances.csv, onnx/ and vnnlib/")
    s.add_argument("--every", type=int, default=1, metavar="K", help="every K-th instance (default 1: all)")
    s.add_argument("--out", metavar="FILE.csv", help="write VNN-COMP result rows here")
    s.add_argument("--reference", metavar="CSV", help="published results to compare with (default: the "
                   "folder's results-*.csv, if there is one)")
    s.add_argument("--timeout-scale", type=float, default=1.0, metavar="F", help="scale each instance's timeout")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--quiet", action="store_true", help="no line per instance on stderr")
    s.set_defaults(func=run_vnncomp)


def run_vnncomp(args) -> int:
    if args.every < 1:
        raise GammaError(f"--every must be a positive integer, got {args.every}")
    if not (math.isfinite(args.timeout_scale) and args.timeout_scale > 0):
        raise GammaError(f"--timeout-scale must be a finite number > 0, got {args.timeout_scale}")
    check_writable(args.out)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_benchmark(args.dir, every=args.every, out=args.out, reference=args.reference,
                           timeout_scale=args.timeout_scale, log=log)
    if args.json:
        print_json(report)
    else:
        print("\n".join(summary_lines(report)))
    return 0
