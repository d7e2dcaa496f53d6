"""Speed and memory of gamma on real models (issue 7) -> BENCHMARKS.md.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out BENCHMARKS.md]
                             [--qwen-blocks 0,27|all] [--smol-blocks 0,15,29|all]
                             [--max-minutes 45] [--threads N] [--sections 1,2,3,4,5 [--update]]

Sections (each a table in the output file; progress goes to stderr):

1. IBP cost in nominal forward passes on whole real models (Whisper tiny.en
   encoder, SmolLM2-135M): ``gamma.ops.evaluate`` and
   ``gamma.bounds.compute_bounds(..., "ibp")`` timed alternately in one
   process, median of N each; the same at 1 torch thread; where IBP's time
   goes (per op type).
2. Block-wise CROWN on a Qwen3-0.6B-shaped model (random weights, GGUF Q8_0,
   written here into a temporary directory by ``_models.py``): seconds and
   peak memory per block from ``gamma.verify(..., block_wise=True,
   blocks=k)``, with ``intermediate="cut"`` and zonotopes on the same
   blocks; a plot in ``benchmarks/out/`` (not committed).
3. The same per-block timing on Whisper tiny.en (encoder) and SmolLM2-135M,
   breadth first (the first block of every model and method, then the rest).
4. Scale-out: serial vs ``workers=2`` (identical bounds asserted).
5. CUDA vs CPU when a CUDA device is present.

Timings on a shared machine are noisy: every ratio is measured side by side
in one run, and the load average is written next to the per-block times.
Per-block runs happen in a child process per (model, method); peak memory is
the child's ``VmHWM`` during the block's ``gamma.verify`` call (reset before
each block through ``/proc/self/clear_refs``; the whole model's weights are
included).  A block that runs past ``--block-timeout``, or past the run's
``--max-minutes`` budget, is killed and reported as not finished (a lower
bound, never an estimate); a child killed by the kernel's OOM killer is
reported as such.  Totals over a subset of blocks are labelled as
extrapolations.  ``--update`` re-measures only ``--sections`` in an existing
output file and keeps the other sections.
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
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}; "
        "the machine is shared with other jobs: see the load averages next to every time",
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
class _IbpTimer:
    """Seconds of IBP per op type (the interval rule and the float32 margin),
    taken by wrapping the engine's two per-node calls while active."""

    def __init__(self, device: str):
        self.device = device
        self.rule, self.margin, self.count = defaultdict(float), defaultdict(float), defaultdict(int)

    def _wrap(self, fn, acc, count):
        def wrapped(node, *a):
            t0 = time.perf_counter()
            out = fn(node, *a)
            sync(self.device)
            acc[node.op] += time.perf_counter() - t0
            if count is not None:
                count[node.op] += 1
            return out
        return wrapped

    def __enter__(self):
        from gamma.bounds import engine
        self._orig = engine.ibp_node, engine.margin
        engine.ibp_node = self._wrap(self._orig[0], self.rule, self.count)
        engine.margin = self._wrap(self._orig[1], self.margin, None)
        return self

    def __exit__(self, *exc):
        from gamma.bounds import engine
        engine.ibp_node, engine.margin = self._orig

    def ops(self) -> dict:
        return {op: (self.count[op], self.rule[op], self.margin[op]) for op in self.count}


def ibp_ratio(graph, x, repeats: int, budget: float, device: str = "cpu", eps: float = EPS,
              breakdown: bool = False) -> dict:
    """Nominal forward vs IBP on the same graph and point, alternated in this
    process after one warm-up forward: ``repeats`` pairs, or fewer (at least 2)
    once ``budget`` seconds are spent.  With ``breakdown`` the last IBP run is
    also split per op type (the wrapper costs a clock read per node)."""
    graph.to(device)
    x = x.to(device=device, dtype=torch.float64)
    fwd, ibp, split = [], [], None
    with torch.no_grad():
        timed(lambda: evaluate(graph, x), device)
        t_start = time.perf_counter()
        for i in range(repeats):
            last = i == repeats - 1 or (i >= 1 and time.perf_counter() - t_start
                                        + (time.perf_counter() - t_start) / (i + 1) > budget)
            fwd.append(timed(lambda: evaluate(graph, x), device))
            if last and breakdown:
                with _IbpTimer(device) as tm:
                    ibp.append(timed(lambda: compute_bounds(graph, x, eps, "ibp", device=device), device))
                split = {"total": ibp[-1], "ops": tm.ops()}
            else:
                ibp.append(timed(lambda: compute_bounds(graph, x, eps, "ibp", device=device), device))
            if last:
                break
    f, i = statistics.median(fwd), statistics.median(ibp)
    pairs = [b / a for a, b in zip(fwd, ibp)]
    return {"forward_s": f, "ibp_s": i, "ratio": i / f, "pair_min": min(pairs), "pair_max": max(pairs),
            "repeats": len(fwd), "forward_all": fwd, "ibp_all": ibp, "breakdown": split}


