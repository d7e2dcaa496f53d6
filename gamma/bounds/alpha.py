"""alpha-CROWN: optimise the relaxation parameters of GELU/SiLU nodes and the
plane mixtures of products of two bounded tensors (SwiGLU's gate * up,
:func:`gamma.bounds.bilinear.mul_planes`).

Every alpha in [0, 1] gives sound relaxation lines (:func:`relax.linear`), so
every iterate gives sound output bounds; we keep the elementwise best over
all iterates, starting from the CROWN bounds, so the result is never looser
than CROWN.  Intermediate bounds stay those of CROWN; alpha is shared by all
output rows (one tensor per node and side), optimised with Adam on the sum of
output widths, whose gradient is accumulated chunk by chunk of output rows
(the memory of one chunk's graph, not of the whole output's).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops import ELEMENTWISE
from .crown import Context, node_bounds
from .interval import Interval


def optimize(ctx: Context, target: str, box: Interval, init: Interval, iters: int = 20, lr: float = 0.2,
             progress: Optional[Callable[[str], None]] = None) -> Interval:
    graph = ctx.graph
    anc = graph.ancestors(target)
    elem = [n for n in graph if n.name in anc and (n.op in ELEMENTWISE or n.op == "mul")]
    if not elem or iters <= 0:
        return init
    params = []
    alpha = {}
    for n in elem:
        shape = graph[n.inputs[0]].shape if n.op in ELEMENTWISE else n.shape    # mul: one mixture per product
        a_lo = torch.full(shape, 0.5, dtype=box.lower.dtype, device=box.lower.device, requires_grad=True)
        a_hi = torch.full(shape, 0.5, dtype=box.lower.dtype, device=box.lower.device, requires_grad=True)
        alpha[n.name] = (a_lo, a_hi)
        params += [a_lo, a_hi]
    opt = torch.optim.Adam(params, lr=lr)
    best_lo, best_hi = init.lower.clone(), init.upper.clone()
    saved = ctx.alpha
    ctx.alpha = alpha
    try:
        for it in range(iters):
            opt.zero_grad()
            b = node_bounds(ctx, target, box, each=_grad)
            if any(p.grad is not None for p in params):
                for p in params:              # a non-finite gradient is no direction
                    if p.grad is not None:
                        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                opt.step()
            with torch.no_grad():
                for p in params:
                    p.nan_to_num_(nan=0.5).clamp_(0.0, 1.0)
                lo, hi = b.lower.detach(), b.upper.detach()
                best_lo = torch.where(torch.isnan(lo), best_lo, torch.maximum(best_lo, lo))
                best_hi = torch.where(torch.isnan(hi), best_hi, torch.minimum(best_hi, hi))
            if progress:
                progress(f"alpha {it + 1}/{iters}: width sum {float((best_hi - best_lo).sum()):.4g}")
    finally:
        ctx.alpha = saved
    return Interval(best_lo, best_hi)


def _grad(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """One chunk of output rows: its share of the loss (the sum of the finite widths) back-propagated
    into the alphas at once, so that only this chunk's graph is held (the sum over chunks is the
    whole loss's gradient)."""
    width = hi - lo
    loss = torch.where(torch.isfinite(width), width, torch.zeros_like(width)).sum()
    if loss.requires_grad:
        loss.backward()
