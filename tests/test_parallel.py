"""gamma.parallel: block-wise runs over local processes, Ray and a checkpoint.

Every placement must give the serial run's numbers bit for bit (records and
bounds); failed blocks are retried once and then reported, never dropped; a
checkpointed run that is interrupted resumes with only the missing blocks.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle

import jsonschema
import numpy as np
import pytest
import torch

import gamma
from gamma import cli, parallel
from gamma.errors import GammaError
from gamma.options import BoundOptions

V = importlib.import_module("gamma.verify")     # the package (gamma.verify is the function)
B = importlib.import_module("gamma.verify.blockwise")

EPS = 1e-3
SEQ = 2


@pytest.fixture(scope="module")
def qwen3(qwen3_hf_dir):
    return gamma.load(qwen3_hf_dir[0])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every run here, serial or in a worker, uses one torch thread: float32
    products (CROWN's linear transposes) round the same only under the same
    thread count (MKL picks its kernels by threads and shape)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _one_thread_per_worker(monkeypatch):
    monkeypatch.setattr(parallel.runners, "cpu_count", lambda: 2)      # --workers 2: one thread each


@pytest.fixture(scope="module")
def serial(qwen3):
    return gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ)


def _same(a, b):
    """Identical records (but for wall times) and bit-identical bounds."""
    assert sorted(a.arrays) == sorted(b.arrays)
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype == np.float64
        assert np.array_equal(a.arrays[k], b.arrays[k]), k
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in a["blocks"]] == [strip(r) for r in b["blocks"]]
    assert a["summary"] == b["summary"]


def _validate(result):
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    jsonschema.Draft202012Validator(V.schema()).validate(d)
    return d


# ---------------------------------------------------------------- what a worker gets
def test_task_holds_only_its_block(qwen3):
    graph = qwen3.graph("decoder", SEQ)
    block = graph.blocks()[1]
    sub = graph.block_graph(block)
    assert {n.block for n in sub if n.op != "input"} == {block}
    own = sum(v.numel() * v.element_size() for n in sub for v in n.params.values() if isinstance(v, torch.Tensor))
    x = torch.zeros(sub.input_shape, dtype=torch.float64)
    blob = parallel.task_bytes(parallel.BlockTask(1, block, sub, x, BoundOptions(EPS)))
    everything = sum(v.numel() * v.element_size() for n in graph for v in n.params.values()
                     if isinstance(v, torch.Tensor))
    assert own < len(blob) < own + 16 * 1024 < everything            # the other block's weights are not sent
    back = pickle.loads(blob)
    assert list(back.graph.nodes) == list(sub.nodes) and back.graph.output == sub.output


def test_views_are_compacted():
    """A weight that is a view into a larger storage is sent as its own data only."""
    from gamma.graph import Graph
    big = torch.randn(1000, 64, dtype=torch.float64)
    g = Graph("g", "x", (2, 64))
    g.add("lin", "linear", "x", block="b", weight=big[:8], bias=big[10, :8])
    x = torch.zeros(2, 64, dtype=torch.float64)
    blob = parallel.task_bytes(parallel.BlockTask(0, "b", g, x, BoundOptions(EPS)))
    assert len(blob) < 20_000                     # not the 512 kB storage
    w = pickle.loads(blob).graph["lin"].params["weight"]
    assert torch.equal(w, big[:8]) and w.untyped_storage().nbytes() == w.numel() * 8


# ---------------------------------------------------------------- same numbers everywhere
def test_workers_match_serial_bit_for_bit(qwen3, serial):
    messages = []
    par = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, workers=2, progress=messages.append)
    _same(serial, par)
    assert par["failed_blocks"] == [] and par["resumed_blocks"] == []
    done = sorted(m for m in messages if " blocks: " in m)                # "1/2 blocks: layer1 done in 3.2s"
    assert [m.split(" ")[0] for m in done] == ["1/2", "2/2"] and all(" done in " in m for m in done)
    assert {m.split(" ")[2] for m in done} == {"layer0", "layer1"}
    _validate(par)


def test_workers_carry_norm_splits(qwen3, serial):
    """--norm-splits reaches the workers (their BoundOptions): the same bounds as the serial run
    with it, bit for bit, narrower than without it, and the report says how many pieces."""
    one = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, norm_splits=3)
    par = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, workers=2, norm_splits=3)
    _same(one, par)
    assert par["norm_splits"] == 3 and par["failed_blocks"] == []
    for b in ("block0", "block1"):
        w1 = one.arrays[f"{b}_upper"] - one.arrays[f"{b}_lower"]
        w0 = serial.arrays[f"{b}_upper"] - serial.arrays[f"{b}_lower"]
        assert np.all(w1 <= w0 * (1 + 1e-3) + 1e-12), b
        assert w1.max() < 0.99 * w0.max(), b            # measured: 0.447 -> 0.325, 0.0285 -> 0.0282


def test_other_thread_counts_differ_only_by_float32_rounding(qwen3, serial):
    """With two threads in one process MKL may round the float32 products
    differently: the bounds then agree to float32 rounding of the products
    (both are sound, see tests/test_models_sound.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ)
    finally:
        torch.set_num_threads(old)
    for k in serial.arrays:
        a, b = serial.arrays[k], two.arrays[k]
        assert np.allclose(a, b, rtol=1e-6, atol=1e-9 * np.abs(a).max()), k


