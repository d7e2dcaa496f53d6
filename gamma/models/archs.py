"""Each architecture as data: its components (the graphs gamma verifies), what
each takes as input, how it is built, and how a block-wise run gets its blocks.

:class:`gamma.models.Model` reads :data:`ARCHS` and asks no architecture
questions of its own; supporting another architecture is one entry here and
its graph builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..graph import Graph
from ..io.checkpoint import LoadedCheckpoint
from ..ops import evaluate
from . import llama, whisper
from .blocks import StreamPlan


def default_mel(shape: tuple[int, ...]) -> torch.Tensor:
    """The default encoder input: normal with standard deviation 0.5 (seed 0), clipped to
    [-1, 1.5], the range of Whisper's normalised log-mel features."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5).clamp(-1.0, 1.5)


@dataclass(frozen=True)
class Inputs:
    """What a component's graph takes, at sequence length T."""
    shape: Callable[[object, int], tuple[int, ...]]     # (config, T) -> the input point's shape
    seq_len: Callable[[torch.Tensor], int]               # an input point -> T


MEL = Inputs(lambda cfg, t: (cfg.n_mels, 2 * t), lambda x: x.shape[-1] // 2)    # log-mel features (n_mels, 2T)
EMBEDDINGS = Inputs(lambda cfg, t: (t, cfg.d_model), lambda x: x.shape[-2])     # token embeddings (T, d)


@dataclass(frozen=True)
class Component:
    """One graph of an architecture."""
    inputs: Inputs
    # (checkpoint, T, output, encoder input or None) -> the graph from the input point to the output
    build: Callable[[LoadedCheckpoint, int, str, Optional[torch.Tensor]], Graph]
    token_table: Optional[str] = None     # the embedding matrix (vocab, d) token ids index; None: no tokens
    no_tokens: str = ""                   # why --tokens is refused (no token_table)
    no_logits: Optional[str] = None       # why --output logits is refused; None: allowed
    # a block plan that builds each block alone ((checkpoint, T, output) -> plan); None: cut the whole graph
    stream: Optional[Callable[[LoadedCheckpoint, int, str], object]] = None


def encoder_output(ckpt: LoadedCheckpoint, seq_len: int, encoder_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Whisper encoder's output at its default (or the given) input: the decoder's cross-attention constant."""
    enc = whisper.build_encoder(ckpt, seq_len)
    x = default_mel(enc.input_shape) if encoder_input is None else encoder_input.double()
    return evaluate(enc, x)


def _whisper_encoder(ckpt, seq_len, output, encoder_input):
    return whisper.build_encoder(ckpt, seq_len)


def _whisper_decoder(ckpt, seq_len, output, encoder_input):
    return whisper.build_decoder(ckpt, seq_len, encoder_output(ckpt, seq_len, encoder_input), output)


def _llama(ckpt, seq_len, output, encoder_input):
    return llama.build_llama(ckpt, seq_len, output)


LLAMA_DECODER = Component(EMBEDDINGS, _llama, token_table="model.embed_tokens.weight", stream=StreamPlan)

# arch -> component name -> Component; the first component is the default
ARCHS: dict[str, dict[str, Component]] = {
    "whisper": {
        "encoder": Component(MEL, _whisper_encoder,
                             no_tokens="--tokens applies to decoders; the Whisper encoder takes --input FEATURES.npy",
                             no_logits="--output logits applies to decoders, not the Whisper encoder"),
        "decoder": Component(EMBEDDINGS, _whisper_decoder, token_table="model.decoder.embed_tokens.weight"),
    },
    "llama": {"decoder": LLAMA_DECODER},
    "qwen3": {"decoder": LLAMA_DECODER},
}
COMPONENTS = {arch: tuple(components) for arch, components in ARCHS.items()}
