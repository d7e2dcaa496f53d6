"""``gamma forward MODEL --out Y.npy``: the nominal output at the input point."""

from __future__ import annotations

import numpy as np

from ..verify import forward, load
from .common import add_input_options, check_writable, input_kwargs, save_npy


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("forward", help="nominal output at the input point (float32 .npy)")
    s.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint (default: Whisper tiny.en)")
    add_input_options(s)
    s.add_argument("--out", required=True, metavar="Y.npy", help="write the output here (float32)")
    s.add_argument("--save-input", metavar="X.npy", help="write the exact input array used (float64)")
    s.set_defaults(func=run)


def run(args) -> int:
    check_writable(args.out, args.save_input)
    res = forward(load(args.model), **input_kwargs(args))
    y = res.output.detach().cpu().numpy().astype(np.float32)
    save_npy(args.out, y)
    if args.save_input:
        save_npy(args.save_input, res.input.detach().cpu().numpy())
    extra = f", input -> {args.save_input}" if args.save_input else ""
    print(f"wrote {args.out}: output {tuple(y.shape)} float32 ({res.component}, {res.point.description}{extra})")
    return 0
