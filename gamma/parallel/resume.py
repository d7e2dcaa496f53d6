"""The resume file of a block-wise run (``--checkpoint FILE``): :class:`ResumeFile`.

Append-only JSON lines (fsync'd): a header line with the run's key
(:func:`run_key`: model, method, epsilon, input, ...), then one line per
finished block with its record and its bounds (float64, base64).  A restarted
run with the same key reads the blocks already done instead of computing them;
a different key is a GammaError.  (Not a model checkpoint: that is
:class:`gamma.io.checkpoint.LoadedCheckpoint`.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..errors import GammaError
from .tasks import BlockOutcome, BlockTask

RESUME_VERSION = 1           # the header's "gamma_checkpoint" value


def run_key(report: dict, alpha_iters: int, x: torch.Tensor) -> dict:
    """What must match for a checkpoint to be resumed: model, component,
    output, sequence length, method, intermediate, epsilon and the input."""
    model = dict(report["model"])
    model["path"] = os.path.realpath(model["path"]) if model.get("path") else model.get("path")
    key = {"model": model}
    key.update({k: report[k] for k in ("component", "output", "seq_len", "method", "intermediate", "epsilon")})
    key["arithmetic"] = report.get("arithmetic", "float32")
    if report.get("products", "polar") != "polar":        # keys written before the option stay valid
        key["products"] = report["products"]
    if report.get("after_saturation", "crown") != "crown":
        key["after_saturation"] = report["after_saturation"]
    if report.get("layernorm_variance", "any") != "any":
        key["layernorm_variance"] = report["layernorm_variance"]
    if report.get("engine", "float32") != "float32":
        key["engine"] = report["engine"]
    if report.get("norm_splits", 1) != 1:
        key["norm_splits"] = report["norm_splits"]
    if report["method"] == "alpha":
        key["alpha_iters"] = int(alpha_iters)
    key["input_sha256"] = tensor_sha256(x)
    return key


def tensor_sha256(t: torch.Tensor) -> str:
    a = np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def _enc(a: Optional[np.ndarray]):
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"shape": list(a.shape), "f8": base64.b64encode(a.tobytes()).decode("ascii")}


def _dec(d) -> Optional[np.ndarray]:
    if d is None:
        return None
    return np.frombuffer(base64.b64decode(d["f8"]), dtype="<f8").reshape(d["shape"]).copy()


@dataclass
class ResumeFile:
    """Append-only JSON lines: a header ``{"gamma_checkpoint": 1, "key": {...}}``,
    then one finished block per line.  Floats are written by ``repr`` (exact);
    bounds as base64 little-endian float64.  A partial last line (a run killed
    while writing) is dropped."""
    path: str
    key: dict
    _file: Any = field(default=None, repr=False)

    def load(self, tasks: list[BlockTask]) -> dict[int, BlockOutcome]:
        key = json.loads(json.dumps(self.key))           # the key as it reads back
        lines, keep = self._read()
        if lines is None:                                # new (or empty) file
            self._open(truncate=0)
            self._write({"gamma_checkpoint": RESUME_VERSION, "key": key})
            return {}
        head = lines[0]
        if not isinstance(head, dict) or head.get("gamma_checkpoint") != RESUME_VERSION:
            raise GammaError(f"{self.path}: not a gamma checkpoint (or another version)")
        if head.get("key") != key:
            old = head.get("key") or {}
            diff = [f"{k}: {old.get(k)!r} here, {key.get(k)!r} now" for k in sorted(set(old) | set(key))
                    if old.get(k) != key.get(k)]
            raise GammaError(f"{self.path}: checkpoint of another run ({'; '.join(diff)}); "
                             "use another file or delete it")
        by_index = {t.index: t for t in tasks}
        done = {}
        for n, rec in enumerate(lines[1:], 2):
            try:
                k, name = int(rec["block_index"]), rec["block_name"]
                task = by_index.get(k)
                if task is None:
                    continue                                # a block this run does not select
                if name != task.name or rec["input_sha256"] != tensor_sha256(task.center):
                    raise GammaError(f"{self.path}:{n}: block {k} ({name}) was computed on a different "
                                     "block input: the checkpoint belongs to another model or input")
                done[k] = BlockOutcome(k, name, rec["row"], _dec(rec["lower"]), _dec(rec["upper"]),
                                       None, int(rec.get("attempts", 1)), float(rec.get("seconds", 0.0)),
                                       resumed=True)
            except (KeyError, TypeError, ValueError):
                raise GammaError(f"{self.path}:{n}: corrupt checkpoint record") from None
        self._open(truncate=keep)
        return done

    def _read(self):
        """(parsed lines, bytes of complete lines) or (None, 0) for a new file."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, 0
        except OSError as e:
            raise GammaError(f"{self.path}: cannot read checkpoint ({e.strerror or e})") from None
        complete = data[:data.rfind(b"\n") + 1]            # a partial last line is dropped
        raws = complete.splitlines(keepends=True)
        lines, keep = [], 0
        for n, raw in enumerate(raws, 1):
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    if n == len(raws):
                        break                               # torn last line
                    raise GammaError(f"{self.path}:{n}: corrupt checkpoint line") from None
            keep += len(raw)
        if not lines:
            if data.strip():
                raise GammaError(f"{self.path}: not a gamma checkpoint")
            return None, 0
        return lines, keep

    def _open(self, truncate: int) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise GammaError(f"{self.path}: cannot write checkpoint (no such directory {folder})")
        try:
            f = open(self.path, "r+b" if os.path.exists(self.path) else "w+b")
        except OSError as e:
            raise GammaError(f"{self.path}: cannot write checkpoint ({e.strerror or e})") from None
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:          # not on POSIX: no lock
            pass
        except OSError:
            f.close()
            raise GammaError(f"{self.path}: checkpoint is in use by another run") from None
        f.truncate(truncate)
        f.seek(truncate)
        self._file = f

    def _write(self, obj) -> None:
        self._file.write(json.dumps(obj, allow_nan=True).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, out: BlockOutcome, input_sha256: str) -> None:
        self._write({"block_index": out.index, "block_name": out.name, "input_sha256": input_sha256,
                     "attempts": out.attempts, "seconds": out.seconds, "row": out.row,
                     "lower": _enc(out.lower), "upper": _enc(out.upper)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
