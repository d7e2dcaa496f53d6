"""``gamma regress run|check|baseline|report``: the verification regression suite.

* ``run SUITE --history FILE``: verify every case, check its bounds by samples
  and attack, append one record per case to the history (JSON Lines).
* ``check SUITE --baseline REF``: newest results (``--history``, or run now)
  against a baseline: a table, and exit status 1 on any regression.
* ``baseline SUITE --history FILE --out FILE``: a baseline from the newest records.
* ``report --history FILE --out DIR``: report.md and one trend PNG per case.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from typing import Optional

from .. import regress as R
from ..errors import GammaError
from ..extras import require
from .common import check_writable, print_json, table


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "regress", help="verification regression suite: run, check against a baseline, report trends",
        description="Run a suite of verification cases (TOML), keep their figures in a JSON Lines history, "
                    "compare the newest results with a baseline, and plot the trends.")
    s.set_defaults(func=_no_subcommand)
    sub = s.add_subparsers(dest="regress_command", metavar="SUBCOMMAND")

    r = sub.add_parser("run", help="run the cases and append one record per case to the history")
    _suite_options(r)
    r.add_argument("--history", required=True, metavar="FILE", help="JSON Lines history to append to")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="compare the newest results with a baseline (exit 1 on a regression)")
    _suite_options(c)
    c.add_argument("--baseline", required=True, metavar="REF", help="baseline JSON {case: record} or a history")
    c.add_argument("--history", metavar="FILE", help="newest record per case from here (default: run now)")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("baseline", help="write a baseline from the newest records of a history")
    b.add_argument("suite", metavar="SUITE", help="suite file (TOML)")
    b.add_argument("--cases", metavar="A,B", help="only these cases")
    b.add_argument("--history", required=True, metavar="FILE", help="JSON Lines history")
    b.add_argument("--out", required=True, metavar="FILE",
                   help="baseline JSON to write (an existing one keeps its other suites' cases)")
    b.set_defaults(func=cmd_baseline)

    p = sub.add_parser("report", help="report.md and trend plots (PNG) from a history")
    p.add_argument("--history", required=True, metavar="FILE", help="JSON Lines history")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=cmd_report)


def _suite_options(p) -> None:
    p.add_argument("suite", metavar="SUITE", help="suite file (TOML)")
    p.add_argument("--cases", metavar="A,B", help="only these cases (comma-separated names)")
    p.add_argument("--cache", metavar="DIR", help="where fixture models are built (default: next to the "
                                                   "history, else a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _no_subcommand(args) -> int:
    raise GammaError("choose a regress subcommand: run, check, baseline or report (gamma regress --help)")


def _names(text: Optional[str]) -> Optional[list[str]]:
    return [n for n in text.replace(" ", "").split(",") if n] if text else None


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"regress: {message}", file=sys.stderr, flush=True)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"gamma: warning: {w}", file=sys.stderr)


def g(v) -> str:
    return "-" if v is None else "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.4g}"


def _summary(rec: dict) -> str:
    if rec.get("error"):
        return f"ERROR {rec['error']}"
    f, s = rec["figures"], rec["soundness"]
    main = "max_width" if rec["config"]["mode"] == "full" else "max_sensitivity"
    why = R.unsound(rec)
    sound = "sound" if not why else f"UNSOUND: {why}"
    if s.get("checked") is False:
        sound = f"soundness not checked (float64 attack; {s.get('float64_outside', 0)} of its points outside)"
    return (f"{main} {g(R.figure(rec, main))} (attacked {g(_empirical(rec, main))}, certified / attacked "
            f"{_x(R.figure(rec, 'ratio'))}), {f['seconds']:.2f}s, +{f['peak_memory_mb']:.0f} MiB, {sound} "
            f"({s['points']} points)")


def _x(v: Optional[float]) -> str:
    return "-" if v is None else "inf" if math.isinf(v) else f"x{v:.3g}"


# ------------------------------------------------------------------ run / check / baseline
def _run_cases(args, cases: list[R.Case], cache: str, history: Optional[str]) -> dict:
    R.check_requirements(cases)          # before the first case runs
    models = R.Models(cache)
    prov, run_id = R.provenance(), R.now_utc()
    out = {}
    for i, case in enumerate(cases, 1):
        tag = f"[{i}/{len(cases)}] {case.name}"
        arith = "" if case.arithmetic == "float32" else f", arithmetic {case.arithmetic}"
        if case.layernorm_variance != "any":
            arith += f", layernorm variance {case.layernorm_variance}"
        if case.norm_splits > 1:
            arith += f", norm splits {case.norm_splits}"
        _say(args, f"{tag}: {case.method}, {case.mode.replace('_', '-')}, eps {case.epsilon:g}{arith}, {case.model}")
        rec = R.run_case(case, models, prov, run_id)
        if history:
            R.append_record(history, rec)
        _say(args, f"{tag}: {_summary(rec)}")
        out[case.name] = rec
    return out


def _cache(args, history: Optional[str]) -> str:
    if args.cache:
        return args.cache
    if history:
        return os.path.join(os.path.dirname(os.path.abspath(history)), ".gamma-regress-cache")
    return os.path.join(tempfile.gettempdir(), "gamma-regress-cache")


def cmd_run(args) -> int:
    cases = R.load_suite(args.suite, _names(args.cases))
    check_writable(args.history)
    recs = _run_cases(args, cases, _cache(args, args.history), args.history)
    bad = [n for n, r in recs.items() if r.get("error") or R.unsound(r)]
    _say(args, f"{len(recs)} records appended to {args.history}" +
         (f"; FAILED: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def cmd_check(args) -> int:
    cases = R.load_suite(args.suite, _names(args.cases))
    if not args.history:
        R.check_requirements(cases)
    base, warnings = R.load_baseline(args.baseline)
    _warn(warnings)
    if args.history:
        h = R.read_history(args.history)
        _warn(h.warnings)
        new = h.newest()
    else:
        new = _run_cases(args, cases, _cache(args, None), None)
    rows = R.compare(cases, new, base)
    failed = R.failed(rows)
    improved = list(dict.fromkeys(r["case"] for r in rows if r["status"] == "IMPROVED"))
    if args.json:
        print_json({"rows": rows, "failed": failed, "improved": improved, "ok": not failed})
        return 1 if failed else 0
    print("\n".join(table(["case", "figure", "old", "new", "change", "status", "note"],
                          [[r["case"], r["figure"], g(r["old"]), g(r["new"]), _pct(r["change"]), r["status"],
                            r["note"]] for r in rows], "llrrrll")))
    print()
    if improved:
        print(f"IMPROVED: {', '.join(improved)}: update the baseline "
              f"(gamma regress baseline {args.suite} --history FILE --out {args.baseline})")
    print(f"REGRESSION in {len(failed)} case(s): {', '.join(failed)}" if failed
          else f"no regression ({len(cases)} cases)")
    return 1 if failed else 0


def _pct(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return ("+inf" if v > 0 else "-inf") if math.isinf(v) else f"{100 * v:+.1f}%"


def cmd_baseline(args) -> int:
    cases = R.load_suite(args.suite, _names(args.cases))
    h = R.read_history(args.history)
    _warn(h.warnings)
    newest = h.newest()
    missing = [c.name for c in cases if c.name not in newest]
    if missing:
        raise GammaError(f"{args.history}: no record of {', '.join(missing)} (gamma regress run first)")
    broken = [c.name for c in cases if newest[c.name].get("error")]
    if broken:
        raise GammaError(f"{args.history}: the newest record of {', '.join(broken)} is an error")
    kept = {}
    if os.path.exists(args.out):                 # one baseline file may serve several suites
        kept, warnings = R.load_baseline(args.out)
        _warn(warnings)
        kept = {k: v for k, v in kept.items() if k not in {c.name for c in cases}}
    R.write_baseline(args.out, {**kept, **{c.name: newest[c.name] for c in cases}})
    print(f"wrote {args.out}: {len(cases)} cases" + (f" (kept {len(kept)} others)" if kept else ""))
    return 0


# ------------------------------------------------------------------ report
def cmd_report(args) -> int:
    require("gamma regress report", "matplotlib")
    h = R.read_history(args.history)
    _warn(h.warnings)
    if not h.records:
        raise GammaError(f"{args.history}: no records to report")
    files = write_report(h.records, args.out)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(os.path.basename(f) for f in files)}")
    return 0


def _by_case(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        out.setdefault(r["case"], []).append(r)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _label(rec: dict) -> str:
    commit = (rec.get("git_commit") or "")[:7] + ("+" if rec.get("git_dirty") else "")
    return f"{rec['date'][5:16].replace('T', ' ')}" + (f"\n{commit}" if commit else "")


def write_report(records: list[dict], out_dir: str) -> list[str]:
    """report.md (latest figures, then every run per case) and ``<case>.png`` trends."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise GammaError(f"{out_dir}: cannot create the report folder ({e.strerror})") from None
    groups = _by_case(records)
    lines = ["# gamma verification regression report", "",
             f"{len(records)} records, {len(groups)} cases.  Widths and sensitivities: lower is tighter.  "
             "`attacked_*`: what samples + a PGD attack on gamma's float64 forward reached inside the same "
             "box (an inner bound: never above the certified figure); `ratio`: certified / attacked max "
             "width, how loose the bound is.  "
             "`soundness`: outputs of samples + PGD attack outside the certified bounds (must be 0).  "
             "`peak_memory_mb`: peak resident memory above the start of the case.", "",
             "## Latest", "", "| case | method | mode | eps | runs | " + " | ".join(R.FIGURES) + " | soundness |",
             "|---|---|---|---|---|" + "---|" * (len(R.FIGURES) + 1)]
    for name, recs in groups.items():
        r = recs[-1]
        c = r["config"]
        figs = [g(R.figure(r, f)) for f in R.FIGURES]
        lines.append(f"| {name} | {c['method']} | {c['mode']} | {c['epsilon']:g} | {len(recs)} | "
                     + " | ".join(figs) + f" | {_sound(r)} |")
    files = []
    for name, recs in groups.items():
        track = recs[-1].get("track") or list(R.FIGURES)
        png = os.path.join(out_dir, f"{_slug(name)}.png")
        _plot(name, recs, track, png)
        files.append(png)
        lines += ["", f"## {name}", "", f"![{name}]({os.path.basename(png)})", "",
                  "| date (UTC) | commit | " + " | ".join(track) + " | soundness |",
                  "|---|---|" + "---|" * (len(track) + 1)]
        for r in recs:
            lines.append(f"| {r['date']} | {(r.get('git_commit') or '-')[:10]} | "
                         + " | ".join(g(R.figure(r, f)) for f in track) + f" | {_sound(r)} |")
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [md] + files


