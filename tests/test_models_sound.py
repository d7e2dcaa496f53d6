"""Whole tiny models: gamma's bounds contain what transformers computes (float32)
at sampled and attacked inputs, for every method and several epsilons."""

import pytest
import torch

from gamma.bounds import compute_bounds
from gamma.io import load_checkpoint
from gamma.models import Model
from soundness import violations

transformers = pytest.importorskip("transformers")


def _scale_init(model, seed):
    """Weights of realistic scale (HF's std 0.02 init makes activations ~0.05)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
            elif "norm" in name and "bias" not in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _lm(kind, tmp):
    T = transformers
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=64, attn_implementation="eager")
    hf = (T.Qwen3ForCausalLM(T.Qwen3Config(**common)) if kind == "qwen3"
          else T.LlamaForCausalLM(T.LlamaConfig(**common)))
    _scale_init(hf, 1)
    hf.save_pretrained(tmp)
    return hf


def _whisper(tmp):
    T = transformers
    cfg = T.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                          vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                          max_source_positions=1500, max_target_positions=448, attn_implementation="eager")
    hf = _scale_init(T.WhisperForConditionalGeneration(cfg), 2)
    hf.save_pretrained(tmp)
    return hf


def whisper_encoder_ref(hf):
    enc = hf.model.encoder
    F = torch.nn.functional

    def fn(x):
        h = F.gelu(enc.conv2(F.gelu(enc.conv1(x.float())))).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        for layer in enc.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return enc.layer_norm(h)
    return fn


CASES = ["qwen3", "llama", "whisper-encoder", "whisper-decoder"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("qwen3", "llama"):
        d = tmp_path_factory.mktemp(kind)
        hf = _lm(kind, d)
        out[kind] = (Model(load_checkpoint(str(d))), lambda x, hf=hf: hf.model(inputs_embeds=x.float()).last_hidden_state)
    d = tmp_path_factory.mktemp("whisper")
    hf = _whisper(d)
    m = Model(load_checkpoint(str(d)))
    out["whisper-encoder"] = (m, whisper_encoder_ref(hf))
    enc_out = m.encoder_output(4).float()
    out["whisper-decoder"] = (m, lambda x: hf.model.decoder(
        inputs_embeds=x.float(), encoder_hidden_states=enc_out[None].expand(x.shape[0], -1, -1)).last_hidden_state)
    return out


@pytest.mark.parametrize("case", CASES)
def test_nominal_matches_transformers(models, case):
    model, ref = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    ours = model.forward(ip.x, comp)
    with torch.no_grad():
        theirs = ref(ip.x[None])[0].double()
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("method", ["ibp", "crown", "zonotope", "alpha"])
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-4])
@pytest.mark.parametrize("case", CASES)
def test_model_bounds_contain_transformers(models, case, eps, method):
    if method == "alpha" and eps != 1e-4:
        pytest.skip("alpha checked at one epsilon to keep the suite short")
    model, ref = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    g = model.graph(comp, seq_len=4)
    r = compute_bounds(g, ip.x, eps, method, alpha_iters=3)
    assert torch.all(r.lower <= r.upper)
    bad = violations(ref, ip.x, eps, r.lower, r.upper, n_samples=1000, steps=10, restarts=1)
    assert bad == 0, f"{case} {method} eps={eps}: {bad} violations"
    if method in ("crown", "alpha"):   # these random models amplify ~100x per block: keep the test meaningful
        assert torch.isfinite(r.width()).all()
    elif method == "zonotope":
        # zonotope boxes of the Whisper-shaped models' norms admit a variance near zero, where a
        # float32 E[x^2] - E[x]^2 variance may vanish (then unbounded is the sound answer); the
        # real-valued function's bounds stay finite
        real = compute_bounds(g, ip.x, eps, method, arithmetic="real")
        assert torch.isfinite(real.width()).all()


@pytest.mark.parametrize("eps", [1e-5, 1e-4])
@pytest.mark.parametrize("case", CASES)
def test_probabilistic_rounding_contains_transformers(models, case, eps):
    """--arithmetic float32-probabilistic: transformers' float32 outputs inside (samples + PGD),
    every node's bounds at most the default mode's."""
    model, ref = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    g = model.graph(comp, seq_len=4)
    r = compute_bounds(g, ip.x, eps, "crown", arithmetic="float32-probabilistic")
    bad = violations(ref, ip.x, eps, r.lower, r.upper, n_samples=1000, steps=10, restarts=1)
    assert bad == 0, f"{case} eps={eps}: {bad} violations"
    default = compute_bounds(g, ip.x, eps, "crown")
    for name in r.nodes:
        assert bool((r.nodes[name].width() <= default.nodes[name].width() * (1 + 1e-9) + 1e-15).all()), name
    assert torch.isfinite(r.width()).all() and r.stats["rounding_failure"] < 1e-12


@pytest.mark.parametrize("method,intermediate", [("crown", "crown"), ("crown", "cut"), ("alpha", "crown")])
@pytest.mark.parametrize("case", CASES)
def test_compact_rows_equal_dense(models, case, method, intermediate):
    """Token-compact cotangents (gamma.bounds.rows) give the dense walk's bounds
    at every node, on whole models (encoder front end with conv and transposes
    included: the walk falls back to dense there) and block graphs."""
    from gamma.bounds import Tunings
    model, _ = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    g = model.graph(comp, seq_len=4)
    got = {}
    for compact in (True, False):
        got[compact] = compute_bounds(g, ip.x, 1e-4, method, intermediate=intermediate, alpha_iters=2,
                                      tunings=Tunings(compact_rows=compact))
    a, b = got[True], got[False]
    assert a.nodes.keys() == b.nodes.keys()
    for name in a.nodes:
        for x, y in ((a.nodes[name].lower, b.nodes[name].lower), (a.nodes[name].upper, b.nodes[name].upper)):
            # an infinite float32 margin (a norm whose variance may vanish) makes the dense walk's
            # 0 * inf terms unbounded where the compact walk skips the zero entries: never the reverse
            fin = torch.isfinite(y)
            assert bool(torch.isfinite(x)[fin].all()), name
            scale = float(y[fin].abs().max()) + 1e-30 if bool(fin.any()) else 1.0
            assert float((x[fin] - y[fin]).abs().max()) <= 1e-9 * scale if bool(fin.any()) else True, name


@pytest.mark.parametrize("case", ["qwen3", "whisper-encoder"])
def test_float32_transposes_used_sound_and_as_tight(models, case, monkeypatch):
    """The checkpoints' weights are float32 values, so CROWN's linear transposes
    run as float32 products (fp.CotangentProduct); the bounds contain every
    sampled and attacked output and are within 1% of the float64 products'."""
    from gamma.bounds import Tunings, fp
    model, ref = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    g = model.graph(comp, seq_len=4)
    calls = []
    product = fp.CotangentProduct.product
    monkeypatch.setattr(fp.CotangentProduct, "product", lambda self, lam, **kw: (calls.append(1), product(self, lam, **kw))[1])
    got = {}
    for f32 in (True, False):
        calls.clear()
        got[f32] = compute_bounds(g, ip.x, 1e-4, "crown", tunings=Tunings(float32_transpose=f32))
        assert bool(calls) is f32
    a, b = got[True], got[False]
    assert violations(ref, ip.x, 1e-4, a.lower, a.upper, n_samples=1000, steps=10, restarts=1) == 0
    assert not torch.equal(a.lower, b.lower)
    assert float(a.width().sum()) <= 1.01 * float(b.width().sum())


