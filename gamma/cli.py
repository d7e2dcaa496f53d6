"""The ``gamma`` command: assembles the subcommands' parsers and dispatches.

Each subcommand lives in ``gamma/commands/<name>.py`` with ``add_parser(subparsers)``
(which sets ``func``); what they share is in :mod:`gamma.commands.common`.
Every user error (a :class:`~gamma.errors.GammaError` or a bad option) is one
line ``gamma: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .commands import analyze, compare, forward, inspect, regress, verify, vnncomp, weights
from .errors import GammaError

# in the order `gamma --help` lists them; each adds its own subcommands
COMMANDS = (inspect, forward, verify, weights, analyze, compare, regress, vnncomp)


class _Parser(argparse.ArgumentParser):
    """argparse with gamma's one-line error format (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"gamma: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gamma", description="Certified lower/upper bounds for real transformer checkpoints.")
    p.add_argument("--version", action="version", version=f"gamma {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


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