def test_ray_local_cluster_matches_serial(qwen3, serial):
    pytest.importorskip("ray")
    par = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, ray="local")
    _same(serial, par)
    _validate(par)


def test_ray_missing_is_a_clear_error(qwen3, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)         # import ray -> ImportError
    with pytest.raises(GammaError, match=r"^gamma verify --ray needs ray: pip install gamma-bounds\[ray\]$"):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, ray="local")


# ---------------------------------------------------------------- failures
_SOLVE = B.solve_block          # the real one, before any monkeypatch


class Flaky:
    """A solve that fails (raises, or kills its process) on chosen blocks.

    ``once``: fail only on the first attempt (a marker file in ``folder`` says
    the first attempt happened, across processes)."""

    def __init__(self, folder: str, blocks: set, once: bool, crash: bool = False):
        self.folder, self.blocks, self.once, self.crash = folder, set(blocks), once, crash

    def __call__(self, task, progress=None):
        if task.index in self.blocks:
            marker = os.path.join(self.folder, f"tried{task.index}")
            first = not os.path.exists(marker)
            open(marker, "a").close()
            if first or not self.once:
                if self.crash:
                    os._exit(3)
                raise RuntimeError(f"boom in {task.name}\nsecond line")
        return _SOLVE(task, progress)


def _tasks(model):
    graph = model.graph("decoder", SEQ)
    x = model.input_point("decoder", SEQ).x
    values = gamma.ops.evaluate(graph, x, keep_all=True)
    opts = BoundOptions(EPS, "crown", "crown", device="cpu", alpha_iters=20)
    out = []
    for k, b in enumerate(graph.blocks()):
        sub = graph.block_graph(b)
        out.append(parallel.BlockTask(k, b, sub, values[sub.input], opts))
    return out


@pytest.mark.parametrize("workers", [None, 2])
def test_failed_block_is_retried_once(qwen3, serial, tmp_path, workers):
    outs = parallel.run_blocks(_tasks(qwen3), Flaky(str(tmp_path), {1}, once=True), workers=workers)
    assert [o.attempts for o in outs] == [1, 2] and not any(o.failed for o in outs)
    assert np.array_equal(outs[1].upper, serial.arrays["block1_upper"])


@pytest.mark.parametrize("workers,crash", [(None, False), (2, False), (2, True)])
def test_block_failing_twice_is_reported(qwen3, serial, tmp_path, workers, crash):
    messages = []
    outs = parallel.run_blocks(_tasks(qwen3), Flaky(str(tmp_path), {0}, once=False, crash=crash),
                               workers=workers, progress=messages.append)
    bad, good = outs
    assert bad.failed and bad.attempts == 2 and bad.row is None and bad.lower is None
    assert bad.error == ("worker process died" if crash else "RuntimeError: boom in layer0")
    assert not good.failed and np.array_equal(good.lower, serial.arrays["block1_lower"])
    assert any("layer0 failed" in m and "retrying" in m for m in messages)
    assert any("layer0 FAILED after 2 attempts" in m for m in messages)


def test_failed_block_in_the_result(qwen3, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(B, "solve_block", Flaky(str(tmp_path), {1}, once=False))
    r = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, tolerance=1.0)
    d = _validate(r)
    assert d["failed_blocks"] == ["layer1"]
    row = d["blocks"][1]
    assert row["status"] == "FAILED" and row["error"] == "RuntimeError: boom in layer1"
    assert row["output_width"] is None and row["nodes"] == [] and row["within_tolerance"] is False
    assert d["verdict"] == "unknown" and "block1_lower" not in r.arrays and "block0_lower" in r.arrays
    assert d["summary"]["worst_blocks"][0]["name"] == "layer1"      # NaN counts as worst


# ---------------------------------------------------------------- checkpoint
def _count_solves(monkeypatch):
    calls = []

    def counting(task, progress=None):
        calls.append(task.index)
        return ORIGINAL_SOLVE(task, progress)
    monkeypatch.setattr(B, "solve_block", counting)
    return calls


ORIGINAL_SOLVE = B.solve_block


