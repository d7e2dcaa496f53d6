"""Soundness helpers for the tests: the library's sampler/attack plus graph copies."""

from __future__ import annotations

import copy

import numpy as np
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


def f32_sum(v: np.ndarray, how: str, rng) -> np.float32:
    """A float32 sum of v in one of the orders an engine may use: 'forward', 'reverse',
    'random' (rng's permutation), 'largest first', 'pairwise', or 'lanes' (8 running sums,
    joined left to right)."""
    if how == "pairwise":
        while len(v) > 1:
            if len(v) % 2:
                v = np.append(v, np.float32(0))
            v = (v[0::2] + v[1::2]).astype(np.float32)
        return np.float32(v[0])
    if how == "lanes":
        acc = np.zeros(8, dtype=np.float32)
        for i in range(0, len(v), 8):
            chunk = np.zeros(8, dtype=np.float32)
            chunk[: len(v[i:i + 8])] = v[i:i + 8]
            acc = (acc + chunk).astype(np.float32)
        return f32_sum(acc, "forward", rng)
    order = {"forward": np.arange(len(v)), "reverse": np.arange(len(v))[::-1],
             "random": rng.permutation(len(v)), "largest first": np.argsort(-np.abs(v))}[how]
    acc = np.float32(0)
    for i in order:
        acc = np.float32(acc + v[i])
    return acc