@pytest.mark.parametrize("arithmetic", ["float32", "float32-probabilistic", "real"])
@pytest.mark.parametrize("case", CASES)
def test_norm_splits_contain_transformers(models, case, arithmetic):
    """--norm-splits 3 on whole tiny models: in both float32 modes transformers' float32 outputs lie
    inside (samples + PGD), in real arithmetic gamma's float64 forward does; every MLP norm is split
    (and Qwen3's attention norms too: q and k feed its q / k norms, which read their CROWN bounds),
    and the output is nowhere wider than without the split (beyond CROWN's own 1e-3 non-monotonicity)."""
    from gamma.bounds import Tunings
    from soundness import graph_fn
    model, ref = models[case]
    comp = "decoder" if case != "whisper-encoder" else "encoder"
    ip = model.input_point(comp, seq_len=4)
    g = model.graph(comp, seq_len=4)
    eps = 1e-4
    on = compute_bounds(g, ip.x, eps, "crown", arithmetic=arithmetic, tunings=Tunings(norm_splits=3))
    off = compute_bounds(g, ip.x, eps, "crown", arithmetic=arithmetic)
    assert on.stats["split_norms"] == (4 if case == "qwen3" else 2)
    assert torch.isfinite(on.width()).all()
    assert bool((on.width() <= off.width() * (1 + 1e-3) + 1e-12).all())
    fn = graph_fn(g, torch.float64) if arithmetic == "real" else ref
    bad = violations(fn, ip.x, eps, on.lower, on.upper, n_samples=1000, steps=10, restarts=1)
    assert bad == 0, f"{case} {arithmetic}: {bad} violations"
