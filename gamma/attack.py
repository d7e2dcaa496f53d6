"""Empirical checks of bounds: box samples and a PGD attack.

Used by the tests, by ``gamma regress`` (soundness on the fly), by
``gamma compare`` (attack on the difference) and by ``gamma verify
--attack`` (:func:`attack_range`: the attacked range of every output, set
beside the certified one).  ``fn`` maps a batch ``(B, *in_shape)`` to
``(B, *out_shape)`` and must be differentiable for the attack.

Every point an attack evaluates lies in the box, so the range it reports is
an inner bound of the true range: attacked width <= true width <= certified
width, and any attacked output outside the certified bounds is a soundness
failure (counted as ``violations``).
"""

from __future__ import annotations

import math
import time
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


# ------------------------------------------------------------------ the attacked range
@dataclass(frozen=True)
class AttackConfig:
    """How hard :func:`attack_range` tries (validated once, by :meth:`checked`)."""
    samples: int = 64        # random points in the box, a quarter of them at random corners
    steps: int = 20          # PGD steps from every start
    restarts: int = 2        # random starts per target and direction (besides the two below)
    widest: int = 8          # outputs with the widest certified bound, each pushed up and down
    others: int = 8          # other outputs drawn at random, each pushed up and down
    seed: int = 0
    chunk: int = 128         # points per forward pass

    def checked(self) -> "AttackConfig":
        for name in ("samples", "steps", "restarts", "widest", "others", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "chunk" else 0):
                raise ValueError(f"attack {name} must be an integer >= {1 if name == 'chunk' else 0}, got {v!r}")
        return self

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("samples", "steps", "restarts", "widest", "others", "seed")}


_SAMPLE_SEED = 0x5EED        # targets and samples use their own stream, apart from the PGD starts


@dataclass
class AttackRange:
    lower: torch.Tensor      # elementwise min of fn over every point evaluated, float64, out shape
    upper: torch.Tensor      # elementwise max
    points: int              # points evaluated (PGD iterates included)
    violations: int          # (point, output) pairs outside the certified bounds given (NaN counts)
    targets: torch.Tensor    # flat indices of the outputs pushed up and down
    seconds: float

    def width(self) -> torch.Tensor:
        return self.upper - self.lower


class _Tracker:
    """Running elementwise min / max of every output seen, and the bound violations."""

    def __init__(self, lower: Optional[torch.Tensor], upper: Optional[torch.Tensor]):
        self.bounds = None if lower is None else (lower.double().reshape(-1), upper.double().reshape(-1))
        self.lo = self.hi = None
        self.points = self.violations = 0

    def __call__(self, y: torch.Tensor) -> None:
        y = y.detach().double().reshape(len(y), -1)                  # (B, n_out)
        lo, hi = y.min(0).values, y.max(0).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.points += len(y)
        if self.bounds is not None:
            l, u = self.bounds
            self.violations += int(((y < l) | (y > u) | torch.isnan(y)).sum())


