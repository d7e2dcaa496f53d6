"""Readable text for people: model facts and verification tables.

Functions here turn the plain data of :mod:`gamma.verify` into lines of
text; they never print.  ``--json`` output does not pass through here.
"""

from __future__ import annotations

import math
from typing import Optional

from .model import COMPONENTS, Model


# ------------------------------------------------------------------ inspect
def describe(model: Model) -> dict:
    """Facts about a loaded checkpoint (``gamma inspect``).  Per-component
    sizes are dicts keyed by component (``{"decoder": 30}``)."""
    c, ck = model.config, model.ckpt
    if model.arch == "whisper":
        layers = {"encoder": c.encoder_layers, "decoder": c.decoder_layers}
        heads = {"encoder": c.encoder_heads, "decoder": c.decoder_heads}
        kv_heads = dict(heads)
        ffn = {"encoder": c.encoder_ffn_dim, "decoder": c.decoder_ffn_dim}
        head_dim = c.d_model // c.encoder_heads if c.encoder_heads else 0
    else:
        layers, heads = {"decoder": c.n_layers}, {"decoder": c.n_heads}
        kv_heads, ffn, head_dim = {"decoder": c.n_kv_heads or c.n_heads}, {"decoder": c.d_ff}, c.head_dim
    dtypes: dict[str, int] = {}
    for t in ck.dtypes.values():
        dtypes[t] = dtypes.get(t, 0) + 1
    return {
        "path": ck.path, "format": ck.format, "arch": model.arch,
        "components": list(COMPONENTS[model.arch]),
        "layers": layers, "hidden_size": c.d_model, "heads": heads, "kv_heads": kv_heads,
        "head_dim": head_dim, "ffn": ffn, "vocab_size": c.vocab_size,
        "parameters": ck.n_params, "tensors": len(ck.tensors),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "notes": list(ck.notes),
    }


def _per_component(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def inspect_lines(info: dict) -> list[str]:
    rows = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("architecture", info["arch"]),
        ("components", ", ".join(info["components"])),
        ("layers", _per_component(info["layers"])),
        ("hidden size", info["hidden_size"]),
        ("heads", _per_component(info["heads"])),
        ("kv heads", _per_component(info["kv_heads"])),
        ("head dim", info["head_dim"]),
        ("ffn", _per_component(info["ffn"])),
        ("vocab", info["vocab_size"]),
        ("parameters", f"{info['parameters']:,} ({info['tensors']} tensors)"),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()) or "-"),
    ]
    lines = [f"{k:<13} {v}" for k, v in rows]
    for note in info["notes"]:
        lines.append(f"{'note':<13} {note}")
    return lines


# ------------------------------------------------------------------ numbers
def num(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}e}"


def seconds(v: float) -> str:
    return f"{v:.2f}s" if v < 100 else f"{v:.0f}s"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Columns padded to their widest cell; ``align`` has one 'l'/'r' per column (default: left first, right rest)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()
    return [fmt(header), fmt(["-" * w if h else "" for h, w in zip(header, widths)])] + [fmt(r) for r in rows]


# ------------------------------------------------------------------ verify
def _header(r: dict) -> list[str]:
    m, ip = r["model"], r["input_point"]
    mode = {"full": "full network", "layer_by_layer": "layer by layer", "block_wise": "block-wise"}[r["mode"]]
    inter = f", intermediate {r['intermediate']}" if r["method"] in ("crown", "alpha") else ""
    real = ["bounds   of the real-valued function only (--arithmetic real): no float32 margins, "
            "not a guarantee for a float32 engine"] if r.get("arithmetic", "float32") == "real" else []
    return [
        f"model    {m['arch']} {r['component']} ({m['format']}) {m['path']}",
        f"run      {mode}, method {r['method']}{inter}, epsilon {r['epsilon']:g}, device {r['device']}",
    ] + real + [
        f"input    {ip['description']}, shape {tuple(ip['shape'])}, seq_len {r['seq_len']}",
        f"output   {r['output_node']} {tuple(r['output_shape'])} ({r['output']})",
    ]


