"""Correlation statistics over a handful of blocks (numpy only, no scipy).

Pearson r, and Spearman rho as the Pearson r of ranks, ties sharing the
average of their ranks (scipy's 'average'); ``tests/test_analyze.py`` checks
them against scipy.  Used by :mod:`gamma.analyze` (sensitivity against
weight norms) and :mod:`gamma.tightness` (certified against attacked
sensitivity).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the average of their ranks (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1          # positions i..j -> ranks i+1..j+1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN with fewer than 2 points or a constant vector."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(dx), np.linalg.norm(dy)
    if nx == 0 or ny == 0:
        return math.nan
    return float(np.clip(np.dot(dx / nx, dy / ny), -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the (average-tie) ranks."""
    return pearson(rankdata(x), rankdata(y))
