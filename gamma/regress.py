"""Verification regression suite: cases, soundness-checked runs, history, baseline check, trends.

A suite is a TOML file of ``[[case]]`` tables (see ``suites/default.toml``)::

    [[case]]
    name = "tiny-qwen3-crown-full"
    model = "fixture:tiny-qwen3"      # a path (relative to the suite file), zoo:NAME or fixture:NAME
    method = "crown"
    epsilon = 1e-3
    mode = "full"                     # or "block-wise"
    seq_len = 2
    track = ["max_width", "seconds"]  # the figures check compares
    tolerance = 0.01                  # relative, on bound figures
    time_factor = 3.0

:func:`run_case` verifies one case with :func:`gamma.verify`, then tests the
bounds with samples and a PGD attack (:mod:`gamma.attack`) on gamma's own
float64 forward pass (per block, on its block graph, for block-wise cases),
and returns one history record.  The history is append-only JSON Lines
(:func:`append_record`, :func:`read_history`); :func:`compare` sets the newest
records against a baseline.  Nothing here prints; the tables and the trend
report (Markdown + PNG) are drawn by :mod:`gamma.commands.regress`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import __version__
from .attack import AttackConfig, attack_range
from .errors import GammaError
from .extras import require
from .io import zoo
from .model import Model
from .ops import evaluate
from .verify import INTERMEDIATE, METHODS, check_epsilon, json_safe, load, verify, versions

try:
    import tomllib
except ImportError:                      # Python 3.10
    import tomli as tomllib              # type: ignore[no-redef]

SCHEMA = 1
# figure -> kind: "bound" (lower is tighter), "time", "memory"; "attack" (what the soundness attack reached:
# an inner bound, the higher the stronger) and "ratio" (certified / attacked width) are tracked, never judged
FIGURES = {"max_width": "bound", "max_sensitivity": "bound", "median_sensitivity": "bound",
           "seconds": "time", "peak_memory_mb": "memory",
           "attacked_max_width": "attack", "attacked_max_sensitivity": "attack", "ratio": "ratio"}
MODES = {"full": "full", "block-wise": "block_wise", "block_wise": "block_wise"}
DEFAULT_TRACK = {"full": ["max_width", "ratio", "seconds"],
                 "block_wise": ["max_sensitivity", "median_sensitivity", "ratio", "seconds"]}
MIN_SECONDS = 1.0        # a time below this never regresses (timer and scheduler noise)
MIN_MEMORY_MB = 64.0     # a memory growth below this never regresses
FAILING = ("ERROR", "MISSING", "CHANGED", "REGRESSION", "UNSOUND")
ZOO = {"whisper_tiny_en": "whisper-tiny.en", "smollm2_135m": "smollm2-135m"}
# tiny random models built here with transformers (seeded: the same function every time)
FIXTURES = {
    "tiny-qwen3": {"arch": "qwen3", "seed": 1234, "config": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0)},
}
_KEYS = {"name", "model", "method", "epsilon", "mode", "component", "seq_len", "tokens", "center", "blocks",
         "output", "track", "tolerance", "time_factor", "memory_factor", "min_seconds", "samples",
         "attack_steps", "intermediate"}
_CONFIG = ("model", "method", "epsilon", "mode", "component", "seq_len", "tokens", "center", "blocks", "output",
           "intermediate")

Progress = Optional[Callable[[str], None]]


# ------------------------------------------------------------------ suite
@dataclass(frozen=True)
class Case:
    name: str
    model: str
    method: str
    epsilon: float
    mode: str                           # "full" | "block_wise"
    track: tuple
    component: Optional[str] = None
    seq_len: int = 8
    tokens: Any = None
    center: Optional[str] = None
    blocks: Any = None
    output: str = "hidden"
    intermediate: str = "crown"         # crown / alpha: how intermediate bounds are computed (crown, cut, ibp)
    tolerance: float = 0.01
    time_factor: float = 3.0
    memory_factor: float = 2.0
    min_seconds: float = MIN_SECONDS
    samples: int = 200
    attack_steps: int = 10
    suite_dir: str = "."

    def config(self) -> dict:
        """What defines the question asked: two records answer the same one iff these agree."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in _CONFIG)}


