"""The float32 rounding of one sum of n terms in any summation tree, from the terms' sizes.

A float32 engine sums a row (a norm's mean, its mean of squares) by some binary
tree of two-operand additions: left to right, pairwise, in SIMD lanes joined at
the end, in blocks.  Addition k rounds ``fl(a + b) = (a + b)(1 + delta_k)``,
``|delta_k| <= U``, so the computed sum is off by ``sum_k delta_k p_k`` with
``p_k`` the computed partial sum there, at most ``(1 + gamma_n)`` times the
sizes of the terms below addition k.

**Lemma.** In any binary tree over n terms, at most ``n - m + 1`` additions have
m or more terms below them (m >= 2).  (Those additions form a subtree holding
the root, with f >= 1 lowest members, each over at least m terms of its own,
and o members with one child outside it, each over at least one term of its
own: ``n >= f m + o``, and there are ``2 f - 1 + o <= n - f (m - 2) - 1 <= n - m + 1``
of them.)  So, with the additions sorted by how many terms they hold, the j-th
holds at most ``n - j + 1`` and its partial sum is at most ``T_{n-j+1}``, ``T_L``
the sum of the L largest term sizes.  Over all n - 1 additions:

    sum_k |p_k|    <= (1 + gamma_n) sum_{L=2..n} T_L          (the deterministic bound)
    sum_k |p_k|^2  <= (1 + gamma_n)^2 sum_{L=2..n} T_L^2      (the probabilistic model's)

against ``(n - 1) S`` and ``(n - 1) S^2`` (S = T_n) for a sum in the worst order;
equal terms give about half and a third of those.  Five more roundings of at
most ``S`` each are budgeted (the terms' own, such as a square; the division by
n or the product with a rounded 1 / n; two spare), as ``gamma_{n+4}`` does:
with every T_L = S the bounds below are exactly ``gamma_{n+4} S`` and
``sqrt(n + 4) S (1 + gamma_{n+4})``.  No assumption on the order; an FMA only
removes a rounding.  Engines that update running moments (Welford) stay
under the norms' hedge (:mod:`.fpmargin`).
"""

from __future__ import annotations

import torch

from . import fp

U = fp.U
EXTRA = 5                       # roundings besides the additions, of at most S each
_F64 = 1.0 + 2.0 ** -40         # the float64 sort, prefix sums and sums below, rounded up


def _prefix(t: torch.Tensor):
    """S (.., 1) and ``T_2 .. T_n`` (.., n - 1) of term sizes ``t`` (.., n) >= 0."""
    c = t.sort(-1, descending=True).values.cumsum(-1)
    return c[..., -1:], c[..., 1:]


def tree_error(t: torch.Tensor) -> torch.Tensor:
    """(.., 1): a bound on the rounding error of a float32 sum (and its division) of n terms whose
    sizes are at most ``t`` (.., n), in any summation tree: ``U (1 + gamma_{n+4}) (sum_{L>=2} T_L
    + 5 S)``, never above ``gamma_{n+4} S``."""
    n = t.shape[-1]
    s, T = _prefix(t)
    g = float(fp.gamma(n + EXTRA - 1))
    tree = U * (1 + g) * (T.sum(-1, keepdim=True) + EXTRA * s) * _F64
    return torch.minimum(tree, g * s * _F64)


def tree_coef(t: torch.Tensor) -> torch.Tensor:
    """(.., 1): the square root of the summed squared coefficients of that sum's roundings,
    ``(1 + gamma_{n+4}) sqrt(sum_{L>=2} T_L^2 + 5 S^2)``: the probabilistic model's error is
    within ``LAMBDA U`` times it (:mod:`.fpprob`)."""
    n = t.shape[-1]
    s, T = _prefix(t)
    g = float(fp.gamma(n + EXTRA - 1))
    return (1 + g) * ((T * T).sum(-1, keepdim=True) + EXTRA * s * s).sqrt() * _F64
