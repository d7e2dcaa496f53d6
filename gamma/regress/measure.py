"""One case run and measured: bounds, time, memory, and the soundness attack on them; its history record."""

from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import subprocess
import time
from typing import Any, Callable, Optional

import torch

from .. import __version__
from ..attack import AttackConfig, attack_range
from ..errors import GammaError
from ..models import Model
from ..ops import evaluate
from ..verify import json_safe, verify, versions
from .models import Models
from .suite import SCHEMA, Case

Progress = Optional[Callable[[str], None]]


def _proc_kb(field_name: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory a block of work adds above the resident set at its start, in MiB.

    Linux: resets the kernel's high-water mark (``/proc/self/clear_refs`` <- 5),
    then reads ``VmHWM - VmRSS(start)`` (method "vmhwm").  Elsewhere: the growth
    of ``getrusage(RUSAGE_SELF).ru_maxrss`` (method "ru_maxrss"), which misses
    peaks below the process's earlier peak and so is only a lower bound."""

    def __enter__(self):
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _proc_kb("VmRSS")
            if self.start is not None:
                self.method = "vmhwm"
        except OSError:
            pass
        if self.method == "ru_maxrss":
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.mb = max(0.0, (_proc_kb("VmHWM") or 0.0) - self.start) / 1024
        else:
            unit = 1.0 if platform.system() == "Darwin" else 1024.0     # bytes on macOS, KiB on Linux
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start
            self.mb = grown * unit / 2 ** 20
        return False


def attack_config(case: Case, seed: int = 0) -> AttackConfig:
    """The soundness attack of a case: its samples and steps, one random restart, 4 + 4 targets."""
    return AttackConfig(samples=case.samples, steps=case.attack_steps, restarts=1, widest=4, others=4, seed=seed)


def soundness(model: Model, case: Case, result, seed: int = 0) -> dict:
    """Samples + PGD (:func:`gamma.attack.attack_range`) on gamma's float64 forward against
    the case's bounds, independent of the verification that made them.

    Full cases: the whole graph over the input box; block-wise: every selected
    block's graph over the box around its nominal input.  Returns the
    violations (attacked outputs outside the bounds), the attacked max width
    and, block-wise, each block's attacked width.  A case whose bounds hold for
    another engine than float32 (``engine``) is not checked: the attack runs the
    float64 function, which those bounds need not contain, so its points outside
    are ``float64_outside`` (as ``gamma verify`` reports them), not violations."""
    rep, arrays = result.report, result.arrays
    graph = model.graph(rep["component"], rep["seq_len"], rep["output"])
    if result.mode == "full":
        parts = [(None, graph, "input", "lower", "upper")]
    else:
        parts = [(r["block_name"], graph.block_graph(r["block_name"]),
                  *(f"block{r['block_index']}_{s}" for s in ("input", "lower", "upper")))
                 for r in rep["blocks"] if f"block{r['block_index']}_lower" in arrays]
    bad = points = 0
    widths: dict[str, float] = {}
    for name, g, x, lo, hi in parts:
        t = {k: torch.from_numpy(arrays[k]).double() for k in (x, lo, hi)}
        att = attack_range(lambda z, g=g: evaluate(g, z), t[x], rep["epsilon"], t[lo], t[hi],
                           attack_config(case, seed))
        bad += att.violations
        points += att.points
        widths[name or "output"] = float((att.upper - att.lower).max())
    out = {"violations": bad, "points": points, "samples": case.samples, "attack_steps": case.attack_steps,
           "empirical_max_width": max(widths.values(), default=0.0)}
    if case.engine != "float32":
        out.update(violations=0, float64_outside=bad, checked=False)
    if result.mode != "full":
        out["attacked_blocks"] = widths
    return out


def attacked_figures(figs: dict, sound: dict, eps: float) -> dict:
    """attacked_max_width, attacked_max_sensitivity and ratio (certified / attacked max width)."""
    aw = sound["empirical_max_width"]
    cw = figs["max_width"]
    ratio = math.nan if math.isnan(cw) else (cw / aw if aw > 0 else (0.0 if cw == 0 else math.inf))
    return {"attacked_max_width": aw, "attacked_max_sensitivity": aw / (2 * eps), "ratio": ratio}


def unsound(rec: dict) -> Optional[str]:
    """Why a record's bounds are unsound (an attacked output outside them, or an attacked
    width above the certified one), or None.  Records without attacked figures: by violations only."""
    s = rec.get("soundness") or {}
    if s.get("checked") is False:            # bounds for another engine: the float64 attack does not judge them
        return None
    if s.get("violations"):
        return f"{s['violations']} of {s['points']} points outside the bounds"
    over = []
    aw, cw = figure(rec, "attacked_max_width"), figure(rec, "max_width")
    if aw is not None and cw is not None and aw > cw:
        over.append(f"attacked max width {aw:.4g} > certified {cw:.4g}")
    for b, a in (s.get("attacked_blocks") or {}).items():
        c = (rec.get("blocks") or {}).get(b)
        if c is not None and a > c:
            over.append(f"{b}: attacked {a:.4g} > certified {c:.4g}")
    return "; ".join(over) or None


def figures(result) -> tuple[dict, dict]:
    """(figures, per-block output widths) of a verify result; non-finite stay as floats here."""
    rep = result.report
    two_eps = 2 * rep["epsilon"]
    if result.mode == "full":
        w = rep["max_width"]
        return {"max_width": w, "mean_width": rep["mean_width"], "max_sensitivity": w / two_eps}, {}
    s = rep["summary"]
    blocks = {r["block_name"]: r["output_width"] for r in rep["blocks"]}
    nan = any(math.isnan(v) for v in blocks.values())
    return {"max_width": math.nan if nan else max(blocks.values()), "max_sensitivity": s["max_sensitivity"],
            "median_sensitivity": s["median_sensitivity"]}, blocks


def provenance() -> dict:
    """gamma version, git commit (absent outside a repository), machine, library versions."""
    out: dict[str, Any] = {"gamma_version": __version__, "versions": versions(),
                           "machine": {"platform": platform.platform(), "processor": platform.machine(),
                                       "cpu_count": os.cpu_count()}}
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            out["git_commit"] = head.stdout.strip()
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_case(case: Case, models: Models, prov: Optional[dict] = None, run_id: Optional[str] = None,
             progress: Progress = None) -> dict:
    """Verify one case, check its bounds empirically, and return its history record.

    ``seconds`` is the wall time of :func:`gamma.verify` on the loaded model
    (loading excluded); ``peak_memory_mb`` is :class:`PeakMemory` around it.
    A case that fails records ``error`` instead of figures."""
    rec: dict[str, Any] = {"schema": SCHEMA, "case": case.name, "date": now_utc(), "run_id": run_id,
                           "config": case.config(), "track": list(case.track), **(prov or provenance())}
    try:
        model, rec["model_id"] = models.get(case)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            result = verify(model, case.epsilon, case.method, block_wise=case.mode == "block_wise",
                            component=case.component, seq_len=case.seq_len, tokens=case.tokens,
                            center=case.center, blocks=case.blocks, output=case.output,
                            intermediate=case.intermediate, arithmetic=case.arithmetic,
                            layernorm_variance=case.layernorm_variance, engine=case.engine,
                            norm_splits=case.norm_splits, progress=progress,
                            attack=False)       # the attack runs below, on the bounds verify returns
            seconds = time.perf_counter() - t0
        if progress:
            progress("soundness check")
        figs, blocks = figures(result)
        sound = soundness(model, case, result)
        figs.update(seconds=seconds, peak_memory_mb=mem.mb, **attacked_figures(figs, sound, case.epsilon))
        rec.update(figures=figs, memory_method=mem.method, soundness=sound,
                   has_nan=result.report["has_nan"], has_infinite=result.report["has_infinite"])
        if blocks:
            rec["blocks"] = blocks
        rec["nonfinite"] = sorted(k for k, v in figs.items() if not math.isfinite(v))
    except Exception as e:           # one broken case must not stop the suite; its record says why
        rec["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, GammaError) else str(e)
    return json_safe(rec)


def figure(rec: dict, name: str) -> Optional[float]:
    """A record's figure: float (inf for a non-finite bound), or None when not measured."""
    v = (rec.get("figures") or {}).get(name)
    if v is None:
        return math.inf if name in rec.get("nonfinite", ()) else None
    return float(v)
