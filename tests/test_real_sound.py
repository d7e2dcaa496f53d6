"""Block-wise bounds on the REAL models contain what transformers' own layers
compute (float32) at sampled and attacked inputs of each block's box."""

import pytest
import torch

import fixtures as F
from gamma.bounds import compute_bounds
from gamma.models import Model
from gamma.ops import evaluate
from soundness import violations

transformers = pytest.importorskip("transformers")


def _layer_fn(layer):
    def fn(x):
        out = layer(x.float(), None)
        return out[0] if isinstance(out, tuple) else out
    return fn


@pytest.mark.real
@pytest.mark.parametrize("method", ["crown", "zonotope"])
def test_real_whisper_block0_contains_transformers(whisper_tiny_en_checkpoint, method):
    ck = whisper_tiny_en_checkpoint
    model = Model(ck)
    T, eps = 2, 1e-3
    ip = model.input_point("encoder", seq_len=T)
    g = model.graph("encoder", seq_len=T)
    vals = evaluate(g, ip.x, keep_all=True)
    bg = g.block_graph("layer0")
    x = vals[bg.input]
    r = compute_bounds(bg, x, eps, method)
    layer = F.whisper_hf_from_checkpoint(ck).model.encoder.layers[0]
    bad = violations(_layer_fn(layer), x, eps, r.lower, r.upper, n_samples=1000, steps=15, restarts=1)
    assert bad == 0
    assert torch.isfinite(r.width()).all()


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("block", [1, 29])
def test_real_smollm2_block_contains_transformers(real_smollm2, smollm2_checkpoint, block):
    model = Model(smollm2_checkpoint)
    T, eps = 2, 1e-3
    ip = model.input_point(seq_len=T)
    g = model.graph(seq_len=T)
    vals = evaluate(g, ip.x, keep_all=True)
    bg = g.block_graph(f"layer{block}")
    x = vals[bg.input]
    r = compute_bounds(bg, x, eps, "crown", intermediate="cut")
    hf = F.hf_from_gguf(real_smollm2)
    layer = hf.model.layers[block]
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]

    def fn(xx):
        xx = xx.float()
        cos, sin = hf.model.rotary_emb(xx, pos.expand(len(xx), -1))
        out = layer(xx, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    bad = violations(fn, x, eps, r.lower, r.upper, n_samples=500, steps=10, restarts=1)
    assert bad == 0