def test_checkpoint_resumes_a_partial_run(qwen3, serial, tmp_path, monkeypatch):
    ck = str(tmp_path / "run.jsonl")
    calls = _count_solves(monkeypatch)
    first = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, blocks="0", checkpoint=ck)
    assert calls == [0] and first["resumed_blocks"] == []
    with open(ck) as f:
        lines = [json.loads(line) for line in f]
    assert lines[0]["gamma_checkpoint"] == 1 and lines[0]["key"]["epsilon"] == EPS
    assert [rec["block_index"] for rec in lines[1:]] == [0]
    full = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, checkpoint=ck)
    assert calls == [0, 1] and full["resumed_blocks"] == [0]
    _same(serial, full)
    again = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, checkpoint=ck, workers=2)
    assert calls == [0, 1] and again["resumed_blocks"] == [0, 1]      # nothing left to compute
    _same(serial, again)
    _validate(again)


def test_checkpoint_after_an_interrupt(qwen3, serial, tmp_path, monkeypatch):
    """Killed after the first block (KeyboardInterrupt), with a torn line at the end."""
    ck = str(tmp_path / "run.jsonl")

    def interrupt(message):
        if " blocks: " in message:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, checkpoint=ck, progress=interrupt)
    with open(ck, "a") as f:
        f.write('{"block_index": 1, "block_na')                   # a write cut short
    calls = _count_solves(monkeypatch)
    full = gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, checkpoint=ck)
    assert calls == [1] and full["resumed_blocks"] == [0]
    _same(serial, full)
    with open(ck) as f:
        assert [json.loads(line).get("block_index") for line in f] == [None, 0, 1]


def test_checkpoint_of_another_run_is_refused(qwen3, tmp_path):
    ck = str(tmp_path / "run.jsonl")
    gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="0", checkpoint=ck)
    with pytest.raises(GammaError, match=r"checkpoint of another run \(epsilon: 0\.001 here, 0\.002 now\)"):
        gamma.verify(qwen3, 2 * EPS, "ibp", block_wise=True, seq_len=SEQ, checkpoint=ck)
    with pytest.raises(GammaError, match=r"checkpoint of another run \(method: 'ibp' here, 'crown' now\)"):
        gamma.verify(qwen3, EPS, "crown", block_wise=True, seq_len=SEQ, checkpoint=ck)
    with pytest.raises(GammaError, match=r"checkpoint of another run \(input_sha256: "):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, tokens="1,2", checkpoint=ck)


def test_checkpoint_block_input_changed(qwen3, tmp_path):
    """Same key, but a block's recorded input differs (the model changed under the same path)."""
    ck = str(tmp_path / "run.jsonl")
    gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="1", checkpoint=ck)
    with open(ck) as f:
        lines = f.readlines()
    rec = json.loads(lines[1])
    rec["input_sha256"] = "0" * 64
    with open(ck, "w") as f:
        f.write(lines[0] + json.dumps(rec) + "\n")
    with pytest.raises(GammaError, match=r"run\.jsonl:2: block 1 \(layer1\) was computed on a different block input"):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, checkpoint=ck)


def test_checkpoint_corrupt_or_foreign(qwen3, tmp_path):
    ck = tmp_path / "run.jsonl"
    ck.write_text("hello\n")
    with pytest.raises(GammaError, match="not a gamma checkpoint"):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, checkpoint=str(ck))
    gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, blocks="0", checkpoint=str(ck2 := tmp_path / "b"))
    head, rec = ck2.read_text().splitlines()
    ck2.write_text(head + "\n" + rec[:40] + "\n" + rec + "\n")          # a torn line in the middle
    with pytest.raises(GammaError, match=r"b:2: corrupt checkpoint line"):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, checkpoint=str(ck2))
    with pytest.raises(GammaError, match="cannot write checkpoint"):
        gamma.verify(qwen3, EPS, "ibp", block_wise=True, seq_len=SEQ, checkpoint=str(tmp_path / "no" / "x"))


# ---------------------------------------------------------------- options
def test_option_errors(qwen3):
    with pytest.raises(GammaError, match=r"--workers must be an integer >= 1, got 0"):
        gamma.verify(qwen3, EPS, block_wise=True, workers=0)
    for kw, opt in ((dict(workers=2), "--workers"), (dict(ray="local"), "--ray"), (dict(checkpoint="x"), "--checkpoint")):
        with pytest.raises(GammaError, match=f"{opt} applies to --block-wise runs"):
            gamma.verify(qwen3, EPS, **kw)


def test_cli_options(qwen3_hf_dir, tmp_path, capsys):
    path = qwen3_hf_dir[0]
    ck = str(tmp_path / "ck.jsonl")
    args = ["verify", path, "--block-wise", "--method", "ibp", "--seq-len", "2", "--json"]
    assert cli.main(args + ["--checkpoint", ck, "--blocks", "1"]) == 0
    assert cli.main(args + ["--checkpoint", ck, "--workers", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["resumed_blocks"] == [1]
    assert cli.main(["verify", path, "--workers", "2"]) == 2
    assert "--workers applies to --block-wise runs" in capsys.readouterr().err
    assert cli.main(args + ["--workers", "-1"]) == 2
    assert "--workers must be an integer >= 1, got -1" in capsys.readouterr().err
