"""Speed and memory of gamma on real models (issue 7) -> BENCHMARKS.md.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out BENCHMARKS.md]
                             [--qwen-blocks 0,27|all] [--smol-blocks 0,15,29|all]
                             [--max-minutes 45] [--threads N] [--sections 1,...,8 [--update]]

Sections (each a table in the output file; progress goes to stderr):

1. IBP cost in nominal forward passes (``_ibp.py``) on whole real models (Whisper tiny.en
   encoder, SmolLM2-135M): ``gamma.ops.evaluate`` and
   ``gamma.bounds.compute_bounds(..., "ibp")`` timed alternately in one
   process, median of N each, and the same on the first block alone (every
   bound finite); the same at 1 torch thread; where IBP's time goes (per op type).
2. Block-wise CROWN on a Qwen3-0.6B-shaped model (random weights, GGUF Q8_0,
   written here into a temporary directory by ``_models.py``): seconds and
   peak memory per block from ``gamma.verify(..., block_wise=True,
   blocks=k)``, with ``intermediate="cut"`` and zonotopes on the same
   blocks; a plot in ``benchmarks/out/`` (not committed).
3. The same per-block timing on Whisper tiny.en (encoder) and SmolLM2-135M,
   breadth first (the first block of every model and method, then the rest).
4. Scale-out: serial vs ``workers=2`` (identical bounds asserted).
5. CUDA vs CPU when a CUDA device is present.
6. Side by side with auto_LiRPA (``autolirpa.py`` in a child process: one
   worker per tool, config and eps; skipped with a note when auto_LiRPA is not
   installed).
7. LayerNorm / RMSNorm, softmax and attention relaxations in CROWN side by side (``norm_relax.py``).
8. Where CROWN's time and width go on one Qwen3-0.6B-shaped block
   (``crown_cost.py``): product FLOPs per pass against this machine's matmul
   rate (a floor for any implementation of the same walk), and what the
   width of ``mlp.gate`` is made of.

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
output file and keeps the other sections; every run adds its command, load and
section timings to "Run time" at the end of the file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)               # this checkout's gamma, not an installed copy
sys.path.insert(0, HERE)

import torch                            # noqa: E402

import gamma                            # noqa: E402
import gamma.io.zoo                        # noqa: E402

import _models                          # noqa: E402

from _common import EPS, LABELS, T0, fmt_s, load_avg, log, machine, table, zoo_models  # noqa: E402
from _blocks import METHOD_RUNS, block_table, child_main, measure_model, parse_blocks, plot, run_blocks  # noqa: E402,E501
from _ibp import _IbpTimer, ibp_ratio, section_ibp  # noqa: E402,F401  (section 1; re-exported for the tests)


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
        per_method = {name: (cut_blocks if name.startswith("crown (cut)") else blocks) for name in args.qwen_methods}
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
                "'crown (cut), 2 workers' is one `gamma.verify(..., workers=2)` call over the same blocks in a "
                "child process: two worker processes with one torch thread each (the serial rows use both "
                "threads in one process); its 'seconds' per block are each worker's own, its 'peak GiB' per "
                "block the largest worker's sampled peak, and its total time the call's wall time. "
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
    m = gamma.load(gamma.io.zoo.whisper_tiny_en())
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


# ------------------------------------------------------------------ 6, 7. the other scripts
def _script(script: str, title: str, args, out: list[str]) -> None:
    """Run ``benchmarks/SCRIPT --out TMP [--quick]`` and inline its markdown."""
    import subprocess
    path = os.path.join(tempfile.mkdtemp(prefix="gamma-bench-"), "out.md")
    cmd = [sys.executable, os.path.join(HERE, script), "--out", path] + (["--quick"] if args.quick else [])
    log(f"{script}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    out += [f"## {title}", ""]
    if rc != 0 or not os.path.exists(path):
        out += [f"**`{script}` failed (exit {rc}); its progress went to stderr.**", ""]
        return
    with open(path) as f:
        lines = f.read().splitlines()
    out += [f"`python benchmarks/{script}{' --quick' if args.quick else ''}` ({fmt_s(time.perf_counter() - t0)} s):",
            ""] + lines[1:] + [""]


def section_autolirpa(args, out: list[str], results: dict) -> None:
    _script("autolirpa.py", "6. Side by side with auto_LiRPA (pre-LN Whisper blocks)", args, out)


def section_norms(args, out: list[str], results: dict) -> None:
    _script("norm_relax.py", "7. LayerNorm / RMSNorm, softmax and attention relaxations in CROWN", args, out)


def section_cost(args, out: list[str], results: dict) -> None:
    _script("crown_cost.py", "8. Where CROWN's time and width go (Qwen3-0.6B shape, one block)", args, out)


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
    ap.add_argument("--sections", default="1,2,3,4,5,6,7,8", help="which sections to run (default all)")
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
    args.qwen_methods = (["crown (cut)", "crown (cut), 2 workers", "zonotope"] if q
                         else ["zonotope", "crown (cut)", "crown (cut), 2 workers", "crown"])
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
    out = ["# gamma benchmarks", "", INTRO, ""]
    first = ["## Run time", "", "Machine and command of the run that wrote this file; later updates below it:", ""] + \
        machine(argv) + [""]
    if q:
        out += ["**Quick mode** (smoke test): small T and few blocks; not the issue's configurations.", ""]
    results: dict = {}
    timings, parts = [], {}
    # cheap sections first, so that the per-block ones use what is left of --max-minutes
    steps = [("1", "IBP ratio", section_ibp), ("4", "scale-out", section_scaleout),
             ("2", "Qwen3-0.6B shape", section_qwen), ("3", "Whisper / SmolLM2 blocks", section_real_blocks),
             ("5", "CUDA", section_cuda), ("7", "norm relaxations", section_norms), ("8", "CROWN cost", section_cost),
             ("6", "auto_LiRPA", section_autolirpa)]

    old = _read_sections(args.out) if args.update else None

    def document():
        if old is None:
            body = [line for sid in sorted(parts, key=_order) for line in parts[sid]]
            return out + body + first + _footer(timings, args)
        head, sections = old
        note = [f"Update run (sections {', '.join(sorted(parts, key=_order))}), "
                f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: "
                f"`{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/run.py', *argv])}` "
                f"(load average at its start: {load_avg_start})"]
        merged = {**sections, **parts}
        runtime = sections.get("Run time", [])
        body = [line for sid in sorted((k for k in merged if k != "Run time"), key=_order) for line in merged[sid]]
        return head + [""] + body + runtime + note + [""] + _footer(timings, args)

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


INTRO = ("Tables of `python benchmarks/run.py` (sections 1-8; quick smoke run: `--quick`), "
         "`python benchmarks/vnncomp.py` (section 9) and `python benchmarks/depth.py` (section 10). "
         "The machine, command and load of every run that wrote them: \"Run time\" at the end.")


def _order(sid: str) -> tuple:
    """Sections by number (1, 2, ..., 10), then the others."""
    return (0, int(sid), "") if sid.isdigit() else (1, 0, sid)


def _footer(timings, args) -> list[str]:
    """The run's section timings (under "## Run time")."""
    return [f"Sections in the order run; run time budget `--max-minutes {args.max_minutes:g}`.",
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
