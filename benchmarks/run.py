"""Speed and memory of gamma on real models (issue 7) -> BENCHMARKS.md.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out BENCHMARKS.md]
                             [--qwen-blocks 0,27|all] [--smol-blocks 0,15,29|all]

Sections (each a table in the output file; progress goes to stderr):

1. IBP cost in nominal forward passes on whole real models (Whisper tiny.en
   encoder, SmolLM2-135M): ``gamma.ops.evaluate`` and
   ``gamma.bounds.compute_bounds(..., "ibp")`` timed alternately in one
   process, median of N each, and where IBP's time goes (per op type).
2. Block-wise CROWN on a Qwen3-0.6B-shaped model (random weights, GGUF Q8_0,
   written here into a temporary directory): seconds and peak memory per
   block from ``gamma.verify(..., block_wise=True, blocks=k)``, with
   ``--intermediate cut`` and zonotopes on the same blocks; a plot.
3. The same per-block timing on Whisper tiny.en (encoder) and SmolLM2-135M.
4. Scale-out: serial vs ``workers=2`` (identical bounds asserted).
5. CUDA vs CPU when a CUDA device is present.

Timings on a shared machine are noisy: every ratio is measured side by side
in one run, and the load average is written next to the per-block times.
Per-block runs happen in a child process per (model, method) so that peak
memory is that of the block (``VmHWM`` reset before each block through
``/proc/self/clear_refs``); a block that exceeds ``--block-timeout`` is
killed and reported as not finished, never estimated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)               # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

import torch                            # noqa: E402

import gamma                            # noqa: E402
import gamma.zoo                        # noqa: E402
from gamma.bounds import compute_bounds  # noqa: E402
from gamma.ops import evaluate          # noqa: E402

import _models                          # noqa: E402

EPS = 1e-3
CHILD_TAG = "@@bench "
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def load_avg() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (work tree modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(argv: list[str]) -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/run.py', *argv])}`",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- RAM: {_mem_total_gib():.1f} GiB",
        f"- GPU: {gpu}",
        f"- python {platform.python_version()}, torch {torch.__version__}, gamma {gamma.__version__} "
        f"(git {_git_rev()})",
        f"- load average (1/5/15 min) at start: {load_avg()}",
    ]


# ------------------------------------------------------------------ helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def fmt_s(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def zoo_models(names) -> dict[str, str]:
    """{label: path} for the real models that are installed; missing ones are logged."""
    table_ = {"whisper": ("Whisper tiny.en encoder", gamma.zoo.whisper_tiny_en),
              "smol": ("SmolLM2-135M (Q4_1 GGUF)", gamma.zoo.smollm2_135m)}
    out = {}
    for n in names:
        label, fn = table_[n]
        try:
            out[n] = fn()
        except gamma.GammaError as e:
            log(f"skipping {label}: {e}")
    return out


LABELS = {"whisper": "Whisper tiny.en encoder", "smol": "SmolLM2-135M (Q4_1 GGUF)",
          "qwen": "Qwen3-0.6B shape, random, Q8_0 GGUF"}


# ------------------------------------------------------------------ 1. IBP in forward passes
def ibp_ratio(graph, x, repeats: int, device: str = "cpu", eps: float = EPS) -> dict:
    """Nominal forward vs IBP on the same graph and point, alternated ``repeats``
    times in this process (after one warm-up forward)."""
    graph.to(device)
    x = x.to(device=device, dtype=torch.float64)
    with torch.no_grad():
        timed(lambda: evaluate(graph, x), device)
        fwd, ibp = [], []
        for _ in range(repeats):
            fwd.append(timed(lambda: evaluate(graph, x), device))
            ibp.append(timed(lambda: compute_bounds(graph, x, eps, "ibp", device=device), device))
    f, i = statistics.median(fwd), statistics.median(ibp)
    pairs = [b / a for a, b in zip(fwd, ibp)]
    return {"forward_s": f, "ibp_s": i, "ratio": i / f, "pair_min": min(pairs), "pair_max": max(pairs),
            "repeats": repeats, "forward_all": fwd, "ibp_all": ibp}


def ibp_breakdown(graph, x, device: str = "cpu", eps: float = EPS) -> dict:
    """Seconds of IBP spent per op type: the interval rule and the float32
    margin, timed by wrapping the engine's two per-node calls (one extra run)."""
    from gamma.bounds import engine
    rule, marg, count = defaultdict(float), defaultdict(float), defaultdict(int)
    orig_rule, orig_margin = engine.ibp_node, engine.margin

    def rule_w(node, *ins):
        t0 = time.perf_counter()
        out = orig_rule(node, *ins)
        sync(device)
        rule[node.op] += time.perf_counter() - t0
        count[node.op] += 1
        return out

    def margin_w(node, ins, iv):
        t0 = time.perf_counter()
        out = orig_margin(node, ins, iv)
        sync(device)
        marg[node.op] += time.perf_counter() - t0
        return out

    engine.ibp_node, engine.margin = rule_w, margin_w
    try:
        with torch.no_grad():
            total = timed(lambda: compute_bounds(graph, x.to(device=device, dtype=torch.float64), eps, "ibp",
                                                 device=device), device)
    finally:
        engine.ibp_node, engine.margin = orig_rule, orig_margin
    return {"total": total, "ops": {op: (count[op], rule[op], marg[op]) for op in count}}


