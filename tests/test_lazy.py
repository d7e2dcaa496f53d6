"""Lazy checkpoints (gamma.io.lazy) and block-wise runs one block at a time (gamma.models.blocks).

What must hold: a lazy store's tensors are the eager loader's bit for bit; a
block built alone is the whole graph's block, node for node; a block-wise run
through the streamed plan gives the bounds the whole-graph path gave, bit for
bit; a run reads only the blocks it needs, a solve only the block it bounds;
``gamma inspect`` reads no tensor data; a worker task carries offsets, not
weights, and reads its block from the file.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import fixtures as F
import gamma
from gamma import bounds, cli, parallel
from gamma.errors import GammaError
from gamma.io import lazy as lazy_io
from gamma.io import load_checkpoint
from gamma.models import Model
from gamma.models import llama
from gamma.ops import evaluate
from gamma.options import BoundOptions
from gamma.verify.blockwise import solve_block
from gamma.verify.records import schema

EPS = 1e-3
SEQ = 3


@pytest.fixture(scope="module")
def llama_q8(tmp_path_factory, llama_model):
    """llama arch (q/k rows permuted by the writer), tied embeddings, Q8_0 matrices."""
    return F.save_gguf(llama_model, str(tmp_path_factory.mktemp("lazy") / "llama-q8.gguf"), "llama", "Q8_0")


@pytest.fixture(scope="module")
def qwen3_q4(tmp_path_factory, qwen3_model):
    return F.save_gguf(qwen3_model, str(tmp_path_factory.mktemp("lazy") / "qwen3-q4.gguf"), "qwen3", "Q4_0")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Serial runs and workers with one torch thread each: float32 products round the same."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _same_store(eager, lazy):
    assert not eager.lazy and lazy.lazy
    assert list(lazy.tensors) == list(eager.tensors)
    assert lazy.config == eager.config and lazy.dtypes == eager.dtypes and lazy.notes == eager.notes
    assert lazy.n_params == eager.n_params and lazy.source_names == eager.source_names
    for name, t in eager.tensors.items():
        got = lazy.tensors[name]
        assert got.dtype == torch.float32 and torch.equal(got, t), name
        assert lazy.shape(name) == tuple(t.shape)


# ---------------------------------------------------------------- the store
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lazy_gguf_equals_eager(tmp_path, llama_model, qwen3_model, arch, qtype):
    model = llama_model if arch == "llama" else qwen3_model
    p = F.save_gguf(model, str(tmp_path / f"{arch}-{qtype}.gguf"), arch, qtype)
    eager, lazy = load_checkpoint(p), load_checkpoint(p, lazy=True)
    _same_store(eager, lazy)
    emb = eager.tensors["model.embed_tokens.weight"]
    assert torch.equal(lazy.rows("model.embed_tokens.weight", [5, 0, 5, 95]), emb[[5, 0, 5, 95]])


def test_lazy_q6_k_and_rows_chunked(monkeypatch, llama_gguf_q6_k):
    """K-quants (256-element super-blocks) too, and dequantized a few rows at a time."""
    monkeypatch.setattr(lazy_io, "CHUNK_ELEMENTS", 600)          # 2 rows of 256 per step
    _same_store(load_checkpoint(llama_gguf_q6_k[0]), load_checkpoint(llama_gguf_q6_k[0], lazy=True))


def test_lazy_safetensors_equals_eager(llama_hf_dir, llama_sharded_dir, qwen3_hf_dir, llama_bare_safetensors,
                                      whisper_hf_dir):
    for d, _ in (llama_hf_dir, llama_sharded_dir, qwen3_hf_dir, llama_bare_safetensors, whisper_hf_dir):
        _same_store(load_checkpoint(d), load_checkpoint(d, lazy=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_lazy_safetensors_dtypes(tmp_path, qwen3_model, dtype):
    from safetensors.torch import save_file
    sd = {k: v.detach().to(dtype).contiguous() for k, v in qwen3_model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    F.write_json(str(tmp_path / "config.json"), qwen3_model.config.to_dict())
    _same_store(load_checkpoint(str(tmp_path)), load_checkpoint(str(tmp_path), lazy=True))


def test_lazy_header_only(monkeypatch, qwen3_q4, llama_hf_dir):
    """Loading lazily and `gamma inspect` read no tensor data (every read goes through read_bytes)."""
    def no_read(*a, **k):
        raise AssertionError("tensor data read")
    monkeypatch.setattr(lazy_io, "read_bytes", no_read)
    ck = load_checkpoint(qwen3_q4, lazy=True)
    assert ck.tensors.loads == {} and ck.tensors.row_loads == {}
    for path in (qwen3_q4, llama_hf_dir[0]):
        assert cli.main(["inspect", path, "--json"]) == 0
    with pytest.raises(AssertionError, match="tensor data read"):
        ck.tensors["model.norm.weight"]


def test_lazy_nan_found_when_read(tmp_path, qwen3_model):
    w = qwen3_model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy().copy()
    w[3, 5] = np.nan
    p = F.save_gguf(qwen3_model, str(tmp_path / "nan.gguf"), "qwen3",
                    overrides={"model.layers.1.mlp.up_proj.weight": (w, None)})
    msg = f"{p}: tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or inf (stored as 'blk.1.ffn_up.weight')"
    with pytest.raises(GammaError) as eager:
        load_checkpoint(p)
    assert str(eager.value) == msg
    res = gamma.verify(p, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="0", attack=False)
    assert res["blocks"][0]["status"] != "FAILED"                 # block 1 is never read
    with pytest.raises(GammaError) as lazy:
        gamma.verify(p, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="1", attack=False)
    assert str(lazy.value) == msg


# ---------------------------------------------------------------- one block alone
@pytest.mark.parametrize("output", ["hidden", "logits"])
def test_block_alone_is_the_cut_block(llama_q8, qwen3_q4, output):
    for path in (llama_q8, qwen3_q4):
        ck = load_checkpoint(path)
        whole = llama.build_llama(ck, SEQ, output)
        for k, name in enumerate(whole.blocks()):
            _same_graph(llama.build_block(ck, k, SEQ, output), whole.block_graph(name))
        head = llama.build_head(ck, SEQ, output)
        assert [n for n in head.nodes if n != head.input] == [n for n in whole.nodes if whole[n].block is None
                                                              and n != whole.input]
        assert head.output == whole.output


def _same_graph(a, b):
    assert (a.name, a.input, a.output, a.meta, a.input_shape) == (b.name, b.input, b.output, b.meta, b.input_shape)
    assert list(a.nodes) == list(b.nodes)
    for name in a.nodes:
        x, y = a[name], b[name]
        assert (x.op, x.inputs, x.block, x.shape) == (y.op, y.inputs, y.block, y.shape), name
        assert x.params.keys() == y.params.keys(), name
        for key, v in x.params.items():
            w = y.params[key]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), (name, key)
            else:
                assert v == w, (name, key)


def test_block_out_of_range(llama_q8):
    with pytest.raises(GammaError, match="block 2 is out of range: the model has 2 blocks"):
        llama.build_block(load_checkpoint(llama_q8, lazy=True), 2, SEQ)


# ---------------------------------------------------------------- block-wise runs
def _reference(model, method, intermediate):
    """The whole-graph path block-wise runs took before plans: the full graph, one forward
    pass keeping every value, each block cut from it and bounded."""
    point = model.input_point("decoder", SEQ)
    graph = model.graph("decoder", SEQ)
    values = evaluate(graph, point.x, keep_all=True)
    out = {"input": point.x.numpy(), "nominal": values[graph.output].numpy()}
    for k, name in enumerate(graph.blocks()):
        sub = graph.block_graph(name)
        res = bounds.compute_bounds(sub, values[sub.input], EPS, method, intermediate=intermediate)
        out.update({f"block{k}_input": values[sub.input].numpy(), f"block{k}_nominal": values[sub.output].numpy(),
                    f"block{k}_lower": res.lower.double().numpy(), f"block{k}_upper": res.upper.double().numpy()})
    return out


@pytest.mark.parametrize("method,intermediate", [("crown", "cut"), ("crown", "crown"), ("ibp", "crown")])
def test_block_wise_bit_identical_to_whole_graph(llama_q8, method, intermediate):
    eager = Model(load_checkpoint(llama_q8))
    ref = _reference(eager, method, intermediate)
    for model in (llama_q8, eager):                        # a path loads lazily; a loaded model is eager
        res = gamma.verify(model, EPS, method, block_wise=True, seq_len=SEQ, intermediate=intermediate,
                           attack=False)
        assert sorted(res.arrays) == sorted(ref)
        for key, want in ref.items():
            assert np.array_equal(res.arrays[key], want), key


def test_run_reads_only_the_blocks_it_needs(llama_q8):
    model = Model(load_checkpoint(llama_q8, lazy=True))
    store = model.ckpt.tensors
    res = gamma.verify(model, EPS, "crown", block_wise=True, seq_len=SEQ, blocks="0", intermediate="cut")
    layer0 = {n for n in store if n.startswith("model.layers.0.")}
    # forward pass, bounds, attack: three builds of block 0, nothing else read whole
    assert set(store.loads) == layer0 and set(store.loads.values()) == {3}
    assert dict(store.row_loads) == {"model.embed_tokens.weight": 1}          # the input's token rows only
    assert "nominal" not in res.arrays                    # the pass stopped at block 0
    store.loads.clear()
    res = gamma.verify(model, EPS, "crown", block_wise=True, seq_len=SEQ, blocks="1", attack=False)
    layer1 = {n for n in store if n.startswith("model.layers.1.")}
    assert set(store.loads) == layer0 | layer1 | {"model.norm.weight"}      # the pass reaches the output
    assert all(store.loads[n] == 1 for n in layer0) and all(store.loads[n] == 2 for n in layer1)
    assert "nominal" in res.arrays


def test_solve_reads_only_its_block(llama_q8):
    """What a worker does with a task: build its block from the file (only that block's
    tensors, each once), bound it, drop it."""
    model = Model(load_checkpoint(llama_q8, lazy=True))
    plan = model.block_plan("decoder", SEQ)
    x = plan.nominal(model.input_point("decoder", SEQ).x, [1]).centers[1]
    task = parallel.BlockTask(1, "layer1", None, x, BoundOptions(EPS, "crown", "cut"), plan.source(1))
    back = pickle.loads(parallel.task_bytes(task))
    assert back.graph is None and back.source.portable
    store = back.source.ckpt.tensors
    assert store.loads == {}
    row, lo, hi = solve_block(back)
    assert dict(store.loads) == {n: 1 for n in store if n.startswith("model.layers.1.")}
    ref = bounds.compute_bounds(plan.block(1), x, EPS, "crown", intermediate="cut")
    assert np.array_equal(lo, ref.lower.double().numpy()) and np.array_equal(hi, ref.upper.double().numpy())


def test_worker_task_carries_offsets_not_weights(llama_q8):
    lazy = Model(load_checkpoint(llama_q8, lazy=True)).block_plan("decoder", SEQ)
    eager = Model(load_checkpoint(llama_q8)).block_plan("decoder", SEQ)
    x = torch.zeros(SEQ, 64, dtype=torch.float64)
    blob = parallel.task_bytes(parallel.BlockTask(0, "layer0", None, x, BoundOptions(EPS), lazy.source(0)))
    weights = sum(v.numel() * 4 for v in (load_checkpoint(llama_q8).tensors[n] for n in lazy.ckpt.tensors
                                          if n.startswith("model.layers.0.")))
    assert len(blob) < 20_000 < weights                       # the table of offsets, no tensor data
    # a loaded (eager) checkpoint has no file to read from: its block's graph is sent instead
    task = parallel.BlockTask(0, "layer0", None, x, BoundOptions(EPS), eager.source(0))
    sent = pickle.loads(parallel.task_bytes(task))
    assert sent.source is None
    _same_graph(sent.graph, eager.block(0))


def test_workers_read_their_blocks_and_report_memory(monkeypatch, qwen3_q4):
    monkeypatch.setattr(parallel.runners, "cpu_count", lambda: 2)      # --workers 2: one thread each
    serial = gamma.verify(qwen3_q4, EPS, "crown", block_wise=True, seq_len=SEQ, intermediate="cut", attack=False)
    par = gamma.verify(qwen3_q4, EPS, "crown", block_wise=True, seq_len=SEQ, intermediate="cut", attack=False,
                       workers=2)
    for k in serial.arrays:
        assert np.array_equal(serial.arrays[k], par.arrays[k]), k
    mem = par["memory"]
    assert mem["peak_rss_mb"] > 0 and sorted(b for w in mem["workers"] for b in w["blocks"]) == [0, 1]
    assert all(w["peak_rss_mb"] > 0 and w["pid"] > 0 for w in mem["workers"])
    assert serial["memory"]["workers"] == [] and serial["memory"]["peak_rss_mb"] > 0


# ---------------------------------------------------------------- the command line
def test_cli_bad_block_index_is_one_line(capsys, qwen3_q4):
    rc = cli.main(["verify", qwen3_q4, "--block-wise", "--blocks", "0,7"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err == "gamma: error: --blocks 0,7: the model has 2 blocks (0..1); block 7 is out of range\n"


def test_cli_block_wise_json_has_memory(capsys, qwen3_q4):
    import json
    import jsonschema
    rc = cli.main(["verify", qwen3_q4, "--block-wise", "--blocks", "1", "--seq-len", "2", "--method", "ibp",
                   "--json", "--quiet"])
    out, _ = capsys.readouterr()
    assert rc == 0
    d = json.loads(out)
    jsonschema.Draft202012Validator(schema()).validate(d)
    assert d["memory"]["peak_rss_mb"] > 0 and d["memory"]["workers"] == []
    rc = cli.main(["verify", qwen3_q4, "--block-wise", "--blocks", "1", "--seq-len", "2", "--method", "ibp",
                   "--quiet"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "peak memory: " in out