def _sound(r: dict) -> str:
    if r.get("error"):
        return "error"
    s = r["soundness"]
    if s.get("checked") is False:
        return f"not checked ({s.get('float64_outside', 0)} / {s['points']} float64 points outside)"
    over = None if s["violations"] else R.unsound(r)
    return f"{s['violations']} / {s['points']}" + (f" UNSOUND ({over})" if over else "")


def _empirical(rec: dict, fname: str) -> Optional[float]:
    """The widest output the soundness attack saw (as a width or a sensitivity): a lower bound on the truth."""
    w = (rec.get("soundness") or {}).get("empirical_max_width")
    if w is None or fname not in ("max_width", "max_sensitivity"):
        return None
    return w if fname == "max_width" else w / (2 * rec["config"]["epsilon"])


def _plot(name: str, recs: list[dict], track: list[str], path: str) -> None:
    """One PNG per case: a panel per tracked figure against the run number (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6.0, 0.7 * len(recs) + 3), 2.3 * len(track) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    x = list(range(1, len(recs) + 1))
    c = recs[-1]["config"]
    for k, fname in enumerate(track):
        ax = fig.add_subplot(len(track), 1, k + 1)
        ys = [R.figure(r, fname) for r in recs]
        pts = [(xi, y) for xi, y in zip(x, ys) if y is not None and math.isfinite(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="certified")
            if R.FIGURES[fname] == "bound" and all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
            elif R.FIGURES[fname] != "bound":
                ax.set_ylim(bottom=0, top=1.15 * max(p[1] for p in pts) or 1.0)
        emp = [(xi, _empirical(r, fname)) for xi, r in zip(x, recs)]
        emp = [(xi, y) for xi, y in emp if y is not None and y > 0]
        if emp and pts:
            ax.plot([p[0] for p in emp], [p[1] for p in emp], "s--", color="tab:gray", ms=4,
                    label="attacked (samples + PGD)")
            ax.legend(fontsize=7, loc="best")
        for xi, y in zip(x, ys):
            if y is not None and not math.isfinite(y):
                ax.annotate("inf", (xi, 0.95), xycoords=("data", "axes fraction"), ha="center", va="top",
                            color="tab:red")
        bad = [xi for xi, r in zip(x, recs) if r.get("error") or R.unsound(r)]
        for xi in bad:
            ax.axvline(xi, color="tab:red", alpha=0.4, lw=6)
        ax.set_ylabel(fname, fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([_label(r) for r in recs] if k == len(track) - 1 else [], fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: {c['method']}, {c['mode'].replace('_', '-')}, eps {c['epsilon']:g} "
                 f"(red band: unsound or failed run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