def section_ibp(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    out += ["## 1. IBP cost in nominal forward passes (whole models)", "",
            f"Nominal forward: `gamma.ops.evaluate(graph, x)`; IBP: `gamma.bounds.compute_bounds(graph, x, {EPS:g}, "
            "\"ibp\")` (float64 with the float32 error margins, as `gamma verify` computes). Both on the same graph "
            f"and point, alternated in one process after one warm-up forward; median of N each. Device: {args.device}. "
            "'ratio' = median IBP / median forward; 'pairs' = range of IBP_i / forward_i over the N adjacent pairs. "
            "Target: ratio <= 4.", ""]
    rows, crumbs = [], []
    for key, path in zoo_models(["whisper", "smol"]).items():
        m = gamma.load(path)
        for T in args.ibp_T:
            graph, x = m.graph(None, T), m.input_point(None, T).x
            reps = args.repeats
            log(f"IBP ratio: {LABELS[key]} T={T}, {reps} repeats (load {load_avg()})")
            r = ibp_ratio(graph, x, reps, args.device)
            ok = "yes" if r["ratio"] <= 4 else "**no**"
            rows.append([LABELS[key], T, len(graph.nodes), reps, fmt_s(r["forward_s"]), fmt_s(r["ibp_s"]),
                         f"**{r['ratio']:.1f}**", f"{r['pair_min']:.1f} - {r['pair_max']:.1f}", ok, load_avg()])
            results.setdefault("ibp", []).append({"model": key, "T": T, **r})
            log(f"  forward {r['forward_s']:.3f}s, IBP {r['ibp_s']:.3f}s, ratio {r['ratio']:.1f}")
        T = args.ibp_T[0]
        log(f"IBP breakdown: {LABELS[key]} T={T}")
        graph, x = m.graph(None, T), m.input_point(None, T).x
        crumbs.append((key, T, ibp_breakdown(graph, x, args.device)))
        del m, graph
    out += table(["model", "T", "nodes", "N", "forward s (median)", "IBP s (median)", "IBP / forward",
                  "pairs", "<= 4?", "load avg after"], rows)
    out += ["", "Where IBP's time goes (one extra instrumented run per model; seconds in the interval rule "
            "and in the float32 margin of each op type, largest first):", ""]
    for key, T, b in crumbs:
        ops = sorted(b["ops"].items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
        rows = [[op, n, fmt_s(r), fmt_s(mg), f"{100 * (r + mg) / b['total']:.0f}%"] for op, (n, r, mg) in ops[:6]]
        out += [f"{LABELS[key]}, T={T}: total {fmt_s(b['total'])} s", ""]
        out += table(["op", "nodes", "rule s", "margin s", "share"], rows) + [""]
        results.setdefault("ibp_breakdown", []).append({"model": key, "T": T, **b})
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]


# ------------------------------------------------------------------ per-block runs (child processes)
def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(spec: dict) -> None:
    """Run blocks one ``gamma.verify`` call each; one JSON line per block on stdout."""
    def emit(obj):
        print(CHILD_TAG + json.dumps(obj), flush=True)

    t0 = time.perf_counter()
    m = gamma.load(spec["path"])
    emit({"event": "loaded", "seconds": time.perf_counter() - t0, "hwm_kib": _hwm_kib()})
    for k in spec["blocks"]:
        reset = _reset_hwm()
        kw = dict(block_wise=True, seq_len=spec["T"], blocks=str(k), device=spec["device"])
        if spec["intermediate"]:
            kw["intermediate"] = spec["intermediate"]
        res = gamma.verify(m, spec["eps"], spec["method"], **kw)
        row = res.report["blocks"][0]
        emit({"event": "block", "block": k, "seconds": row["seconds"], "status": row["status"],
              "output_width": row["output_width"], "hwm_kib": _hwm_kib(), "hwm_reset": reset,
              "nominal_s": res.report["timings"]["nominal"], "total_s": res.report["timings"]["total"],
              "error": row.get("error"), "load": load_avg()})
        if spec.get("stop_after_s") and row["seconds"] > spec["stop_after_s"]:
            emit({"event": "stopped", "after_block": k})
            break


def run_blocks(path: str, T: int, method: str, intermediate: Optional[str], blocks: list[int], device: str,
               timeout: float, stop_after_s: Optional[float] = None) -> dict:
    """Per-block rows from a child process; a block past ``timeout`` seconds is killed."""
    spec = dict(path=path, T=T, method=method, intermediate=intermediate, blocks=blocks, device=device, eps=EPS,
                stop_after_s=stop_after_s)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in p.stdout:
            if line.startswith(CHILD_TAG):
                lines.put(json.loads(line[len(CHILD_TAG):]))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    out = {"rows": [], "load_s": None, "load_hwm_kib": None, "killed": None, "stopped": False, "error": None}
    pending = list(blocks)
    deadline = time.perf_counter() + timeout + 1800        # loading the model gets its own allowance
    while True:
        try:
            ev = lines.get(timeout=max(1.0, deadline - time.perf_counter()))
        except queue.Empty:
            p.kill()
            p.wait()
            out["killed"] = pending[0] if pending else None
            log(f"  block {out['killed']} did not finish within {timeout:.0f} s: killed")
            break
        if ev is None:
            break
        if ev["event"] == "loaded":
            out["load_s"], out["load_hwm_kib"] = ev["seconds"], ev["hwm_kib"]
            log(f"  model loaded in {ev['seconds']:.1f} s")
        elif ev["event"] == "block":
            out["rows"].append(ev)
            pending.remove(ev["block"])
            log(f"  block {ev['block']}: {ev['seconds']:.1f} s, peak {ev['hwm_kib'] / 2**20:.2f} GiB, "
                f"width {ev['output_width']:.3g}, {ev['status']} (load {ev['load']})")
        elif ev["event"] == "stopped":
            out["stopped"] = True
        deadline = time.perf_counter() + timeout
    rc = p.wait()
    if rc != 0 and out["killed"] is None:
        out["error"] = f"child exited with status {rc}"
        log(f"  {out['error']}")
    out["wall_s"] = time.perf_counter() - t0
    out["not_run"] = [b for b in pending if b != out["killed"]]
    return out


def parse_blocks(spec: str, n: int) -> list[int]:
    """``all``, or what ``gamma verify --blocks`` takes (0,27 / 0:4 / 3)."""
    from gamma.verify import select_blocks
    return list(range(n)) if spec == "all" else select_blocks(spec, n)


def block_table(label: str, n_blocks: int, T: int, runs: dict, timeout: float) -> list[str]:
    """Per-block table for one model: one row per (method, block), then per-method totals."""
    rows, summary = [], []
    for name, r in runs.items():
        for ev in r["rows"]:
            rows.append([name, ev["block"], fmt_s(ev["seconds"]), f"{ev['hwm_kib'] / 2**20:.2f}",
                         fmt_g(ev["output_width"]), ev["status"], ev["load"]])
        if r["killed"] is not None:
            rows.append([name, r["killed"], f"> {timeout:.0f} (killed, not finished)", "-", "-", "-", "-"])
        secs = [ev["seconds"] for ev in r["rows"]]
        n = len(secs)
        peak = max((ev["hwm_kib"] for ev in r["rows"]), default=None)
        measured = sum(secs)
        if n == n_blocks:
            total = f"{fmt_s(measured)} s measured (all {n_blocks} blocks)"
        elif n:
            total = (f"{fmt_s(measured)} s measured over {n} of {n_blocks} blocks; "
                     f"extrapolated to all {n_blocks}: ~{fmt_s(measured / n * n_blocks)} s "
                     f"(~{measured / n * n_blocks / 60:.1f} min, **extrapolation, not measured**)")
        else:
            total = "no block finished"
        notes = []
        if r["stopped"]:
            notes.append("stopped after a block over the per-method limit")
        if r["not_run"]:
            notes.append(f"blocks {r['not_run']} not run")
        if r["error"]:
            notes.append(r["error"])
        summary.append([name, f"{n}/{n_blocks}", total,
                        "-" if peak is None else f"{peak / 2**20:.2f}",
                        "-" if r["load_s"] is None else fmt_s(r["load_s"]), "; ".join(notes) or "-"])
    out = [f"**{label}**, T={T}, epsilon {EPS:g}:", ""]
    out += table(["method", "block", "seconds", "peak GiB", "max output width", "status", "load avg"], rows)
    out += [""] + table(["method", "blocks measured", "time", "peak GiB (max over blocks)", "model load s",
                         "notes"], summary) + [""]
    return out


def plot(name: str, label: str, runs: dict) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return None
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = [m for m, r in runs.items() if r["rows"]]
    blocks = sorted({ev["block"] for m in methods for ev in runs[m]["rows"]})
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        secs = {ev["block"]: ev["seconds"] for ev in runs[m]["rows"]}
        xs = [i + j * width for i, b in enumerate(blocks) if b in secs]
        ax.bar(xs, [secs[b] for b in blocks if b in secs], width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(blocks))], [str(b) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title(f"{label}: time per block (measured blocks only)")
    ax.legend()
    fig.tight_layout()
    rel = os.path.join("benchmarks", "out", f"{name}_block_seconds.png")
    fig.savefig(os.path.join(ROOT, rel), dpi=100)
    plt.close(fig)
    return rel


METHOD_RUNS = {"crown": ("crown", None), "crown (cut)": ("crown", "cut"), "zonotope": ("zonotope", None)}


def measure_model(key: str, path: str, T: int, blocks: list[int], n_blocks: int, methods: list[str], args,
                  results: dict, limit_first: Optional[str] = None) -> dict:
    runs = {}
    for name in methods:
        method, inter = METHOD_RUNS[name]
        log(f"{LABELS[key]} T={T} {name}: blocks {blocks} (load {load_avg()})")
        stop = args.crown_limit if name == limit_first else None
        runs[name] = run_blocks(path, T, method, inter, blocks, args.device, args.block_timeout, stop)
        results.setdefault("blocks", []).append({"model": key, "T": T, "method": name, **runs[name]})
    return runs


def section_qwen(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    shape = _models.Qwen3Shape(num_hidden_layers=args.qwen_layers)
    out += ["## 2. Block-wise CROWN on a Qwen3-0.6B-shaped model", ""]
    with tempfile.TemporaryDirectory(prefix="gamma-bench-") as tmp:
        path = os.path.join(tmp, "qwen3-0.6b-shape-q8_0.gguf")
        log(f"writing random Qwen3 {shape.num_hidden_layers} x {shape.hidden_size} GGUF Q8_0 "
            f"({shape.params() / 1e6:.0f}M weights)")
        t0 = time.perf_counter()
        _models.write_qwen3_gguf(path, shape, "Q8_0")
        t_write = time.perf_counter() - t0
        size = os.path.getsize(path)
        blocks = parse_blocks(args.qwen_blocks, shape.num_hidden_layers)
        out += [f"Model: {shape.num_hidden_layers} blocks, hidden {shape.hidden_size}, "
                f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} kv heads, head_dim "
                f"{shape.head_dim}, MLP {shape.intermediate_size}, vocab {shape.vocab_size}; "
                f"{shape.params() / 1e6:.0f}M weights, seeded random (std {shape.initializer_range}), "
                f"written by `benchmarks/_models.py` as GGUF Q8_0 ({size / 2**20:.0f} MiB, {fmt_s(t_write)} s). "
                f"`gamma.verify(path, {EPS:g}, method, block_wise=True, seq_len={args.qwen_T}, blocks=k)` per block "
                f"in a child process; 'seconds' is the block's own time from the result row; 'peak GiB' is the "
                "process's peak resident memory during that call (the whole model's weights and the nominal "
                "forward pass included). Blocks measured: "
                f"{blocks} of {shape.num_hidden_layers} (`--qwen-blocks`). CROWN is stopped after the first "
                f"block if that block takes over {args.crown_limit:.0f} s. Target: every block under 10 min in "
                "total and under 8 GB.", ""]
        methods = ["crown (cut)", "crown", "zonotope"]
        runs = measure_model("qwen", path, args.qwen_T, blocks, shape.num_hidden_layers, methods, args, results,
                             limit_first="crown")
    out += block_table(LABELS["qwen"], shape.num_hidden_layers, args.qwen_T, runs, args.block_timeout)
    png = plot("qwen3_0.6b_shape", f"Qwen3-0.6B shape T={args.qwen_T}", runs)
    if png:
        out += [f"Plot: `{png}` (not committed; regenerate with this command).", ""]
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]