def threads_table(args, results: dict) -> list[str]:
    """Forward and IBP on Whisper tiny.en at this run's thread count and at 1
    thread, alternated: on a shared machine, OpenMP threads that wait for a
    busy core can cost more than they bring."""
    n = torch.get_num_threads()
    if n == 1 or args.device != "cpu":
        return []
    m = gamma.load(gamma.zoo.whisper_tiny_en())
    T = args.ibp_T[0]
    graph, x = m.graph(None, T), m.input_point(None, T).x
    log(f"threads: {n} vs 1 on Whisper T={T} (load {load_avg()})")
    got = {n: ([], []), 1: ([], [])}
    with torch.no_grad():
        evaluate(graph, x)
        for _ in range(3):
            for th in (n, 1):
                torch.set_num_threads(th)
                got[th][0].append(timed(lambda: evaluate(graph, x), "cpu"))
                got[th][1].append(timed(lambda: compute_bounds(graph, x, EPS, "ibp"), "cpu"))
    torch.set_num_threads(n)
    rows = [[th, fmt_s(statistics.median(f)), fmt_s(statistics.median(i)),
             f"{statistics.median(i) / statistics.median(f):.1f}"] for th, (f, i) in got.items()]
    results["threads"] = {th: {"forward": f, "ibp": i} for th, (f, i) in got.items()}
    return ["", f"Thread count under this run's load (Whisper tiny.en encoder, T={T}, median of 3, {n} and 1 torch "
            f"threads alternated; load avg {load_avg()}): when other jobs hold the cores, OpenMP threads waiting "
            "at barriers can make the multi-threaded run slower than one thread, inflating every time in this "
            "file.", ""] + table(["torch threads", "forward s", "IBP s", "IBP / forward"], rows)


