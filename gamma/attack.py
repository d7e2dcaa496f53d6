"""Empirical checks of bounds: box samples and a PGD attack.

Used by the tests, by ``gamma regress`` (soundness on the fly), by
``gamma compare`` (attack on the difference) and by the tightness figures
(certified width / empirical width).  ``fn`` maps a batch ``(B, *in_shape)``
to ``(B, *out_shape)`` and must be differentiable for the attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


def sample_points(center: torch.Tensor, eps: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points in the box: a quarter at random corners, the rest uniform."""
    u = torch.rand((n, *center.shape), generator=gen, dtype=torch.float64) * 2 - 1
    k = max(1, n // 4)
    u[:k] = torch.sign(u[:k])
    return center + eps * u


def pgd_points(fn: Fn, center: torch.Tensor, eps: float, out_numel: int, gen: torch.Generator,
               n_targets: int = 8, steps: int = 20, restarts: int = 2,
               nominal: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Projected sign-gradient ascent and descent on chosen outputs.

    Pushes each target output up and down from ``restarts`` random starts;
    targets are random outputs plus the nominal argmax/argmin (or ``targets``).
    Returns the final points, ``(2 * len(targets) * restarts, *in_shape)``.
    """
    if targets is None:
        idx = torch.randperm(out_numel, generator=gen)[:n_targets]
        if nominal is not None:
            flat = nominal.reshape(-1)
            idx = torch.unique(torch.cat([idx, flat.argmax()[None], flat.argmin()[None]]))
    else:
        idx = targets
    tg = idx.repeat(2 * restarts)
    signs = torch.cat([torch.ones(len(idx)), -torch.ones(len(idx))]).repeat(restarts).double()
    b = len(tg)
    x = center + eps * (torch.rand((b, *center.shape), generator=gen, dtype=torch.float64) * 2 - 1)
    for step in range(steps):
        x = x.detach().requires_grad_(True)
        y = fn(x).reshape(b, -1).double()
        obj = (signs * y[torch.arange(b), tg]).sum()
        (g,) = torch.autograd.grad(obj, x)
        size = eps * 0.5 * (1 - step / steps) + eps * 0.02
        x = center + (x.detach() + size * torch.sign(g) - center).clamp(-eps, eps)
    return x.detach()


@dataclass
class Empirical:
    lower: torch.Tensor       # elementwise min of the outputs seen
    upper: torch.Tensor       # elementwise max
    violations: int           # outputs outside the certified bounds (if given)
    points: int
    worst_input: Optional[torch.Tensor] = None   # input of the largest |output| seen (first output elt)


def explore(fn: Fn, center: torch.Tensor, eps: float, lower: Optional[torch.Tensor] = None,
            upper: Optional[torch.Tensor] = None, n_samples: int = 1000, seed: int = 0,
            attack: bool = True, chunk: int = 256, **pgd) -> Empirical:
    """Evaluate ``fn`` on samples (and attack points); count bound violations."""
    gen = torch.Generator().manual_seed(seed)
    pts = [center[None], sample_points(center, eps, n_samples, gen)]
    if attack:
        with torch.no_grad():
            nominal = fn(center[None])[0]
        pts.append(pgd_points(fn, center, eps, nominal.numel(), gen, nominal=nominal, **pgd))
    lo = hi = None
    bad = n = 0
    for p in pts:
        for c in torch.split(p, chunk):
            with torch.no_grad():
                y = fn(c).double()
            n += len(c)
            cmin, cmax = y.min(0).values, y.max(0).values
            lo = cmin if lo is None else torch.minimum(lo, cmin)
            hi = cmax if hi is None else torch.maximum(hi, cmax)
            if lower is not None:
                bad += int(((y < lower) | (y > upper) | torch.isnan(y)).sum())
    return Empirical(lo, hi, bad, n)


def violations(fn: Fn, center, eps, lower, upper, **kw) -> int:
    return explore(fn, center, eps, lower, upper, **kw).violations
