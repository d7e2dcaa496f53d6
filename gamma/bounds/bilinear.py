"""Facts about products of two bounded tensors that every domain uses.

``z = x @ y^T`` whose x rows sum to one (softmax probabilities: attention @ V,
``rows_sum_to_one``) equals ``x @ (y - m)^T + m^T`` for any per-row constant
m, so the domains relax the product around ``y - m`` (:func:`simplex_shift`)
and CROWN may take one McCormick plane per product by the sign of Lambda
(:func:`planes`).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def simplex_shift(node, y_center: Tensor):
    """For ``z = x @ y^T`` whose x rows sum to one (softmax probabilities):
    the per-row constant m (.., S', 1) with ``z = x @ (y - m)^T + m^T`` exactly.
    Centring y this way removes its common offset from every relaxation."""
    if not node.params.get("rows_sum_to_one"):
        return None
    return y_center.mean(-1, keepdim=True)


def shift_constant(x_center: Tensor, m: Tensor) -> Tensor:
    """The constant ``m^T - cx m'^T`` (m' = m broadcast over y's last axis) of
    the shifted product, relaxed around x's centre ``cx`` (.., T, S'); (.., T, a).
    Every column of m' is m, so ``cx m'^T = rowsum(cx) m^T``: an outer
    product, not a matmul with a stride-0 operand (a slow path on CPU)."""
    return (1 - x_center.sum(-1, keepdim=True)) * m.transpose(-1, -2)


def planes(node) -> bool:
    """Whether CROWN may relax this product ``x @ y^T`` by McCormick planes chosen
    per sign of Lambda (:func:`gamma.bounds.crown._matmul_planes`): the
    attention @ V product, whose x rows are probabilities."""
    return bool(node.params.get("rows_sum_to_one"))