def _verdict(r: dict) -> list[str]:
    lines = []
    if r.get("tolerance") is not None:
        if r["mode"] == "block_wise":
            over = [b["block_name"] for b in r["blocks"] if not b["within_tolerance"]]
            lines.append(f"tolerance {r['tolerance']:g}: " + (f"exceeded by {', '.join(over)}" if over
                                                              else "every block's output width is within it"))
        else:
            rel = "<=" if r["within_tolerance"] else ">"
            lines.append(f"tolerance max width {num(r['max_width'])} {rel} {r['tolerance']:g}")
    if "property" in r:
        p = r["property"]
        lines.append(f"property {p['proved']}/{p['total']} assertions proved")
        for a in p["assertions"]:
            if not a["proved"]:
                lines.append(f"  not proved: Y_{a['index']} {a['op']} {a['bound']:g} "
                             f"(bounds [{num(a['lower'])}, {num(a['upper'])}])")
    if r.get("verdict"):
        lines.append(f"verdict  {r['verdict'].upper()}")
    return lines


def _flags(r: dict) -> str:
    flags = [f for f, on in (("NaN", r.get("has_nan")), ("inf", r.get("has_infinite"))) if on]
    return f"  [bounds contain {' and '.join(flags)}]" if flags else ""


def full_lines(r: dict, top: int = 5) -> list[str]:
    lines = _header(r)
    lines.append(f"bounds   max width {num(r['max_width'])}, mean width {num(r['mean_width'])}, "
                 f"range [{num(r['lower_min'])}, {num(r['upper_max'])}]  ({seconds(r['seconds'])}){_flags(r)}")
    lines += _full_attack_lines(r.get("attack"))
    if r["mode"] == "layer_by_layer":
        lines += _layer_lines(r)
    else:
        widest = sorted((n for n in r["nodes"] if n["output_width"] is not None),
                        key=lambda n: -_key(n["output_width"]))[:top]
        if widest:
            lines.append("widest nodes:")
            lines += ["  " + s for s in table(
                ["node", "op", "max width", "mean width"],
                [[n["name"], n["layer_type"], num(n["output_width"]), num(n["mean_width"])] for n in widest],
                "llrr")]
    return lines + _verdict(r)


def _key(v) -> float:
    return math.inf if v is None or math.isnan(v) else v


def _full_attack_lines(a: Optional[dict]) -> list[str]:
    """Attacked figures of a full run (``gamma verify --attack``)."""
    if not a:
        return []
    lines = [f"attack   max width {num(a['max_width'])} (certified / attacked {_growth(a['ratio'])}), "
             f"{a['points']} points, {a['targets']} outputs pushed up and down  ({seconds(a['seconds'])})"]
    lines += _violations(a["violations"])
    if len(a["per_position"]) > 1:
        lines.append("per output position:")
        lines += ["  " + s for s in table(
            ["#", "certified", "attacked", "ratio"],
            [[p["index"], num(p["certified_width"]), num(p["attacked_width"]), _growth(p["ratio"])]
             for p in a["per_position"]], "rrrr")]
    return lines


def _violations(n: int) -> list[str]:
    return [f"UNSOUND  {n} attacked outputs fall outside the certified bounds"] if n else []


def _mark(n: dict) -> str:
    if n["has_nan"]:
        return "NaN"
    if n["has_infinite"]:
        return "INF"
    return "SATURATED" if n["saturated"] else ""


def _layer_lines(r: dict) -> list[str]:
    lines = ["", "width growth, node by node:"]
    lines += ["  " + s for s in table(
        ["node", "op", "in width", "out width", "growth", "flag"],
        [[n["name"], n["layer_type"], num(n["input_width"]), num(n["output_width"]), _growth(n["growth"]),
          _mark(n)] for n in r["nodes"]], "llrrrl")]
    if r["block_growth"]:
        lines += ["", "width growth, block by block:"]
        lines += ["  " + s for s in table(
            ["#", "block", "in width", "out width", "growth", "first degraded node"],
            [[b["block_index"], b["block_name"], num(b["input_width"]), num(b["output_width"]),
              _growth(b["growth"]), b["first_degraded_node"] or ""] for b in r["block_growth"]], "rlrrrl")]
    fd = r["first_degraded"]
    lines.append("")
    lines.append(f"first degraded node: {fd['name']} ({fd['layer_type']}, {fd['reason']}, width "
                 f"{num(fd['output_width'])})" if fd else "no node degraded (no NaN, inf or saturation)")
    return lines


