"""A loaded model: checkpoint + graph builders + verification input points.

Input points (the centre of the verification box):

* Whisper encoder: log-mel features ``(n_mels, 2T)``.  Default: a
  deterministic pseudo-random array (:func:`default_mel`: ``torch.Generator``
  seed 0, normal with standard deviation 0.5, clipped to [-1, 1.5], the range
  of Whisper's normalised log-mel features).
* Decoder LMs and the Whisper decoder: token embeddings ``(T, d)``.  Default
  tokens: ``T`` ids drawn with ``torch.Generator`` seed 0 from ``[0, vocab)``.
  ``--tokens 1,2,3`` picks them; ``--center zeros`` uses all-zero inputs (as
  gamma-crown does); ``--input FILE.npy`` gives the exact array.
* The Whisper decoder holds the encoder output at its nominal value, computed
  from the default (or given) encoder input of the same ``seq_len``.

What differs between architectures is data (:mod:`.archs`); the checks of the
input options (:func:`check_seq_len`, :func:`check_center`,
:func:`check_output`) are the ones :class:`gamma.verify.InputSpec` runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import GammaError
from ..graph import Graph
from ..io.checkpoint import LoadedCheckpoint
from ..ops import evaluate
from .archs import ARCHS, COMPONENTS, Component, default_mel, encoder_output
from .blocks import GraphPlan

OUTPUTS = ("hidden", "logits")
CENTERS = ("default", "zeros")


def check_seq_len(seq_len: int) -> int:
    if seq_len < 1:
        raise GammaError(f"--seq-len must be >= 1, got {seq_len}")
    return seq_len


def check_center(center: Optional[str]) -> Optional[str]:
    """None (the default point), "default" or "zeros"."""
    if center not in (None,) + CENTERS:
        raise GammaError(f"unknown --center '{center}' (choose zeros or default)")
    return center


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise GammaError(f"unknown --output '{output}' (choose hidden or logits)")
    return output


@dataclass
class InputPoint:
    x: torch.Tensor                      # float64, the graph's input shape
    description: str
    tokens: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)


class Model:
    """A checkpoint with the graphs gamma verifies."""

    def __init__(self, ckpt: LoadedCheckpoint):
        self.ckpt = ckpt

    @property
    def config(self):
        return self.ckpt.config

    @property
    def arch(self) -> str:
        return self.ckpt.config.arch

    @property
    def path(self) -> str:
        return self.ckpt.path

    def component(self, component: Optional[str]) -> str:
        allowed = COMPONENTS[self.arch]
        if component in (None, "auto"):
            return allowed[0]
        if component not in allowed:
            raise GammaError(f"{self.arch} has no component '{component}' (choose from {', '.join(allowed)})")
        return component

    def _spec(self, component: Optional[str]) -> Component:
        return ARCHS[self.arch][self.component(component)]

    # -- input points -----------------------------------------------------
    def input_point(self, component: Optional[str] = None, seq_len: int = 8, *,
                    input_path: Optional[str] = None, tokens: Optional[Sequence[int]] = None,
                    center: Optional[str] = None) -> InputPoint:
        comp = self.component(component)
        spec = self._spec(comp)
        check_seq_len(seq_len)
        shape = spec.inputs.shape(self.config, seq_len)
        if input_path is not None:
            x = _load_npy(input_path)
            if tuple(x.shape) != shape:
                raise GammaError(f"{input_path}: input has shape {tuple(x.shape)}, expected {shape} "
                                 f"for {self.arch} {comp} at --seq-len {seq_len}")
            return InputPoint(x, f"file {os.path.basename(input_path)}")
        check_center(center)
        if center == "zeros":
            return InputPoint(torch.zeros(shape, dtype=torch.float64), "zeros")
        if spec.token_table is None:
            if tokens is not None:
                raise GammaError(spec.no_tokens)
            return InputPoint(default_mel(shape), "default mel (seed 0)")
        if tokens is None:
            vocab = self.ckpt.shape(spec.token_table)[0]
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, vocab, (seq_len,), generator=gen).tolist()
            desc = "default tokens (seed 0)"
        else:
            tokens = [int(t) for t in tokens]
            desc = "tokens " + ",".join(map(str, tokens))
        return InputPoint(self.embed(tokens, comp), desc, tokens=list(tokens))

    def embed(self, tokens: Sequence[int], component: str = "decoder") -> torch.Tensor:
        """(T, d) float64 token embeddings (a lazy checkpoint reads only these rows)."""
        spec = self._spec(component)
        if spec.token_table is None:
            raise GammaError(spec.no_tokens)
        vocab = self.ckpt.shape(spec.token_table)[0]
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise GammaError(f"token ids {bad} out of range [0, {vocab})")
        return self.ckpt.rows(spec.token_table, list(tokens)).double()

    def seq_len_of(self, component: Optional[str], x: torch.Tensor) -> int:
        """The sequence length of an input point (the encoder's 2T mel columns are T frames)."""
        return self._spec(component).inputs.seq_len(x)

    # -- graphs -------------------------------------------------------------
    def graph(self, component: Optional[str] = None, seq_len: int = 8, output: str = "hidden",
              encoder_input: Optional[torch.Tensor] = None) -> Graph:
        """The graph whose input is the verification input point."""
        spec = self._spec(component)
        check_output(output)
        if output == "logits" and spec.no_logits:
            raise GammaError(spec.no_logits)
        return spec.build(self.ckpt, seq_len, output, encoder_input)

    def block_plan(self, component: Optional[str] = None, seq_len: int = 8, output: str = "hidden",
                   encoder_input: Optional[torch.Tensor] = None):
        """The blocks of :meth:`graph` one at a time (:mod:`.blocks`): Llama / Qwen3
        build each block alone from its own weights; Whisper cuts its whole graph."""
        spec = self._spec(component)
        check_output(output)
        if spec.stream is not None:
            return spec.stream(self.ckpt, seq_len, output)
        return GraphPlan(self.graph(component, seq_len, output, encoder_input))

    def encoder_output(self, seq_len: int, encoder_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        return encoder_output(self.ckpt, seq_len, encoder_input)

    def forward(self, x: torch.Tensor, component: Optional[str] = None, output: str = "hidden") -> torch.Tensor:
        comp = self.component(component)
        return evaluate(self.graph(comp, self.seq_len_of(comp, x), output), x.double())


def _load_npy(path: str) -> torch.Tensor:
    if not os.path.exists(path):
        raise GammaError(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types on corrupt files
        raise GammaError(f"{path}: not a readable .npy array ({type(e).__name__})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise GammaError(f"{path}: input must be a float array, got {arr.dtype}")
    x = torch.from_numpy(np.asarray(arr, dtype=np.float64))
    if not torch.isfinite(x).all():
        raise GammaError(f"{path}: input contains NaN or inf")
    return x
