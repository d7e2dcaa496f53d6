"""Progress messages with a time estimate, for runs that take minutes.

The bound engine reports ``"crown NODE"`` as it starts CROWN on a node (the
nodes come in graph order).  :class:`BoundsEstimate` wraps a progress
callback for one such run and turns those messages into
``"LABEL: node 412/1203 NODE, about 3m10s left"``.

The estimate is a model, not a measurement: a CROWN pass from the node at
position i back-substitutes through the i nodes before it, so the work done
before position i is taken as proportional to i**2 (the sum 1 + 2 + ... + i).
With ``intermediate="crown"`` that is close; the output's own pass, the last
and largest, is where it is least reliable.  No estimate is shown before 5%
of that modelled work is done.  :class:`CountEstimate` does the same for n
equal tasks (blocks), from the mean time of those finished.

The engine also reports ``"saturated NODE"`` (``"ibp-from NODE"`` where it switches to
interval bounds there) once, at the first node wider than
:data:`gamma.options.SATURATION_WIDTH` (or unbounded): every later message then
says so (``..., saturated from NODE``), so that a user watching a long
whole-model run learns early that its bounds will come from caps, and that
``--after-saturation ibp`` would finish from there.

Nothing here prints; the callback decides where the text goes.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

Progress = Optional[Callable[[str], None]]
MIN_FRACTION = 0.05          # no estimate before this share of the modelled work is done
MIN_SECONDS = 2.0            # nor before this much time has passed


def duration(seconds: float) -> str:
    """``45s``, ``3m10s``, ``2h05m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def remaining(elapsed: float, fraction: float) -> Optional[float]:
    """Seconds left if ``fraction`` of the work took ``elapsed``; None while too early to say."""
    if fraction < MIN_FRACTION or elapsed < MIN_SECONDS or fraction >= 1.0:
        return None
    return elapsed * (1.0 - fraction) / fraction


def _left(elapsed: float, fraction: float) -> str:
    r = remaining(elapsed, fraction)
    return "" if r is None else f", about {duration(r)} left"


class BoundsEstimate:
    """A progress callback for one ``compute_bounds`` over ``graph`` (see the module docstring)."""

    def __init__(self, progress: Callable[[str], None], graph, label: str,
                 clock: Callable[[], float] = time.perf_counter):
        names = [n.name for n in graph if n.op != "input"]
        self.position = {name: i for i, name in enumerate(names, 1)}
        self.total = len(names)
        self.progress, self.label, self.clock = progress, label, clock
        self.t0 = clock()
        self.saturated = ""             # ", saturated from NODE" once the engine reports it

    def fraction(self, position: int) -> float:
        """Modelled share of the work done before the node at ``position`` (1-based) starts."""
        return (position - 1) * position / (self.total * (self.total + 1))

    def __call__(self, message: str) -> None:
        kind, _, node = message.partition(" ")
        if kind in ("saturated", "ibp-from"):
            self.saturated = f", saturated from {node}"
            getattr(self.progress, "note", self.progress)(f"{self.label}: {node} saturated: " + (
                "interval bounds from here (--after-saturation ibp)" if kind == "ibp-from" else
                "the bounds after it will come from caps (--after-saturation ibp would finish from here)"))
            return
        i = self.position.get(node) if kind == "crown" else None
        if i is None:                                   # alpha iterations, or anything else: as it is
            self.progress(f"{self.label}: {message}")
            return
        left = _left(self.clock() - self.t0, self.fraction(i))
        self.progress(f"{self.label}: node {i}/{self.total} {node}{left}{self.saturated}")


class CountEstimate:
    """``LABEL j/n NAME, about T left`` for n tasks of similar cost, run one after another."""

    def __init__(self, progress: Callable[[str], None], n: int, label: str = "block",
                 clock: Callable[[], float] = time.perf_counter):
        self.progress, self.n, self.label, self.clock = progress, n, label, clock
        self.t0 = clock()

    def start(self, j: int, name: str) -> str:
        """Report that task ``j`` (0-based) starts; returns its tag ("block 3/30 layer2")."""
        tag = f"{self.label} {j + 1}/{self.n} {name}"
        self.progress(tag + _left(self.clock() - self.t0, j / self.n) if self.n else tag)
        return tag
