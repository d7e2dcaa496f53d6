"""Why blocks differ: block-wise sensitivity against weight norms.

:func:`analyze` joins a block-wise verification report (``gamma verify
--block-wise --json``, or :meth:`VerifyResult.to_dict`) with a weight-norm
report (:func:`gamma.norms.weight_norms`) block by block, and measures how
well the norms explain the sensitivities: Pearson r (raw and on log10
values), Spearman rho, and the overlap of the top-k blocks by each.
:func:`write_report` writes ``report.md`` and three PNG plots.

Two sensitivities per block when the verify report has its attack (the
default of ``gamma verify --block-wise``): the certified one (an upper
bound, loosened by the relaxation) and the attacked one (a lower bound,
from points found in the box).  Both are correlated with the norms, side by
side, and their rank agreement says whether the certified ranking of the
blocks is the model's or the relaxation's.

Correlations come from :mod:`gamma.stats` (numpy only; ties get average
ranks), not scipy.  Nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Optional, Sequence

import numpy as np

from .errors import GammaError
from .stats import pearson, rankdata, spearman  # noqa: F401  (re-exported)

TOP_K = 5
AGREE = 0.9          # certified and attacked rankings "agree" when Spearman rho >= this and the top block is the same
PLOTS = {"sensitivity": "sensitivity.png", "spectral": "spectral.png", "scatter": "sensitivity_vs_spectral.png"}


# ------------------------------------------------------------------ inputs
def load_verify_json(path: str) -> dict:
    """A block-wise verify report from a file; GammaError if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GammaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GammaError(f"{path}: cannot read ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise GammaError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
    check_verify_report(data, path)
    return data


def check_verify_report(data, where: str = "verify report") -> None:
    if not isinstance(data, dict) or data.get("mode") != "block_wise":
        mode = data.get("mode") if isinstance(data, dict) else None
        raise GammaError(f"{where}: not a block-wise verify report (mode {mode!r}; "
                         "make it with gamma verify --block-wise --json)")
    blocks = data.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise GammaError(f"{where}: has no blocks")
    for b in blocks:
        if not isinstance(b, dict) or not isinstance(b.get("block_name"), str) or "sensitivity" not in b:
            raise GammaError(f"{where}: every block needs block_name and sensitivity")
        s = b["sensitivity"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise GammaError(f"{where}: block {b['block_name']}: sensitivity must be a number or null")
    for key in ("component", "epsilon", "method"):
        if key not in data:
            raise GammaError(f"{where}: missing '{key}'")


# ------------------------------------------------------------------ analysis
def _num(v) -> float:
    return math.nan if v is None else float(v)


def block_rows(verify_report: dict, norms_report: dict) -> list[dict]:
    """One row per verified block: sensitivity, max spectral, total Frobenius, amplification."""
    comp = verify_report["component"]
    v_arch = (verify_report.get("model") or {}).get("arch")
    n_arch = norms_report["model"]["arch"]
    if v_arch is not None and v_arch != n_arch:
        raise GammaError(f"the verify report is for a {v_arch} model, the weights are {n_arch}")
    norms = {f"layer{b['index']}": b for b in norms_report["blocks"] if b["component"] == comp}
    rows = []
    for vb in verify_report["blocks"]:
        nb = norms.get(vb["block_name"])
        if nb is None:
            raise GammaError(f"verified block {vb['block_name']} ({comp}) has no weights in "
                             f"{norms_report['model']['path']}: is it the same model?")
        sens, spec = _num(vb["sensitivity"]), nb["max_spectral"]
        rows.append({
            "index": nb["index"], "block": nb["name"], "component": comp, "sensitivity": sens,
            "attacked_sensitivity": _num(vb.get("attacked_sensitivity")), "ratio": _num(vb.get("ratio")),
            "max_spectral": spec, "max_spectral_part": nb["max_spectral_part"],
            "total_frobenius": nb["total_frobenius"],
            "parts_spectral": {k[:-len("_spectral")]: v for k, v in nb.items()
                               if k.endswith("_spectral") and k != "max_spectral" and v is not None},
            "amplification": sens / spec if spec > 0 else math.nan,
            "status": vb.get("status"), "degraded": bool(vb.get("degraded", False)),
        })
    return rows


def _usable(rows: list[dict], key: str, value: str = "sensitivity") -> list[dict]:
    return [r for r in rows if all(math.isfinite(r[k]) and r[k] > 0 for k in (value, key))]


def correlations(rows: list[dict], key: str = "max_spectral", value: str = "sensitivity") -> dict:
    """``rows[*][value]`` (the certified sensitivity, or the attacked one) against
    ``rows[*][key]``: Pearson raw and log10, Spearman, over the blocks where both
    are finite and > 0 (the others are listed)."""
    ok = _usable(rows, key, value)
    used = {id(r) for r in ok}
    s = [r[value] for r in ok]
    w = [r[key] for r in ok]
    return {
        "value": value, "against": key, "n": len(ok),
        "pearson": pearson(s, w),
        "pearson_log10": pearson(np.log10(s), np.log10(w)) if ok else math.nan,
        "spearman": spearman(s, w),
        "excluded": [r["block"] for r in rows if id(r) not in used],
    }


def _sens_key(v: float) -> float:
    return math.inf if math.isnan(v) else v       # unknown (non-finite) sensitivity ranks as the worst


def top_overlap(rows: list[dict], k: int = TOP_K) -> dict:
    """The top-k blocks by sensitivity and by max spectral norm, and what they share."""
    k = min(k, len(rows))
    by_sens = [r["block"] for r in sorted(rows, key=lambda r: -_sens_key(r["sensitivity"]))[:k]]
    by_spec = [r["block"] for r in sorted(rows, key=lambda r: -r["max_spectral"])[:k]]
    both = [b for b in by_sens if b in by_spec]
    return {"k": k, "by_sensitivity": by_sens, "by_spectral": by_spec, "overlap": len(both),
            "overlap_blocks": both}


def attacked(rows: list[dict]) -> Optional[dict]:
    """Certified against attacked sensitivity: both correlated with the norms, their rank
    agreement, the top block by each; None when the verify report has no attack."""
    if not any(math.isfinite(r["attacked_sensitivity"]) for r in rows):
        return None
    both = _usable(rows, "attacked_sensitivity")
    rho = spearman([r["sensitivity"] for r in both], [r["attacked_sensitivity"] for r in both])
    top_c = max(both, key=lambda r: r["sensitivity"])["block"] if both else None
    top_a = max(both, key=lambda r: r["attacked_sensitivity"])["block"] if both else None
    ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"])]
    return {
        "correlation": correlations(rows, "max_spectral", "attacked_sensitivity"),
        "correlation_frobenius": correlations(rows, "total_frobenius", "attacked_sensitivity"),
        "rank_agreement": rho, "n": len(both),
        "top_certified": top_c, "top_attacked": top_a,
        "agree": bool(rho >= AGREE and top_c == top_a) if not math.isnan(rho) else None,
        "min_ratio": min(ratios) if ratios else math.nan, "max_ratio": max(ratios) if ratios else math.nan,
    }


def analyze(verify_report: dict, norms_report: dict, top_k: int = TOP_K) -> dict:
    """The analysis (plain data; JSON-safe after :func:`gamma.verify.json_safe`)."""
    check_verify_report(verify_report)
    rows = block_rows(verify_report, norms_report)
    return {
        "model": verify_report.get("model") or norms_report["model"],
        "component": verify_report["component"],
        "method": verify_report["method"], "epsilon": verify_report["epsilon"],
        "seq_len": verify_report.get("seq_len"),
        "input_point": (verify_report.get("input_point") or {}).get("description"),
        "blocks": rows,
        "correlation": correlations(rows, "max_spectral"),
        "correlation_frobenius": correlations(rows, "total_frobenius"),
        "top": top_overlap(rows, top_k),
        "attacked": attacked(rows),
        "norms": {"exact_limit": norms_report["exact_limit"], "rtol": norms_report["rtol"],
                  "notes": norms_report["notes"]},
        "versions": {"verify": verify_report.get("versions"), "analysis": _versions()},
    }


def _versions() -> dict:
    import torch
    from . import __version__
    try:
        import matplotlib
        plots = matplotlib.__version__
    except ImportError:                 # the analysis is data; only write_report needs matplotlib
        plots = None
    return {"gamma": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "matplotlib": plots, "python": platform.python_version()}


# ------------------------------------------------------------------ report
def write_report(a: dict, out_dir: str) -> list[str]:
    """``report.md`` and the PNG plots in ``out_dir`` (created); returns the paths written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise GammaError(f"{out_dir}: cannot create directory ({e.strerror or e})") from None
    paths = [plot(kind, a, os.path.join(out_dir, name)) for kind, name in PLOTS.items()]
    md = os.path.join(out_dir, "report.md")
    try:
        with open(md, "w", encoding="utf-8") as f:
            f.write("\n".join(markdown(a)) + "\n")
    except OSError as e:
        raise GammaError(f"{md}: cannot write ({e.strerror or e})") from None
    return [md] + paths


def _e(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3e}"


def _r(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:+.3f}"


def _x(v: Optional[float]) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return "inf" if math.isinf(v) else f"x{v:.3g}"


def _agreement(a: dict) -> list[str]:
    """The report's sentences on certified against attacked sensitivity."""
    at = a.get("attacked")
    if not at:
        return ["The verify report has no attack (made with --no-attack, or by an older gamma): only the "
                "certified sensitivity is shown.  `gamma verify --block-wise` attacks every block by default."]
    rho = at["rank_agreement"]
    lines = [f"Certified / attacked width per block: from {_x(at['min_ratio'])} to {_x(at['max_ratio'])}.  "
             f"Rank agreement of certified and attacked sensitivity (Spearman rho over {at['n']} blocks): "
             f"{_r(rho)}.  Most sensitive block: {at['top_certified']} by the certified figure, "
             f"{at['top_attacked']} by the attacked one."]
    if at["agree"] is False:
        lines += ["", f"**The two rankings disagree** (Spearman rho {_r(rho)} < {AGREE:g}"
                  + (f"; the top block differs: {at['top_certified']} certified, {at['top_attacked']} attacked"
                     if at["top_certified"] != at["top_attacked"] else "")
                  + "): part of what separates the blocks' certified sensitivities is how loose the relaxation "
                    "is on each block, not how sensitive the block is.  Read the norm correlations of the "
                    "attacked sensitivity for the model, those of the certified one for the bound."]
    elif at["agree"]:
        lines += ["", f"The two rankings agree (Spearman rho >= {AGREE:g}, same top block): the relaxation's "
                      f"looseness ({_x(at['min_ratio'])} to {_x(at['max_ratio'])}) does not reorder the blocks "
                      "here, so the certified ranking is the attacked one."]
    return lines


def markdown(a: dict) -> list[str]:
    m, c, t = a["model"], a["correlation"], a["top"]
    cf = a["correlation_frobenius"]
    vv = a["versions"]["verify"] or {}
    lines = [
        f"# Block sensitivity and weight norms: {m.get('arch', '?')} {a['component']}", "",
        f"- model: `{m.get('path')}` ({m.get('format', '?')}, {m.get('arch', '?')})",
        f"- verification: block-wise, method `{a['method']}`, epsilon {a['epsilon']:g}, "
        f"seq_len {a['seq_len']}, input {a['input_point']}",
        f"- weight norms: float64; exact SVD for matrices up to {a['norms']['exact_limit']}^2 entries, "
        f"Lanczos (relative tolerance {a['norms']['rtol']:g}) above",
        "- versions: verify " + ", ".join(f"{k} {v}" for k, v in vv.items()) + "; analysis "
        + ", ".join(f"{k} {v}" for k, v in a["versions"]["analysis"].items()),
    ]
    lines += [f"- note: {n}" for n in a["norms"]["notes"]]
    at = a.get("attacked")
    lines += ["", "## Per block", "",
              "| # | block | sensitivity (certified) | " + ("attacked sensitivity | certified / attacked | "
                                                          if at else "")
              + "max spectral (part) | total Frobenius | amplification | status |",
              "|---:|---|---:|" + ("---:|---:|" if at else "") + "---:|---:|---:|---|"]
    for r in a["blocks"]:
        lines.append(f"| {r['index']} | {r['block']} | {_e(r['sensitivity'])} | "
                     + (f"{_e(r['attacked_sensitivity'])} | {_x(r['ratio'])} | " if at else "")
                     + f"{r['max_spectral']:.4g} ({r['max_spectral_part']}) | {r['total_frobenius']:.4g} | "
                       f"{_e(r['amplification'])} | {r['status'] or ''} |")
    lines += ["", "## Correlation of sensitivity with weight norms", "",
              "| sensitivity | against | n | Pearson r | Pearson r (log10) | Spearman rho |",
              "|---|---|---:|---:|---:|---:|"]
    pairs = [("certified", c, "max spectral norm"), ("certified", cf, "total Frobenius norm")]
    if at:
        pairs[1:1] = [("attacked", at["correlation"], "max spectral norm")]
        pairs.append(("attacked", at["correlation_frobenius"], "total Frobenius norm"))
    for which, cc, label in pairs:
        lines.append(f"| {which} | {label} | {cc['n']} | {_r(cc['pearson'])} | {_r(cc['pearson_log10'])} "
                     f"| {_r(cc['spearman'])} |")
    if c["excluded"]:
        lines.append(f"\nLeft out (sensitivity not finite and > 0): {', '.join(c['excluded'])}.")
    lines += ["", "## Certified and attacked", ""] + _agreement(a)
    lines += ["", f"## Top {t['k']} blocks", "",
              f"- by sensitivity: {', '.join(t['by_sensitivity'])}",
              f"- by max spectral norm: {', '.join(t['by_spectral'])}",
              f"- overlap: {t['overlap']} of {t['k']}" + (f" ({', '.join(t['overlap_blocks'])})"
                                                         if t["overlap_blocks"] else "")
              + (" -- every block is in both lists, so the overlap says nothing here"
                 if t["k"] == len(a["blocks"]) else ""),
              "", "## Plots", ""]
    lines += [f"![{kind}]({name})" for kind, name in PLOTS.items()]
    lines += ["", "## How to read this", "",
              "- *Sensitivity* is the block's certified output width divided by its input width (2 epsilon), "
              "with the block verified on its own over its nominal input +- epsilon.  It is an upper "
              "bound on how much the block can amplify an L-inf perturbation there, loosened by the "
              "relaxation of the bound method.",
              "- The *spectral norm* of a weight matrix bounds how much that linear map alone can stretch "
              "an input (in L2).  A block is more than its matrices: residual connections, LayerNorm/RMSNorm "
              "(which divide by the input's spread), softmax and the activation all change the gain, so no "
              "norm bounds the sensitivity by itself.",
              "- *Amplification* = sensitivity / max spectral norm: how much of the sensitivity the largest "
              "matrix does not explain.  Similar values across blocks mean the weights explain the "
              "differences; a block far above the rest owes its sensitivity to something else "
              "(normalisation of a small-variance input, a sharp softmax, or bound looseness).",
              "- *Attacked sensitivity* is the width the attack (random samples and PGD with restarts on "
              "gamma's float64 forward pass, inside the same box) actually reached, over 2 epsilon: a lower "
              "bound on the true sensitivity, as the certified one is an upper bound.  Their ratio is how "
              "loose the relaxation is on that block; blocks ranked by the certified figure alone may be "
              "ranked by that looseness rather than by the model.",
              "- Pearson r on raw values is driven by the largest blocks; on log10 values it measures "
              "whether the orders of magnitude move together; Spearman rho uses only the order.  With "
              f"{c['n']} blocks, a correlation is weak evidence: one block can move it a lot."]
    return lines


def plot(kind: str, a: dict, path: str) -> str:
    """One PNG (matplotlib's Agg canvas; pyplot's global state is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = a["blocks"]
    names = [r["block"] for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    where = f"{a['model'].get('arch', '')} {a['component']}, {a['method']}, eps {a['epsilon']:g}"
    small = dict(fontsize=6, rotation=90 if len(rows) > 8 else 0)
    at = a.get("attacked")
    if kind == "sensitivity":
        s = np.array([r["sensitivity"] for r in rows])
        ok = np.isfinite(s) & (s > 0)
        half = 0.4 if at else 0.8                          # bar width: two bars per block with the attack
        xc = x - half / 2 if at else x
        ax.bar(xc[ok], s[ok], width=half, color="tab:red", label="certified (upper bound)")
        for i in np.flatnonzero(~ok):
            ax.annotate("n/a", (x[i], 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                        fontsize=8)
        shown = list(s[ok])
        if at:
            v = np.array([r["attacked_sensitivity"] for r in rows])
            okv = np.isfinite(v) & (v > 0)
            ax.bar(x[okv] + half / 2, v[okv], width=half, color="tab:gray", label="attacked (lower bound)")
            shown += list(v[okv])
            for i in np.flatnonzero(ok & okv):            # the ratio above each pair
                ax.annotate(_x(rows[i]["ratio"]), (x[i], s[i]), ha="center", va="bottom", **small)
            ax.legend(fontsize=7, loc="best")
            ax.set_title(f"Block sensitivity, certified and attacked ({where})\nabove each pair: certified / "
                         f"attacked; rank agreement (Spearman) {_r(at['rank_agreement'])}", fontsize=9)
        else:
            for i in np.flatnonzero(ok):
                ax.annotate(f"{s[i]:.3g}", (x[i], s[i]), ha="center", va="bottom", **small)
            ax.set_title(f"Block sensitivity ({where})")
        ax.set_yscale("log")
        _log_labels(ax.yaxis, shown)
        ax.set_ylabel("sensitivity (out width / in width)")
    elif kind == "spectral":
        ax.bar(x, [r["max_spectral"] for r in rows], color="tab:blue", alpha=0.35, label="max (bar)")
        parts = list(dict.fromkeys(p for r in rows for p in r["parts_spectral"]))
        for j, part in enumerate(parts):                 # one marker per matrix, spread across the bar
            dx = (j - (len(parts) - 1) / 2) * 0.7 / max(len(parts), 1)
            pts = [(xi + dx, r["parts_spectral"][part]) for xi, r in zip(x, rows) if part in r["parts_spectral"]]
            ax.plot(*zip(*pts), linestyle="none", marker="o", markersize=3.5, label=part,
                    color=f"C{j % 10}")
        ax.legend(fontsize=6, ncol=min(len(parts) + 1, 6), loc="upper left")
        ax.set_ylim(0, 1.25 * max(r["max_spectral"] for r in rows))
        ax.set_ylabel("spectral norm (largest singular value)")
        ax.set_title(f"Spectral norm of each matrix per block ({a['model'].get('arch', '')} {a['component']})")
    else:
        ok = _usable(rows, "max_spectral")
        c = a["correlation"]
        ax.scatter([r["max_spectral"] for r in ok], [r["sensitivity"] for r in ok], color="tab:purple",
                   label=f"certified: Spearman {_r(c['spearman'])}, log10 r {_r(c['pearson_log10'])}")
        for r in ok:
            ax.annotate(r["block"].replace("encoder.", "").replace("decoder.", ""),
                        (r["max_spectral"], r["sensitivity"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ys = [r["sensitivity"] for r in ok]
        if at:
            oka = _usable(rows, "max_spectral", "attacked_sensitivity")
            ca = at["correlation"]
            ax.scatter([r["max_spectral"] for r in oka], [r["attacked_sensitivity"] for r in oka], color="tab:gray",
                       marker="s", label=f"attacked: Spearman {_r(ca['spearman'])}, log10 r {_r(ca['pearson_log10'])}")
            for r in oka:                                   # a thin line joins each block's two points
                if math.isfinite(r["sensitivity"]) and r["sensitivity"] > 0:
                    ax.plot([r["max_spectral"]] * 2, [r["attacked_sensitivity"], r["sensitivity"]], color="0.7",
                            lw=0.8, zorder=0)
            ys += [r["attacked_sensitivity"] for r in oka]
            ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_labels(ax.xaxis, [r["max_spectral"] for r in ok])
        _log_labels(ax.yaxis, ys)
        ax.set_xlabel("max spectral norm")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"Sensitivity vs spectral norm ({where})\nPearson r {_r(c['pearson'])}, "
                     f"log10 {_r(c['pearson_log10'])}, Spearman {_r(c['spearman'])} (certified, n={c['n']})",
                     fontsize=9)
    if kind != "scatter":
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center",
                           fontsize=7)
        ax.set_xlabel("block")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise GammaError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def _log_labels(axis, values) -> None:
    """Plain number labels on a log axis that spans less than two decades
    (matplotlib would label at most one tick there, as 4 x 10^0)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    v = [float(t) for t in values if math.isfinite(t) and t > 0]
    if not v or math.log10(max(v) / min(v)) >= 2:
        return
    fmt = FuncFormatter(lambda t, _: f"{t:.3g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt if math.log10(max(v) / min(v)) < 1 else NullFormatter())
