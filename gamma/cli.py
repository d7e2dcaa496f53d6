"""The ``gamma`` command: ``inspect``, ``forward`` and ``verify``.

Every user error (a :class:`~gamma.errors.GammaError` or a bad option) is one
line ``gamma: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from . import __version__, report
from .commands import vnncomp
from .errors import GammaError
from .verify import ARITHMETIC, INTERMEDIATE, METHODS, check_epsilon, forward, load, verify

DEFAULT_EPSILON = 1e-3


class _Parser(argparse.ArgumentParser):
    """argparse with gamma's one-line error format (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"gamma: error: {message}\n")


def _add_input_options(p: argparse.ArgumentParser, title: str = "input point (the centre of the box)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--component", choices=("encoder", "decoder"),
                   help="Whisper: encoder (default) or decoder; decoder LMs: decoder")
    g.add_argument("--seq-len", type=int, default=8, metavar="T",
                   help="sequence length (Whisper encoder: T frames = 2T mel columns; default 8)")
    g.add_argument("--tokens", metavar="IDS", help="decoder token ids, e.g. 1,2,3 (sets --seq-len)")
    g.add_argument("--input", dest="input_path", metavar="FILE.npy", help="the exact input array")
    g.add_argument("--center", choices=("zeros", "default"), help="zeros: all-zero input (as gamma-crown)")
    g.add_argument("--output", choices=("hidden", "logits"), default="hidden",
                   help="output point: final hidden state (default) or logits (decoders)")


# further subcommands, each in gamma/commands/<name>.py with add_parser(subparsers)
COMMAND_MODULES = ("weights", "analyze", "compare", "regress", "vnncomp")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gamma", description="Certified lower/upper bounds for real transformer checkpoints.")
    p.add_argument("--version", action="version", version=f"gamma {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="what a checkpoint contains")
    s.add_argument("model", metavar="MODEL", help="checkpoint file or directory")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("forward", help="nominal output at the input point (float32 .npy)")
    s.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint (default: Whisper tiny.en)")
    _add_input_options(s)
    s.add_argument("--out", required=True, metavar="Y.npy", help="write the output here (float32)")
    s.add_argument("--save-input", metavar="X.npy", help="write the exact input array used (float64)")
    s.set_defaults(func=cmd_forward)

    s = sub.add_parser(
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
    _add_input_options(s)
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
    vnncomp.add_verify_options(s)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=cmd_verify)

    for name in COMMAND_MODULES:          # each module adds its own subcommands
        importlib.import_module(f"gamma.commands.{name}").add_parser(sub)
    return p


# ------------------------------------------------------------------ commands
def cmd_inspect(args) -> int:
    info = report.describe(load(args.model))
    _emit(info, report.inspect_lines, args.json)
    return 0


def _input_kwargs(args) -> dict:
    return dict(component=args.component, seq_len=args.seq_len, tokens=args.tokens,
                input_path=args.input_path, center=None if args.center == "default" else args.center,
                output=args.output)


def _check_writable(*paths: Optional[str]) -> None:
    """Fail before a long run, not after it, when an output file cannot be created."""
    for path in paths:
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise GammaError(f"{path}: cannot write (no such directory {folder})")
        if os.path.isdir(path):
            raise GammaError(f"{path}: cannot write (is a directory)")


def cmd_forward(args) -> int:
    _check_writable(args.out, args.save_input)
    res = forward(load(args.model), **_input_kwargs(args))
    y = res.output.detach().cpu().numpy().astype(np.float32)
    _save_npy(args.out, y)
    if args.save_input:
        _save_npy(args.save_input, res.input.detach().cpu().numpy())
    extra = f", input -> {args.save_input}" if args.save_input else ""
    print(f"wrote {args.out}: output {tuple(y.shape)} float32 ({res.component}, {res.point.description}{extra})")
    return 0


def cmd_verify(args) -> int:
    if args.vnnlib:
        return vnncomp.run_verify(args)
    raw = "1e-3" if args.epsilon is None else args.epsilon
    eps = check_epsilon(raw, shown=raw)
    _check_writable(args.save_bounds)
    block_wise = args.block_wise or (args.model is None and not args.layer_by_layer and not args.full)
    progress = _Progress(enabled=not args.quiet, live=sys.stderr.isatty())
    try:
        result = verify(args.model, eps, args.method, block_wise=block_wise, layer_by_layer=args.layer_by_layer,
                        blocks=args.blocks, tolerance=args.tolerance, property=args.property,
                        worst_k=args.worst_k, intermediate=args.intermediate, device=args.device,
                        alpha_iters=args.alpha_iters, workers=args.workers, ray=args.ray,
                        checkpoint=args.checkpoint, progress=progress, arithmetic=args.arithmetic,
                        attack=args.attack, **_input_kwargs(args))
    finally:
        progress.done()
    if args.save_bounds:
        result.save_bounds(args.save_bounds)
    if args.json:
        print(json.dumps(result.to_dict(), allow_nan=False))
    else:
        print("\n".join(report.verify_lines(result.report)))
        for b in result.report.get("blocks", []):
            if b["status"] == "FAILED":
                print(f"block {b['block_name']} FAILED: {b['error']}")
        if args.save_bounds:
            print(f"bounds written to {args.save_bounds}")
    return 0


# ------------------------------------------------------------------ helpers
def _emit(data: dict, lines, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, allow_nan=False))
    else:
        print("\n".join(lines(data)))


def _save_npy(path: str, arr: np.ndarray) -> None:
    try:
        with open(path, "wb") as f:
            np.save(f, arr)
    except OSError as e:
        raise GammaError(f"{path}: cannot write ({e.strerror or e})") from None


class _Progress:
    """Progress on stderr: on a terminal one rewritten status line (the message
    and the elapsed time); otherwise (a log file, a CI job) a plain line at
    most every ``every`` seconds, the first after ``every`` seconds, so that
    a long run leaves a heartbeat of what it is doing and a short one none."""

    def __init__(self, enabled: bool, live: bool = True, every: float = 30.0):
        self.enabled = enabled
        self.live = live
        self.every = every
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.width = 0

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.live:
            if now - self.last >= self.every:
                sys.stderr.write(f"gamma: {message} [{now - self.t0:.1f}s]\n")
                sys.stderr.flush()
                self.last = now
            return
        line = f"gamma: {message} [{now - self.t0:.1f}s]"
        cols = _columns() - 1
        line = line[:cols]
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def done(self) -> None:
        if self.enabled and self.live and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def _columns() -> int:
    try:
        cols = os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        cols = 0
    return cols if cols > 20 else 80


# options whose value may start with '-' ("-1e-3", "-inf"), which argparse would take for an option
_NUMERIC_OPTIONS = ("--epsilon", "--tolerance", "--timeout")


def _join_numeric(argv: Sequence[str]) -> list[str]:
    """``--epsilon -inf`` -> ``--epsilon=-inf`` so that the value gets gamma's own check."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _NUMERIC_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = _join_numeric(sys.argv[1:] if argv is None else list(argv))
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:          # --help, --version, bad options (already reported)
            return e.code if isinstance(e.code, int) else 2
        if args.command is None:
            raise GammaError("choose a command: inspect, forward, verify, weights, analyze, compare, diff, regress or vnncomp "
                             "(gamma --help)")
        return args.func(args)
    except GammaError as e:
        print(f"gamma: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gamma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
