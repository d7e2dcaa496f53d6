"""``gamma verify``: bound the output over an L-inf box (full, layer by layer or block-wise).

``--vnnlib`` runs go to :func:`gamma.commands.vnncomp.run_verify`.
"""

from __future__ import annotations

import argparse

from .. import report
from ..verify import ARITHMETIC, INTERMEDIATE, METHODS, check_epsilon, verify
from .common import Progress, add_input_options, check_writable, input_kwargs, print_json
from .vnncomp import add_verify_options
from .vnncomp import run_verify as run_vnnlib


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "verify", help="bound the output over an L-inf box",
        description="Bound the output over the L-inf box [x - eps, x + eps]. Without MODEL: block-wise "
                    "CROWN at epsilon 1e-3 on the default real model (Whisper tiny.en encoder).")
    s.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint (default: Whisper tiny.en)")
    s.add_argument("--native", action="store_true", help="accepted for gamma-crown compatibility (no effect)")
    s.add_argument("--method", choices=METHODS, default="crown", help="bound method (default crown)")
    s.add_argument("--epsilon", default=None, metavar="E", help="box radius (default 1e-3)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--block-wise", action="store_true", help="verify every block on its own")
    mode.add_argument("--layer-by-layer", action="store_true", help="width growth node by node")
    mode.add_argument("--full", action="store_true", help="whole network (the default when MODEL is given)")
    s.add_argument("--blocks", metavar="SEL", help="blocks for --block-wise: 0:4, 3 or 0,2,5")
    s.add_argument("--worst-k", type=int, default=5, metavar="K", help="worst blocks listed (default 5)")
    s.add_argument("--tolerance", type=float, metavar="T", help="verified iff every output width <= T")
    s.add_argument("--property", metavar="FILE", help="gamma's own VNN-LIB subset: (assert (<= Y_i c)) lines that "
                   "MUST HOLD (the opposite of standard VNN-LIB, whose assertions state the unsafe region: use "
                   "--vnnlib for that)")
    s.add_argument("--save-bounds", metavar="FILE.npz", help="write input, lower, upper, nominal arrays "
                                                            "(and the attacked lower / upper)")
    s.add_argument("--attack", action=argparse.BooleanOptionalAction, default=None,
                   help="attack the bounds inside the same box (samples + PGD on gamma's float64 forward) and show "
                        "attacked width and certified/attacked ratio beside the certified figures (default: on "
                        "with --block-wise, off otherwise)")
    add_input_options(s)
    s.add_argument("--intermediate", choices=INTERMEDIATE, default="crown",
                   help="bounds of intermediate nodes for crown/alpha: crown (default), cut (CROWN back to the nearest normalised residual and attention@V by the half-sum product relaxation: cheaper, looser) or ibp")
    s.add_argument("--arithmetic", choices=ARITHMETIC, default="float32",
                   help="float32 (default): bounds hold for any float32 engine, rounding included; real: bounds of "
                        "the real-valued function only, as auto_LiRPA computes them (not a float32 guarantee)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--alpha-iters", type=int, default=20, metavar="N", help="alpha-CROWN iterations")
    g = s.add_argument_group("scale-out (--block-wise)")
    g.add_argument("--workers", type=int, metavar="N", help="blocks in N local processes (cores / N threads each)")
    g.add_argument("--ray", metavar="ADDRESS", help="blocks as Ray tasks: auto, local or host:port (pip install ray)")
    g.add_argument("--checkpoint", metavar="FILE", help="append finished blocks here; a rerun skips them")
    add_verify_options(s)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=run)


def run(args) -> int:
    if args.vnnlib:
        return run_vnnlib(args)
    raw = "1e-3" if args.epsilon is None else args.epsilon
    eps = check_epsilon(raw, shown=raw)
    check_writable(args.save_bounds)
    block_wise = args.block_wise or (args.model is None and not args.layer_by_layer and not args.full)
    progress = Progress.for_stderr(not args.quiet)
    try:
        result = verify(args.model, eps, args.method, block_wise=block_wise, layer_by_layer=args.layer_by_layer,
                        blocks=args.blocks, tolerance=args.tolerance, property=args.property,
                        worst_k=args.worst_k, intermediate=args.intermediate, device=args.device,
                        alpha_iters=args.alpha_iters, workers=args.workers, ray=args.ray,
                        checkpoint=args.checkpoint, progress=progress, arithmetic=args.arithmetic,
                        attack=args.attack, **input_kwargs(args))
    finally:
        progress.done()
    if args.save_bounds:
        result.save_bounds(args.save_bounds)
    if args.json:
        print_json(result.to_dict())
    else:
        print("\n".join(report.verify_lines(result.report)))
        for b in result.report.get("blocks", []):
            if b["status"] == "FAILED":
                print(f"block {b['block_name']} FAILED: {b['error']}")
        if args.save_bounds:
            print(f"bounds written to {args.save_bounds}")
    return 0
