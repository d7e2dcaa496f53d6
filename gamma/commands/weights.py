"""``gamma weights norms MODEL``: Frobenius and spectral norms per tensor and per block."""

from __future__ import annotations

import argparse
from typing import Optional

from ..errors import GammaError
from ..norms import DEFAULT_EXACT_LIMIT, weight_norms
from ..verify import load
from .common import Progress, print_json, table


def add_parser(subparsers) -> None:
    w = subparsers.add_parser("weights", help="weight statistics (norms)",
                              description="Weight statistics of a checkpoint.")
    sub = w.add_subparsers(dest="weights_command", metavar="WHAT")
    w.set_defaults(func=_need_subcommand)
    s = sub.add_parser(
        "norms", help="Frobenius and spectral norm of every matrix, per block",
        description="Frobenius and spectral norm (largest singular value, float64) of every weight "
                    "matrix, and per block: attention q/k/v/o and MLP matrices, total Frobenius, max spectral.")
    s.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint (default: Whisper tiny.en)")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.add_argument("--exact-limit", type=int, default=DEFAULT_EXACT_LIMIT, metavar="N",
                   help="exact SVD for matrices with at most N*N entries, Lanczos (rel. tol. 1e-6) "
                        f"above (default {DEFAULT_EXACT_LIMIT})")
    s.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    s.set_defaults(func=run)


def _need_subcommand(args) -> int:
    raise GammaError("choose what to compute: gamma weights norms MODEL")


def run(args) -> int:
    if args.exact_limit < 1:
        raise GammaError(f"--exact-limit must be a positive integer, got {args.exact_limit}")
    progress = Progress.for_stderr(not args.quiet and not args.json)
    try:
        progress("loading model")
        model = load(args.model)
        result = weight_norms(model.ckpt, exact_limit=args.exact_limit, progress=progress)
    finally:
        progress.done()
    if args.json:
        print_json(result)
    else:
        print("\n".join(norms_lines(result)))
    return 0


# ------------------------------------------------------------------ table
def g(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def _short(part: str) -> str:
    return part.replace("attn_", "").replace("mlp_", "").replace("cross_", "x")


def norms_lines(r: dict) -> list[str]:
    """The readable report: model, method, per-component block tables, other matrices, summary, notes."""
    m = r["model"]
    tensors = [t for t in r["tensors"] if t["tied_to"] is None]
    n_svd = sum(t["method"] == "svd" for t in tensors)
    power = [t for t in tensors if t["method"] == "power"]
    method = f"exact SVD (float64) for {n_svd} matrices"
    if power:
        worst = max(t["rel_error_bound"] for t in power)
        method += (f", Lanczos for {len(power)} (larger than {r['exact_limit']}^2 entries; "
                   f"rel. error <= {worst:.1e}, tolerance {r['rtol']:g})")
    lines = [f"model    {m['arch']} ({m['format']}) {m['path']}",
             f"method   {method}"]
    for note in r["notes"]:
        lines.append(f"note     {note}")
    for comp, parts in r["parts"].items():
        blocks = [b for b in r["blocks"] if b["component"] == comp]
        if not blocks:
            continue
        label = f"{comp} blocks" if m["arch"] == "whisper" else "blocks"
        for kind in ("spectral", "frobenius"):
            total = ["max spec", "part"] if kind == "spectral" else ["total fro"]
            header = ["#", "block"] + [_short(p) for p in parts] + total
            rows = []
            for b in blocks:
                extra = [g(b["max_spectral"]), b["max_spectral_part"]] if kind == "spectral" \
                    else [g(b["total_frobenius"])]
                rows.append([b["index"], b["name"]] + [g(b[f"{p}_{kind}"]) for p in parts] + extra)
            align = "rl" + "r" * (len(parts) + 1) + ("l" if kind == "spectral" else "")
            lines += ["", f"{label}: {kind} norm per matrix ({', '.join(parts)})"]
            lines += ["  " + s for s in table(header, rows, align)]
    others = [t for t in r["tensors"] if t["part"] is None]
    if others:
        lines += ["", "other matrices:"]
        lines += ["  " + s for s in table(
            ["tensor", "shape", "dtype", "frobenius", "spectral", "method", "rel err"],
            [[t["name"], "x".join(map(str, t["shape"])), t["source_dtype"] or "-", g(t["frobenius"]),
              g(t["spectral"]), t["method"] + (f" (tied to {t['tied_to']})" if t["tied_to"] else ""),
              f"{t['rel_error_bound']:.1e}"] for t in others], "lllrrlr")]
    lines += [""] + summary_lines(r["summary"], "summary" if "summary_by_component" not in r else "all blocks")
    for comp, s in r.get("summary_by_component", {}).items():
        lines += summary_lines(s, comp)
    return lines


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"x{v:.3g}"


def summary_lines(s: dict, label: str) -> list[str]:
    if not s.get("num_blocks"):
        return [f"{label}: no blocks"]
    return [f"{label}: total Frobenius max {g(s['max_total_frobenius'])} ({s['max_total_frobenius_block']}), "
            f"min {g(s['min_total_frobenius'])} ({s['min_total_frobenius_block']}), "
            f"range {_ratio(s['total_frobenius_range'])}",
            f"{' ' * len(label)}  max spectral    max {g(s['max_spectral'])} ({s['max_spectral_block']}), "
            f"min {g(s['min_spectral'])} ({s['min_spectral_block']}), range {_ratio(s['spectral_range'])}"]


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only this command (for tests and ``python -m``-less use)."""
    p = argparse.ArgumentParser(prog="gamma")
    add_parser(p.add_subparsers(dest="command"))
    return p
