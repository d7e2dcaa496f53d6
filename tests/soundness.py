"""Soundness helpers for the tests: the library's sampler/attack plus graph copies."""

from __future__ import annotations

import copy

import torch

from gamma.attack import explore, pgd_points, sample_points, violations  # noqa: F401


def as_dtype(graph, dtype):
    """A copy of ``graph`` whose constants are ``dtype`` (float32: a float32 engine)."""
    g = copy.deepcopy(graph)
    return g.to(dtype=dtype)


def graph_fn(graph, dtype=torch.float64):
    from gamma.ops import evaluate
    g = as_dtype(graph, dtype)
    return lambda x: evaluate(g, x.to(dtype))