def section_ibp(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    out += ["## 1. IBP cost in nominal forward passes (whole models)", "",
            f"Nominal forward: `gamma.ops.evaluate(graph, x)`; IBP: `gamma.bounds.compute_bounds(graph, x, {EPS:g}, "
            "\"ibp\")` (float64 with the float32 error margins, as `gamma verify` computes). Both on the same graph "
            f"and point, alternated in one process after one warm-up forward; median of N each. Device: {args.device}. "
            "'ratio' = median IBP / median forward; 'pairs' = range of IBP_i / forward_i over the N adjacent pairs. "
            f"N = up to {args.repeats} pairs, fewer (at least 2) once a configuration has used "
            f"{args.ibp_budget:.0f} s. Target: ratio <= 4.", ""]
    rows, crumbs = [], []
    for key, path in zoo_models(args.ibp_models).items():
        m = gamma.load(path)
        for j, T in enumerate(args.ibp_T):
            graph, x = m.graph(None, T), m.input_point(None, T).x
            log(f"IBP ratio: {LABELS[key]} T={T}, up to {args.repeats} repeats (load {load_avg()})")
            r = ibp_ratio(graph, x, args.repeats, args.ibp_budget, args.device, breakdown=j == 0)
            ok = "yes" if r["ratio"] <= 4 else "**no**"
            rows.append([LABELS[key], T, len(graph.nodes), r["repeats"], fmt_s(r["forward_s"]), fmt_s(r["ibp_s"]),
                         f"**{r['ratio']:.1f}**", f"{r['pair_min']:.1f} - {r['pair_max']:.1f}", ok, load_avg()])
            results.setdefault("ibp", []).append({"model": key, "T": T, **r})
            if r["breakdown"]:
                crumbs.append((key, T, r["breakdown"]))
            log(f"  forward {r['forward_s']:.3f}s, IBP {r['ibp_s']:.3f}s, ratio {r['ratio']:.1f}")
            del graph
        del m
    out += table(["model", "T", "nodes", "N", "forward s (median)", "IBP s (median)", "IBP / forward",
                  "pairs", "<= 4?", "load avg after"], rows)
    out += threads_table(args, results)
    out += ["", "Where IBP's time goes (the last IBP run at the smallest T, split per op type by wrapping the "
            "engine's per-node interval rule and float32 margin; largest first):", ""]
    for key, T, b in crumbs:
        ops = sorted(b["ops"].items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
        rows = [[op, n, fmt_s(r), fmt_s(mg), f"{100 * (r + mg) / b['total']:.0f}%"] for op, (n, r, mg) in ops[:6]]
        out += [f"{LABELS[key]}, T={T}: total {fmt_s(b['total'])} s", ""]
        out += table(["op", "nodes", "rule s", "margin s", "share"], rows) + [""]
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
        started = []

        def progress(msg, k=k):
            if not started:                  # gamma.parallel reports the block just before solving it
                started.append(True)
                emit({"event": "started", "block": k})
        res = gamma.verify(m, spec["eps"], spec["method"], progress=progress, **kw)
        row = res.report["blocks"][0]
        emit({"event": "block", "block": k, "seconds": row["seconds"], "status": row["status"],
              "output_width": row["output_width"], "hwm_kib": _hwm_kib(), "hwm_reset": reset,
              "nominal_s": res.report["timings"]["nominal"], "total_s": res.report["timings"]["total"],
              "error": row.get("error"), "load": load_avg()})
        if spec.get("stop_after_s") and row["seconds"] > spec["stop_after_s"]:
            emit({"event": "stopped", "after_block": k})
            break


def run_blocks(path: str, T: int, method: str, intermediate: Optional[str], blocks: list[int], device: str,
               timeout: float, stop_after_s: Optional[float] = None, deadline: Optional[float] = None) -> dict:
    """Per-block rows from a child process.  A block whose bound computation
    runs past ``timeout`` seconds, or past the run's ``deadline``
    (``time.perf_counter()`` value), is killed; later blocks are not run."""
    out = {"rows": [], "load_s": None, "load_hwm_kib": None, "killed": None, "kill_after_s": None,
           "kill_reason": None, "stopped": False, "error": None, "skipped": None, "not_run": [], "wall_s": 0.0}
    left = math.inf if deadline is None else deadline - time.perf_counter()
    if left < 120:
        out.update(skipped="run time budget (--max-minutes) spent", not_run=list(blocks))
        log(f"  not run: {out['skipped']}")
        return out
    spec = dict(path=path, T=T, method=method, intermediate=intermediate, blocks=blocks, device=device, eps=EPS,
                stop_after_s=stop_after_s, threads=torch.get_num_threads())
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
    pending = list(blocks)
    started_at = t0
    limit, reason = math.inf, None          # no limit while loading and between blocks (graph + nominal)
    while True:
        run_left = math.inf if deadline is None else deadline - time.perf_counter()
        try:
            ev = lines.get(timeout=max(1.0, min(limit - time.perf_counter(), run_left)) if
                           min(limit, run_left) < math.inf else None)
        except queue.Empty:
            p.kill()
            p.wait()
            why = reason if limit - time.perf_counter() <= 1.0 else "run time budget (--max-minutes)"
            out.update(killed=pending[0] if pending else None, kill_reason=why,
                       kill_after_s=time.perf_counter() - started_at)
            log(f"  block {out['killed']}: not finished after {out['kill_after_s']:.0f} s ({why}): killed")
            break
        if ev is None:
            break
        if ev["event"] == "loaded":
            out["load_s"], out["load_hwm_kib"] = ev["seconds"], ev["hwm_kib"]
            log(f"  model loaded in {ev['seconds']:.1f} s")
        elif ev["event"] == "started":
            started_at = time.perf_counter()
            limit, reason = started_at + timeout, f"--block-timeout {timeout:.0f} s"
        elif ev["event"] == "block":
            out["rows"].append(ev)
            pending.remove(ev["block"])
            limit = math.inf
            log(f"  block {ev['block']}: {ev['seconds']:.1f} s, peak {ev['hwm_kib'] / 2**20:.2f} GiB, "
                f"width {ev['output_width']:.3g}, {ev['status']} (load {ev['load']})")
        elif ev["event"] == "stopped":
            out["stopped"] = True
    rc = p.wait()
    if rc != 0 and out["killed"] is None:
        out["error"] = _oom(p.pid) if rc == -9 else None
        out["error"] = out["error"] or f"child exited with status {rc}"
        if pending:
            out["error"] += f" during block {pending[0]}"
        log(f"  {out['error']}")
    out["wall_s"] = time.perf_counter() - t0
    out["not_run"] = [b for b in pending if b != out["killed"]]
    return out


def _oom(pid: int) -> Optional[str]:
    """The kernel's OOM-kill line for ``pid``, as a short note (None if dmesg does not say)."""
    import re
    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(rf"Killed process {pid} .*?anon-rss:(\d+)kB", text)
    if not m:
        return None
    return (f"killed by the kernel's OOM killer at {int(m.group(1)) / 2**20:.1f} GiB resident "
            f"(machine total {_mem_total_gib():.1f} GiB, shared with other jobs)")


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
            rows.append([name, r["killed"], f"**> {r['kill_after_s']:.0f}** (not finished: killed, "
                         f"{r['kill_reason']})", "-", "-", "-", "-"])
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
        if r["skipped"]:
            notes.append(f"not run: {r['skipped']}")
        if r["stopped"]:
            notes.append("stopped after a block over --crown-limit")
        if r["killed"] is not None:
            notes.append(f"block {r['killed']} killed after {r['kill_after_s']:.0f} s")
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
    methods = [m for m, r in runs.items() if r["rows"]]
    if not methods:
        return None
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
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
                  results: dict) -> dict:
    """Per method, the blocks in one child; a method stops after a block slower than ``--crown-limit``."""
    runs = {}
    for name in methods:
        method, inter = METHOD_RUNS[name]
        these = blocks[name] if isinstance(blocks, dict) else blocks
        log(f"{LABELS[key]} T={T} {name}: blocks {these} (load {load_avg()})")
        runs[name] = run_blocks(path, T, method, inter, these, args.device, args.block_timeout, args.crown_limit,
                                args.deadline)
        results.setdefault("blocks", []).append({"model": key, "T": T, "method": name, **runs[name]})
    return runs


def _span(blocks: list[int]) -> str:
    if len(blocks) > 3 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]} (all {len(blocks)})" if blocks[0] == 0 else f"{blocks[0]}-{blocks[-1]}"
    return str(blocks)


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
        cut_blocks = parse_blocks(args.qwen_cut_blocks, shape.num_hidden_layers)
        per_method = {name: (cut_blocks if name == "crown (cut)" else blocks) for name in args.qwen_methods}
        out += [f"Model: {shape.num_hidden_layers} blocks, hidden {shape.hidden_size}, "
                f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} kv heads, head_dim "
                f"{shape.head_dim}, MLP {shape.intermediate_size}, vocab {shape.vocab_size}; "
                f"{shape.params() / 1e6:.0f}M weights, seeded random (std {shape.initializer_range}; token embeddings "
                f"std {shape.embedding_std}, see `benchmarks/_models.py`), "
                f"written by `benchmarks/_models.py` as GGUF Q8_0 ({size / 2**20:.0f} MiB, {fmt_s(t_write)} s). "
                f"`gamma.verify(path, {EPS:g}, method, block_wise=True, seq_len={args.qwen_T}, blocks=k)` per block "
                f"in a child process; 'seconds' is the block's own time from the result row; 'peak GiB' is the "
                "process's peak resident memory during that call (the whole model's weights and the nominal "
                "forward pass included). Blocks measured: "
                f"crown (cut) {_span(cut_blocks)} (`--qwen-cut-blocks`), the other methods {_span(blocks)} "
                f"(`--qwen-blocks`), of {shape.num_hidden_layers}. A method stops after a block slower "
                f"than {args.crown_limit:.0f} s (`--crown-limit`); a block still running after "
                f"{args.block_timeout:.0f} s (`--block-timeout`) is killed and reported as not finished. "
                "Target: every block, in total, under 10 min and 8 GB.", ""]
        runs = measure_model("qwen", path, args.qwen_T, per_method, shape.num_hidden_layers, args.qwen_methods, args,
                             results)
    out += block_table(LABELS["qwen"], shape.num_hidden_layers, args.qwen_T, runs, args.block_timeout)
    png = plot("qwen3_0.6b_shape", f"Qwen3-0.6B shape T={args.qwen_T}", runs)
    if png:
        out += [f"Plot: `{png}` (not committed; regenerate with this command).", ""]
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]


