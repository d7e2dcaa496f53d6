"""gamma.attack.attack_range: inside the box, never above the certified bound, and at least as
strong as plain PGD (20 steps, 2 restarts) where the exact maximum is known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gamma.attack import AttackConfig, attack_range, choose_targets, pgd_points
from gamma.graph import Graph
from gamma.ops import evaluate


def _linear(gen: torch.Generator, n_in: int = 6, n_out: int = 5):
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64)
    g = Graph("lin", "x", (n_in,))
    g.add("y", "linear", "x", weight=w, bias=b)
    g.infer_shapes()
    return g, w, b


def _plain(fn, center, eps, targets, seed):
    """Plain PGD as gamma had it: 20 steps, 2 restarts, final points only."""
    gen = torch.Generator().manual_seed(seed)
    pts = pgd_points(fn, center, eps, int(targets.max()) + 1, gen, steps=20, restarts=2, targets=targets)
    with torch.no_grad():
        y = fn(pts).reshape(len(pts), -1)
    return y.min(0).values, y.max(0).values


def test_linear_network_reaches_the_exact_range():
    """y = W x + b over |x - c| <= eps: the range of y_j is W c + b -+ eps sum_i |W_ji| (by hand)."""
    gen = torch.Generator().manual_seed(0)
    g, w, b = _linear(gen)
    c = torch.randn(6, generator=gen, dtype=torch.float64)
    eps = 0.3
    lo = w @ c + b - eps * w.abs().sum(1)
    hi = w @ c + b + eps * w.abs().sum(1)
    att = attack_range(lambda z: evaluate(g, z), c, eps, lo - 1e-12, hi + 1e-12,      # float64 rounding
                       AttackConfig(samples=8, widest=5, others=0))
    assert torch.allclose(att.lower, lo, rtol=0, atol=1e-12) and torch.allclose(att.upper, hi, rtol=0, atol=1e-12)
    assert att.violations == 0
    plain_lo, plain_hi = _plain(lambda z: evaluate(g, z), c, eps, torch.arange(5), 0)
    assert torch.all(att.upper >= plain_hi - 1e-12) and torch.all(att.lower <= plain_lo + 1e-12)


def _bowl(x: torch.Tensor) -> torch.Tensor:
    """y_j = (x_j + 0.25)^2 over x in [-1, 1]^n: max 1.5625 at x_j = 1, a local max 0.5625 at
    x_j = -1 (where sign-gradient ascent from any start below -0.25 ends), min 0 at x_j = -0.25."""
    return (x + 0.25) ** 2


def test_at_least_as_strong_as_plain_pgd_where_the_max_is_known():
    n, eps, short = 12, 1.0, 0
    c = torch.zeros(n, dtype=torch.float64)
    targets = torch.arange(n)
    exact_max = torch.full((n,), 1.5625, dtype=torch.float64)
    for seed in range(6):
        att = attack_range(_bowl, c, eps, config=AttackConfig(seed=seed, widest=0, others=n))
        assert torch.equal(att.targets, targets)
        plain_lo, plain_hi = _plain(_bowl, c, eps, targets, seed)
        assert torch.all(att.upper >= plain_hi - 1e-12) and torch.all(att.lower <= plain_lo + 1e-12)
        assert torch.allclose(att.upper, exact_max, rtol=0, atol=1e-12)       # the exact max, on every output
        assert float(att.lower.max()) <= 1e-3                                 # exact min 0
        assert torch.all(att.upper <= 1.5625 + 1e-12) and torch.all(att.lower >= 0)      # inside the box
        short += int((plain_hi < 1.5625 - 1e-9).sum())
    assert short >= 3          # the case tells the two apart: plain PGD stops at the local max x_j = -1
    print(f"\nplain PGD (20 steps, 2 restarts) short of the max on {short} of {6 * n} outputs; attack_range on 0")


def test_monotone_network_reaches_the_upper_and_lower_corners():
    """y = W2 relu(W1 x + b1) with W1, W2 >= 0 is increasing in every input: its range over the
    box is [f(c - eps), f(c + eps)] exactly."""
    gen = torch.Generator().manual_seed(3)
    w1 = torch.rand(16, 8, generator=gen, dtype=torch.float64)
    b1 = torch.randn(16, generator=gen, dtype=torch.float64)
    w2 = torch.rand(4, 16, generator=gen, dtype=torch.float64)
    g = Graph("mono", "x", (8,))
    g.add("h", "linear", "x", weight=w1, bias=b1)
    g.add("r", "relu", "h")
    g.add("y", "linear", "r", weight=w2)
    g.infer_shapes()
    fn = lambda z: evaluate(g, z)
    c, eps = torch.randn(8, generator=gen, dtype=torch.float64), 0.5
    att = attack_range(fn, c, eps, config=AttackConfig(samples=16, widest=0, others=4))
    assert torch.allclose(att.upper, fn(c + eps), rtol=0, atol=1e-12)
    assert torch.allclose(att.lower, fn(c - eps), rtol=0, atol=1e-12)
    plain_lo, plain_hi = _plain(fn, c, eps, torch.arange(4), 0)
    assert torch.all(att.upper >= plain_hi - 1e-12) and torch.all(att.lower <= plain_lo + 1e-12)


def test_violations_count_points_outside_the_given_bounds():
    gen = torch.Generator().manual_seed(1)
    g, w, b = _linear(gen, 4, 3)
    c = torch.zeros(4, dtype=torch.float64)
    nominal = b
    att = attack_range(lambda z: evaluate(g, z), c, 0.1, nominal - 1e-9, nominal + 1e-9,
                       AttackConfig(samples=4, steps=2, restarts=1, widest=3, others=0))
    assert att.violations > 0                   # bounds that ignore the box are caught
    assert att.points == 1 + 4 + (2 * 3 * 3) * (2 + 1)


def test_choose_targets_widest_first_then_random():
    gen = torch.Generator().manual_seed(0)
    lo = torch.zeros(10, dtype=torch.float64)
    up = torch.tensor([1, 5, 2, math.nan, 0, 0, 3, 0, 0, 0], dtype=torch.float64)
    t = choose_targets(10, 3, 2, gen, lo, up)
    assert {1, 3, 6} <= set(t.tolist()) and len(t) == 5 and len(set(t.tolist())) == 5
    assert choose_targets(4, 10, 10, gen, lo[:4], up[:4]).tolist() == [0, 1, 2, 3]


def test_config_is_checked():
    with pytest.raises(ValueError, match="attack steps must be an integer >= 0, got -1"):
        AttackConfig(steps=-1).checked()
    with pytest.raises(ValueError, match="attack chunk must be an integer >= 1, got 0"):
        AttackConfig(chunk=0).checked()
