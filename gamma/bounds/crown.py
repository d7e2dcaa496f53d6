"""CROWN: backward linear bound propagation, the walk.

For a spec matrix ``Lambda`` (S, *target_shape) the walk computes, for every
row s, a lower bound of ``Lambda_s . y`` over the input box as
``A_s . x + bias_s`` with ``A`` propagated backwards node by node; the upper
bound of ``Lambda_s . y`` is minus the lower bound of ``-Lambda_s . y``, so
both are obtained in one pass by stacking ``[I; -I]``.

The walk (:func:`backward`, :func:`node_bounds`) knows nothing about the ops:
each node's rule (:data:`.crown_rules.RULES`) maps the cotangent of its output
to cotangents of its inputs plus a constant, given a linear relaxation valid
on the node's intermediate bounds, which :class:`Context` holds and caches.
At each node the float32 margin ``m`` adds ``-|Lambda| . m`` to the constant.
Cotangents are dense or token-compact (:mod:`.rows`), stacked ``[lam; -lam]``
pairs walked as one (:class:`.rows.Sym`) until a rule that picks its lines by
the sign of Lambda.  Refinements of an op's internals (:mod:`.refine`) run
backward passes of their own; the engine hands their table to the Context.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, NamedTuple, Optional

import torch

from ..ops import ELEMENTWISE
from . import crown_rules, fpprob, norm_side, relax, rows, score_input, score_side, value_input, value_side
from .bilinear import planes
from .fp import CotangentProduct
from .interval import Interval
from .jacobian import linearize
from .rows import Rows
from .tuning import DEFAULT, Tunings

Tensor = torch.Tensor


class Context:
    """Intermediate bounds, margins and cached relaxations of one graph.

    ``refine``: op -> ``f(ctx, node) -> dict`` of sound facts about the op's
    internals (:data:`.refine.REFINE`, which the engine passes); none without it."""

    def __init__(self, graph, bounds: dict, margins: dict, alpha: Optional[dict] = None,
                 tunings: Tunings = DEFAULT, refine: Optional[dict] = None):
        self.graph = graph
        self.tunings = tunings
        self.refine = refine or {}
        self.bounds = bounds            # name -> Interval (sound, float64)
        self.margins = margins          # name -> Tensor | None
        self.pooled: dict = {}          # name -> fpprob.Split: dot margins pooled per row (float32-probabilistic)
        self.events = 0                 # bounds that rest on the probabilistic model (fpprob.failure)
        self.modes: dict = {}           # name -> fpmargin.CommonModes: a margin's row-shared errors (norms)
        # --engine llama.cpp (fpggml): a node whose engine value sits a known signed offset from the real
        # function's: the offset (name -> Tensor) and the symmetric margin about it that the walk charges
        # (``margins`` keeps |offset| + that margin for every other reader)
        self.offsets: dict = {}
        self.about: dict = {}
        # and a linear node whose walk takes the input elements where keep (.., n) is False as constants
        # (their range is in the offset and margin): name -> keep (bool, the input's shape)
        self.keep: dict = {}
        self.means: dict = {}           # LayerNorm name -> bounds of its input's row mean (refine.norm_mean_square)
        self.alpha = alpha or {}        # name -> (alpha_lower, alpha_upper) tensors
        self.stops: dict = {}           # name -> frozenset: where backward passes for it stop (--intermediate cut)
        self.planes = True              # attention @ V by sign-chosen planes (the engine: in the output's pass only)
        self.keep_linear: set = set()   # nodes whose linear bounds over the input box are kept (score_input.py)
        self.linear: dict = {}          # name -> Linear, for those nodes
        self._lin: dict = {}
        self._const: dict = {}
        self._relax: dict = {}
        self._band: dict = {}
        self._lint: dict = {}
        self._refined: dict = {}

    def inb(self, node, k: int = 0) -> Interval:
        return self.bounds[node.inputs[k]]

    def refinement(self, node) -> dict:
        """Sound facts about the op's internals beyond its input box (:attr:`refine`),
        computed once per node: ``q`` and ``c`` for norms, {} for other ops."""
        if node.name not in self._refined:
            refine = self.refine.get(node.op)
            self._refined[node.name] = refine(self, node) if refine is not None else {}
        return self._refined[node.name]

    def linearization(self, node):
        if node.name not in self._lin:
            lin = linearize(node, self.inb(node), self.tunings, **self.refinement(node))
            self._lin[node.name] = lin if self.tunings.row_remainder else replace(lin, rem=None)
        return self._lin[node.name]

    def cached(self, node, make, kind: str = "rule"):
        """``make()`` once per node, ``kind`` and Context (a rule's per-node constants)."""
        key = (kind, node.name)
        if key not in self._const:
            self._const[key] = make()
        return self._const[key]

    def lin_const(self, node):
        """``y0 - J0 x0`` of a linearised node (the constant of its linear form)."""
        if node.name not in self._const:
            lin = self.linearization(node)
            self._const[node.name] = lin.y0 - lin.jvp(lin.x0)
        return self._const[node.name]

    def linear_product(self, node):
        """The float32 transpose of a linear node (:class:`fp.CotangentProduct`),
        or None where it does not apply (then the float64 product is used)."""
        if node.name not in self._lint:
            x = self.inb(node)
            self._lint[node.name] = (CotangentProduct.build(node.params["weight"], node.params.get("bias"),
                                                            x.lower, x.upper)
                                       if self.tunings.float32_transpose else None)
        return self._lint[node.name]

    def margin(self, node, m=False):
        """What the walk charges per unit ``|Lambda|`` at ``node``: its float32
        margin (or ``m`` where given) plus, for a linear node whose transpose runs
        in float32, that product's error term (:class:`fp.CotangentProduct`)."""
        if m is False:
            m = self.about[node.name] if node.name in self.about else self.margins.get(node.name)
        if node.op != "linear" or node.name in self.keep:      # (keep: the transpose runs in float64)
            return m
        p = self.linear_product(node)
        if p is None:
            return m
        return p.err if m is None else m + p.err

    def value_side(self, node):
        """The constants of :func:`.value_side.remainder` for the product ``node``
        (None where its y is not a linear layer's heads, or the tuning is off)."""
        if not self.tunings.value_side:
            return None
        return self.cached(node, lambda: value_side.build(self.graph, node, self.bounds, self.margins,
                                                          self.inb(node, 1)), "value_side")

    def value_input(self, node):
        """The constants of :func:`.value_input.entries` for attention @ V ``node`` (None where
        V's linear bounds over the input were not kept, or the tuning is off)."""
        if not (self.tunings.value_input and node.params.get("rows_sum_to_one")):
            return None
        return self.cached(node, lambda: value_input.build(self.graph, node, self.linear, self.inb(node, 1))
                           if self.linear else None, "value_input")

    def score_side(self, node):
        """The per-entry remainder bound of :func:`.score_side.remainder` (not for attention @ V)
        and :func:`.score_input.remainder` for the product ``node``, the narrower per entry (None
        where neither applies or their tunings are off)."""
        key = ("score_side", node.name)
        if key not in self._const:
            x, y = self.inb(node, 0), self.inb(node, 1)
            r = (score_side.remainder(self.graph, node, self.bounds, self.margins, x, y,
                                      spectral_norms=self.tunings.score_spectral)
                 if self.tunings.score_side and not node.params.get("rows_sum_to_one") else None)
            u = score_input.remainder(self.graph, node, self.linear, x, y) if self.linear else None
            self._const[key] = u if r is None else r if u is None else torch.minimum(r, u)
            for name in node.inputs:       # the sides' slopes served their one product: free them
                src = score_input.kept_source(self.graph, name, self.linear)
                if src is not None:
                    self.linear.pop(src[0], None)
        return self._const[key]

    def norm_side(self, node):
        """The constants of :func:`.norm_side.saving` for an RMSNorm ``node`` (None for other
        ops, where its input is not a residual add of a linear layer, or the tuning is off)."""
        if node.op != "rmsnorm" or not self.tunings.norm_side:
            return None
        return self.cached(node, lambda: norm_side.build(self.graph, node, self.bounds, self.margins), "norm_side")

    def use_planes(self, node) -> bool:
        """Whether this pass relaxes the product ``node`` by McCormick planes chosen
        per sign of Lambda (:func:`.crown_rules._matmul_planes`; attention @ V only)."""
        return self.planes and self.tunings.matmul_planes and planes(node)

    def relaxation(self, node):
        """(al, bl, au, bu) lines of an elementwise node on its input bounds."""
        if node.name in self.alpha:
            a_lo, a_hi = self.alpha[node.name]
            x = self.inb(node)
            al, bl, _, _ = relax.linear(node.op, x.lower, x.upper, alpha=a_lo)
            _, _, au, bu = relax.linear(node.op, x.lower, x.upper, alpha=a_hi)
            return al, bl, au, bu
        if node.name not in self._relax:
            x = self.inb(node)
            self._relax[node.name] = relax.linear(node.op, x.lower, x.upper)
        return self._relax[node.name]

    def band(self, node):
        """``(c, h)`` when the two lines of an elementwise node are parallel
        (``al == au`` everywhere: the chord slope, the default for non-convex
        functions), so that ``f(x) in a x + c +- h``; else None.  The rule is
        then linear in Lambda (``lam a``, constant ``lam . c - |lam| . h``)
        and the shared halves (:class:`rows.Sym`) need not split there."""
        if node.name in self.alpha:
            return None                 # optimised slopes: the two lines differ (and are not cached)
        if node.name not in self._band:
            self._band[node.name] = _band(*self.relaxation(node))
        return self._band[node.name]


def _band(al, bl, au, bu):
    """Centre and half-width of ``[bl, bu]`` when ``al == au``, rounded outward:
    ``c - h <= bl`` and ``c + h >= bu`` despite the float64 rounding of both."""
    if not torch.equal(al, au):
        return None
    c = 0.5 * (bl + bu)
    h = 0.5 * (bu - bl) + relax.EPS * (bl.abs() + bu.abs())
    return c, h


# ---------------------------------------------------------------- the walk
def _margin_dot(lam, m: Tensor) -> Tensor:
    """``|lam| . m`` per row (lam: a layout), where an infinite margin costs only the
    rows that use it (0 * inf counts as 0: an entry a row does not depend on), the
    same in the dense and the token-compact walk."""
    if bool(torch.isfinite(m).all()):
        return lam.abs_dot(m)
    fin = torch.isfinite(m)
    hit = lam.abs_dot((~fin).to(m.dtype))
    return lam.abs_dot(torch.where(fin, m, torch.zeros_like(m))).masked_fill(hit > 0, math.inf)


def _margin_charge(ctx: Context, node, cot) -> Optional[Tensor]:
    """What the float32 margin of ``node`` costs each row of ``cot``: ``|lam| . m``,
    or, where the margin has row-shared errors (:class:`.fpmargin.CommonModes`),
    ``|lam| . elem`` plus each shared error times its signed row sum."""
    parts = ctx.modes.get(node.name)
    if parts is None or not parts.finite():
        m = ctx.margin(node)
        return None if m is None else _margin_dot(cot, m)
    c = cot.abs_dot(parts.elem)
    for vc, vr, s in parts.modes:
        c = c + cot.shared_abs_dot(vc, s) + cot.abs_dot(s * vr)
    return c


def _pool(ctx: Context, node, cot, sym: bool, pool):
    """The node's pooled dot margins (:mod:`.fpprob`) added to ``pool`` = [sum |lam| E, sum lam^2 v]
    per row (2S rows: a shared cotangent's charge is the same for both halves), and what its
    deterministic part costs (as :func:`_margin_charge`), from one ``|lam|``."""
    sp = ctx.pooled[node.name]
    a = cot.like(cot.t.abs())
    d, v = a.dot(sp.dot), a.like(a.t * a.t).dot(sp.var)
    det = ctx.margin(node, sp.det)
    m = None if det is None else (a.dot(det) if bool(torch.isfinite(det).all()) else _margin_dot(cot, det))
    if sym:
        d, v = torch.cat([d, d]), torch.cat([v, v])
    return ([d, v] if pool is None else [pool[0] + d, pool[1] + v]), m


F64_PAD = 2.0 ** -40        # float64 rounding of a concretised term, relative to |lam| (|c| + r): n ULP64 for n <= 8192


def _pooled_charge(ctx: Context, bias: Tensor, pool, trace) -> Tensor:
    if pool is None:
        return bias
    ctx.events += bias.shape[0]
    return _charge(bias, bias - fpprob.pooled(*pool), trace, "dot products", "pooled")


def _acc(bias: Tensor, sym: bool, odd, even) -> Tensor:
    """``bias + odd - even`` per row; for a shared cotangent (:class:`rows.Sym`)
    the rows of -Lambda get ``-odd - even``."""
    if not sym:
        if odd is not None:
            bias = bias + odd
        return bias if even is None else bias - even
    S = bias.shape[0] // 2
    o = 0.0 if odd is None else odd
    e = 0.0 if even is None else even
    half = lambda v: torch.as_tensor(v, dtype=bias.dtype, device=bias.device).expand(S)
    return bias + torch.cat([half(o - e), half(-o - e)])


def _charge(old: Tensor, new: Tensor, trace, name: str, kind: str) -> Tensor:
    if trace is not None:
        trace(f"{name}:{kind}", new - old)
    return new


def sign_dependent(node, ctx: Context) -> bool:
    """Rules that pick their lines by the sign of Lambda: a shared cotangent
    (:class:`rows.Sym`) is split into its halves before them."""
    if node.op in ELEMENTWISE:
        return ctx.band(node) is None
    if node.op == "mul" and node.name in ctx.alpha:
        return True
    return node.op == "matmul" and ctx.use_planes(node)


class Linear(NamedTuple):
    """A node's CROWN bounds as linear functions of the input over ``box``:
    ``a_lo x + b_lo <= y <= a_hi x + b_hi`` per element (rows: the node's elements, flat;
    columns: the input's elements, flat)."""
    a_lo: Tensor
    b_lo: Tensor
    a_hi: Tensor
    b_hi: Tensor
    box: Interval


def backward(ctx: Context, lams: dict, bias: Tensor, box: Interval, stop: frozenset = frozenset(),
             trace: Optional[Callable[[str, Tensor], None]] = None, keep: Optional[list] = None) -> Tensor:
    """Lower bounds (S,) of ``sum_k lams[k] . value(k) + bias`` over the input box.

    Walks the ancestors of the nodes in ``lams`` in reverse topological order.
    At a node in ``stop`` (whose bounds are known) the remaining term is
    concretised over that node's interval instead of being propagated further.
    Cotangents are Tensors, :class:`Rows` or :class:`rows.Sym` (a stack
    ``[lam; -lam]`` kept as lam until an elementwise relaxation needs the
    halves apart).  ``trace(label, delta)``, when given, sees every term this
    walk adds to the constants (not those of the passes its relaxations run
    for their own bounds): delta (2S,) for ``NODE:margin`` (float32 margin),
    ``NODE:rule`` (the rule's constant: biases, relaxation offsets and
    remainders) or ``NODE:box`` (concretised over the box or a stop node's
    interval).  The width of spec s is ``-(delta[s] + delta[S + s])`` summed
    over the terms, plus what the specs' own constant gives.  ``keep``: a list that receives the
    cotangent at the input, dense (2S, input numel), where the walk reaches it.
    """
    graph = ctx.graph
    lams = dict(lams)
    anc: set = set()
    for k in lams:
        anc |= graph.ancestors(k, stop=None)
    order = [n for n in graph if n.name in anc]
    pool = None                 # float32-probabilistic: the dot margins pooled over each row (fpprob)
    for node in reversed(order):
        lam = lams.pop(node.name, None)
        if lam is None:
            continue
        concretise = node.op == "input" or node.name in stop
        if isinstance(lam, rows.Sym) and sign_dependent(node, ctx) and not concretise:
            lam = lam.full()
        sym = isinstance(lam, rows.Sym)
        if sym:
            lam = lam.lam
        if concretise:
            iv = box if node.op == "input" else ctx.bounds[node.name]
            if keep is not None and node.op == "input":
                d = (lam.dense() if isinstance(lam, Rows) else lam).reshape(lam.shape[0] if isinstance(lam, Tensor)
                                                                            else lam.t.shape[0], -1)
                keep.append(torch.cat([d, -d]) if sym else d)
            cot = rows.layout(lam)
            # the concretisation's own float64 rounding (and its cotangent's, relative to its size), outward:
            # F64_PAD of |lam| (|c| + r); without it a bound attained at a corner may sit an ulp inside
            reach = iv.radius + F64_PAD * (iv.center.abs() + iv.radius)
            bias = _charge(bias, _acc(bias, sym, cot.dot(iv.center), cot.abs_dot(reach)), trace,
                           node.name, "box")
            continue
        if isinstance(lam, Rows) and (not rows.applies(graph, node, lam) or node.name in ctx.alpha and node.op == "mul"):
            lam = lam.dense()
        if isinstance(lam, Tensor) and not lam.is_contiguous():
            lam = lam.contiguous()          # one copy here, not one per row-wise dot (reshape) below
        cot = rows.layout(lam)
        if node.name in ctx.pooled:
            pool, m = _pool(ctx, node, cot, sym, pool)
        else:
            m = _margin_charge(ctx, node, cot)
        off = ctx.offsets.get(node.name)
        if m is not None or off is not None:
            bias = _charge(bias, _acc(bias, sym, None if off is None else cot.dot(off), m), trace, node.name, "margin")
            if m is not None and not bool(torch.isfinite(m).all()) and bool(torch.isneginf(bias).all()):
                return _pooled_charge(ctx, bias, pool, trace)   # an unbounded margin reached every row
        ins, odd, even = crown_rules.apply(node, cot, ctx)
        bias = _charge(bias, _acc(bias, sym, odd, even), trace, node.name, "rule")
        for name, li in zip(node.inputs, ins):
            if sym:
                li = rows.Sym(li)
            lams[name] = rows.add(lams[name], li) if name in lams else li
    return _pooled_charge(ctx, bias, pool, trace)


def _linear_spec_bias(node, idx: Tensor, unit: Tensor, m, off, dtype, device) -> Tensor:
    """Constants (2k,) of the specs ``[e_idx; -e_idx]`` placed through a linear
    target: its bias (and the engine's offset ``off``) and, outward, its margin."""
    b = node.params.get("bias")
    const = b[unit] if b is not None else torch.zeros(len(idx), dtype=dtype, device=device)
    if off is not None:
        const = const + off.reshape(-1)[idx]
    bias = torch.cat([const, -const])
    if m is not None:
        mm = m.reshape(-1)[idx]
        bias = bias - torch.cat([mm, mm])
    return bias


def halves(lams: dict, tunings: Tunings) -> dict:
    """The specs as built (shared halves), or stacked when ``tunings.shared_halves`` is off."""
    if tunings.shared_halves:
        return lams
    return {k: (v.full() if isinstance(v, rows.Sym) else v) for k, v in lams.items()}


def _first_step(ctx: Context, target: str, idx: Tensor, dtype, device):
    """Cotangents after the target node for the specs ``[e_idx; -e_idx]``.

    For a linear target the rows of W are placed directly (no product with an
    identity matrix); otherwise the spec itself is returned.
    """
    graph = ctx.graph
    node = graph[target]
    shape = node.shape
    k = len(idx)
    n = numel(shape)
    m = ctx.margins.get(target)
    off, keep = None, ctx.keep.get(target)
    if node.op == "linear" and target in ctx.offsets:           # --engine llama.cpp: the walk's form
        m, off = ctx.about[target], ctx.offsets[target]
    if ctx.tunings.compact_rows and node.op == "linear" and len(shape) >= 2:
        W = node.params["weight"]                               # (out, in)
        in_shape = graph[node.inputs[0]].shape
        T, out = shape[-2], shape[-1]
        unit, tok, lead = idx % out, (idx // out) % T, idx // (out * T)
        t = torch.zeros(k, max(1, numel(in_shape[:-2])), in_shape[-1], dtype=dtype, device=device)
        rw = W[unit]
        if keep is not None:
            rw = rw * keep.reshape(-1, T, in_shape[-1])[lead, tok]
        t[torch.arange(k, device=device), lead] = rw
        t = t.reshape(k, *in_shape[:-2], 1, in_shape[-1])
        return ({node.inputs[0]: rows.Sym(Rows.of(t, tok, T))},
                _linear_spec_bias(node, idx, unit, m, off, dtype, device))
    if ctx.tunings.compact_rows and len(shape) >= 2:
        return {target: rows.first_rows(graph, target, idx, dtype, device)}, torch.zeros(2 * k, dtype=dtype,
                                                                                          device=device)
    if node.op == "linear" and len(shape) >= 1:
        W = node.params["weight"]                               # (out, in)
        out = shape[-1]
        tok, unit = idx // out, idx % out                       # flat leading index, output unit
        in_shape = graph[node.inputs[0]].shape
        lead = numel(in_shape[:-1])
        lam = torch.zeros(k, lead, in_shape[-1], dtype=dtype, device=device)
        rw = W[unit]
        if keep is not None:
            rw = rw * keep.reshape(-1, in_shape[-1])[tok]
        lam[torch.arange(k), tok] = rw
        return ({node.inputs[0]: rows.Sym(lam.reshape(k, *in_shape))},
                _linear_spec_bias(node, idx, unit, m, off, dtype, device))
    eye = torch.zeros(k, n, dtype=dtype, device=device)
    eye[torch.arange(k), idx] = 1.0
    return {target: rows.Sym(eye.reshape(k, *shape))}, eye.new_zeros(2 * k)


def node_bounds(ctx: Context, target: str, box: Interval, chunk_elems: Optional[int] = None,
                stop: frozenset = frozenset(), each: Optional[Callable] = None) -> Interval:
    """CROWN bounds of every element of ``target``, in chunks of spec rows; ``each(lo, hi)`` is called
    on every chunk's bounds (alpha-CROWN's gradient, one chunk's graph at a time), which are then detached."""
    graph = ctx.graph
    shape = graph[target].shape
    n = numel(shape)
    widest = max(numel(graph[a].shape) for a in graph.ancestors(target))
    n_rows = max(1, min(n, (chunk_elems or ctx.tunings.chunk_elems) // max(1, 2 * widest)))
    dtype, device = box.lower.dtype, box.lower.device
    lo = torch.empty(n, dtype=dtype, device=device)
    hi = torch.empty(n, dtype=dtype, device=device)
    parts: list = []
    for s in range(0, n, n_rows):
        e = min(n, s + n_rows)
        k = e - s
        lams, bias = _first_step(ctx, target, torch.arange(s, e, device=device), dtype, device)
        lams = halves(lams, ctx.tunings)
        keep = [] if (target in ctx.keep_linear and not stop) else None
        lb = backward(ctx, lams, bias, box, stop, keep=keep)
        if each is not None:
            each(lb[:k], -lb[k:])
            lb = lb.detach()
        lo[s:e] = lb[:k]
        hi[s:e] = -lb[k:]
        if keep is not None:
            parts.append(_linear_rows(keep, lb, k, box, dtype, device))
    if target in ctx.keep_linear and not stop:
        a_lo, b_lo, a_hi, b_hi = (torch.cat(p) for p in zip(*parts))
        ctx.linear[target] = Linear(a_lo, b_lo, a_hi, b_hi, box)
    return Interval(lo.reshape(shape), hi.reshape(shape))


def _linear_rows(keep: list, lb: Tensor, k: int, box: Interval, dtype, device) -> tuple:
    """(a_lo, b_lo, a_hi, b_hi) of k elements from a pass's input cotangent A (2k, n) and its lower
    bounds lb (2k,): ``lb = b + A . c - |A| . reach - pooled`` (as concretised), so ``y_s >= A_s x +
    (lb_s - A_s . c + |A_s| . reach)`` over the box, less a pad for this float64 arithmetic; the
    upper rows are the negated specs.  A pass that did not reach the input (every spec cut short:
    an unbounded row) gives zero slopes and its concretised bound."""
    n = box.center.numel()
    if not keep:
        a = torch.zeros(2 * k, n, dtype=dtype, device=device)
    else:
        a = keep[0]
    c, r = box.center.reshape(-1), box.radius.reshape(-1)
    reach = r + F64_PAD * (c.abs() + r)
    lin = a @ c
    mag = a.abs() @ reach
    beta = lb - lin + mag
    beta = beta - F64_PAD * (lb.abs() + lin.abs() + mag)
    return a[:k], beta[:k], -a[k:], -beta[k:]


def numel(shape) -> int:
    return math.prod(shape)
