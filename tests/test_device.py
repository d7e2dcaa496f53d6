"""The engine names a device for every tensor it creates, so ``--device cuda``
never meets a CPU tensor it made itself.  No CUDA device is needed: a torch
function mode watches the factory calls (``torch.zeros``, ``torch.arange``,
...) that the bound code makes on the CPU and fails on any without a
``device`` (``torch.as_tensor`` of a tensor keeps that tensor's device)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import gamma
from gamma.bounds import compute_bounds

import fixtures as F

FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "eye", "linspace", "rand", "randn", "as_tensor"}
PKG = os.path.dirname(os.path.abspath(gamma.__file__)) + os.sep


class Factories(TorchFunctionMode):
    """Counts factory calls made from gamma's own code; ``missing``: those without a device."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PKG)]
            if frames:
                self.calls += 1
                keeps = name == "as_tensor" and args and isinstance(args[0], torch.Tensor)
                if "device" not in kwargs and not keeps:
                    f = frames[-1]
                    self.missing.append(f"torch.{name} at {os.path.relpath(f.filename, PKG)}:{f.lineno}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["qwen3", "whisper"])
def test_every_tensor_the_engine_creates_names_its_device(arch, tmp_path):
    m = gamma.load(F.save_hf(F.build(arch), str(tmp_path / arch)))
    part = "encoder" if arch == "whisper" else None
    g, x = m.graph(part, 3), m.input_point(part, 3).x
    mode = Factories()
    with mode:
        for method, inter in [("ibp", "crown"), ("crown", "crown"), ("crown", "cut"), ("alpha", "crown"),
                              ("zonotope", "crown")]:
            compute_bounds(g, x, 1e-3, method, intermediate=inter, alpha_iters=2)
    assert mode.calls > 100                      # the mode saw the engine's factory calls
    assert mode.missing == []
