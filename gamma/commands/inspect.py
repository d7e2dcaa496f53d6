"""``gamma inspect MODEL``: what a checkpoint contains."""

from __future__ import annotations

from .. import report
from ..verify import load
from .common import emit


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("inspect", help="what a checkpoint contains")
    s.add_argument("model", metavar="MODEL", help="checkpoint file or directory")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=run)


def run(args) -> int:
    emit(report.describe(load(args.model)), report.inspect_lines, args.json)
    return 0