def load_suite(path: str, names: Optional[list[str]] = None) -> list[Case]:
    """Parse and validate a suite file; ``names`` keeps those cases (in suite order)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise GammaError(f"{path}: no such suite file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise GammaError(f"{path}: not a readable TOML suite ({e})") from None
    extra = set(data) - {"case"}
    if extra or not isinstance(data.get("case"), list) or not data["case"]:
        raise GammaError(f"{path}: expected [[case]] tables only" + (f" (unknown: {sorted(extra)})" if extra else ""))
    cases = [_case(path, i, t) for i, t in enumerate(data["case"], 1)]
    seen = set()
    for c in cases:
        if c.name in seen:
            raise GammaError(f"{path}: case name '{c.name}' is used twice")
        seen.add(c.name)
    if names:
        unknown = [n for n in names if n not in seen]
        if unknown:
            raise GammaError(f"{path}: no case {', '.join(map(repr, unknown))} (cases: {', '.join(sorted(seen))})")
        cases = [c for c in cases if c.name in names]
    return cases


def _case(path: str, i: int, t: dict) -> Case:
    where = f"{path}: case {t.get('name', f'#{i}')!r}"
    bad = set(t) - _KEYS
    if bad:
        raise GammaError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(_KEYS))})")
    for k in ("name", "model", "method", "epsilon", "mode"):
        if k not in t:
            raise GammaError(f"{where}: '{k}' is required")
    if t["method"] not in METHODS:
        raise GammaError(f"{where}: unknown method '{t['method']}' (choose from {', '.join(METHODS)})")
    if t["mode"] not in MODES:
        raise GammaError(f"{where}: mode must be 'full' or 'block-wise', got '{t['mode']}'")
    mode = MODES[t["mode"]]
    if "blocks" in t and mode != "block_wise":
        raise GammaError(f"{where}: 'blocks' applies to block-wise cases")
    track = tuple(t.get("track", DEFAULT_TRACK[mode]))
    for fig in track:
        if fig not in FIGURES:
            raise GammaError(f"{where}: cannot track '{fig}' (choose from {', '.join(FIGURES)})")
        if fig == "median_sensitivity" and mode != "block_wise":
            raise GammaError(f"{where}: median_sensitivity is a block-wise figure")
    kw = {k: t[k] for k in ("component", "seq_len", "center", "output", "samples", "attack_steps") if k in t}
    if "intermediate" in t:
        if t["intermediate"] not in INTERMEDIATE:
            raise GammaError(f"{where}: unknown intermediate '{t['intermediate']}' "
                             f"(choose from {', '.join(INTERMEDIATE)})")
        kw["intermediate"] = t["intermediate"]
    for k in ("tolerance", "time_factor", "memory_factor", "min_seconds"):
        if k in t:
            v = t[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise GammaError(f"{where}: '{k}' must be a finite number >= 0, got {v!r}")
            kw[k] = float(v)
    tokens = t.get("tokens")
    blocks = t.get("blocks")
    return Case(name=str(t["name"]), model=str(t["model"]), method=t["method"],
                epsilon=check_epsilon(t["epsilon"], f"{t['epsilon']!r} in {where}"), mode=mode, track=track,
                tokens=tuple(tokens) if isinstance(tokens, list) else tokens,
                blocks=tuple(blocks) if isinstance(blocks, list) else blocks,
                suite_dir=os.path.dirname(os.path.abspath(path)), **kw)


# ------------------------------------------------------------------ models
def resolve_model(spec: str, suite_dir: str, cache_dir: str) -> tuple[str, dict]:
    """(checkpoint path, identity) for ``zoo:NAME``, ``fixture:NAME`` or a path.

    The identity says which function the path holds (a fixture's weight digest,
    a zoo package's version); check refuses to compare records whose differ."""
    kind, _, name = spec.partition(":")
    if kind == "zoo" and name:
        zname = ZOO.get(name, name)
        path = zoo.locate(zname)
        pip_name = zoo.MODELS[zname][2]
        try:
            from importlib.metadata import version
            ver = version(pip_name)
        except Exception:    # PackageNotFoundError, or an unusual install
            ver = None
        return path, {"zoo": zname, "package": pip_name, "version": ver}
    if kind == "fixture" and name:
        path, digest = build_fixture(name, cache_dir)
        return path, {"fixture": name, "digest": digest}
    path = spec if os.path.isabs(spec) else os.path.join(suite_dir, spec)
    return path, {"path": spec}


def build_fixture(name: str, cache_dir: str) -> tuple[str, str]:
    """(folder, weight digest) of a :data:`FIXTURES` model, built once into ``cache_dir``.

    Every weight is drawn from one seeded generator (linear weights N(0, 1/fan_in),
    embeddings N(0, 1), norm gains 1 + 0.1 N(0, 1)), independent of transformers'
    own initialisation, which (std 0.02) makes RMSNorm inputs tiny and bounds huge."""
    if name not in FIXTURES:
        raise GammaError(f"unknown fixture '{name}' (known: {', '.join(FIXTURES)})")
    spec = FIXTURES[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f"{name}-{key}")
    meta = os.path.join(folder, "fixture.json")
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            return folder, json.load(f)["digest"]
    tf = require(f"fixture:{name}", "transformers")
    from transformers.utils import logging as tf_logging
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    classes = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[spec["arch"]]
    model = model_cls(cfg_cls(**spec["config"])).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            z = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * z if p.ndim == 1 else z if "embed" in pname else z / math.sqrt(p.shape[1]))
            digest.update(pname.encode() + str(tuple(p.shape)).encode() + p.numpy().tobytes())
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    os.chmod(tmp, 0o755)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "fixture.json"), "w", encoding="utf-8") as f:
        json.dump({**spec, "name": name, "digest": digest.hexdigest()}, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:                      # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest.hexdigest()


def check_requirements(cases: list[Case]) -> None:
    """GammaError naming the extra to install when a case's model needs a missing package."""
    for case in cases:
        kind, _, name = case.model.partition(":")
        if kind == "fixture" and name:
            require(case.model, "transformers")


class Models:
    """Loads each model once and keeps only the latest resident (so that one
    case's memory figure does not depend on which models ran before it)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.key: Optional[tuple] = None
        self.value: Optional[tuple[Model, dict]] = None

    def get(self, case: Case) -> tuple[Model, dict]:
        key = (case.model, case.suite_dir)
        if key != self.key:
            self.key = self.value = None
            path, ident = resolve_model(case.model, case.suite_dir, self.cache_dir)
            self.value, self.key = (load(path), ident), key
        return self.value


# ------------------------------------------------------------------ measuring
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
    and, block-wise, each block's attacked width."""
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
                            intermediate=case.intermediate, progress=progress,
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


# ------------------------------------------------------------------ history (JSON Lines)
def append_record(path: str, record: dict) -> None:
    """Append one record as one line with a single ``write`` + ``fsync``.

    ``O_APPEND`` puts every write at the end, so concurrent appenders never
    interleave within a record; an interrupted write can leave only a
    truncated *last* line, which :func:`read_history` skips (and the next
    append starts on a fresh line)."""
    data = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise GammaError(f"{path}: cannot open the history ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data          # close a truncated line left by an interrupted run
        n = os.write(fd, data)
        if n != len(data):
            raise GammaError(f"{path}: short write ({n} of {len(data)} bytes; disk full?)")
        os.fsync(fd)
    except OSError as e:
        raise GammaError(f"{path}: cannot append to the history ({e.strerror})") from None
    finally:
        os.close(fd)


@dataclass
class History:
    records: list = field(default_factory=list)
    warnings: list = field(default_factory=list)      # lines skipped, as messages

    def newest(self) -> dict:
        """case -> its last record in file (append) order."""
        return {r["case"]: r for r in self.records}


def read_history(path: str) -> History:
    """Every record of a JSON Lines history; unreadable lines are skipped and reported."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise GammaError(f"{path}: no such history file") from None
    except OSError as e:
        raise GammaError(f"{path}: cannot read the history ({e.strerror})") from None
    h = History()
    lines = raw.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("case"), str):
                raise ValueError("not a record")
        except ValueError:            # JSONDecodeError and UnicodeDecodeError are ValueErrors
            last = n == len(lines) and not raw.endswith(b"\n")
            h.warnings.append(f"{path}:{n}: " + ("truncated last line skipped (an interrupted write?)" if last
                                                  else "not a history record, skipped"))
            continue
        h.records.append(rec)
    return h


def load_baseline(path: str) -> tuple[dict, list[str]]:
    """(case -> record, warnings) from a baseline JSON ``{case: record}`` or a history."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise GammaError(f"{path}: no such baseline file") from None
    except (OSError, ValueError):
        obj = None
    if isinstance(obj, dict) and "case" not in obj:
        bad = [k for k, v in obj.items() if not isinstance(v, dict)]
        if bad:
            raise GammaError(f"{path}: baseline entry {bad[0]!r} is not a record")
        return obj, []
    h = read_history(path)
    if not h.records:
        raise GammaError(f"{path}: neither a baseline {{case: record}} nor a history with records")
    return h.newest(), h.warnings


def write_baseline(path: str, records: dict) -> None:
    """``{case: record}`` as indented JSON, written atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".baseline-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise GammaError(f"{path}: cannot write the baseline ({e.strerror})") from None


# ------------------------------------------------------------------ comparison
def _rel(old: float, new: float) -> Optional[float]:
    if math.isinf(old) or math.isinf(new):
        return None if old == new else (math.inf if new > old else -math.inf)
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / abs(old)


def judge(case: Case, name: str, old: Optional[float], new: Optional[float], base: dict, rec: dict):
    """(status, relative change, note) of one tracked figure."""
    if old is None or new is None:
        return "OK", None, "not measured"
    change = _rel(old, new)
    kind = FIGURES[name]
    if kind == "bound":
        if math.isfinite(old) and not math.isfinite(new):
            return "REGRESSION", change, "finite bound became infinite"
        if not math.isfinite(old) and math.isfinite(new):
            return "IMPROVED", change, "infinite bound became finite"
        if change is not None and change > case.tolerance:
            return "REGRESSION", change, f"looser by more than {case.tolerance:g}"
        if change is not None and change < -case.tolerance:
            return "IMPROVED", change, "tighter: update the baseline"
        return "OK", change, ""
    if kind in ("attack", "ratio"):
        return "OK", change, "tracked"
    if kind == "time":
        other = "" if base.get("machine") == rec.get("machine") else " (baseline from another machine)"
        if new > case.time_factor * old and new > case.min_seconds:
            return "REGRESSION", change, f"slower than {case.time_factor:g}x the baseline{other}"
        return "OK", change, other.strip(" ()")
    if base.get("memory_method") != rec.get("memory_method"):
        return "OK", change, "memory measured differently"
    if new > case.memory_factor * old and new - old > MIN_MEMORY_MB:
        return "REGRESSION", change, f"more than {case.memory_factor:g}x the baseline memory"
    return "OK", change, ""


def compare(cases: list[Case], new: dict, base: dict) -> list[dict]:
    """One row per (case, figure) and one soundness row per case:
    ``{case, figure, old, new, change, status, note}``.  Status is one of
    OK, IMPROVED, NEW (no baseline), REGRESSION, ERROR (the run failed),
    MISSING (no new result), CHANGED (the case or its model differs from the
    baseline's: update the baseline)."""
    rows = []

    def row(case, fig, old, new_v, status, change=None, note=""):
        rows.append({"case": case.name, "figure": fig, "old": old, "new": new_v, "change": change,
                     "status": status, "note": note})

    for case in cases:
        rec, b = new.get(case.name), base.get(case.name)
        if rec is None:
            row(case, "-", None, None, "MISSING", note="no result for this case")
            continue
        if rec.get("error"):
            row(case, "-", None, None, "ERROR", note=rec["error"])
            continue
        bad = rec["soundness"]["violations"]
        old_bad = (b or {}).get("soundness", {}).get("violations")
        row(case, "soundness", old_bad, bad, "REGRESSION" if bad else "OK",
            note=f"{bad} of {rec['soundness']['points']} points outside the bounds" if bad else "")
        over = None if bad else unsound(rec)          # attacked width above the certified one
        if over:
            row(case, "attacked<=certified", None, figure(rec, "attacked_max_width"), "UNSOUND", note=over)
        if b is None or b.get("error"):
            for fig in case.track:
                row(case, fig, None, figure(rec, fig), "NEW", note="no baseline")
            continue
        diff = [k for k in _CONFIG if b.get("config", {}).get(k) != rec["config"].get(k)]
        if b.get("model_id") != rec.get("model_id"):
            diff.append("model_id")
        if diff:
            row(case, "-", None, None, "CHANGED", note="differs from the baseline in " + ", ".join(diff))
            continue
        for fig in case.track:
            old, new_v = figure(b, fig), figure(rec, fig)
            status, change, note = judge(case, fig, old, new_v, b, rec)
            row(case, fig, old, new_v, status, change, note)
    return rows


def failed(rows: list[dict]) -> list[str]:
    """Cases with a failing row, in order."""
    return list(dict.fromkeys(r["case"] for r in rows if r["status"] in FAILING))
