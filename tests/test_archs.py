"""gamma.models.archs: every architecture the loaders recognise is one entry of data,
and the Model facade asks no architecture questions of its own."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from gamma.io.checkpoint import ModelConfig
from gamma.io.names import ARCH_SIGNATURES
from gamma.models import ARCHS, COMPONENTS, model


def test_every_loaded_arch_has_an_entry():
    assert {arch for arch, _ in ARCH_SIGNATURES} == set(ARCHS)
    assert COMPONENTS == {"whisper": ("encoder", "decoder"), "llama": ("decoder",), "qwen3": ("decoder",)}


@pytest.mark.parametrize("arch,component", [(a, c) for a in ARCHS for c in ARCHS[a]])
def test_input_shape_and_sequence_length_agree(arch, component):
    spec = ARCHS[arch][component]
    cfg = ModelConfig(arch=arch, d_model=24, n_mels=16)
    for t in (1, 5):
        shape = spec.inputs.shape(cfg, t)
        assert spec.inputs.seq_len(torch.zeros(shape)) == t
    assert (spec.token_table is None) == bool(spec.no_tokens)


def test_the_facade_asks_no_architecture_questions():
    """No comparison in gamma/models/model.py reads an ``arch``: what differs is in ARCHS."""
    tree = ast.parse(inspect.getsource(model))
    asks = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(isinstance(n, (ast.Attribute, ast.Name)) and getattr(n, "attr", getattr(n, "id", None)) == "arch"
                    for n in ast.walk(node))]
    assert asks == []
