"""``gamma verify``: bound the output over an L-inf box (full, layer by layer or block-wise).

``--vnnlib`` runs go to :func:`gamma.commands.vnncomp.run_verify`.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from ..options import (AFTER_SATURATION, ARITHMETIC, ENGINES, INTERMEDIATE, LAYERNORM_VARIANCE, METHODS, PRODUCTS,
                       BoundOptions)
from ..verify import InputSpec, RunSpec, run as run_verification
from .common import (Progress, add_input_options, check_writable, input_kwargs, num, print_json, seconds,
                     table, warn_engine)
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
                   help="float32 (default): bounds hold for any float32 engine, rounding included; "
                        "float32-probabilistic: the same with the rounding errors of dot products and norms' sums taken as independent "
                        "and mean-zero (far tighter on deep models; the failure probability under that model is "
                        "reported); real: bounds of the real-valued function only, as auto_LiRPA computes them (not a "
                        "float32 guarantee)")
    s.add_argument("--products", choices=PRODUCTS, default="polar",
                   help="elementwise products (SwiGLU's gate * up) in CROWN: polar (default) also by (s^2 - d^2)/4 "
                        "with CROWN bounds of s = x + y and d = x - y, tighter, about 2x the time of a Llama-family "
                        "block; half-sum: the McCormick half-sum only (faster, looser)")
    s.add_argument("--after-saturation", choices=AFTER_SATURATION, default="crown",
                   help="what bounds the nodes after the first node whose bound is wider than 1e6 or unbounded: "
                        "crown (default) keeps running CROWN passes; ibp switches to interval bounds there (no "
                        "tighter, far faster in depth: use it to learn quickly where and whether a deep model's "
                        "bounds saturate); the report names the node")
    s.add_argument("--layernorm-variance", choices=LAYERNORM_VARIANCE, default="any",
                   help="how the float32 engine computes LayerNorm's variance: any (default: any algorithm, "
                        "running moments as in PyTorch's CPU kernel included, covered by doubling the derived "
                        "margin), formula (E[x^2] - E[x]^2 or mean((x - mean)^2) in any summation order, as "
                        "CTranslate2 and llama.cpp compute it: the derived margin itself; the bounds then do not "
                        "cover PyTorch's CPU LayerNorm) or two-pass (mean((x - mean)^2) only, as llama.cpp and "
                        "whisper.cpp compute it: tighter where a row's mean is large next to its spread; the "
                        "bounds then do not cover CTranslate2 either)")
    s.add_argument("--engine", choices=ENGINES, default="float32",
                   help="which engine's arithmetic the float32 bounds hold for: float32 (default: any engine computing "
                        "every op in float32, as transformers does) or llama.cpp (a GGUF file as ggml's CPU backend "
                        "computes it: matmul activations quantized to Q8_0/Q8_1 blocks or rounded to F16/BF16 as the "
                        "weight's type asks, an F16 KV cache without flash attention (llama.cpp -fa off), ggml's own RoPE angles "
                        "and RMSNorm)")
    s.add_argument("--norm-splits", type=int, default=1, metavar="K",
                   help="CROWN bounds the nodes after each LayerNorm / RMSNorm (its MLP and residual add, up to the "
                        "next norm or attention) once per piece of K of the norm's mean square, and takes their union: "
                        "tighter where the norm's scale varies over the box (blocks at eps 1e-3), at up to K times "
                        "those nodes' passes (default 1: no split; K > 1 needs --method crown or alpha, --intermediate crown)")
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
    options = BoundOptions("1e-3" if args.epsilon is None else args.epsilon, args.method, args.intermediate,
                           args.arithmetic, args.device, args.alpha_iters, args.products,
                           args.after_saturation, args.layernorm_variance, args.engine,
                           args.norm_splits)   # a bad --epsilon shown as typed
    check_writable(args.save_bounds)
    block_wise = args.block_wise or (args.model is None and not args.layer_by_layer and not args.full)
    spec = RunSpec("block_wise" if block_wise else "layer_by_layer" if args.layer_by_layer else "full",
                   args.blocks, args.tolerance, args.property, args.worst_k, args.workers, args.ray,
                   args.checkpoint, args.attack)
    inputs = InputSpec(**input_kwargs(args))
    progress = Progress.for_stderr(not args.quiet)
    try:
        result = run_verification(args.model, options, inputs, spec, progress)
    finally:
        progress.done()
    warn_engine(result.report["model"], result.report)
    if args.save_bounds:
        result.save_bounds(args.save_bounds)
    if args.json:
        print_json(result.to_dict())
    else:
        print("\n".join(verify_lines(result.report)))
        for b in result.report.get("blocks", []):
            if b["status"] == "FAILED":
                print(f"block {b['block_name']} FAILED: {b['error']}")
        if args.save_bounds:
            print(f"bounds written to {args.save_bounds}")
    return 0


# ------------------------------------------------------------------ text
ARITHMETIC_LINE = {
    "float32": "bounds   hold for every float32 engine: its rounding included, in any summation order (assumed: "
               "math functions within a few ulp, {ln})",
    "float32-probabilistic": "bounds   hold for float32 engines with the rounding of dot products and of norms' sums "
                             "under a probabilistic model (--arithmetic float32-probabilistic: independent "
                             "mean-zero rounding errors, any summation order); under it they fail with probability "
                             "<= {p:.1e}; the other ops' rounding as in the default mode ({ln})",
    "real": "bounds   of the real-valued function only (--arithmetic real): no float32 margins, "
            "not a guarantee for a float32 engine",
}

ENGINE_LINE = {
    "float32": None,
    "llama.cpp": "engine   llama.cpp's CPU backend (--engine llama.cpp): matmul activations quantized or rounded to "
                 "the weights' vec_dot types, an F16 KV cache without flash attention, ggml's RoPE angles and RMSNorm",
}

LAYERNORM_LINE = {
    "any": "LayerNorm's running moments within twice the derived allowance",
    "formula": "LayerNorm's variance by E[x^2] - E[x]^2 or mean((x - mean)^2), --layernorm-variance formula: "
               "CTranslate2, llama.cpp, not PyTorch's CPU kernel",
    "two-pass": "LayerNorm's variance by mean((x - mean)^2), --layernorm-variance two-pass: llama.cpp, "
                "whisper.cpp, not CTranslate2 or PyTorch's CPU kernel",
}


def _header(r: dict) -> list[str]:
    m, ip = r["model"], r["input_point"]
    mode = {"full": "full network", "layer_by_layer": "layer by layer", "block_wise": "block-wise"}[r["mode"]]
    inter = f", intermediate {r['intermediate']}" if r["method"] in ("crown", "alpha") else ""
    if r.get("products", "polar") != "polar" and r["method"] in ("crown", "alpha"):
        inter += f", products {r['products']}"
    if r.get("after_saturation", "crown") != "crown" and r["method"] in ("crown", "alpha"):
        inter += f", after saturation {r['after_saturation']}"
    if r.get("norm_splits", 1) > 1 and r["method"] in ("crown", "alpha"):
        inter += f", norm splits {r['norm_splits']}"
    real = [ARITHMETIC_LINE[r.get("arithmetic", "float32")].format(
        p=r.get("rounding_failure", 1.0), ln=LAYERNORM_LINE[r.get("layernorm_variance", "any")])]
    if ENGINE_LINE[r.get("engine", "float32")]:
        real.append(ENGINE_LINE[r["engine"]])
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
    lines += _unbounded_lines(r)
    lines += _ibp_from_lines(r)
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


# what narrows an unbounded whole-network bound, per arithmetic mode (the first that applies)
NARROWER = {
    "float32": "the float32 rounding allowance and the relaxations widen each other through depth here; "
               "--arithmetic float32-probabilistic (a rounding model; its failure probability is reported) "
               "or --arithmetic real (no rounding) bound narrower, and so do a smaller --epsilon and --block-wise",
    "float32-probabilistic": "the relaxations widen through depth here; --arithmetic real (no rounding), a smaller "
                             "--epsilon or --block-wise bound narrower",
    "real": "the relaxations widen through depth here; a smaller --epsilon or --block-wise bound narrower",
}


def _ibp_from_lines(r: dict) -> list[str]:
    """Where --after-saturation ibp stopped the CROWN passes (full runs; block rows say it per block)."""
    at = r.get("ibp_from")
    if not at:
        return []
    return [f"ibp from {at['node']} (width {num(at['width'])}) on: --after-saturation ibp; the nodes after it are "
            f"bounded by interval rules, float32 margins and caps, with no CROWN pass"]


def _unbounded_lines(r: dict) -> list[str]:
    """Where an unbounded (NaN or infinite) output starts and what narrows it; for a finite
    output, where a node saturated (after it the bounds come from the ops' ranges and caps,
    e.g. softmax's [0, 1] or RMSNorm's output cap, not from the input region)."""
    if not (r.get("has_nan") or r.get("has_infinite")):
        fd = r.get("first_degraded")
        if not fd or fd["reason"] != "saturated" or r["mode"] == "block_wise":
            return []
        return [f"saturated from {fd['name']} ({fd['layer_type']}, width {num(fd['output_width'])}) on: the bounds "
                f"after it come from the ops' ranges and caps, not from the input region; "
                f"{NARROWER[r.get('arithmetic', 'float32')]}"]
    first = next((n for n in r["nodes"] if n["has_nan"] or n["has_infinite"]), None)
    where = f"from {first['name']} ({first['layer_type']}) on" if first else "at the output"
    return [f"unbounded {where}: {NARROWER[r.get('arithmetic', 'float32')]}"]


def _key(v) -> float:
    return math.inf if v is None or math.isnan(v) else v


def _full_attack_lines(a: Optional[dict]) -> list[str]:
    """Attacked figures of a full run (``gamma verify --attack``)."""
    if not a:
        return []
    lines = [f"attack   max width {num(a['max_width'])} (certified / attacked {_growth(a['ratio'])}), "
             f"{a['points']} points, {a['targets']} outputs pushed up and down  ({seconds(a['seconds'])})"]
    lines += _violations(a["violations"], a.get("float64_outside"))
    if len(a["per_position"]) > 1:
        lines.append("per output position:")
        lines += ["  " + s for s in table(
            ["#", "certified", "attacked", "ratio"],
            [[p["index"], num(p["certified_width"]), num(p["attacked_width"]), _growth(p["ratio"])]
             for p in a["per_position"]], "rrrr")]
    return lines


def _violations(n: int, outside: Optional[int] = None) -> list[str]:
    """The verdict lines of an attack; ``outside``: under another engine than float32 (the key is
    there), how many of the float64 attack's points lie outside that engine's bounds."""
    lines = [f"UNSOUND  {n} attacked outputs fall outside the certified bounds"] if n else []
    if outside:
        lines.append(f"note     {outside} attacked outputs of gamma's float64 forward lie outside the bounds, which "
                     "hold for the engine named above instead: the attack does not evaluate that engine")
    elif outside is not None:
        lines.append("note     the attack evaluates gamma's float64 forward, not the engine named above: its widths "
                     "are the real function's (none of its points lies outside the bounds)")
    return lines


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
    cut = [b for b in rows if b.get("ibp_from")]
    if cut:
        lines.append("ibp from (--after-saturation ibp): " + ", ".join(
            f"{b['block_name']} at {b['ibp_from']['node']}" for b in cut))
    return lines + _memory_lines(r.get("memory")) + _block_attack_lines(att) + _verdict(r)


def _memory_lines(m: Optional[dict]) -> list[str]:
    """Peak resident memory of this process and of each worker (block-wise runs)."""
    if not m or m.get("peak_rss_mb") is None:
        return []
    line = f"peak memory: {m['peak_rss_mb'] / 1024:.2f} GiB (this process)"
    if m["workers"]:
        line += "; workers: " + ", ".join(
            f"pid {w['pid']} {w['peak_rss_mb'] / 1024:.2f} GiB (blocks {','.join(map(str, w['blocks']))})"
            for w in m["workers"])
    return [line]


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
    return lines + _violations(a["violations"], a.get("float64_outside"))


def verify_lines(r: dict) -> list[str]:
    return block_lines(r) if r["mode"] == "block_wise" else full_lines(r)