def _merge(a: dict, b: dict) -> dict:
    """Two run_blocks results of one (model, method) as one."""
    out = dict(a)
    out["rows"] = a["rows"] + b["rows"]
    for k in ("killed", "kill_after_s", "kill_reason", "error", "skipped"):
        out[k] = a[k] if a[k] is not None else b[k]
    out["stopped"] = a["stopped"] or b["stopped"]
    out["not_run"] = a["not_run"] + b["not_run"]
    out["load_s"] = a["load_s"] if a["load_s"] is not None else b["load_s"]
    out["wall_s"] = a["wall_s"] + b["wall_s"]
    return out


def section_real_blocks(args, out: list[str], results: dict) -> None:
    """Breadth first: the first selected block of every (model, method), then
    the other blocks, so that a run cut short by --max-minutes still covers
    every model and method."""
    t_sec = time.perf_counter()
    out += ["## 3. Block-wise CROWN on Whisper tiny.en and SmolLM2-135M", "",
            f"As section 2, at T={args.block_T} (Whisper: T frames = 2T mel columns), breadth first: the first "
            "selected block of every model and method, then the others. Target: every block in minutes, not "
            "hours.", ""]
    paths = zoo_models(["whisper", "smol"])
    n_blocks = {"whisper": 4, "smol": 30}
    specs = {"whisper": args.whisper_blocks, "smol": args.smol_blocks}
    picked = {key: parse_blocks(specs[key], n_blocks[key]) for key in paths}
    runs = {key: measure_model(key, path, args.block_T, picked[key][:1], n_blocks[key], args.block_methods, args,
                               results) for key, path in paths.items()}
    for key, path in paths.items():
        rest = picked[key][1:]
        for name in args.block_methods:
            first = runs[key][name]
            if not rest:
                continue
            if first["rows"] and not first["stopped"]:
                more = measure_model(key, path, args.block_T, rest, n_blocks[key], [name], args, results)[name]
                runs[key][name] = _merge(first, more)
            else:
                first["not_run"] = first["not_run"] + rest
    for key in paths:
        out += block_table(LABELS[key], n_blocks[key], args.block_T, runs[key], args.block_timeout)
        png = plot(key, f"{LABELS[key]} T={args.block_T}", runs[key])
        if png:
            out += [f"Plot: `{png}`.", ""]
    out += [f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]


