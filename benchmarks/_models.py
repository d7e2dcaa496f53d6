"""Random-weight checkpoints for the benchmarks, written as GGUF with gguf-py.

The benchmarks build their own large models (nothing is downloaded): seeded
numpy weights in the shape of a real architecture, written the way llama.cpp
writes a ``qwen3`` GGUF (gguf-py's tensor names, ``qwen3.*`` metadata,
1-D tensors in F32, matrices in the requested quant type), through the same
writer as the tests' models (:mod:`gamma.io.tiny`).

Weights follow transformers' initialisation of a fresh ``Qwen3ForCausalLM``
(normal, std ``initializer_range`` = 0.02), except the token embeddings
(std ``embedding_std`` = 1): with std 0.02 an epsilon of 1e-3 is 5% of
block 0's input, whose box then nearly contains the zero vector, and every
method's bound of the first RMSNorm saturates.  With std 1 block 0 sees a
residual stream of the size deeper blocks see.  The norm weights are 1 plus
a small seeded perturbation so that a swapped norm tensor changes the
function.  Timing does not depend on the values; tightness does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gamma.io.tiny import hf_meta, write_gguf

SEED = 1234


@dataclass(frozen=True)
class Qwen3Shape:
    """A Qwen3 decoder's sizes (defaults: Qwen3-0.6B with a small vocabulary;
    the vocabulary does not change a block or the hidden output)."""
    num_hidden_layers: int = 28
    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    vocab_size: int = 1000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    embedding_std: float = 1.0

    def params(self) -> int:
        """Number of weights (embedding and untied LM head included)."""
        d, h, kv, hd, f = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                           self.head_dim, self.intermediate_size)
        block = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d + 2 * hd
        return self.num_hidden_layers * block + 2 * self.vocab_size * d + d


QWEN3_0_6B = Qwen3Shape()


def qwen3_tensors(shape: Qwen3Shape, seed: int = SEED):
    """Yield (hf name, float32 array) for every tensor of a random Qwen3 model.
    Matrices are (out_features, in_features), as in transformers' state dict."""
    rng = np.random.default_rng(seed)
    s = shape
    std = s.initializer_range

    def mat(rows, cols, scale=std):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)

    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    yield "model.embed_tokens.weight", mat(s.vocab_size, s.hidden_size, s.embedding_std)
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(s.hidden_size)
        yield p + "self_attn.q_proj.weight", mat(q, s.hidden_size)
        yield p + "self_attn.k_proj.weight", mat(kv, s.hidden_size)
        yield p + "self_attn.v_proj.weight", mat(kv, s.hidden_size)
        yield p + "self_attn.o_proj.weight", mat(s.hidden_size, q)
        yield p + "self_attn.q_norm.weight", norm(s.head_dim)
        yield p + "self_attn.k_norm.weight", norm(s.head_dim)
        yield p + "post_attention_layernorm.weight", norm(s.hidden_size)
        yield p + "mlp.gate_proj.weight", mat(s.intermediate_size, s.hidden_size)
        yield p + "mlp.up_proj.weight", mat(s.intermediate_size, s.hidden_size)
        yield p + "mlp.down_proj.weight", mat(s.hidden_size, s.intermediate_size)
    yield "model.norm.weight", norm(s.hidden_size)
    yield "lm_head.weight", mat(s.vocab_size, s.hidden_size)


def write_qwen3_gguf(path: str, shape: Qwen3Shape = QWEN3_0_6B, qtype: str = "Q8_0", seed: int = SEED) -> str:
    """Write a random Qwen3 model as a GGUF file (matrices in ``qtype``:
    Q8_0, F16 or F32; 1-D tensors F32, as llama.cpp does) with gamma's one
    GGUF writer (:func:`gamma.io.tiny.write_gguf`)."""
    name = "random-qwen3-" + "x".join(str(v) for v in (shape.num_hidden_layers, shape.hidden_size))
    return write_gguf(path, "qwen3", hf_meta(shape), qwen3_tensors(shape, seed), qtype, name=name)


def describe(shape: Qwen3Shape) -> dict:
    return {**asdict(shape), "params": shape.params()}
