"""CROWN: backward linear bound propagation.

For a spec matrix ``Lambda`` (S, *target_shape) the walk computes, for every
row s, a lower bound of ``Lambda_s . y`` over the input box as
``A_s . x + bias_s`` with ``A`` propagated backwards node by node; the upper
bound of ``Lambda_s . y`` is minus the lower bound of ``-Lambda_s . y``, so
both are obtained in one pass by stacking ``[I; -I]``.

Rules (:data:`BACKWARD`) map the cotangent of a node's output to cotangents of
its inputs plus a constant, given a linear relaxation valid on the node's
intermediate bounds:

* affine ops: exact transpose (:data:`gamma.ops.AFFINE`);
* GELU / SiLU: chord/tangent lines from :mod:`gamma.bounds.relax`, chosen by the
  sign of Lambda (optionally parameterised by alpha);
* products ``x*y`` and ``x @ y^T``: ``xy = cy x + cx y - cx cy + dx dy`` with
  ``|dx dy| <= rx ry`` (centres and radii of the intermediate bounds);
* softmax: mean-value linearisation; LayerNorm / RMSNorm: per row the
  mean-value or the decomposed form (:mod:`.norm`, :mod:`.softmax`), with the mean square
  of the centred input bounded by its own small backward pass
  (:func:`norm_mean_square`).

At each node the float32 margin ``m`` adds ``-|Lambda| . m`` to the constant.
The walk itself (:func:`backward`) knows nothing about the ops.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch

from ..errors import UnsupportedOp
from ..ops import AFFINE, ELEMENTWISE
from . import relax, rows
from .fp import CotangentProduct
from .bilinear import planes, shift_constant, simplex_shift
from .interval import Interval
from .jacobian import linearize
from .linearization import row_dot
from .norm import norm_interval, norm_stats
from .rows import Rows
from .tuning import DEFAULT, Tunings

Tensor = torch.Tensor


class Context:
    """Intermediate bounds, margins and cached relaxations of one graph."""

    def __init__(self, graph, bounds: dict, margins: dict, alpha: Optional[dict] = None,
                 tunings: Tunings = DEFAULT):
        self.graph = graph
        self.tunings = tunings
        self.bounds = bounds            # name -> Interval (sound, float64)
        self.margins = margins          # name -> Tensor | None
        self.alpha = alpha or {}        # name -> (alpha_lower, alpha_upper) tensors
        self.stops: dict = {}           # name -> frozenset: where backward passes for it stop (--intermediate cut)
        self.planes = True              # attention @ V by sign-chosen planes (the engine: in the output's pass only)
        self._lin: dict = {}
        self._const: dict = {}
        self._relax: dict = {}
        self._band: dict = {}
        self._lint: dict = {}
        self._refined: dict = {}

    def inb(self, node, k: int = 0) -> Interval:
        return self.bounds[node.inputs[k]]

    def refinement(self, node) -> dict:
        """Sound facts about the op's internals beyond its input box (:data:`REFINE`),
        computed once per node: ``q`` and ``c`` for norms, {} for other ops."""
        if node.name not in self._refined:
            refine = REFINE.get(node.op) if self.tunings.norm_internals else None
            self._refined[node.name] = refine(self, node) if refine is not None else {}
        return self._refined[node.name]

    def linearization(self, node):
        if node.name not in self._lin:
            lin = linearize(node, self.inb(node), self.tunings, **self.refinement(node))
            self._lin[node.name] = lin if self.tunings.row_remainder else replace(lin, rem=None)
        return self._lin[node.name]

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

    def margin(self, node):
        """What the walk charges per unit ``|Lambda|`` at ``node``: its float32
        margin plus, for a linear node whose transpose runs in float32, that
        product's error term (:class:`fp.CotangentProduct`)."""
        m = self.margins.get(node.name)
        if node.op != "linear":
            return m
        p = self.linear_product(node)
        if p is None:
            return m
        return p.err if m is None else m + p.err

    def use_planes(self, node) -> bool:
        """Whether this pass relaxes the product ``node`` by McCormick planes chosen
        per sign of Lambda (:func:`_matmul_planes`; attention @ V only)."""
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


def _flat_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _dot(lam: Tensor, c) -> Tensor:
    """sum over the trailing dims of lam * c (c broadcast to lam.shape[1:]): (S,), one mat-vec
    (:func:`.linearization.row_dot`)."""
    return row_dot(lam, torch.as_tensor(c, dtype=lam.dtype, device=lam.device))


