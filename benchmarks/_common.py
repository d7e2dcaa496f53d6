"""Helpers shared by the benchmark scripts: logging with elapsed time, the
machine description, timing, number formatting and markdown tables."""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Optional

import torch

import gamma
import gamma.io.zoo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

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


def write_markdown(path: str, lines: list[str]) -> None:
    """Write a script's markdown (its folder made if needed) and echo it on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def zoo_models(names) -> dict[str, str]:
    """{label: path} for the real models that are installed; missing ones are logged."""
    table_ = {"whisper": ("Whisper tiny.en encoder", gamma.io.zoo.whisper_tiny_en),
              "smol": ("SmolLM2-135M (Q4_1 GGUF)", gamma.io.zoo.smollm2_135m)}
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