def section_real_blocks(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    out += ["## 3. Block-wise CROWN on Whisper tiny.en and SmolLM2-135M", "",
            f"As section 2, at T={args.block_T} (Whisper: T frames = 2T mel columns).", ""]
    paths = zoo_models(["whisper", "smol"])
    n_blocks = {"whisper": 4, "smol": 30}
    specs = {"whisper": args.whisper_blocks, "smol": args.smol_blocks}
    for key, path in paths.items():
        blocks = parse_blocks(specs[key], n_blocks[key])
        runs = measure_model(key, path, args.block_T, blocks, n_blocks[key], ["crown (cut)", "crown"], args,
                             results, limit_first="crown")
        out += block_table(LABELS[key], n_blocks[key], args.block_T, runs, args.block_timeout)
        png = plot(key, f"{LABELS[key]} T={args.block_T}", runs)
        if png:
            out += [f"Plot: `{png}`.", ""]
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]


# ------------------------------------------------------------------ 4. scale-out
def section_scaleout(args, out: list[str], results: dict) -> None:
    import numpy as np
    t_sec = time.perf_counter()
    path = gamma.zoo.whisper_tiny_en()
    m = gamma.load(path)
    kw = dict(block_wise=True, seq_len=args.scale_T, intermediate="cut", device=args.device)
    out += ["## 4. Scale-out: serial vs `workers=2`", "",
            f"`gamma.verify(Whisper tiny.en, {EPS:g}, \"crown\", block_wise=True, seq_len={args.scale_T}, "
            "intermediate=\"cut\")` over all 4 blocks, serially and with `workers=2` (each worker gets "
            f"cores // 2 = {max(1, (os.cpu_count() or 1) // 2)} torch threads), back to back in one run. "
            "Bounds compared element by element.", ""]
    log(f"scale-out: serial (load {load_avg()})")
    t0 = time.perf_counter()
    serial = gamma.verify(m, EPS, "crown", **kw)
    t_serial = time.perf_counter() - t0
    log(f"scale-out: workers=2 (load {load_avg()})")
    t0 = time.perf_counter()
    par = gamma.verify(m, EPS, "crown", workers=2, **kw)
    t_par = time.perf_counter() - t0
    keys = sorted(serial.arrays)
    same = keys == sorted(par.arrays) and all(np.array_equal(serial.arrays[k], par.arrays[k]) for k in keys)
    assert same, "workers=2 bounds differ from the serial run"
    rows = [["serial", fmt_s(t_serial), fmt_s(serial.report["seconds"]), "-"],
            ["workers=2", fmt_s(t_par), fmt_s(par.report["seconds"]),
             f"{t_serial / t_par:.2f}x"]]
    out += table(["run", "wall s (verify call)", "block phase s", "speed-up (wall)"], rows)
    out += ["", f"Bounds identical bit for bit: {'yes' if same else 'NO'} ({len(keys)} arrays). "
            f"Load average after: {load_avg()} (the machine is shared: a speed-up below 2 on 2 cores is expected "
            "when other jobs hold the cores).", "",
            f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]
    results["scaleout"] = {"serial_s": t_serial, "workers2_s": t_par, "identical": same}


