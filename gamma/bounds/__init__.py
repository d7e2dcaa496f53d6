"""Sound bounds on every node of a graph over an L-inf input box.

Public API::

    compute_bounds(graph, center, epsilon, method="crown", ...) -> BoundResult

``method`` is one of :data:`METHODS`.  Every method returns bounds that hold
for the real-valued function *and* for a float32 evaluation of it by a
reference engine (see :mod:`gamma.bounds.fp`).
"""

from .interval import Interval
from .engine import METHODS, BoundResult, compute_bounds

__all__ = ["Interval", "METHODS", "BoundResult", "compute_bounds"]