# ---------------------------------------------------------------- rules
def _affine(node, lam, ctx):
    fact = AFFINE[node.op]
    shapes = [ctx.graph[i].shape for i in node.inputs]
    ins = fact.lin_T(node, lam, shapes)
    off = fact.offset(node)
    bias = _dot(lam, off) if off is not None else lam.new_zeros(lam.shape[0])
    return list(ins), bias, None


def _linear(node, lam, ctx):
    """``lam W`` as a float32 product where it applies (:class:`fp.CotangentProduct`;
    its error term is in :meth:`Context.margin`), else in float64."""
    p = ctx.linear_product(node)
    if p is not None:
        lin = p.product(lam)
        odd = _dot(lam, p.y0) - _dot(lin, p.x0)
        if bool(torch.isfinite(odd).all()):                  # else float32 overflowed somewhere
            return [lin], odd, p.floor
    return _affine(node, lam, ctx)


def _elementwise(node, lam, ctx):
    al, bl, au, bu = ctx.relaxation(node)
    band = ctx.band(node)
    if band is not None:                        # lam (a x + c) -/+ |lam| h: linear in lam
        c, h = band
        return [lam * al], _dot(lam, c), _dot(lam.abs(), h)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    return [pos * al + neg * au], _dot(pos, bl) + _dot(neg, bu), None


def _mul(node, lam, ctx):
    if node.name in ctx.alpha:
        return _mul_planes(node, lam, ctx)
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = x.center, y.center
    return [lam * cy, lam * cx], -_dot(lam, cx * cy), _dot(lam.abs(), x.radius * y.radius)


def mul_planes(x, y, a_lo, a_hi):
    """Mixtures of the two McCormick planes of ``z = x y`` on the box, per element:

        z >= a P1 + (1 - a) P2,  P1 = xl y + yl x - xl yl,  P2 = xu y + yu x - xu yu   (a = a_lo)
        z <= b Q1 + (1 - b) Q2,  Q1 = xu y + yl x - xu yl,  Q2 = xl y + yu x - xl yu   (b = a_hi)

    each a convex combination of valid planes, so valid for any a, b in [0, 1];
    a = b = 1/2 is the half-sum rule.  Returns (x and y slopes, constant) of the
    lower and of the upper line."""
    xl, xu, yl, yu = x.lower, x.upper, y.lower, y.upper
    lo = (a_lo * yl + (1 - a_lo) * yu, a_lo * xl + (1 - a_lo) * xu, -(a_lo * xl * yl + (1 - a_lo) * xu * yu))
    hi = (a_hi * yl + (1 - a_hi) * yu, a_hi * xu + (1 - a_hi) * xl, -(a_hi * xu * yl + (1 - a_hi) * xl * yu))
    return lo, hi


def _mul_planes(node, lam, ctx):
    """x * y with alpha-CROWN's plane mixtures (:func:`mul_planes`): the lower
    line where lam > 0, the upper one where lam < 0 (sign-dependent)."""
    (lx, ly, lc), (ux, uy, uc) = mul_planes(ctx.inb(node, 0), ctx.inb(node, 1), *ctx.alpha[node.name])
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    return [pos * lx + neg * ux, pos * ly + neg * uy], _dot(pos, lc) + _dot(neg, uc), None


def _matmul(node, lam, ctx):
    if ctx.use_planes(node):
        return _matmul_planes(node, lam, ctx)
    return _matmul_centre(node, lam, ctx)


