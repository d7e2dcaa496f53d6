"""Certified comparison of two versions of a model (``gamma compare``, ``gamma diff``).

Question: over the L-inf box ``[x - eps, x + eps]`` around the reference's
input point, can ``reference(x') - target(x')`` exceed a tolerance anywhere?

The *difference network* is one graph with one shared input node holding both
models' graphs (node names prefixed ``ref.`` / ``tgt.``), ending in::

    diff = add(ref_out, mul_const(tgt_out, -1))             # reference - target

Identical sub-computations (same op, identical parameters, same merged
inputs) are merged into one ``shared.`` node (common-subexpression
elimination), so shared parts are one node and cancel exactly; CROWN and
zonotopes keep the shared input symbolic, so the two models' dependence on
it cancels as far as their weights agree.  Subtracting two independently
bounded outputs (the *naive* bound ``[l1 - u2, u1 - l2]``) cancels nothing.

What the bounds cover: the exact real-valued difference, and the difference
of the two models evaluated in float32 by one deterministic engine (a merged
node is computed once, so identical computations give identical values).  If
both outputs merge into one node the difference is exactly 0.  With
``merge=False`` no node is shared and the bounds also hold when the two models
run on different float32 engines; the naive bound always does.

Results are plain data; nothing here prints.  Modules: :mod:`.network` (the
difference network, its bounds and attack), :mod:`.runs` (two checkpoints).
"""

from .network import (VERDICTS, DiffAttack, DiffBounds, DiffGraph, abs_max, attack_difference, bound_difference,
                      compare_graphs, difference_graph, max_value, same_params, verdict)
from .runs import STRUCTURE, CompareResult, check_compatible, compare, diff, drift_key

__all__ = ["VERDICTS", "DiffAttack", "DiffBounds", "DiffGraph", "abs_max", "max_value", "attack_difference",
           "bound_difference", "compare_graphs", "difference_graph", "same_params", "verdict", "STRUCTURE",
           "CompareResult", "check_compatible", "compare", "diff", "drift_key"]
