"""Norms split on their mean square: one scalar per row, branched, for the nodes after it.

A LayerNorm / RMSNorm ``N`` relaxes ``y = w c s + b`` with ``s = (q + eps)^-1/2`` and
``q = mean(c^2)`` the row's mean square; its remainders (the product ``c s``, the
inverse square root's line) grow with the width of q's interval ``[q_lo, q_hi]``
(CROWN's, :func:`.refine.norm_mean_square`).  Cut that interval into K pieces with
shared edges, ``q_lo = e_0 <= e_1 <= ... <= e_K = q_hi``.  For each piece k the
sub-region ``D_k(t) = {x in box : q_t(x) in [e_k, e_k+1]}`` (t: a row of N) is covered by
the same relaxations with q's interval replaced by the piece's, and ``union_k D_k(t)``
is the box.

Which nodes may use that: the **row-local** nodes after N (:func:`plan`), those whose
row t depends on N's row t alone and on nothing else that depends on N (linear layers,
adds, products, activations of the same rows: an MLP and its residual add, up to the next
norm or attention).  Their bounds in run k (every row of N at its own piece k, the nodes
before N at their bounds over the whole box) hold on ``D_k(t)`` for row t: a backward pass
from row t of such a node meets N and the nodes between only at row t.  So the union over
k of run k's bounds holds on the whole box, and so does its intersection with the bounds
computed without the split (kept: a piece's lines are valid on ``D_k`` but concretised over
the whole box, so on a row whose scale varies widely a piece can be looser than no split).
The float32 margins stay those of the whole box (valid on every piece).

Cost: each row-local node that gets a CROWN pass gets K more, and a product among them K
more refinements (its refinement in each piece is most of what the split gains on a SwiGLU
MLP).  Measured on real blocks: docs/depth.md, eighteenth round.
"""

from __future__ import annotations

import copy
from collections import ChainMap
from collections.abc import MutableMapping
from typing import Optional

import torch

from ..ops import ELEMENTWISE
from .crown import node_bounds
from .ibp import ibp_node
from .interval import Interval
from .norm import norm_stats
from .refine import refined_interval

NORMS = ("layernorm", "rmsnorm")
# the pieces' edges at (k / K)^SKEW of the way in s: narrower pieces where s is large (its lines are steepest
# there, and the widest piece sets the union); measured at K = 4, eps 1e-3, default mode: SKEW 1 / 1.3 / 1.6 / 2
# gave Whisper layer2 0.4104 / 0.4085 / 0.4097 / 0.4132, SmolLM2 block 0 14.69 / 14.44 / 14.46 / 14.64
SKEW = 1.3
ROW_LOCAL = {"linear", "add", "add_const", "mul", "mul_const"} | ELEMENTWISE   # row t of the output from row t of the inputs


def plan(graph, need: set, kept, pieces: int) -> dict:
    """norm name -> its row-local nodes (names, topological order): those of ``graph`` that
    depend on the norm only through its same rows and each other (see the module), none of
    them in ``kept`` (nodes whose linear bounds a pass keeps), at least one of them needing
    CROWN bounds (``need`` or the output).  Empty where ``pieces`` < 2."""
    if pieces < 2:
        return {}
    out: dict = {}
    taken: set = set()
    for norm in graph:
        if norm.op not in NORMS or norm.name in taken:
            continue
        lead = tuple(norm.shape[:-1])
        own, below = {norm.name}, {norm.name}          # below: every node that depends on the norm
        local = []
        for z in graph:
            if not any(i in below for i in z.inputs):
                continue
            below.add(z.name)
            row_local = (z.op in ROW_LOCAL and z.name not in taken and z.name not in kept
                         and tuple(z.shape[:-1]) == lead
                         and all(i in own and tuple(graph[i].shape[:-1]) == lead or i not in below
                                 for i in z.inputs))
            if row_local:
                own.add(z.name)
                local.append(z.name)
        if any(n in need or n == graph.output for n in local):
            out[norm.name] = local
            taken |= own
    return out


class _Routed(MutableMapping):
    """A cache of one piece's Context: its own nodes' entries kept apart, every other
    node's shared with the Context without the split (they depend on bounds valid on
    the whole box)."""

    def __init__(self, shared, own: set):
        self.local, self.shared, self.own = {}, shared, own

    def _map(self, key):
        name = key[1] if isinstance(key, tuple) else key
        return self.local if name in self.own else self.shared

    def __getitem__(self, key):
        return self._map(key)[key]

    def __setitem__(self, key, value):
        self._map(key)[key] = value

    def __delitem__(self, key):
        del self._map(key)[key]

    def __contains__(self, key):
        return key in self._map(key)

    def __iter__(self):
        yield from self.local
        yield from self.shared

    def __len__(self):
        return len(self.local) + len(self.shared)


def _piece(ctx, norm, own: set, facts: dict):
    """A Context for one piece: the bounds of ``own`` nodes its own (over ``ctx.bounds``),
    the norm's refinement ``facts``, its relaxations of ``own`` apart, the rest shared."""
    c = copy.copy(ctx)
    c.bounds = ChainMap({}, ctx.bounds)
    for attr in ("_lin", "_const", "_relax", "_band", "_lint"):
        setattr(c, attr, _Routed(getattr(ctx, attr), own))
    c._refined = _Routed(ctx._refined, own)          # (a product's refinement in a piece: most of its gain)
    c._refined[norm.name] = facts
    c.keep_linear = frozenset()          # linear bounds over the input are kept for the whole box only
    c.events = 0
    return c