# ------------------------------------------------------------------ 4. scale-out
def _compare(a, b, differing: Optional[list] = None) -> tuple[bool, float, float]:
    """(bit-identical, max |a - b|, max |a - b| / max |a|) over every finite
    bound array; the names of the arrays that differ go to ``differing``."""
    import numpy as np
    keys = sorted(a.arrays)
    if keys != sorted(b.arrays):
        return False, math.inf, math.inf
    same, diff, scale = True, 0.0, 0.0
    for k in keys:
        x, y = a.arrays[k], b.arrays[k]
        eq = bool(np.array_equal(x, y, equal_nan=True))
        same &= eq
        if not eq and differing is not None:
            differing.append(k)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            diff = max(diff, float(np.abs(x[ok] - y[ok]).max()))
            scale = max(scale, float(np.abs(x[ok]).max()))
    return same, diff, diff / scale if scale else 0.0


def section_scaleout(args, out: list[str], results: dict) -> None:
    t_sec = time.perf_counter()
    m = gamma.load(gamma.zoo.whisper_tiny_en())
    cores = os.cpu_count() or 1
    per = max(1, cores // 2)
    kw = dict(block_wise=True, seq_len=args.scale_T, intermediate="cut", device=args.device)
    out += ["## 4. Scale-out: serial vs `workers=2`", "",
            f"`gamma.verify(Whisper tiny.en, {EPS:g}, \"crown\", block_wise=True, seq_len={args.scale_T}, "
            "intermediate=\"cut\")` over all 4 blocks: serially with this process's "
            f"{torch.get_num_threads()} torch threads, with `workers=2` (each worker gets cores // 2 = {per} "
            f"torch threads), and serially with {per} torch thread(s) (the workers' setting), back to back in one "
            "run. Every bound array (input, nominal, each block's lower/upper) compared with the serial run.", ""]
    runs = {}
    for name, threads, workers in (("serial", None, None), ("workers=2", None, 2),
                                   (f"serial, {per} thread(s)", per, None)):
        log(f"scale-out: {name} (load {load_avg()})")
        saved = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            res = gamma.verify(m, EPS, "crown", workers=workers, **kw)
            runs[name] = (res, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(saved)
    base, t_base = runs["serial"]
    rows, verdict, differing = [], {}, []
    for name, (res, t) in runs.items():
        same, diff, rel = _compare(base, res, differing if name == "workers=2" else None) \
            if name != "serial" else (True, 0.0, 0.0)
        cmp_par = ""
        if name.startswith("serial, "):
            s2, d2, _ = _compare(runs["workers=2"][0], res)
            cmp_par = "identical" if s2 else f"max abs diff {d2:.3g}"
            verdict["threads_explain"] = s2
        verdict[name] = same
        t_one = runs[f"serial, {per} thread(s)"][1]
        rows.append([name, fmt_s(t), fmt_s(res.report["seconds"]), f"{t_base / t:.2f}x", f"{t_one / t:.2f}x",
                     "-" if name == "serial" else ("yes" if same else f"**no**: max abs diff {diff:.3g} "
                                                    f"(relative {rel:.2g})"), cmp_par or "-"])
    out += table(["run", "wall s (verify call)", "block phase s", "speed-up vs serial",
                  f"speed-up vs serial {per} thread(s)", "identical to serial?", "vs workers=2"], rows)
    if verdict["workers=2"]:
        note = "workers=2 gives bit-identical bounds to the serial run."
    elif verdict.get("threads_explain"):
        note = (f"**workers=2 is not bit-identical to the serial run** at this process's thread count, but is "
                f"bit-identical to a serial run with {per} thread(s): the difference comes from the torch thread "
                "count (float summation order in multi-threaded kernels), not from the scale-out. Both are sound "
                "(the float32 margins dwarf float64 rounding), but `gamma.parallel`'s 'bit for bit' claim holds only "
                "at equal thread counts.")
    else:
        note = ("**workers=2 is not bit-identical to the serial run**, and the thread count does not explain it "
                f"(arrays that differ: {', '.join(differing)}).")
    out += ["", note, "", f"Load average after: {load_avg()} (on a shared 2-core machine a speed-up below 2 is "
            "expected when other jobs hold the cores).", "",
            f"Section time: {fmt_s(time.perf_counter() - t_sec)} s.", ""]
    results["scaleout"] = {n: {"seconds": t, "identical_to_serial": verdict.get(n)} for n, (_, t) in runs.items()}
    assert verdict["workers=2"] or verdict.get("threads_explain"), note


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
    ap.add_argument("--update", action="store_true",
                    help="replace only the sections run now in an existing --out file (keep the others)")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (default all)")
    ap.add_argument("--repeats", type=int, help="IBP section: at most N forward/IBP pairs (default 5; quick 2)")
    ap.add_argument("--ibp-budget", type=float,
                    help="IBP section: stop repeating (after 2 pairs) once a configuration used this many s "
                         "(default 150)")
    ap.add_argument("--qwen-blocks", help="blocks of the Qwen3 shape: 0,27 (default), a slice, or all")
    ap.add_argument("--qwen-cut-blocks", help="blocks of the Qwen3 shape for crown (cut): all (default) or as "
                    "--qwen-blocks")
    ap.add_argument("--qwen-layers", type=int, help="blocks in the Qwen3 shape (default 28; quick 2)")
    ap.add_argument("--whisper-blocks", help="default all (4)")
    ap.add_argument("--smol-blocks", help="default 0,15,29; all for every block")
    ap.add_argument("--crown-limit", type=float, default=300.0,
                    help="per-block runs: stop a method on a model after a block slower than this (s; default 300)")
    ap.add_argument("--block-timeout", type=float, default=900.0,
                    help="kill a block that runs longer than this (s; default 900)")
    ap.add_argument("--max-minutes", type=float,
                    help="run time budget: per-block runs that would pass it are killed or not started "
                         "(default 45; quick 5)")
    ap.add_argument("--threads", type=int, help="torch threads here and in the per-block children "
                    "(default: torch's default, one per core)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        child_main(spec)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    # quick: every code path once, on the smallest inputs (a smoke test, not the configurations)
    args.ibp_models = ["whisper"] if q else ["whisper", "smol"]
    args.ibp_T = [2] if q else [8, 16, 64, 256]
    args.repeats = args.repeats or (2 if q else 5)
    args.qwen_layers = args.qwen_layers or (2 if q else 28)
    args.qwen_blocks = args.qwen_blocks or ("0" if q else "0,27")
    args.qwen_cut_blocks = args.qwen_cut_blocks or ("0" if q else "all")
    args.qwen_T = 1 if q else 8
    args.block_T = 1 if q else 16
    args.scale_T = 1 if q else 4
    args.whisper_blocks = args.whisper_blocks or ("0" if q else "all")
    args.smol_blocks = args.smol_blocks or ("0" if q else "0,15,29")
    args.block_methods = ["crown (cut)"] if q else ["crown (cut)", "crown"]
    args.qwen_methods = ["crown (cut)", "zonotope"] if q else ["zonotope", "crown (cut)", "crown"]
    args.max_minutes = args.max_minutes or (5.0 if q else 45.0)
    args.deadline = T0 + 60 * args.max_minutes
    if args.ibp_budget is None:
        args.ibp_budget = 10.0 if q else 150.0
    if q:
        args.crown_limit = min(args.crown_limit, 60.0)
        args.block_timeout = min(args.block_timeout, 120.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device on this machine; sections 1-4 run on the CPU")
        args.device = "cpu"
    sections = {s.strip() for s in args.sections.split(",")}

    load_avg_start = load_avg()
    out = ["# gamma benchmarks", "", "Regenerate with one command (quick smoke run: `--quick`). Machine:", ""]
    out += machine(argv) + [""]
    if q:
        out += ["**Quick mode** (smoke test): small T and few blocks; not the issue's configurations.", ""]
    results: dict = {}
    timings, parts = [], {}
    # cheap sections first, so that the per-block ones use what is left of --max-minutes
    steps = [("1", "IBP ratio", section_ibp), ("4", "scale-out", section_scaleout),
             ("2", "Qwen3-0.6B shape", section_qwen), ("3", "Whisper / SmolLM2 blocks", section_real_blocks),
             ("5", "CUDA", section_cuda)]

    old = _read_sections(args.out) if args.update else None

    def document():
        if old is None:
            body = [line for sid in sorted(parts) for line in parts[sid]]
            return out + body + _footer(timings, args)
        head, sections = old
        note = [f"- updated {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: sections "
                f"{', '.join(sorted(parts))} re-measured by `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/run.py', *argv])}` "
                f"(load average at its start: {load_avg_start})"]
        merged = {**sections, **parts}
        runtime = sections.get("Run time", [])
        body = [line for sid in sorted(k for k in merged if k != "Run time") for line in merged[sid]]
        return head + note + [""] + body + runtime + \
            [f"Update run (sections {', '.join(sorted(parts))}):", ""] + _footer(timings, args)[2:]

    for sid, name, fn in steps:
        if sid not in sections:
            continue
        t0 = time.perf_counter()
        parts[sid] = []
        try:
            fn(args, parts[sid], results)
        except Exception as e:           # a failed section is reported, the others still run
            log(f"section {sid} failed: {type(e).__name__}: {e}")
            parts[sid] += [f"**Section {sid} ({name}) failed: `{type(e).__name__}: {e}`**", ""]
        timings.append([sid, name, fmt_s(time.perf_counter() - t0)])
        _write(args.out, document())     # partial results survive an interrupted run
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    log(f"wrote {args.out} ({fmt_s(time.perf_counter() - T0)} s)")
    return 0


def _footer(timings, args) -> list[str]:
    return ["## Run time", "", f"Sections in the order run; run time budget `--max-minutes {args.max_minutes:g}`.",
            ""] + table(["section", "what", "wall s"], timings) + \
        ["", f"Total: {fmt_s(time.perf_counter() - T0)} s. Load average (1/5/15 min) at the end: {load_avg()}.", ""]


def _read_sections(path: str):
    """(header lines, {"1": lines, ..., "Run time": lines}) of an existing
    output file, for --update; None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines()
    head, sections, key = [], {}, None
    for line in lines:
        if line.startswith("## "):
            title = line[3:]
            key = title.split(".", 1)[0] if title[:1].isdigit() else title
            sections[key] = []
        (sections[key] if key is not None else head).append(line)
    while head and not head[-1].strip():
        head.pop()
    for v in sections.values():
        if v and v[-1].strip():
            v.append("")
    return head, sections


def _write(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