def choose_targets(n_out: int, widest: int, others: int, gen: torch.Generator,
                   lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None,
                   nominal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat output indices to attack: the ``widest`` widest certified bounds (NaN and inf
    first), or without bounds the nominal argmax / argmin; then ``others`` drawn at random
    from the rest.  Sorted, distinct."""
    first = torch.zeros(0, dtype=torch.long)
    if lower is not None and widest > 0:
        w = (upper.double() - lower.double()).reshape(-1)
        w = torch.nan_to_num(w, nan=math.inf)
        first = torch.argsort(w, descending=True, stable=True)[:widest]
    elif nominal is not None and widest > 0:
        flat = nominal.reshape(-1)
        first = torch.unique(torch.stack([flat.argmax(), flat.argmin()]))[:widest]
    rest = torch.ones(n_out, dtype=torch.bool)
    rest[first] = False
    pool = torch.nonzero(rest).reshape(-1)
    pick = pool[torch.randperm(len(pool), generator=gen)[:others]]
    return torch.sort(torch.cat([first, pick])).values


def attack_range(fn: Fn, center: torch.Tensor, eps: float, lower: Optional[torch.Tensor] = None,
                 upper: Optional[torch.Tensor] = None, config: AttackConfig = AttackConfig()) -> AttackRange:
    """The range of every output over the points an attack finds in the box.

    Points: the centre; ``config.samples`` box samples; then for each target
    output (:func:`choose_targets`) and each direction (up, down) a
    projected sign-gradient ascent (the step shrinking from eps/2 to eps/50)
    from ``restarts`` random starts, from the corner the gradient at the
    centre points to (exact for a linear function) and from the best sample
    for that objective.  The runs from random starts are exactly those of
    :func:`pgd_points` with ``restarts`` and ``steps`` on the same targets,
    seeded with ``config.seed`` (same starts, same step sizes), so its
    final points are among the points evaluated here: this attack is never
    weaker than that plain PGD.  The two other starts come on top, and
    every iterate counts, not only the last.
    """
    cfg = config.checked()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + _SAMPLE_SEED)     # targets, samples
    center = center.double()
    track = _Tracker(lower, upper)
    with torch.no_grad():
        nominal = fn(center[None])
    track(nominal)
    n_out = nominal[0].numel()
    targets = choose_targets(n_out, cfg.widest, cfg.others, gen, lower, upper, nominal[0])
    n_t = len(targets)
    best = None                                           # (2 * n_t,) best sample objective so far, and where
    if cfg.samples:
        pts = sample_points(center, eps, cfg.samples, gen)
        for c in torch.split(pts, cfg.chunk):
            with torch.no_grad():
                y = fn(c)
            track(y)
            obj = y.double().reshape(len(c), -1)[:, targets]
            obj = torch.cat([obj, -obj], 1)                  # (B, 2 n_t): up then down
            v, i = obj.max(0)
            if best is None:
                best = (v, c[i])
            else:
                better = v > best[0]
                best = (torch.where(better, v, best[0]), torch.where(_expand(better, c[i]), c[i], best[1]))
    if cfg.steps and n_t:
        # the random starts exactly as pgd_points(seed=cfg.seed) draws them: these runs contain its points
        pgd_gen = torch.Generator().manual_seed(cfg.seed)
        starts = [center + eps * (torch.rand((cfg.restarts * 2 * n_t, *center.shape), generator=pgd_gen,
                                             dtype=torch.float64) * 2 - 1),
                  _gradient_corners(fn, center, eps, targets, cfg.chunk)]
        if best is not None:
            starts.append(best[1])
        x0 = torch.cat(starts)
        reps = len(x0) // (2 * n_t)                  # every start set is (targets up, targets down)
        signs = torch.cat([torch.ones(n_t), -torch.ones(n_t)]).double()
        _pgd(fn, center, eps, x0, targets.repeat(2 * reps), signs.repeat(reps), cfg, track)
    return AttackRange(track.lo.reshape(nominal[0].shape), track.hi.reshape(nominal[0].shape), track.points,
                       track.violations, targets, time.perf_counter() - t0)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _gradient_corners(fn: Fn, center: torch.Tensor, eps: float, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(2 n_t, *in_shape)``: centre +- eps sign(grad y_t) (up, then down); one backward per chunk."""
    out = []
    for tg in torch.split(targets, chunk):
        x = center.expand(len(tg), *center.shape).clone().requires_grad_(True)
        y = fn(x).reshape(len(tg), -1)
        (g,) = torch.autograd.grad(y[torch.arange(len(tg)), tg].double().sum(), x)
        out.append(torch.sign(g))
    s = torch.cat(out)
    return torch.cat([center + eps * s, center - eps * s])


def _pgd(fn: Fn, center: torch.Tensor, eps: float, x0: torch.Tensor, tg: torch.Tensor, signs: torch.Tensor,
         cfg: AttackConfig, track: _Tracker) -> None:
    """Sign-gradient ascent on ``signs * y[tg]`` from every row of ``x0``; every iterate is tracked."""
    for lo in range(0, len(x0), cfg.chunk):
        x, t, s = x0[lo:lo + cfg.chunk], tg[lo:lo + cfg.chunk], signs[lo:lo + cfg.chunk]
        rows = torch.arange(len(x))
        for step in range(cfg.steps):
            x = x.detach().requires_grad_(True)
            y = fn(x)
            track(y)
            obj = (s * y.reshape(len(x), -1)[rows, t].double()).sum()
            (g,) = torch.autograd.grad(obj, x)
            size = eps * 0.5 * (1 - step / cfg.steps) + eps * 0.02
            x = center + (x.detach() + size * torch.sign(g) - center).clamp(-eps, eps)
        with torch.no_grad():
            track(fn(x))
