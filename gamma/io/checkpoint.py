"""What a loader returns: the architecture's hyper-parameters (:class:`ModelConfig`,
independent of the checkpoint format) and the loaded weights (:class:`LoadedCheckpoint`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..errors import GammaError

ARCHITECTURES = ("whisper", "llama", "qwen3")


@dataclass
class ModelConfig:
    """Hyper-parameters of one of the supported architectures.

    Decoder LMs (llama, qwen3) use ``n_layers``/``n_heads``/``n_kv_heads``.
    Whisper uses the ``encoder_*``/``decoder_*`` fields; ``d_model`` is shared.
    """

    arch: str                      # "whisper" | "llama" | "qwen3"
    d_model: int
    vocab_size: int = 0
    # decoder-only LMs
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0              # 0 -> d_model // n_heads
    d_ff: int = 0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q/k/v biases (Qwen2 style)
    attention_out_bias: bool = False  # o_proj bias (Llama/Qwen3 attention_bias=True; not Qwen2)
    # whisper
    n_mels: int = 80
    encoder_layers: int = 0
    encoder_heads: int = 0
    encoder_ffn_dim: int = 0
    decoder_layers: int = 0
    decoder_heads: int = 0
    decoder_ffn_dim: int = 0
    max_source_positions: int = 1500
    max_target_positions: int = 448
    layer_norm_eps: float = 1e-5
    # free-form provenance (what was read, what was inferred)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise GammaError(f"unknown architecture '{self.arch}' (supported: {', '.join(ARCHITECTURES)})")
        if self.arch != "whisper" and not self.head_dim and self.n_heads:
            self.head_dim = self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: float32 tensors under canonical (Hugging Face) names.

    ``tensors`` maps canonical HF names (``model.layers.0.self_attn.q_proj.weight``,
    ``model.encoder.layers.0.fc1.weight``, ...) to float32 CPU tensors in HF
    orientation (Linear weights are ``(out, in)``).  Quantized weights are
    dequantized on load; ``dtypes`` keeps the source type of every tensor
    (``"F16"``, ``"Q4_1"``, ...).  A lazy checkpoint (``load_checkpoint(path,
    lazy=True)``) holds a :class:`~gamma.io.lazy.LazyTensors` instead of a dict:
    each tensor is read (and dequantized) from the file when it is indexed, and
    :meth:`shape` / :meth:`rows` / :attr:`n_params` read no tensor data.
    """

    path: str
    format: str                    # "safetensors" | "gguf" | "ct2" | "pytorch"
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what was inferred, warnings
    source_names: dict[str, str] = field(default_factory=dict)  # canonical -> name in file
    block_minima: dict[str, torch.Tensor] = field(default_factory=dict)  # GGUF Q4_1 / Q5_1 weights (eager)

    @property
    def lazy(self) -> bool:
        """True when ``tensors`` reads each tensor from the file on access (:mod:`gamma.io.lazy`)."""
        return getattr(self.tensors, "lazy", False)

    def minima(self, name: str) -> Optional[torch.Tensor]:
        """(rows, cols / 32): each block's m of a GGUF Q4_1 / Q5_1 weight (:mod:`gamma.io.ggml`),
        else None."""
        if self.lazy:
            return self.tensors.minima(name)
        return self.block_minima.get(name)

    def dtype_counts(self) -> dict[str, int]:
        """How many tensors of each source type the file holds (``{"Q4_1": 210, "F32": 61}``)."""
        counts: dict[str, int] = {}
        for t in self.dtypes.values():
            counts[t] = counts.get(t, 0) + 1
        return counts

    @property
    def n_params(self) -> int:
        if self.lazy:
            return self.tensors.n_params()
        # tied tensors (lm_head / proj_out sharing the embedding) are one object: count it once
        return sum(t.numel() for t in {id(t): t for t in self.tensors.values()}.values())

    def shape(self, name: str) -> tuple:
        """The shape of tensor ``name`` without reading it."""
        if name not in self.tensors:
            raise GammaError(f"{self.path}: missing tensor '{name}' for {self.config.arch}")
        return self.tensors.shape(name) if self.lazy else tuple(self.tensors[name].shape)

    def rows(self, name: str, index: list[int]) -> torch.Tensor:
        """Rows ``index`` of tensor ``name`` (float32): a lazy store reads only those rows."""
        if self.lazy:
            self.shape(name)
            return self.tensors.rows(name, index)
        return self.get(name)[torch.tensor(index, dtype=torch.long)]

    def get(self, name: str, shape: Optional[tuple] = None) -> torch.Tensor:
        if name not in self.tensors:
            raise GammaError(f"{self.path}: missing tensor '{name}' for {self.config.arch}")
        t = self.tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise GammaError(f"{self.path}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t