def _growth(v: Optional[float]) -> str:
    if v is None or math.isnan(v):
        return "-"
    return "inf" if math.isinf(v) else f"x{v:.3g}"


def block_lines(r: dict) -> list[str]:
    """One row per block; the --worst-k blocks are marked with '*'."""
    lines = _header(r)
    rows = r["blocks"]
    worst_blocks = r["summary"]["worst_blocks"]
    if len(worst_blocks) >= len(rows):        # marking every block says nothing: mark the worst one
        worst_blocks = worst_blocks[:1] if len(rows) > 1 else []
    worst = {w["index"] for w in worst_blocks}
    probes = [("qk", "qk_matmul_width"), ("attn", "attn_width"), ("swiglu", "swiglu_width"),
              ("mlp", "mlp_width"), ("cross qk", "cross_qk_width"), ("cross attn", "cross_attn_width")]
    probes = [(h, k) for h, k in probes if any(k in b for b in rows)]
    att = r.get("attack")
    extra = ["attacked", "att sens", "ratio"] if att else []
    header = ["", "#", "block", "in width", "out width", "sensitivity"] + extra + [h for h, _ in probes] \
        + ["status", "time"]
    body = [["*" if b["block_index"] in worst else "", b["block_index"], b["block_name"], num(b["input_width"], 2),
             num(b["output_width"]), num(b["sensitivity"])]
            + ([num(b.get("attacked_width")), num(b.get("attacked_sensitivity")), _growth(b.get("ratio"))]
               if att else [])
            + [num(b.get(k)) for _, k in probes] + [b["status"], seconds(b["seconds"])] for b in rows]
    lines += [""] + table(header, body, "lrl" + "r" * (3 + len(extra) + len(probes)) + "lr")
    s = r["summary"]
    lines += ["", f"sensitivity (max out width / in width): max {num(s['max_sensitivity'])}, "
                  f"median {num(s['median_sensitivity'])}, min {num(s['min_sensitivity'])}, "
                  f"range {_growth(s['sensitivity_range'])}  ({seconds(r['seconds'])}){_flags(r)}"]
    if worst:
        lines.append("worst blocks (*): " + ", ".join(f"{w['name']} ({num(w['sensitivity'])})"
                                                     for w in worst_blocks))
    lines.append("degraded blocks: " + (", ".join(
        f"{b['block_name']} at {b['first_degraded_node']}" for b in rows if b["degraded"]) or "none"))
    return lines + _block_attack_lines(att) + _verdict(r)


def _block_attack_lines(a: Optional[dict]) -> list[str]:
    """The attack summary of a block-wise run: ratios, rank agreement, worst-ratio blocks."""
    if not a:
        return []
    rho = "n/a" if a["spearman"] is None or math.isnan(a["spearman"]) else f"{a['spearman']:+.2f}"
    lines = [f"attack: certified / attacked width max {_growth(a['max_ratio'])}, median {_growth(a['median_ratio'])}, "
             f"min {_growth(a['min_ratio'])} ({a['points']} points, {seconds(a['seconds'])})",
             f"rank agreement of certified and attacked sensitivity: Spearman {rho} over {a['spearman_n']} blocks"]
    if a["worst_ratio_blocks"]:
        lines.append("loosest blocks (certified / attacked): " + ", ".join(
            f"{w['name']} ({_growth(w['ratio'])})" for w in a["worst_ratio_blocks"]))
    return lines + _violations(a["violations"])


def verify_lines(r: dict) -> list[str]:
    return block_lines(r) if r["mode"] == "block_wise" else full_lines(r)
