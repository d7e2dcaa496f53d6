"""What the commands' CLIs share: the input-point options, output-file checks,
JSON and text output (numbers, tables), and the progress line on stderr.

Every command module in :mod:`gamma.commands` imports its helpers from here
(never from another command or from :mod:`gamma.cli`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

from ..errors import GammaError
from ..verify import json_safe


# ------------------------------------------------------------------ options
def add_input_options(p: argparse.ArgumentParser, title: str = "input point (the centre of the box)") -> None:
    """The input-point options of every command that runs a model."""
    g = p.add_argument_group(title)
    g.add_argument("--component", choices=("encoder", "decoder"),
                   help="Whisper: encoder (default) or decoder; decoder LMs: decoder")
    g.add_argument("--seq-len", type=int, default=8, metavar="T",
                   help="sequence length (Whisper encoder: T frames = 2T mel columns; default 8)")
    g.add_argument("--tokens", metavar="IDS", help="decoder token ids, e.g. 1,2,3 (sets --seq-len)")
    g.add_argument("--input", dest="input_path", metavar="FILE.npy", help="the exact input array")
    g.add_argument("--center", choices=("zeros", "default"), help="zeros: all-zero input (as gamma-crown)")
    g.add_argument("--output", choices=("hidden", "logits"), default="hidden",
                   help="output point: final hidden state (default) or logits (decoders)")


def input_kwargs(args) -> dict:
    """The keyword arguments of ``gamma.forward`` / ``verify`` / ``compare`` from :func:`add_input_options`."""
    return dict(component=args.component, seq_len=args.seq_len, tokens=args.tokens,
                input_path=args.input_path, center=None if args.center == "default" else args.center,
                output=args.output)


# ------------------------------------------------------------------ files
def check_writable(*paths: Optional[str]) -> None:
    """Fail before a long run, not after it, when an output file cannot be created."""
    for path in paths:
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise GammaError(f"{path}: cannot write (no such directory {folder})")
        if os.path.isdir(path):
            raise GammaError(f"{path}: cannot write (is a directory)")


def save_npy(path: str, arr: np.ndarray) -> None:
    try:
        with open(path, "wb") as f:
            np.save(f, arr)
    except OSError as e:
        raise GammaError(f"{path}: cannot write ({e.strerror or e})") from None


# ------------------------------------------------------------------ output
def print_json(data) -> None:
    """One JSON object on stdout (non-finite floats as null, never NaN/Infinity)."""
    print(json.dumps(json_safe(data), allow_nan=False))


def emit(data: dict, lines: Callable[[dict], list[str]], as_json: bool) -> None:
    """``data`` as JSON (``--json``) or as the text ``lines(data)``."""
    if as_json:
        print_json(data)
    else:
        print("\n".join(lines(data)))


def num(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}e}"


def seconds(v: float) -> str:
    return f"{v:.2f}s" if v < 100 else f"{v:.0f}s"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Columns padded to their widest cell; ``align`` has one 'l'/'r' per column (default: left first, right rest)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()
    return [fmt(header), fmt(["-" * w if h else "" for h, w in zip(header, widths)])] + [fmt(r) for r in rows]


class Progress:
    """Progress on stderr: on a terminal one rewritten status line (the message
    and the elapsed time); otherwise (a log file, a CI job) a plain line at
    most every ``every`` seconds, the first after ``every`` seconds, so that
    a long run leaves a heartbeat of what it is doing and a short one none.
    Call :meth:`done` (or pass ``None``) to clear the line at the end."""

    def __init__(self, enabled: bool, live: bool = True, every: float = 30.0):
        self.enabled = enabled
        self.live = live
        self.every = every
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.width = 0

    @classmethod
    def for_stderr(cls, enabled: bool) -> "Progress":
        """Live on a terminal, a heartbeat in a log."""
        return cls(enabled=enabled, live=sys.stderr.isatty())

    def __call__(self, message: Optional[str]) -> None:
        if message is None:
            self.done()
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.live:
            if now - self.last >= self.every:
                sys.stderr.write(f"gamma: {message} [{now - self.t0:.1f}s]\n")
                sys.stderr.flush()
                self.last = now
            return
        line = f"gamma: {message} [{now - self.t0:.1f}s]"
        cols = _columns() - 1
        line = line[:cols]
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def note(self, message: str) -> None:
        """A message that a log must not miss (a saturated bound): on a terminal as any other,
        in a log written at once, whatever the heartbeat."""
        if self.enabled and not self.live:
            self.last = time.perf_counter() - self.every
        self(message)

    def done(self) -> None:
        if self.enabled and self.live and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def _columns() -> int:
    try:
        cols = os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        cols = 0
    return cols if cols > 20 else 80


# the engine a checkpoint format is run by, where a --layernorm-variance assumption leaves it out
# (only for architectures with LayerNorms: the option changes nothing for RMSNorm models)
LAYERNORM_ARCHS = {"whisper"}
ENGINE_NOT_COVERED = {
    ("ct2", "two-pass"): "CTranslate2, which runs this checkpoint, computes LayerNorm's variance as "
                         "E[x^2] - E[x]^2: --layernorm-variance formula covers it, two-pass does not",
    ("safetensors", "formula"): "transformers on CPU (PyTorch's LayerNorm keeps running moments) is not "
                                "covered by --layernorm-variance formula: --layernorm-variance any is",
    ("safetensors", "two-pass"): "transformers on CPU (PyTorch's LayerNorm keeps running moments) is not "
                                 "covered by --layernorm-variance two-pass: --layernorm-variance any is",
}
ENGINE_NOT_COVERED[("pytorch", "formula")] = ENGINE_NOT_COVERED[("safetensors", "formula")]
ENGINE_NOT_COVERED[("pytorch", "two-pass")] = ENGINE_NOT_COVERED[("safetensors", "two-pass")]


# ggml's CPU matmuls take their activations in the weight's "vec_dot_type": a quantized weight's
# activations are quantized (Q8_0, Q8_1, Q8_K), an F16 / BF16 weight's rounded to that type
def _ggml_rounds_activations(dtype: str) -> bool:
    return dtype in ("F16", "BF16") or dtype.startswith(("Q", "IQ", "TQ", "MXFP"))


def activation_note(model: dict, r: dict) -> Optional[str]:
    """One line where ``model`` (a report's model entry with its ``dtypes``) is a GGUF file whose
    weights llama.cpp multiplies by activations it first quantizes or rounds below float32, which
    the float32 margins do not cover, else None (real arithmetic assumes no engine; ``--engine
    llama.cpp`` covers it)."""
    if r.get("arithmetic") == "real" or model.get("format") != "gguf" or r.get("engine") == "llama.cpp":
        return None
    types = sorted(t for t in (model.get("dtypes") or {}) if _ggml_rounds_activations(t))
    if not types:
        return None
    return (f"llama.cpp's CPU matmuls with {'/'.join(types)} weights quantize or round their activations "
            "(to Q8_0/Q8_1/Q8_K or F16), which the float32 margins do not cover: the bounds hold for the "
            "dequantized weights in float32 engines (transformers); --engine llama.cpp covers llama.cpp")


def engine_note(model: dict, r: dict) -> Optional[str]:
    """One line where the float32 bounds' LayerNorm assumption (``r``'s arithmetic and
    layernorm_variance) leaves out the engine that ``model``'s format (a report's model entry)
    is run by, else None (real arithmetic assumes no engine)."""
    if r.get("arithmetic") == "real" or model.get("arch") not in LAYERNORM_ARCHS:
        return None
    return ENGINE_NOT_COVERED.get((model.get("format"), r.get("layernorm_variance", "any")))


def warn_engine(model: dict, r: dict, who: str = "") -> None:
    """:func:`engine_note` and :func:`activation_note` as warning lines on stderr, where there are any."""
    for note in (engine_note(model, r), activation_note(model, r)):
        if note:
            print(f"gamma: warning: {who}{note}", file=sys.stderr)
