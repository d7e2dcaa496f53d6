"""gamma.options: every bound option is checked once, by one function with one message,
whichever entry point the value comes through (the CLI, gamma.verify, compute_bounds);
the checked options are frozen and pickle; compute_bounds leaves the caller's graph
where it was."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

import gamma
from gamma import cli
from gamma.bounds import compute_bounds
from gamma.errors import GammaError
from gamma.graph import Graph
from gamma.options import (BoundOptions, check_alpha_iters, check_arithmetic, check_device, check_epsilon,
                           check_intermediate, check_method, check_tolerance)


def _graph() -> Graph:
    gen = torch.Generator().manual_seed(0)
    g = Graph("tiny", "x", (3, 4))
    g.add("fc", "linear", "x", weight=torch.randn(5, 4, generator=gen, dtype=torch.float64),
          bias=torch.randn(5, generator=gen, dtype=torch.float64))
    g.add("act", "gelu", "fc")
    return g.infer_shapes()


BAD = [
    (dict(epsilon=0), "--epsilon must be a finite number > 0, got 0"),
    (dict(epsilon="-1e0"), "--epsilon must be a finite number > 0, got -1e0"),
    (dict(epsilon=math.nan), "--epsilon must be a finite number > 0, got nan"),
    (dict(method="magic"), "unknown method 'magic' (choose from ibp, crown, alpha, zonotope)"),
    (dict(intermediate="x"), "unknown --intermediate 'x' (choose from crown, cut, ibp)"),
    (dict(arithmetic="float16"), "unknown --arithmetic 'float16' (choose from float32, float32-probabilistic, real)"),
    (dict(device="tpu"), "unknown --device 'tpu' (choose cpu or cuda)"),
    (dict(device="cpu:0"), "unknown --device 'cpu:0' (choose cpu or cuda)"),
    (dict(alpha_iters=-1), "--alpha-iters must be an integer >= 0, got -1"),
    (dict(alpha_iters=2.5), "--alpha-iters must be an integer >= 0, got 2.5"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_one_message_at_every_entry(bad, message):
    """BoundOptions, compute_bounds and gamma.verify raise the same message for the same value."""
    kw = dict(dict(epsilon=1e-3), **bad)
    with pytest.raises(GammaError) as options:
        BoundOptions(**kw)
    g = _graph()
    with pytest.raises(GammaError) as engine:
        compute_bounds(g, torch.zeros(3, 4, dtype=torch.float64), **kw)
    with pytest.raises(GammaError) as api:
        gamma.verify("/nonexistent/model.gguf", **kw)         # checked before the model is read
    assert str(options.value) == str(engine.value) == str(api.value) == message


@pytest.mark.parametrize("argv,message", [
    (["--epsilon", "-1e0"], "--epsilon must be a finite number > 0, got -1e0"),
    (["--epsilon", "x"], "--epsilon must be a finite number > 0, got x"),
    (["--device", "tpu"], "unknown --device 'tpu' (choose cpu or cuda)"),
    (["--alpha-iters", "-3"], "--alpha-iters must be an integer >= 0, got -3"),
])
def test_cli_says_the_same(argv, message, capsys):
    assert cli.main(["verify", "/nonexistent/model.gguf"] + argv) == 2
    assert capsys.readouterr().err == f"gamma: error: {message}\n"


def test_checks_return_the_checked_value():
    assert check_epsilon("2e-3") == 2e-3 and check_epsilon(1) == 1.0
    assert check_method("alpha") == "alpha" and check_intermediate("cut") == "cut"
    assert check_arithmetic("real") == "real" and check_device("cpu") == "cpu"
    assert check_alpha_iters(0) == 0 and check_tolerance(None) is None and check_tolerance(2) == 2.0
    with pytest.raises(GammaError, match=r"^--tolerance must be a finite number >= 0, got -1$"):
        check_tolerance(-1)
    with pytest.raises(GammaError, match=r"^--alpha-iters must be an integer >= 0, got True$"):
        check_alpha_iters(True)


def test_frozen_and_pickles():
    o = BoundOptions("1e-3", "alpha", "cut", "real", "cpu", 7)
    assert o.epsilon == 1e-3 and isinstance(o.epsilon, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.method = "ibp"
    assert pickle.loads(pickle.dumps(o)) == o
    with pytest.raises(GammaError, match="unknown method"):
        dataclasses.replace(o, method="magic")                 # a changed copy is checked again


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha", "zonotope"])
def test_options_give_the_same_bits(method):
    g, x = _graph(), torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    a = compute_bounds(g, x, 1e-2, method, intermediate="crown", arithmetic="real", alpha_iters=3)
    b = compute_bounds(g, x, options=BoundOptions(1e-2, method, "crown", "real", "cpu", 3))
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    with pytest.raises(TypeError, match="not both"):
        compute_bounds(g, x, 1e-2, options=BoundOptions(1e-2))
    with pytest.raises(GammaError, match="options must be a gamma.options.BoundOptions"):
        compute_bounds(g, x, options={"epsilon": 1e-2})


def test_epsilon_zero_only_where_allowed():
    g, x = _graph(), torch.zeros(3, 4, dtype=torch.float64)
    r = compute_bounds(g, x, 0, "crown", allow_zero=True)          # the float32 rounding alone
    assert bool((r.upper >= r.lower).all())


def test_graph_on_leaves_the_graph():
    """Graph.on is self where every constant is there already, else a copy; never moves self."""
    g = _graph()
    w = g["fc"].params["weight"]
    assert g.on("cpu") is g
    moved = g.on("meta")
    assert moved is not g and moved["fc"].params["weight"].device.type == "meta"
    assert g["fc"].params["weight"] is w and w.device.type == "cpu"
    assert list(moved.nodes) == list(g.nodes) and moved.output == g.output and moved.input_shape == g.input_shape


def test_compute_bounds_leaves_the_callers_graph():
    g = _graph()
    before = {(n.name, k): v for n in g for k, v in n.params.items()}
    compute_bounds(g, torch.zeros(3, 4, dtype=torch.float64), 1e-3, "crown")
    assert all(g[name].params[k] is v for (name, k), v in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compute_bounds_on_cuda_leaves_the_callers_graph_on_the_cpu():
    g = _graph()
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    gpu = compute_bounds(g, x, 1e-2, "crown", device="cuda")
    assert all(v.device.type == "cpu" for n in g for v in n.params.values() if isinstance(v, torch.Tensor))
    cpu = compute_bounds(g, x, 1e-2, "crown")
    assert bool((gpu.lower <= cpu.upper).all()) and bool((cpu.lower <= gpu.upper).all())