def _matmul_centre(node, lam, ctx):
    """z = x y^T with x (.., T, a), y (.., S, a); lam (B, .., T, S): every product
    ``x_k y_k`` by the half-sum of its McCormick planes (linear in lam)."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    cx, cy = x.center, y.center
    t = lambda v: v.transpose(-1, -2)
    m = simplex_shift(node, cy)                     # z = x (y - m)^T + m^T when x rows sum to 1
    bias = lam.new_zeros(lam.shape[0])
    if m is not None:
        # x (y - m)^T relaxed around (cx, cy - m): the y-term is cx (y - m)^T = cx y^T - cx m^T
        cy = cy - m
        bias = bias + _dot(lam, shift_constant(cx, m).expand(node.shape))
    bias = bias - _dot(lam, cx @ t(cy))
    return [lam @ cy, t(lam) @ cx], bias, _dot(lam.abs(), x.radius @ t(y.radius))


def _matmul_planes(node, lam, ctx):
    """z = x y^T (attention @ V: x the probabilities) with one McCormick plane per
    product chosen by the sign of lam, both exact where x is at its lower bound,
    which is where most probabilities are tight:

        x y >= yl x + xl y - xl yl   (lam > 0),    x y <= yu x + xl y - xl yu   (lam < 0),

    y shifted by the row constant m as in :func:`_matmul_centre`.  On the
    width-64 Whisper block at eps 1e-2 the output is 2% tighter than with the
    half-sum of the planes (which stays for q k^T, where it is 2% tighter).
    The rule is not linear in lam, so the shared halves split here and a
    pass through attention costs up to 2x on its query side; the engine
    therefore uses it in the output's own pass only (``Context.planes``),
    which keeps 70-100% of the gain at about no cost, and never under
    ``--intermediate cut``."""
    x, y = ctx.inb(node, 0), ctx.inb(node, 1)
    t = lambda v: v.transpose(-1, -2)
    m = simplex_shift(node, y.center)
    yl, yu = y.lower, y.upper
    bias = lam.new_zeros(lam.shape[0])
    if m is not None:
        yl, yu = yl - m, yu - m
        bias = bias + _dot(lam, t(m).expand(node.shape))
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    xl = x.lower
    ly = t(lam) @ xl
    bias = bias - _dot(pos, xl @ t(yl)) - _dot(neg, xl @ t(yu))
    if m is not None:
        bias = bias - _dot(ly, m.expand(y.center.shape))        # ly . (y - m) = ly . y - ly . m
    return [pos @ yl + neg @ yu, ly], bias, None


def _jacobian(node, lam, ctx):
    lin = ctx.linearization(node)
    const = ctx.lin_const(node)
    return [lin.vjp(lam)], _dot(lam, const), lin.even_at()(lam)


BACKWARD: dict = {op: _affine for op in AFFINE}
BACKWARD.update({op: _elementwise for op in ELEMENTWISE})
BACKWARD.update({"linear": _linear, "mul": _mul, "matmul": _matmul,
                 "softmax": _jacobian, "layernorm": _jacobian, "rmsnorm": _jacobian})


# ---------------------------------------------------------------- refinements
def norm_mean_square(ctx: Context, node) -> dict:
    """CROWN bounds of the mean square ``q = mean(c^2)``, ``c = P x`` (x: the
    norm's input, P: centring or identity), per row: with ``[cl, cu]`` the
    box of c and t its centre,

        mean(m c) - mean(cl cu)  >=  q  >=  mean(2 t c) - mean(t^2)    (m = cl + cu)

    (chords and tangents of c^2), both linear in x, bounded by one backward
    pass of 2R rows (R = rows of x).  The box gives q's range from independent
    c_j intervals; this keeps the correlation between them, which is what
    makes the norm's inverse scale, and so its relaxation, tight."""
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
    lam = x.lower.new_zeros(2 * R, R, d)
    ar = torch.arange(R, device=lam.device)
    lam[ar, ar] = -up
    lam[R + ar, ar] = lo
    lb = backward(ctx, {node.inputs[0]: lam.reshape(2 * R, *shape)}, lam.new_zeros(2 * R),
                  ctx.bounds[ctx.graph.input], ctx.stops.get(node.inputs[0], frozenset()))
    row = shape[:-1] + (1,)
    q_hi = (-lb[:R]).reshape(row) - (cl * cu).mean(-1, keepdim=True)
    q_lo = lb[R:].reshape(row) - (t * t).mean(-1, keepdim=True)
    slack = 1e-12 * (q_hi.abs() + q_lo.abs()) + 1e-300        # float64 rounding of the pass
    return {"q": ((q_lo - slack).clamp_min(0), q_hi + slack), "c": c}


def centred_bounds(ctx: Context, node, chunk_elems: Optional[int] = None) -> tuple:
    """CROWN bounds ``(lower, upper)`` of LayerNorm's centred input ``x - mean(x)``
    (spec rows ``[P e_i; -P e_i]``, token-compact when x has a token axis).
    The box of x loses the correlation between x_i and mean(x)."""
    graph = ctx.graph
    name = node.inputs[0]
    shape = graph[name].shape
    n = _numel(shape)
    d = shape[-1]
    box = ctx.bounds[graph.input]
    dtype, device = box.lower.dtype, box.lower.device
    widest = max(_numel(graph[a].shape) for a in graph.ancestors(name) | {name})
    step = max(1, min(n, (chunk_elems or ctx.tunings.chunk_elems) // max(1, 2 * widest)))
    lo = torch.empty(n, dtype=dtype, device=device)
    hi = torch.empty(n, dtype=dtype, device=device)
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = torch.arange(s, e, device=device)
        lam = rows.first_rows(graph, name, idx, dtype, device) if ctx.tunings.compact_rows else None
        if lam is not None:
            lam = rows.Sym(lam.lam.like(lam.lam.t - lam.lam.t.mean(-1, keepdim=True)))
        else:
            eye = torch.zeros(e - s, n, dtype=dtype, device=device)
            eye[torch.arange(e - s), idx] = 1.0
            eye = eye.reshape(e - s, -1, d)
            lam = rows.Sym((eye - eye.mean(-1, keepdim=True)).reshape(e - s, *shape))
        lb = backward(ctx, _halves({name: lam}, ctx.tunings), torch.zeros(2 * (e - s), dtype=dtype, device=device), box,
                      ctx.stops.get(name, frozenset()))
        lo[s:e], hi[s:e] = lb[:e - s], -lb[e - s:]
    slack = 1e-12 * torch.maximum(lo.abs(), hi.abs()) + 1e-300      # float64 rounding of the pass
    return (lo - slack).reshape(shape), (hi + slack).reshape(shape)


REFINE = {"layernorm": norm_mean_square, "rmsnorm": norm_mean_square}


def _norm_box(ctx: Context, node, x: Interval) -> Interval:
    """The box's rule intersected with the refined one (each sound), carrying the
    refined statistics (which are the box's intersected with CROWN's)."""
    refined = norm_interval(node, x, **ctx.refinement(node))
    out = refined.intersect(norm_interval(node, x))
    out.stats = refined.stats
    return out


# interval rules that use the refinements: a norm's box from CROWN's mean square and
# centred input instead of the box's (the float32 margin then reads the same statistics:
# where the box's variance may reach 0, its rsqrt error is unbounded; CROWN's is not)
REFINED_IBP = {"layernorm": _norm_box, "rmsnorm": _norm_box}


def refined_interval(ctx: Context, node, ins: list) -> Optional[Interval]:
    """The node's interval from its refinements (:data:`REFINED_IBP`), or None
    where the op has none."""
    rule = REFINED_IBP.get(node.op) if ctx.tunings.norm_internals else None
    return rule(ctx, node, *ins) if rule is not None else None


# ---------------------------------------------------------------- the walk
def _odd_dot(lam, c) -> Tensor:
    return lam.dot(c) if isinstance(lam, Rows) else _dot(lam, c)


def _abs_dot(lam, c) -> Tensor:
    return lam.like(lam.t.abs()).dot(c) if isinstance(lam, Rows) else _dot(lam.abs(), c)


def _margin_dot(lam, m: Tensor) -> Tensor:
    """``|lam| . m`` per row, where an infinite margin costs only the rows that
    use it (0 * inf counts as 0: an entry a row does not depend on), the same
    in the dense and the token-compact walk."""
    if bool(torch.isfinite(m).all()):
        return _abs_dot(lam, m)
    fin = torch.isfinite(m)
    hit = _abs_dot(lam, (~fin).to(m.dtype))
    return _abs_dot(lam, torch.where(fin, m, torch.zeros_like(m))).masked_fill(hit > 0, math.inf)


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


def backward(ctx: Context, lams: dict, bias: Tensor, box: Interval, stop: frozenset = frozenset(),
             trace: Optional[Callable[[str, Tensor], None]] = None) -> Tensor:
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
    over the terms, plus what the specs' own constant gives.
    """
    graph = ctx.graph
    lams = dict(lams)
    anc: set = set()
    for k in lams:
        anc |= graph.ancestors(k, stop=None)
    order = [n for n in graph if n.name in anc]
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
            bias = _charge(bias, _acc(bias, sym, _odd_dot(lam, iv.center), _abs_dot(lam, iv.radius)), trace,
                           node.name, "box")
            continue
        if isinstance(lam, Rows) and (not rows.applies(graph, node, lam) or node.name in ctx.alpha and node.op == "mul"):
            lam = lam.dense()
        if isinstance(lam, Tensor) and not lam.is_contiguous():
            lam = lam.contiguous()          # one copy here, not one per row-wise dot (reshape) below
        m = ctx.margin(node)
        if m is not None:
            bias = _charge(bias, _acc(bias, sym, None, _margin_dot(lam, m)), trace, node.name, "margin")
        if isinstance(lam, Rows):
            rule = rows.COMPACT[node.op]
        else:
            try:
                rule = BACKWARD[node.op]
            except KeyError:
                raise UnsupportedOp(node.op, "crown", node.name) from None
        ins, odd, even = rule(node, lam, ctx)
        bias = _charge(bias, _acc(bias, sym, odd, even), trace, node.name, "rule")
        for name, li in zip(node.inputs, ins):
            if sym:
                li = rows.Sym(li)
            lams[name] = rows.add(lams[name], li) if name in lams else li
    return bias


def _linear_spec_bias(node, idx: Tensor, unit: Tensor, m, dtype, device) -> Tensor:
    """Constants (2k,) of the specs ``[e_idx; -e_idx]`` placed through a linear
    target: its bias and, outward, its float32 margin."""
    b = node.params.get("bias")
    const = b[unit] if b is not None else torch.zeros(len(idx), dtype=dtype, device=device)
    bias = torch.cat([const, -const])
    if m is not None:
        mm = m.reshape(-1)[idx]
        bias = bias - torch.cat([mm, mm])
    return bias


def _halves(lams: dict, tunings: Tunings) -> dict:
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
    n = _numel(shape)
    m = ctx.margins.get(target)
    if ctx.tunings.compact_rows and node.op == "linear" and len(shape) >= 2:
        W = node.params["weight"]                               # (out, in)
        in_shape = graph[node.inputs[0]].shape
        T, out = shape[-2], shape[-1]
        unit, tok, lead = idx % out, (idx // out) % T, idx // (out * T)
        t = torch.zeros(k, max(1, _numel(in_shape[:-2])), in_shape[-1], dtype=dtype, device=device)
        t[torch.arange(k, device=device), lead] = W[unit]
        t = t.reshape(k, *in_shape[:-2], 1, in_shape[-1])
        return {node.inputs[0]: rows.Sym(Rows.of(t, tok, T))}, _linear_spec_bias(node, idx, unit, m, dtype, device)
    if ctx.tunings.compact_rows and len(shape) >= 2:
        return {target: rows.first_rows(graph, target, idx, dtype, device)}, torch.zeros(2 * k, dtype=dtype,
                                                                                          device=device)
    if node.op == "linear" and len(shape) >= 1:
        W = node.params["weight"]                               # (out, in)
        out = shape[-1]
        tok, unit = idx // out, idx % out                       # flat leading index, output unit
        in_shape = graph[node.inputs[0]].shape
        lead = _numel(in_shape[:-1])
        lam = torch.zeros(k, lead, in_shape[-1], dtype=dtype, device=device)
        lam[torch.arange(k), tok] = W[unit]
        return {node.inputs[0]: rows.Sym(lam.reshape(k, *in_shape))}, _linear_spec_bias(node, idx, unit, m, dtype,
                                                                                         device)
    eye = torch.zeros(k, n, dtype=dtype, device=device)
    eye[torch.arange(k), idx] = 1.0
    return {target: rows.Sym(eye.reshape(k, *shape))}, eye.new_zeros(2 * k)


def node_bounds(ctx: Context, target: str, box: Interval, chunk_elems: Optional[int] = None,
                stop: frozenset = frozenset()) -> Interval:
    """CROWN bounds of every element of ``target``, in chunks of spec rows."""
    graph = ctx.graph
    shape = graph[target].shape
    n = _numel(shape)
    widest = max(_numel(graph[a].shape) for a in graph.ancestors(target))
    n_rows = max(1, min(n, (chunk_elems or ctx.tunings.chunk_elems) // max(1, 2 * widest)))
    dtype, device = box.lower.dtype, box.lower.device
    lo = torch.empty(n, dtype=dtype, device=device)
    hi = torch.empty(n, dtype=dtype, device=device)
    for s in range(0, n, n_rows):
        e = min(n, s + n_rows)
        k = e - s
        lams, bias = _first_step(ctx, target, torch.arange(s, e, device=device), dtype, device)
        lams = _halves(lams, ctx.tunings)
        lb = backward(ctx, lams, bias, box, stop)
        lo[s:e] = lb[:k]
        hi[s:e] = -lb[k:]
    return Interval(lo.reshape(shape), hi.reshape(shape))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
