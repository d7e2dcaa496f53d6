"""Soundness harness shared by the bound tests: box samples plus a PGD attack.

``violations(fn, center, eps, lower, upper)`` draws uniform samples and box
corners, runs projected sign-gradient ascent/descent on chosen outputs from
several starts, and returns how many evaluated outputs fall outside
[lower, upper].  ``fn`` maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)``
and is evaluated in whatever precision it computes (float32 references check
the rounding margins).
"""

from __future__ import annotations

import copy

import torch


def sample_points(center: torch.Tensor, eps: float, n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand((n, *center.shape), generator=gen, dtype=torch.float64) * 2 - 1
    k = max(1, n // 4)
    u[:k] = torch.sign(u[:k])                     # corners
    return center + eps * u


def pgd_points(fn, center: torch.Tensor, eps: float, out_numel: int, gen: torch.Generator,
               n_targets: int = 8, steps: int = 20, restarts: int = 2, nominal=None) -> torch.Tensor:
    """Points found by pushing ``n_targets`` outputs up and down (2 * n_targets * restarts runs)."""
    idx = torch.randperm(out_numel, generator=gen)[:n_targets]
    if nominal is not None:                       # include the extremal outputs
        flat = nominal.reshape(-1)
        idx = torch.unique(torch.cat([idx, flat.argmax()[None], flat.argmin()[None]]))
    targets = idx.repeat(2 * restarts)
    signs = torch.cat([torch.ones(len(idx)), -torch.ones(len(idx))]).repeat(restarts).double()
    b = len(targets)
    x = center + eps * (torch.rand((b, *center.shape), generator=gen, dtype=torch.float64) * 2 - 1)
    for step in range(steps):
        x = x.detach().requires_grad_(True)
        y = fn(x).reshape(b, -1).double()
        obj = (signs * y[torch.arange(b), targets]).sum()
        (g,) = torch.autograd.grad(obj, x)
        size = eps * 0.5 * (1 - step / steps) + eps * 0.02
        x = center + (x.detach() + size * torch.sign(g) - center).clamp(-eps, eps)
    return x.detach()


def violations(fn, center: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor,
               n_samples: int = 1000, seed: int = 0, attack: bool = True, **pgd) -> int:
    gen = torch.Generator().manual_seed(seed)
    pts = [sample_points(center, eps, n_samples, gen), center[None]]
    if attack:
        with torch.no_grad():
            nominal = fn(center[None])[0]
        pts.append(pgd_points(fn, center, eps, lower.numel(), gen, nominal=nominal, **pgd))
    bad = 0
    for p in pts:
        for chunk in torch.split(p, 256):
            with torch.no_grad():
                y = fn(chunk).double()
            bad += int(((y < lower) | (y > upper) | torch.isnan(y)).sum())
    return bad


def as_dtype(graph, dtype):
    """A copy of ``graph`` whose constants are ``dtype`` (float32: a float32 engine)."""
    g = copy.deepcopy(graph)
    return g.to(dtype=dtype)


def graph_fn(graph, dtype=torch.float64):
    from gamma.ops import evaluate
    g = as_dtype(graph, dtype)
    return lambda x: evaluate(g, x.to(dtype))