# ------------------------------------------------------------------ 5. CUDA
def section_cuda(args, out: list[str], results: dict) -> None:
    out += ["## 5. CUDA", ""]
    if not torch.cuda.is_available():
        out += ["No CUDA device on this machine (`torch.cuda.is_available()` is False): skipped. On a CUDA "
                "machine, `python benchmarks/run.py --device cuda` runs sections 1-4 on the GPU and this section "
                "compares CPU and GPU side by side.", ""]
        return
    t_sec = time.perf_counter()
    out += [f"Device: {torch.cuda.get_device_name(0)}. One block per model, CPU and CUDA back to back "
            f"(crown, T={args.block_T}; Qwen3 shape at T={args.qwen_T}).", ""]
    rows = []
    for key, path in zoo_models(["whisper", "smol"]).items():
        for name in ("crown (cut)", "crown"):
            method, inter = METHOD_RUNS[name]
            r = {d: run_blocks(path, args.block_T, method, inter, [0], d, args.block_timeout) for d in ("cpu", "cuda")}
            c, g = (r[d]["rows"][0]["seconds"] if r[d]["rows"] else None for d in ("cpu", "cuda"))
            rows.append([LABELS[key], name, 0, fmt_s(c), fmt_s(g), f"{c / g:.1f}x" if c and g else "-"])
    out += table(["model", "method", "block", "CPU s", "CUDA s", "speed-up"], rows)
    out += ["", f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]
    results["cuda"] = rows


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (a few minutes): small T, few blocks")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--json", dest="json_out", help="also write every measurement here")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (default all)")
    ap.add_argument("--repeats", type=int, help="IBP section: N repeats (default 3; quick 2)")
    ap.add_argument("--qwen-blocks", help="blocks of the Qwen3 shape: 0,27 (default), a slice, or all")
    ap.add_argument("--qwen-layers", type=int, help="blocks in the Qwen3 shape (default 28; quick 2)")
    ap.add_argument("--whisper-blocks", help="default all (4)")
    ap.add_argument("--smol-blocks", help="default 0,15,29; all for every block")
    ap.add_argument("--crown-limit", type=float, default=600.0,
                    help="stop CROWN on a model after a block slower than this (s; default 600)")
    ap.add_argument("--block-timeout", type=float, default=1800.0,
                    help="kill a block that runs longer than this (s; default 1800)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    q = args.quick
    args.ibp_T = [4] if q else [8, 16]
    args.repeats = args.repeats or (2 if q else 3)
    args.qwen_layers = args.qwen_layers or (2 if q else 28)
    args.qwen_blocks = args.qwen_blocks or ("0" if q else "0,27")
    args.qwen_T = 2 if q else 8
    args.block_T = 2 if q else 16
    args.scale_T = 2 if q else 4
    args.whisper_blocks = args.whisper_blocks or ("0" if q else "all")
    args.smol_blocks = args.smol_blocks or ("0" if q else "0,15,29")
    if q:
        args.crown_limit = min(args.crown_limit, 60.0)
        args.block_timeout = min(args.block_timeout, 120.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device on this machine; sections 1-4 run on the CPU")
        args.device = "cpu"
    sections = {s.strip() for s in args.sections.split(",")}

    out = ["# gamma benchmarks", "", "Regenerate with one command (quick smoke run: `--quick`). Machine:", ""]
    out += machine(argv) + [""]
    if q:
        out += ["**Quick mode** (smoke test): small T and few blocks; not the issue's configurations.", ""]
    results: dict = {}
    timings = []
    steps = [("1", "IBP ratio", section_ibp), ("2", "Qwen3-0.6B shape", section_qwen),
             ("3", "Whisper / SmolLM2 blocks", section_real_blocks), ("4", "scale-out", section_scaleout),
             ("5", "CUDA", section_cuda)]
    for sid, name, fn in steps:
        if sid not in sections:
            continue
        t0 = time.perf_counter()
        try:
            fn(args, out, results)
        except Exception as e:           # a failed section is reported, the others still run
            log(f"section {sid} failed: {type(e).__name__}: {e}")
            out += [f"**Section {sid} ({name}) failed: `{type(e).__name__}: {e}`**", ""]
        timings.append([sid, name, fmt_s(time.perf_counter() - t0)])
        _write(args.out, out + _footer(timings))      # partial results survive an interrupted run
    _write(args.out, out + _footer(timings))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    log(f"wrote {args.out}")
    return 0


def _footer(timings) -> list[str]:
    return ["## Run time", ""] + table(["section", "what", "wall s"], timings) + \
        ["", f"Load average (1/5/15 min) at the end: {load_avg()}.", ""]


def _write(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
