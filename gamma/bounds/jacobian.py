"""The ops bounded as a whole (``gamma.ops.JACOBIAN``: softmax, LayerNorm,
RMSNorm): their linear forms by op (:data:`LINEARIZE`), for CROWN and
zonotopes.  The forms are in :mod:`.softmax` and :mod:`.norm`, what they share
(:class:`.linearization.Linearization`) in :mod:`.linearization`; IBP's rules
for these ops are in :mod:`.ibp`."""

from __future__ import annotations

from .interval import Interval
from .linearization import Linearization
from .norm import norm_lin
from .softmax import softmax_lin
from .tuning import DEFAULT, Tunings

LINEARIZE = {"softmax": softmax_lin, "layernorm": norm_lin, "rmsnorm": norm_lin}


def linearize(node, x: Interval, tunings: Tunings = DEFAULT, **refined) -> Linearization:
    """The linear form of ``node`` over the box ``x``.  ``refined``: extra sound facts
    about the op's internals (``q`` and ``c`` for norms, :data:`gamma.bounds.refine.REFINE`)."""
    return LINEARIZE[node.op](node, x, tunings, **refined)
