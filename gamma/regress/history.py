"""The JSON Lines history, baseline files, and the check of new records against a baseline."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from ..errors import GammaError
from .measure import figure, unsound
from .suite import CONFIG_KEYS, FAILING, FIGURES, MIN_MEMORY_MB, OPTION_DEFAULTS, Case


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
        note = f"{bad} of {rec['soundness']['points']} points outside the bounds" if bad else ""
        if rec["soundness"].get("checked") is False:
            note = (f"not checked: bounds for {case.engine}, the attack runs float64 "
                    f"({rec['soundness'].get('float64_outside', 0)} of its points outside)")
        row(case, "soundness", old_bad, bad, "REGRESSION" if bad else "OK", note=note)
        over = None if bad else unsound(rec)          # attacked width above the certified one
        if over:
            row(case, "attacked<=certified", None, figure(rec, "attacked_max_width"), "UNSOUND", note=over)
        if b is None or b.get("error"):
            for fig in case.track:
                row(case, fig, None, figure(rec, fig), "NEW", note="no baseline")
            continue
        diff = [k for k in (*CONFIG_KEYS, *OPTION_DEFAULTS)
                if b.get("config", {}).get(k, OPTION_DEFAULTS.get(k)) != rec["config"].get(k, OPTION_DEFAULTS.get(k))]
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
