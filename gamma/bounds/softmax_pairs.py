"""Softmax from its score differences: a refinement for CROWN (:mod:`.refine`).

Softmax depends on its scores only through their differences,
``y_i = 1 / sum_j exp(z_j - z_i)``.  One backward pass bounds every
difference ``z_j - z_i`` of a row (spec rows ``e_j - e_i``, token-compact),
which keeps what the box of z loses: the scores of one query against all
keys move together when the query moves.  With ``[lo_ij, hi_ij]`` those
bounds (``lo_ii = hi_ii = 0``),

    1 / sum_j exp(hi_ij)  <=  y_i  <=  1 / sum_j exp(lo_ij),

each side reached where every difference is at its own bound, so this is
the tight interval of y_i over the pairwise bounds.  It serves the softmax's
box and float32 margin; the differences themselves serve its mean-value form
(:func:`.softmax.softmax_lin`, ``d=``: the Jacobian's range on the segments
from the box centre, and the remainder read on the differences).  On the real
SmolLM2-135M block 0 at eps 1e-3 the box alone halved the block's certified width
(310 -> 151, real arithmetic; docs/depth.md's eleventh round has what the form adds).

The pass has ``S (S - 1) / 2`` rows per softmax row (S keys; the pair (j, i)
is the other half of (i, j)), so it runs only up to :data:`MAX_KEYS` keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .crown import Context, backward, numel
from .rows import Rows, Sym
from .softmax import pairwise_interval, softmax_ibp  # noqa: F401  (pairwise_interval: also public here)

Tensor = torch.Tensor
MAX_KEYS = 32            # rows of the pass grow as S^2 per softmax row: beyond this many keys, no refinement


def pair_differences(ctx: Context, node) -> Optional[tuple]:
    """CROWN bounds ``(lo, hi)``, each (*lead, T, S, S), of ``z_j - z_i`` at
    ``[.., t, i, j]`` for the softmax input z (*lead, T, S); None when the row
    is longer than :data:`MAX_KEYS` or has a single key."""
    graph = ctx.graph
    name = node.inputs[0]
    *lead, T, S = graph[name].shape
    if S > MAX_KEYS or S < 2:
        return None
    nl = math.prod(lead)
    ii, jj = torch.triu_indices(S, S, 1)                     # pairs i < j of a row
    P = len(ii)
    k = nl * T * P                                           # spec rows: (lead, t, pair)
    box = ctx.bounds[graph.input]
    dtype, device = box.lower.dtype, box.lower.device
    ld = torch.arange(nl, device=device).repeat_interleave(T * P)
    tok = torch.arange(T, device=device).repeat_interleave(P).repeat(nl)
    pi, pj = ii.to(device).repeat(nl * T), jj.to(device).repeat(nl * T)
    widest = max(numel(graph[a].shape) for a in graph.ancestors(name) | {name})
    step = max(1, ctx.tunings.chunk_elems // max(1, 2 * widest))
    lo = torch.empty(k, dtype=dtype, device=device)
    hi = torch.empty(k, dtype=dtype, device=device)
    for s in range(0, k, step):
        e = min(k, s + step)
        ar = torch.arange(e - s, device=device)
        t = torch.zeros(e - s, nl, S, dtype=dtype, device=device)   # (rows, lead, S): e_j - e_i
        t[ar, ld[s:e], pj[s:e]] = 1.0
        t[ar, ld[s:e], pi[s:e]] = -1.0
        rows = Rows.of(t.reshape(e - s, *lead, 1, S), tok[s:e], T)
        lam = Sym(rows if ctx.tunings.compact_rows else rows.dense())
        lb = backward(ctx, {name: lam}, torch.zeros(2 * (e - s), dtype=dtype, device=device), box,
                      ctx.stops.get(name, frozenset()))
        lo[s:e], hi[s:e] = lb[:e - s], -lb[e - s:]
    slack = 1e-12 * torch.maximum(lo.abs(), hi.abs()) + 1e-300          # float64 rounding of the pass
    lo, hi = lo - slack, hi + slack
    d_lo = torch.zeros(nl, T, S, S, dtype=dtype, device=device)
    d_hi = torch.zeros_like(d_lo)
    d_lo[ld, tok, pi, pj], d_hi[ld, tok, pi, pj] = lo, hi                # z_j - z_i
    d_lo[ld, tok, pj, pi], d_hi[ld, tok, pj, pi] = -hi, -lo              # z_i - z_j
    return d_lo.reshape(*lead, T, S, S), d_hi.reshape(*lead, T, S, S)


def softmax_pairs(ctx: Context, node) -> dict:
    """The refinement of a softmax node, or {} where :func:`pair_differences` does not
    run (or ``tunings.softmax_pairs`` is off): ``"y"``, its output interval over the
    region from the pairwise differences, intersected with the box rule's, and ``"d"``,
    those differences (the mean-value form reads them: :func:`.softmax.softmax_lin`)."""
    d = pair_differences(ctx, node) if ctx.tunings.softmax_pairs else None
    if d is None:
        return {}
    x = ctx.inb(node)
    return {"y": softmax_ibp(node, x).intersect(pairwise_interval(x, *d, node.params.get("mask"))), "d": d}
