"""The VNN-COMP 2023 vit benchmark (ONNX + VNN-LIB) -> a BENCHMARKS.md section.

Runs ``gamma vnncomp``'s runner (:func:`gamma.vnncomp.run_benchmark`: one
process per instance, the instance's timeout, VNN-COMP result rows) over
every K-th instance of the benchmark folder and writes a markdown section:
the result counts beside alpha-beta-CROWN's published results on the same
instances, and per instance the attacked figure (PGD's smallest unsafe-case
value) beside the certified one (worst certified margin after CROWN and
alpha-CROWN).

    python benchmarks/vnncomp.py [--dir ../shared/benchmarks/vnncomp2023-vit] [--every K] [--limit N]
        [--csv results.csv] [--out FILE.md] [--update BENCHMARKS.md]

``--update`` replaces the section (or inserts it before "## Run time").
A full run takes up to 200 x 130 s (about 7 hours) on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

from gamma.vnncomp import run_benchmark, summary_lines  # noqa: E402

from _common import ROOT, load_avg, log, machine, table, write_markdown  # noqa: E402

TITLE = "## 9. VNN-COMP 2023 vit benchmark (ONNX + VNN-LIB)"
DEFAULT_DIR = os.path.join(ROOT, "..", "shared", "benchmarks", "vnncomp2023-vit")


def _phase(row: dict, name: str):
    for p in row.get("phases") or []:
        if p["phase"] == name:
            return p
    return None


def _num(v, fmt="{:+.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def section(report: dict, argv: list, seconds: float) -> list:
    lines = [TITLE, "", f"`python benchmarks/vnncomp.py {' '.join(argv)}` ({seconds:.0f} s):", ""]
    env = machine(argv)
    env[1] = f"- command: `python benchmarks/vnncomp.py {' '.join(argv)}`"
    lines += env + ["",
                    f"{report['run']} of {report['instances']} instances (every {report['every']}-th), each in its own "
                    "process with its timeout (loading torch and the model counts). Arithmetic: the real-valued "
                    "network, as the other VNN-COMP verifiers bound it. Pipeline: PGD attack, CROWN with the "
                    "property as the last layer, alpha-CROWN if time remains; no branch and bound (alpha-beta-CROWN "
                    "uses it, on a GPU).", ""]
    lines += summary_lines(report)[2:] + [""]
    rows = []
    for r in report["rows"]:
        att, cr, al = _phase(r, "attack"), _phase(r, "crown"), _phase(r, "alpha")
        rows.append([r["vnnlib"], r["result"], f"{r['run_time']:.1f}", _num(att and att["best"]),
                     "-" if cr is None else f"{cr['refuted']}/{cr['cases']}", _num(cr and cr["worst_lower"]),
                     "-" if al is None else f"{al['refuted']}/{al['cases']} ({al['iters']} it)",
                     _num(al and al["worst_lower"]), r["reference"] or "-", _num(r["reference_time"], "{:.1f}")])
    lines += table(["instance", "gamma", "s", "attack: smallest unsafe value", "crown refuted", "crown worst margin",
                    "alpha refuted", "alpha worst margin", "ab-CROWN", "ab-CROWN s"], rows)
    lines += ["", "An instance is verified (unsat) when every unsafe case has a row with certified lower bound > 0; "
              "the attack column is the smallest value PGD reached (<= 0 would be a counterexample), so the gap "
              "between it and the certified margin is the looseness of the relaxation.", ""]
    return lines


def update(path: str, lines: list) -> None:
    text = open(path).read() if os.path.exists(path) else ""
    block = "\n".join(lines).rstrip() + "\n\n"
    if TITLE in text:
        start = text.index(TITLE)
        nxt = text.find("\n## ", start + len(TITLE))
        text = text[:start] + block + (text[nxt + 1:] if nxt >= 0 else "")
    elif "\n## Run time" in text:
        i = text.index("\n## Run time") + 1
        text = text[:i] + block + text[i:]
    else:
        text = text.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=DEFAULT_DIR, help="benchmark folder (instances.csv, onnx/, vnnlib/)")
    ap.add_argument("--every", type=int, default=1, metavar="K", help="every K-th instance (default all)")
    ap.add_argument("--limit", type=int, default=None, metavar="N", help="at most N instances (smoke runs)")
    ap.add_argument("--csv", default=None, help="VNN-COMP result rows (default: beside --out)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "vnncomp.md"), help="markdown section written here")
    ap.add_argument("--update", metavar="BENCHMARKS.md", help="also replace / insert the section in this file")
    args = ap.parse_args(argv)
    csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    t0 = time.perf_counter()
    log(f"vit benchmark from {args.dir}, every {args.every}, load {load_avg()}")
    report = run_benchmark(args.dir, every=args.every, out=csv_path, limit=args.limit, log=log)
    lines = section(report, argv, time.perf_counter() - t0)
    write_markdown(args.out, lines)
    if args.update:
        update(args.update, lines)
        log(f"section written into {args.update}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
