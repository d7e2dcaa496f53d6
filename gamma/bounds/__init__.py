"""Sound bounds on every node of a graph over an L-inf input box.

Public API::

    compute_bounds(graph, center, epsilon, method="crown", ...) -> BoundResult

``method`` is one of :data:`METHODS`.  Every method returns bounds that hold
for the real-valued function *and* for a float32 evaluation of it by a
reference engine (see :mod:`gamma.bounds.fp`); ``arithmetic="real"`` drops
the float32 part (:data:`ARITHMETIC`); ``tunings=`` (:class:`Tunings`) picks how
the engine computes them.
"""

from .interval import Interval
from .engine import ARITHMETIC, METHODS, BoundResult, compute_bounds
from .tuning import Tunings

__all__ = ["Interval", "ARITHMETIC", "METHODS", "BoundResult", "Tunings", "compute_bounds"]