class Splits:
    """The split norms of one bound computation (``plan``'s) and their pieces' Contexts,
    driven by the engine's walk: :meth:`start` after a split norm's bounds, :meth:`bound`
    at each of its row-local nodes."""

    def __init__(self, ctx, plan_: dict, pieces: int):
        self.ctx, self.pieces = ctx, pieces
        self.norm_of = {n: norm for norm, local in plan_.items() for n in local}
        self.left = {norm: len(local) for norm, local in plan_.items()}
        self.norms = set(plan_)
        self.live: dict = {}             # norm -> its pieces' Contexts, while row-local nodes are left

    def owns(self, name: str) -> bool:
        return self.norm_of.get(name) in self.live

    def start(self, norm, iv: Interval) -> Interval:
        """Cut the norm's mean-square interval into pieces (rows whose interval is not finite
        keep it whole in every piece) and bound the norm in each; returns its bounds, the
        union over the pieces intersected with ``iv`` (the bounds without the split)."""
        ctx = self.ctx
        facts = ctx.refinement(norm)
        if not facts or facts.get("q") is None:
            return iv
        x = ctx.inb(norm)
        _, _, (q_lo, q_hi), _ = norm_stats(x, norm.params["eps"], norm.op == "layernorm", facts["q"], facts.get("c"))
        own = {norm.name} | {n for n, m in self.norm_of.items() if m == norm.name}
        runs = [_piece(ctx, norm, own, {**facts, "q": q})
                for q in pieces(q_lo, q_hi, norm.params["eps"], self.pieces)]
        self.live[norm.name] = runs
        m = ctx.margins.get(norm.name)
        return self._union(norm, iv, runs, lambda c: _widen(refined_interval(c, norm, [c.bounds[i] for i in norm.inputs]), m))

    def bound(self, node, iv: Interval, box: Interval, crown: bool, stop: frozenset) -> Interval:
        """A row-local node's bounds: in each piece its interval rule on the piece's input
        bounds, widened by its float32 margin, intersected with ``iv`` (the bounds without the
        split) and, where ``crown``, with the piece's CROWN pass; the union over the pieces."""
        norm = self.norm_of[node.name]
        runs = self.live[norm]
        m = self.ctx.margins.get(node.name)

        def one(c):
            ins = [c.bounds[i] for i in node.inputs]
            b = (refined_interval(c, node, ins) or ibp_node(node, *ins)).widen(m).intersect(iv)
            if crown:
                c.planes = self.ctx.planes
                b = b.intersect(node_bounds(c, node.name, box, stop=stop))
            return b
        out = self._union(node, iv, runs, one)
        self.left[norm] -= 1
        if self.left[norm] == 0:
            del self.live[norm]              # the last row-local node: free the pieces
        return out

    def _union(self, node, iv: Interval, runs, make) -> Interval:
        lo = hi = None
        for c in runs:
            b = make(c)
            if b is None:
                return iv
            b = b.intersect(iv)
            c.bounds.maps[0][node.name] = b
            lo = b.lower if lo is None else torch.minimum(lo, b.lower)
            hi = b.upper if hi is None else torch.maximum(hi, b.upper)
            self.ctx.events += c.events
            c.events = 0
        return Interval(lo, hi).intersect(iv)


def pieces(q_lo, q_hi, eps: float, k: int) -> list:
    """``k`` intervals ``(lo, hi)`` of q per row that share their edges and cover ``[q_lo, q_hi]``
    (edges by :func:`_edge` at ``(i / k)^SKEW``); a row whose interval is not finite is whole in each."""
    ok = torch.isfinite(q_lo) & torch.isfinite(q_hi)
    edges = [q_lo] + [torch.where(ok, _edge(q_lo, q_hi, eps, (i / k) ** SKEW), q_lo) for i in range(1, k)] + [q_hi]
    return [(torch.where(ok, edges[i], q_lo), torch.where(ok, edges[i + 1], q_hi)) for i in range(k)]


def _edge(q_lo, q_hi, eps: float, f: float):
    """An inner edge: fraction f of the way from q_lo to q_hi in the inverse scale
    ``s = (q + eps)^-1/2`` (the pieces' remainders follow s's width), clamped to [q_lo, q_hi]
    (its rounding cannot leave the interval uncovered: neighbouring pieces share the edge)."""
    s_hi, s_lo = torch.rsqrt(q_lo + eps), torch.rsqrt(q_hi + eps)
    s = s_hi + (s_lo - s_hi) * f
    return torch.minimum(torch.maximum(s.pow(-2) - eps, q_lo), q_hi)


def _widen(b: Optional[Interval], m) -> Optional[Interval]:
    return None if b is None else b.widen(m)


def active(tunings, method: str, intermediate: str) -> int:
    """The number of pieces that applies: ``tunings.norm_splits`` for CROWN passes to the
    input (methods crown and alpha, intermediate crown), else 1."""
    return tunings.norm_splits if method in ("crown", "alpha") and intermediate == "crown" else 1


def make(ctx, graph, need: set, method: str, intermediate: str) -> Optional[Splits]:
    k = active(ctx.tunings, method, intermediate)
    p = plan(graph, need, ctx.keep_linear, k)
    return Splits(ctx, p, k) if p else None
