"""Regression suites: the TOML file of ``[[case]]`` tables, validated into :class:`Case` objects."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GammaError
from ..options import (ARITHMETIC, ENGINES, INTERMEDIATE, LAYERNORM_VARIANCE, MAX_NORM_SPLITS, METHODS,
                       check_epsilon, check_norm_splits)

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
_KEYS = {"name", "model", "method", "epsilon", "mode", "component", "seq_len", "tokens", "center", "blocks",
         "output", "track", "tolerance", "time_factor", "memory_factor", "min_seconds", "samples",
         "attack_steps", "intermediate", "arithmetic", "layernorm_variance", "engine", "norm_splits"}
CONFIG_KEYS = ("model", "method", "epsilon", "mode", "component", "seq_len", "tokens", "center", "blocks", "output",
           "intermediate")
# options a record's config names only where they differ from these defaults (older records lack them)
OPTION_DEFAULTS = {"arithmetic": "float32", "layernorm_variance": "any", "engine": "float32", "norm_splits": 1}


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
    arithmetic: str = "float32"         # what the bounds hold for (gamma.options.ARITHMETIC)
    layernorm_variance: str = "any"     # the engine's LayerNorm variance (gamma.options.LAYERNORM_VARIANCE)
    engine: str = "float32"             # the engine the bounds hold for (gamma.options.ENGINES)
    norm_splits: int = 1                # pieces of each norm's mean square (gamma.bounds.split; 1: no split)
    tolerance: float = 0.01
    time_factor: float = 3.0
    memory_factor: float = 2.0
    min_seconds: float = MIN_SECONDS
    samples: int = 200
    attack_steps: int = 10
    suite_dir: str = "."

    def config(self) -> dict:
        """What defines the question asked: two records answer the same one iff these agree."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in CONFIG_KEYS)}
        for k, default in OPTION_DEFAULTS.items():   # (records from before a key: its default)
            if getattr(self, k) != default:
                out[k] = getattr(self, k)
        return out


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
    if "arithmetic" in t:
        if t["arithmetic"] not in ARITHMETIC:
            raise GammaError(f"{where}: unknown arithmetic '{t['arithmetic']}' (choose from {', '.join(ARITHMETIC)})")
        kw["arithmetic"] = t["arithmetic"]
    if "layernorm_variance" in t:
        if t["layernorm_variance"] not in LAYERNORM_VARIANCE:
            raise GammaError(f"{where}: unknown layernorm_variance '{t['layernorm_variance']}' "
                             f"(choose from {', '.join(LAYERNORM_VARIANCE)})")
        kw["layernorm_variance"] = t["layernorm_variance"]
    if "engine" in t:
        if t["engine"] not in ENGINES:
            raise GammaError(f"{where}: unknown engine '{t['engine']}' (choose from {', '.join(ENGINES)})")
        kw["engine"] = t["engine"]
    if "norm_splits" in t:
        try:
            kw["norm_splits"] = check_norm_splits(t["norm_splits"])
        except GammaError:
            raise GammaError(f"{where}: 'norm_splits' must be an integer from 1 to {MAX_NORM_SPLITS}, "
                             f"got {t['norm_splits']!r}") from None
        if kw["norm_splits"] > 1 and (t["method"] not in ("crown", "alpha")
                                      or kw.get("intermediate", "crown") != "crown"):
            raise GammaError(f"{where}: 'norm_splits' > 1 needs method crown or alpha with intermediate crown")
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
