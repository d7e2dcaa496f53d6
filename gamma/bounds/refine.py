"""CROWN's refinements of an op's internals: sound facts beyond its input box,
from backward passes of their own (:func:`.crown.backward`), computed once per
node (:meth:`.crown.Context.refinement`, which finds them in :data:`REFINE`).

LayerNorm / RMSNorm: the centred input ``c = x - mean(x)`` (:func:`centred_bounds`)
and the mean square ``q = mean(c^2)`` (:func:`norm_mean_square`).  The box of x
loses the correlation between x_i and mean(x) and between the entries of a
row, which is what makes the norm's inverse scale, and so its relaxation,
tight.  They serve the norm's linear form (:func:`.norm.norm_lin`) and, through
:data:`REFINED_IBP`, its box and float32 margin: where the input box admits
zero variance the box's rsqrt error is unbounded, CROWN's is not.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import rows
from .crown import Context, backward, halves, numel
from .interval import Interval
from .norm import norm_interval, norm_stats
from .softmax_pairs import softmax_pairs


def norm_mean_square(ctx: Context, node) -> dict:
    """CROWN bounds of the mean square ``q = mean(c^2)``, ``c = P x`` (x: the
    norm's input, P: centring or identity), per row: with ``[cl, cu]`` the
    box of c and t its centre,

        mean(m c) - mean(cl cu)  >=  q  >=  mean(2 t c) - mean(t^2)    (m = cl + cu)

    (chords and tangents of c^2), both linear in x, bounded by one backward
    pass of 2R rows (R = rows of x); the lower one also as
    ``q >= mean(t c)^2 / mean(t^2)`` where ``mean(t c) > 0`` over the region.  The
    box gives q's range from independent c_j intervals; this keeps the correlation between them, which is what
    makes the norm's inverse scale, and so its relaxation, tight."""
    if not ctx.tunings.norm_internals:
        return {}
    x = ctx.inb(node)
    centered = node.op == "layernorm"
    c = centred_bounds(ctx, node) if centered else None
    _, _, _, (cl, cu) = norm_stats(x, node.params["eps"], centered, c=c)
    shape = x.lower.shape
    d = shape[-1]
    R = x.lower.numel() // d
    P = (lambda t: t - t.mean(-1, keepdim=True)) if centered else (lambda t: t)
    t = 0.5 * (cl + cu)
    up = P(cl + cu).reshape(R, d) / d                       # q <= up . x_row - mean(cl cu)
    lo = P(2 * t).reshape(R, d) / d                         # q >= lo . x_row - mean(t^2)
    # rows: -up, lo (the mean square's lines) and, for LayerNorm, +-1/d (the row's mean)
    k = 4 if centered else 2
    lam = x.lower.new_zeros(k * R, R, d)
    ar = torch.arange(R, device=lam.device)
    lam[ar, ar] = -up
    lam[R + ar, ar] = lo
    if centered:
        lam[2 * R + ar, ar] = 1.0 / d
        lam[3 * R + ar, ar] = -1.0 / d
    lb = backward(ctx, {node.inputs[0]: lam.reshape(k * R, *shape)}, lam.new_zeros(k * R),
                  ctx.bounds[ctx.graph.input], ctx.stops.get(node.inputs[0], frozenset()))
    row = shape[:-1] + (1,)
    q_hi = (-lb[:R]).reshape(row) - (cl * cu).mean(-1, keepdim=True)
    # q >= mean(2 a t c) - a^2 mean(t^2) for every a >= 0 (the tangent at a t); with m2 <= mean(2 t c)
    # over the region, the best a = m2 / (2 mean(t^2)) gives m2^2 / (4 mean(t^2)) (Cauchy-Schwarz:
    # mean(c^2) mean(t^2) >= mean(t c)^2), never below a = 1's m2 - mean(t^2), and still > 0 where
    # the tangent at t itself reaches below zero
    m2, tt = lb[R:2 * R].reshape(row), (t * t).mean(-1, keepdim=True)
    scaled = torch.where((m2 > 0) & (tt > 0), m2 * m2 / (4 * tt).clamp_min(1e-300), torch.zeros_like(m2))
    q_lo = torch.maximum(m2 - tt, scaled)
    slack = 1e-12 * (q_hi.abs() + q_lo.abs()) + 1e-300        # float64 rounding of the pass
    if centered:
        m_lo, m_hi = lb[2 * R:3 * R].reshape(row), (-lb[3 * R:]).reshape(row)
        ms = 1e-12 * torch.maximum(m_lo.abs(), m_hi.abs()) + 1e-300
        ctx.means[node.name] = (m_lo - ms, m_hi + ms)
    return {"q": ((q_lo - slack).clamp_min(0), q_hi + slack), "c": c}


def norm_input_box(ctx: Context, node) -> Optional[Interval]:
    """A LayerNorm input's box from the norm's refinement: ``x = c + mean(x)``, with
    CROWN's bounds of the centred input c and of the row mean (one backward pass
    fewer than bounding x itself; the norm reads only c and the mean square), or
    None where the refinement has no mean (RMSNorm, tunings off)."""
    facts = ctx.refinement(node)
    if node.name not in ctx.means or facts.get("c") is None:
        return None
    (cl, cu), (ml, mh) = facts["c"], ctx.means[node.name]
    lo, hi = cl + ml, cu + mh
    slack = 1e-12 * torch.maximum(lo.abs(), hi.abs()) + 1e-300   # float64 rounding of the sums
    return Interval(lo - slack, hi + slack)


def _element_bounds(ctx: Context, names: list, maps: list, stop: frozenset,
                    chunk_elems: Optional[int] = None) -> tuple:
    """CROWN bounds ``(lower, upper)``, per element i of the nodes ``names`` (one
    shape), of ``sum_k maps[k](e_i) . value(names[k])``: spec rows ``[e_i; -e_i]``
    (token-compact where the nodes have a token axis) mapped per node, walked in
    chunks.  A map gets the rows and ``take`` (a tensor of the node's shape, as
    each row sees it)."""
    graph = ctx.graph
    shape = graph[names[0]].shape
    n = numel(shape)
    box = ctx.bounds[graph.input]
    dtype, device = box.lower.dtype, box.lower.device
    widest = max(numel(graph[a].shape) for nm in names for a in graph.ancestors(nm) | {nm})
    step = max(1, min(n, (chunk_elems or ctx.tunings.chunk_elems) // max(1, 2 * widest)))
    lo = torch.empty(n, dtype=dtype, device=device)
    hi = torch.empty(n, dtype=dtype, device=device)
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = torch.arange(s, e, device=device)
        unit = rows.first_rows(graph, names[0], idx, dtype, device) if ctx.tunings.compact_rows else None
        if unit is None:
            eye = torch.zeros(e - s, n, dtype=dtype, device=device)
            eye[torch.arange(e - s), idx] = 1.0
            unit = rows.Sym(eye.reshape(e - s, *shape))
        u = unit.lam
        lams = {nm: rows.Sym(u.like(f(u.t, u.take)) if isinstance(u, rows.Rows) else f(u, lambda c: c))
                for nm, f in zip(names, maps)}
        lb = backward(ctx, halves(lams, ctx.tunings), torch.zeros(2 * (e - s), dtype=dtype, device=device), box,
                      stop)
        lo[s:e], hi[s:e] = lb[:e - s], -lb[e - s:]
    slack = 1e-12 * torch.maximum(lo.abs(), hi.abs()) + 1e-300      # float64 rounding of the pass
    return (lo - slack).reshape(shape), (hi + slack).reshape(shape)


def centred_bounds(ctx: Context, node, chunk_elems: Optional[int] = None) -> tuple:
    """CROWN bounds ``(lower, upper)`` of LayerNorm's centred input ``x - mean(x)``
    (spec rows ``[P e_i; -P e_i]``, token-compact when x has a token axis).
    The box of x loses the correlation between x_i and mean(x)."""
    name = node.inputs[0]
    return _element_bounds(ctx, [name], [lambda t, take: t - t.mean(-1, keepdim=True)],
                           ctx.stops.get(name, frozenset()), chunk_elems)


def product_sums(ctx: Context, node, chunk_elems: Optional[int] = None) -> dict:
    """CROWN bounds of ``s = k x + y / k`` and ``d = k x - y / k`` for the product
    ``x * y`` of two nodes of its shape (SwiGLU's act * up), ``k = sqrt(ry / rx)`` per
    element (the scale that balances the two boxes): ``{"s": (lo, hi), "d": (lo, hi),
    "k": k}``, or {} where the tuning is off or x and y are one node.  Where x and y move
    together (or against each other) these are tighter than the sums of their boxes,
    which is what :func:`.bilinear.polar_band` turns into a narrower band for the
    product."""
    xa, ya = node.inputs
    if not ctx.tunings.product_sums or xa == ya:
        return {}
    rx, ry = ctx.bounds[xa].radius, ctx.bounds[ya].radius
    ok = (rx > 0) & (ry > 0) & torch.isfinite(rx) & torch.isfinite(ry)
    k = torch.where(ok, (ry / torch.where(ok, rx, torch.ones_like(rx))).sqrt(), torch.ones_like(rx))
    k = k.clamp(1e-6, 1e6)
    stop = ctx.stops.get(xa, frozenset()) | ctx.stops.get(ya, frozenset())
    out = {key: _element_bounds(ctx, [xa, ya], [lambda t, take: t * take(k),
                                                lambda t, take, sg=sign: sg * t / take(k)], stop, chunk_elems)
           for key, sign in (("s", 1.0), ("d", -1.0))}
    out["k"] = k
    return out


REFINE = {"layernorm": norm_mean_square, "rmsnorm": norm_mean_square, "softmax": softmax_pairs,
          "mul": product_sums}


def _norm_box(ctx: Context, node, x: Interval) -> Optional[Interval]:
    """The box's rule intersected with the refined one (each sound), carrying the
    refined statistics (which are the box's intersected with CROWN's)."""
    facts = ctx.refinement(node)
    if not facts:
        return None
    refined = norm_interval(node, x, **facts)
    out = refined.intersect(norm_interval(node, x))
    out.stats = refined.stats
    return out


# interval rules that use the refinements: a norm's box from CROWN's mean square and
# centred input instead of the box's (the float32 margin then reads the same statistics:
# where the box's variance may reach 0, its rsqrt error is unbounded; CROWN's is not)
def _softmax_box(ctx: Context, node, x: Interval) -> Optional[Interval]:
    """Softmax's box from its score differences (:mod:`.softmax_pairs`), already
    intersected with the box rule's."""
    return ctx.refinement(node).get("y")


REFINED_IBP = {"layernorm": _norm_box, "rmsnorm": _norm_box, "softmax": _softmax_box}


def refined_interval(ctx: Context, node, ins: list) -> Optional[Interval]:
    """The node's interval from its refinements (:data:`REFINED_IBP`), or None
    where the op has none."""
    rule = REFINED_IBP.get(node.op)
    return rule(ctx, node, *ins) if rule is not None else None
