"""Per-block runs in child processes (``run.py --child``): one ``gamma.verify``
call per block, peak memory from ``VmHWM``, timeouts and OOM kills reported,
never estimated; the per-block tables and plots."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Optional

import torch

import gamma
from _common import CHILD_TAG, EPS, HERE, LABELS, ROOT, _mem_total_gib, fmt_g, fmt_s, load_avg, log, table

RUN_PY = os.path.join(HERE, "run.py")


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
    if spec.get("workers", 1) > 1:
        _child_workers(m, spec, emit)
        return
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


def _rss_kib(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class _MemorySampler(threading.Thread):
    """Resident memory of this process and all its descendants, sampled every
    0.2 s: the peak of the sum (shared library pages counted once per process,
    so an upper bound of what the run holds) and the largest single worker.
    ``getrusage(RUSAGE_CHILDREN)`` cannot serve: a spawned worker briefly
    shares the parent's pages between fork and exec, and its peak RSS then
    reads as the parent's."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_total = self.peak_worker = 0

    def run(self):
        me = os.getpid()
        while not self.stop.is_set():
            kids, todo = [], _children(me)
            while todo:
                c = todo.pop()
                kids.append(c)
                todo += _children(c)
            sizes = [_rss_kib(c) for c in kids]
            self.peak_total = max(self.peak_total, _rss_kib(me) + sum(sizes))
            self.peak_worker = max([self.peak_worker] + sizes)
            self.stop.wait(0.2)


def _child_workers(m, spec: dict, emit) -> None:
    """All blocks in one ``gamma.verify(..., workers=N)`` call (N local
    processes, one torch thread each on two cores): per-block rows from the
    report, the run's wall time, this process's peak memory and the sampled
    peak of all processes together (:class:`_MemorySampler`)."""
    kw = dict(block_wise=True, seq_len=spec["T"], blocks=",".join(map(str, spec["blocks"])), device=spec["device"],
              workers=spec["workers"])
    if spec["intermediate"]:
        kw["intermediate"] = spec["intermediate"]
    emit({"event": "started", "block": spec["blocks"][0]})
    sampler = _MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    res = gamma.verify(m, spec["eps"], spec["method"], progress=lambda msg: log(f"    {msg}") if " blocks: " in msg
                       else None, **kw)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    kids = sampler.peak_worker
    for row in res.report["blocks"]:
        emit({"event": "block", "block": row["block_index"], "seconds": row["seconds"], "status": row["status"],
              "output_width": row["output_width"], "hwm_kib": kids, "hwm_reset": False,
              "nominal_s": res.report["timings"]["nominal"], "total_s": res.report["timings"]["total"],
              "error": row.get("error"), "load": load_avg()})
    emit({"event": "run", "wall_s": wall, "workers": spec["workers"], "parent_hwm_kib": _hwm_kib(),
          "worker_hwm_kib": kids, "total_peak_kib": sampler.peak_total, "failed": res.report["failed_blocks"]})


def run_blocks(path: str, T: int, method: str, intermediate: Optional[str], blocks: list[int], device: str,
               timeout: float, stop_after_s: Optional[float] = None, deadline: Optional[float] = None,
               workers: int = 1) -> dict:
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
                stop_after_s=stop_after_s, threads=torch.get_num_threads(), workers=workers)
    if workers > 1:                         # one call for every block: the timeout covers the whole run
        timeout = timeout * math.ceil(len(blocks) / workers)
    out["run"] = None
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, RUN_PY, "--child", json.dumps(spec)],
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
        elif ev["event"] == "run":
            out["run"] = ev
            log(f"  all blocks over {ev['workers']} workers: {ev['wall_s']:.1f} s wall, peak "
                f"{ev['total_peak_kib'] / 2**20:.2f} GiB in all processes together ({ev['parent_hwm_kib'] / 2**20:.2f} "
                f"GiB main process, {ev['worker_hwm_kib'] / 2**20:.2f} GiB largest worker)")
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
        run = r.get("run")
        if run is not None:
            w = run["workers"]
            total = (f"{fmt_s(run['wall_s'])} s wall for {n} of {n_blocks} blocks over {w} worker processes "
                     f"(one `gamma.verify --workers {w}` call; per-block times sum to {fmt_s(measured)} s)")
            peak_txt = (f"{run['total_peak_kib'] / 2**20:.2f} all processes together, sampled every 0.2 s "
                        f"(main process {run['parent_hwm_kib'] / 2**20:.2f}, largest worker "
                        f"{run['worker_hwm_kib'] / 2**20:.2f})")
        elif n == n_blocks:
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
        if run is None:
            peak_txt = "-" if peak is None else f"{peak / 2**20:.2f}"
        summary.append([name, f"{n}/{n_blocks}", total, peak_txt,
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


METHOD_RUNS = {"crown": ("crown", None), "crown (cut)": ("crown", "cut"), "zonotope": ("zonotope", None),
               "crown (cut), 2 workers": ("crown", "cut", 2)}


def measure_model(key: str, path: str, T: int, blocks: list[int], n_blocks: int, methods: list[str], args,
                  results: dict) -> dict:
    """Per method, the blocks in one child; a method stops after a block slower than ``--crown-limit``."""
    runs = {}
    for name in methods:
        method, inter, *workers = METHOD_RUNS[name]
        these = blocks[name] if isinstance(blocks, dict) else blocks
        log(f"{LABELS[key]} T={T} {name}: blocks {these} (load {load_avg()})")
        runs[name] = run_blocks(path, T, method, inter, these, args.device, args.block_timeout, args.crown_limit,
                                args.deadline, workers=workers[0] if workers else 1)
        results.setdefault("blocks", []).append({"model": key, "T": T, "method": name, **runs[name]})
    return runs
