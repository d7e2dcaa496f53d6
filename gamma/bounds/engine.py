"""One entry point for every method: :func:`compute_bounds`.

Walks the graph once in topological order.  At every node it computes a sound
interval (IBP rule on the input intervals, widened by the float32 margin) and,
depending on the method, intersects it with a tighter one:

* ``ibp``: nothing more;
* ``crown``: CROWN bounds for every node whose bounds a relaxation needs
  (inputs of nonlinear ops) and for the output (``intermediate="ibp"`` keeps
  IBP for the intermediate nodes);
* ``alpha``: as crown, then the output bounds are optimised over the
  relaxation slopes (:mod:`.alpha`), never looser than CROWN;
* ``zonotope``: a forward zonotope per node.

With ``options.after_saturation="ibp"`` the crown and alpha methods stop there: from the first
node whose bound is wider than :data:`gamma.options.SATURATION_WIDTH` (or unbounded) on, every node
gets its interval rule and margin only (``stats["ibp_from"]`` names the node).

Every intersection of two sound enclosures is sound.  The result has sound
bounds of every node, so per-node widths come for free.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..errors import GammaError
from ..ops import BILINEAR, ELEMENTWISE, JACOBIAN
from ..options import ARITHMETIC, INTERMEDIATE, METHODS, SATURATION_WIDTH, BoundOptions
from .alpha import optimize
from . import fpggml, fpprob, score_input, split, value_input
from .crown import Context, node_bounds, numel as _numel
from .fpmargin import margin_split, output_cap
from .ibp import ibp_node
from .refine import REFINE, norm_input_box, refined_interval
from .interval import Interval
from .tuning import DEFAULT, Tunings
from .zonotope import Zono, zono_node

# facts: ranges an op's float32 output can never leave (softmax: a correctly
# rounded a / b with 0 <= a <= b stays in [0, 1])
OUTPUT_RANGE = {"softmax": (0.0, 1.0)}


def clamp_output_range(op: str, iv: Interval, margin) -> Interval:
    """Clamp to :data:`OUTPUT_RANGE` where the float32 margin is finite.  An
    infinite margin means the float32 op may overflow (softmax of an inf
    score is NaN), so there the bound stays as wide as the margin made it."""
    lo, hi = OUTPUT_RANGE[op]
    l, u = iv.lower.clamp(lo, hi), iv.upper.clamp(lo, hi)
    if margin is not None and not bool(torch.isfinite(margin).all()):
        ok = torch.isfinite(margin)
        l, u = torch.where(ok, l, iv.lower), torch.where(ok, u, iv.upper)
    return Interval(l, u)
NONLINEAR = ELEMENTWISE | BILINEAR | JACOBIAN


@dataclass
class BoundResult:
    lower: torch.Tensor            # (*output_shape) float64 CPU
    upper: torch.Tensor
    nodes: dict                    # name -> Interval (CPU float64) for every node
    method: str
    seconds: float
    stats: dict = field(default_factory=dict)

    def width(self) -> torch.Tensor:
        return self.upper - self.lower


def _sanitize(iv: Interval) -> Interval:
    """inf - inf gives NaN; a NaN bound means 'unbounded', which is what we report."""
    return Interval(torch.nan_to_num(iv.lower, nan=-math.inf, posinf=math.inf, neginf=-math.inf),
                    torch.nan_to_num(iv.upper, nan=math.inf, posinf=math.inf, neginf=-math.inf))


def saturated(iv: Interval) -> bool:
    """Whether some element's bound is wider than :data:`SATURATION_WIDTH` or unbounded (NaN-free,
    after :func:`_sanitize`): what ``after_saturation="ibp"`` switches on."""
    if iv.lower.numel() == 0:
        return False
    w = iv.upper - iv.lower
    return not bool(torch.isfinite(w).all()) or float(w.max()) > SATURATION_WIDTH


def _unbounded_everywhere(iv: Interval) -> bool:
    """(-inf, inf) at every entry (bounds are NaN-free after :func:`_sanitize`): two
    reductions, the second only when the first holds, instead of four full-size ops."""
    if iv.lower.numel() == 0:
        return True
    return bool(iv.lower.amax() == -math.inf) and bool(iv.upper.amin() == math.inf)


# ops whose IBP image of CROWN bounds is as tight as CROWN itself: permutations
# and copies are exact; a unary elementwise op on an interval is optimal
PASS_THROUGH = {"transpose", "split_heads", "merge_heads", "repeat_kv"} | ELEMENTWISE


def needs_bounds(graph) -> set[str]:
    """Nodes that get CROWN bounds: the inputs of nonlinear ops, traced back
    through ops whose IBP image is as tight (so CROWN runs on fewer, smaller nodes)."""
    need = set()
    for node in graph:
        if node.op in NONLINEAR:
            for name in node.inputs:
                while graph[name].op in PASS_THROUGH:
                    name = graph[name].inputs[0]
                if graph[name].op != "input":
                    need.add(name)
    return need


def norm_fed(graph, need: set[str]) -> set[str]:
    """The nodes of ``need`` that only LayerNorms need (every nonlinear op that reads
    them, through pass-through ops, is a LayerNorm), the output excepted: their box
    can come from the norm's own refinement (:func:`.refine.norm_input_box`)."""
    why: dict = {}
    for node in graph:
        if node.op in NONLINEAR:
            for name in node.inputs:
                while graph[name].op in PASS_THROUGH:
                    name = graph[name].inputs[0]
                why.setdefault(name, set()).add(node.op)
    return {n for n in need if why.get(n) == {"layernorm"} and n != graph.output}


def cut_points(graph, need: set[str]) -> dict[str, frozenset]:
    """For ``intermediate='cut'``: per needed node, the residual-stream node
    feeding the nearest normalisation that dominates it (all its paths to the
    input pass through it); CROWN stops there and uses that node's bounds."""
    norm_inputs = [n.inputs[0] for n in graph if n.op in ("layernorm", "rmsnorm")]
    order = {n: i for i, n in enumerate(graph.nodes)}
    out = {}
    for name in need:
        best = None
        for s in norm_inputs:
            if s == graph.input or order[s] >= order[name]:
                continue
            if s in graph.ancestors(name) and graph.input not in graph.ancestors(name, stop=s):
                if best is None or order[s] > order[best]:
                    best = s
        out[name] = frozenset([best]) if best else frozenset()
    return out


def _ggml_charge(ctx, node, ins, m, ex) -> tuple:
    """``(margin, offset, box or None)`` of ``node`` under ``--engine llama.cpp`` from its float32
    margin ``m`` and :func:`.fpggml.extra`'s ``ex``; records what the CROWN walk charges there
    (``ctx.offsets`` / ``ctx.about``, and ``ctx.keep`` where the walk takes some of a linear layer's
    inputs as constants, whose own box is then returned)."""
    pooled = node.name in ctx.pooled
    base = 0.0 if ex.own and not pooled else m      # (a pooled float32 margin stays, the extra added)
    keep, w_off, w_add = ex.walk if ex.walk is not None else (None, ex.offset, ex.margin)
    if pooled:                                      # charged with the pooled margin's own part
        sp = ctx.pooled[node.name]
        ctx.pooled[node.name] = fpprob.Split(sp.det + w_add, sp.dot, sp.var)
    if w_off is not None:
        ctx.offsets[node.name], ctx.about[node.name] = w_off, base + w_add
    box = None
    if keep is not None:
        ctx.keep[node.name] = keep
        x, zero = ins[0], torch.zeros_like(ins[0].lower)
        box = ibp_node(node, Interval(torch.where(keep, x.lower, zero), torch.where(keep, x.upper, zero)))
        box = Interval(box.lower + w_off, box.upper + w_off).widen(base + w_add)
    return base + ex.margin, ex.offset, box


def compute_bounds(graph, center: torch.Tensor, epsilon: Optional[float] = None, method: str = "crown", *,
                   intermediate: str = "crown", device: str = "cpu", alpha_iters: int = 20,
                   progress: Optional[Callable[[str], None]] = None, allow_zero: bool = False,
                   arithmetic: str = "float32", tunings: Optional[Tunings] = None,
                   options: Optional[BoundOptions] = None, layernorm_variance: str = "any",
                   engine: str = "float32") -> BoundResult:
    """Sound bounds of every node of ``graph`` over ``[center - eps, center + eps]``.

    ``arithmetic="float32"`` (default): they contain what any float32 engine
    computes (an outward margin for its rounding at every node).
    ``"float32-probabilistic"``: the same, with the rounding of dot products and norms' sums under
    a probabilistic model (:mod:`.fpprob`; ``stats["rounding_failure"]`` bounds
    the probability that the bounds fail under it).  ``"real"``:
    they contain the real-valued function only (no margins; gamma's own
    float32 products still charge their rounding), which is what other
    verifiers bound, and not a guarantee for a float32 engine.  ``layernorm_variance``
    (:data:`gamma.options.LAYERNORM_VARIANCE`): "any" (default), "formula", for engines that
    compute LayerNorm's variance as E[x^2] - E[x]^2 or mean((x - mean)^2) (not by running
    moments): its margin is then not doubled as a whole, or "two-pass", mean((x - mean)^2) only
    (llama.cpp, whisper.cpp), which also drops the one-pass form's error.  ``tunings``: how
    the engine computes them (:class:`Tunings`; the defaults when None).  ``engine``
    (:data:`gamma.options.ENGINES`): "float32" (default), or "llama.cpp": the float32 bounds also
    cover what ggml's CPU backend does beyond float32 on a graph built from a GGUF file
    (:mod:`.fpggml`).

    ``options``: the options checked already (:class:`gamma.options.BoundOptions`), in place
    of ``epsilon``, ``method``, ``intermediate``, ``device``, ``alpha_iters``, ``arithmetic`` and
    ``layernorm_variance``; without it those are checked here, by the same checks.  Its
    ``products="half-sum"`` turns ``tunings.product_sums`` off, and its ``norm_splits``
    sets ``tunings.norm_splits`` (:mod:`.split`).  ``graph`` stays where
    it is: on another device the engine works on a copy (:meth:`Graph.on`)."""
    zero = allow_zero and options is None and epsilon == 0       # the rounding floor alone (benchmarks)
    if options is None:
        options = BoundOptions(1.0 if zero else epsilon, method, intermediate, arithmetic, device, alpha_iters,
                               layernorm_variance=layernorm_variance, engine=engine)
    elif not isinstance(options, BoundOptions):
        raise GammaError(f"options must be a gamma.options.BoundOptions, got {type(options).__name__}")
    elif epsilon is not None:
        raise TypeError("compute_bounds: give epsilon in options or on its own, not both")
    if tunings is None:
        tunings = DEFAULT
    elif not isinstance(tunings, Tunings):
        raise GammaError(f"tunings must be a gamma.bounds.Tunings, got {type(tunings).__name__}")
    if options.products == "half-sum" and tunings.product_sums:
        tunings = replace(tunings, product_sums=False)
    if options.norm_splits > 1:
        tunings = replace(tunings, norm_splits=options.norm_splits)
    method, intermediate, arithmetic = options.method, options.intermediate, options.arithmetic
    eps = 0.0 if zero else options.epsilon
    variance = options.layernorm_variance
    ggml = options.engine == "llama.cpp"
    if ggml:
        fpggml.check(graph)
    dev = torch.device(options.device)
    if tuple(center.shape) != tuple(graph.input_shape):
        raise GammaError(f"input has shape {tuple(center.shape)}, the graph expects {tuple(graph.input_shape)}")
    t0 = time.perf_counter()
    graph = graph.on(dev)
    # contiguous: float32 products take their GEMM path (and so their rounding) from the layout,
    # and a block input sliced out of a forward pass may be a transposed view
    x0 = center.to(device=dev, dtype=torch.float64).contiguous()
    box = Interval(x0 - eps, x0 + eps)
    bounds: dict = {graph.input: box}
    margins: dict = {}
    stats = {"crown_nodes": 0}

    zonos = {graph.input: Zono.from_box(box)} if method == "zonotope" else None
    ctx = Context(graph, bounds, margins, tunings=tunings, refine=REFINE)
    need = needs_bounds(graph) if (method in ("crown", "alpha") and intermediate != "ibp") else set()
    # a LayerNorm input's box from the norm's centred-input and mean passes instead of a pass of its own
    # (not under --intermediate cut, whose passes stop at these nodes and concretise their boxes)
    from_norm = (norm_fed(graph, need) if intermediate == "crown" and tunings.norm_internals
                 and tunings.norm_input_from_centre else set())
    need -= from_norm
    stops = cut_points(graph, need) if intermediate == "cut" else {}
    if intermediate == "crown" and method in ("crown", "alpha"):
        # the attention products' sides keep their linear bounds over the input, where small
        # (score_input.py; V for attention @ V's value side: value_input.py)
        size = lambda n: _numel(graph[n].shape) * box.center.numel()     # noqa: E731
        keep = set()
        if tunings.score_input:
            keep |= {n for n in score_input.wanted(graph, need) if size(n) <= score_input.BUDGET}
        if tunings.value_input:
            keep |= {n for n in value_input.wanted(graph, need) if size(n) <= value_input.BUDGET}
        ctx.keep_linear = keep
    # a norm's mean square cut into pieces for the row-local nodes after it (split.py)
    splits = split.make(ctx, graph, need, method, intermediate) if zonos is None else None
    if splits is not None:
        stats["split_norms"] = len(splits.norms)
    # norms' boxes (and so their float32 margins) from CROWN's statistics of their input
    refine = method in ("crown", "alpha") and intermediate != "ibp"
    ctx.stops = stops
    consumers = graph.consumers()
    remaining = {n: len(c) for n, c in consumers.items()}
    unbounded: set = set()          # ibp: nodes whose bounds are (-inf, inf) everywhere
    # after_saturation="ibp": from the first saturated node on, no CROWN pass and no refined interval
    switch = options.after_saturation == "ibp" and refine
    watch = switch or (progress is not None and method in ("crown", "alpha"))   # the first saturated node
    for idx, node in enumerate(graph):
        if node.op == "input":
            continue
        if method == "ibp" and node.shape and all(i in unbounded for i in node.inputs):
            # every input unbounded everywhere: so is the output, once the float32 margin is added
            # (each margin rule is inf on such inputs), so skip the rule and the margin
            bounds[node.name] = Interval(torch.full(node.shape, -math.inf, dtype=torch.float64, device=dev),
                                         torch.full(node.shape, math.inf, dtype=torch.float64, device=dev))
            margins[node.name] = None
            unbounded.add(node.name)
            continue
        if node.op == "layernorm" and node.inputs[0] in from_norm and refine:
            x = norm_input_box(ctx, node)
            if x is not None:
                bounds[node.inputs[0]] = _sanitize(bounds[node.inputs[0]].intersect(x))
        ins = [bounds[i] for i in node.inputs]
        iv = refined_interval(ctx, node, ins) if refine else None
        if iv is None:
            iv = ibp_node(node, *ins)
        prob = arithmetic == "float32-probabilistic"
        sums = fpggml.RMS_SUMS if ggml and node.op == "rmsnorm" else fpprob.NORM_SUMS if prob else None
        m, modes = (margin_split(node, ins, iv, margins, sums, variance)
                    if arithmetic != "real" else (None, None))
        if prob and modes is not None:
            ctx.events += 2 * iv.lower.numel()          # (at most) two sums per element's row, one event each
        if prob and m is not None:
            sp = fpprob.split(node, ins, iv, margins)
            if sp is not None and sp.finite():
                m = torch.minimum(m, sp.elementwise())      # each bound holds (the model's per element)
                ctx.pooled[node.name] = sp
                ctx.events += m.numel()
        off = walk_iv = None
        if ggml and m is not None:
            ex = fpggml.extra(node, ins)                    # what ggml computes beyond float32 (llama.cpp)
            if ex is not None:
                m, off, walk_iv = _ggml_charge(ctx, node, ins, m, ex)
            if off is not None:                             # the engine's value: off from the real one, +- m
                iv = Interval(iv.lower + off, iv.upper + off)
                m_about, m = m, m + off.abs() * (1 + 2.0 ** -40)
        margins[node.name] = m
        if modes is not None:
            ctx.modes[node.name] = modes
        iv = iv.widen(m if off is None else m_about)
        if walk_iv is not None:
            iv = iv.intersect(walk_iv)
        cap = output_cap(node) if m is not None else None
        if cap is not None and bool(torch.isfinite(ins[0].lower).all()) and bool(torch.isfinite(ins[0].upper).all()):
            # (a float32 input that may be inf makes the output NaN: no cap there)
            iv = Interval(iv.lower.clamp_min(-cap), iv.upper.clamp_max(cap))
        if node.op in OUTPUT_RANGE:
            iv = clamp_output_range(node.op, iv, m)
        if zonos is not None:
            z = zono_node(node, [zonos[i] for i in node.inputs], ins, tunings)
            if m is not None:
                z.box = z.box + m
            zonos[node.name] = z
            iv = iv.intersect(z.interval())
            for i in node.inputs:            # free generators nobody needs any more
                remaining[i] -= 1
                if remaining[i] == 0 and i != graph.input:
                    zonos.pop(i, None)
        elif "ibp_from" not in stats and (node.name in need or (node.name == graph.output and method != "ibp")):
            if progress:
                progress(f"crown {node.name}")
            # attention @ V by sign-chosen planes in the output's own pass only (intermediate passes
            # would pay up to 2x for them on the attention side); --intermediate cut never (cheap mode)
            ctx.planes = intermediate != "cut" and node.name == graph.output
            iv = iv.intersect(node_bounds(ctx, node.name, box, stop=stops.get(node.name, frozenset())))
            stats["crown_nodes"] += 1
        if splits is not None and splits.owns(node.name) and "ibp_from" not in stats:
            iv = splits.bound(node, iv, box, node.name in need or node.name == graph.output,
                              stops.get(node.name, frozenset()))
        bounds[node.name] = iv = _sanitize(iv)
        if splits is not None and node.name in splits.norms and "ibp_from" not in stats:
            bounds[node.name] = iv = _sanitize(splits.start(node, iv))
        if watch and saturated(iv):
            watch = False
            if switch:
                w = iv.upper - iv.lower
                stats["ibp_from"] = {"node": node.name, "width": float(w.max()) if bool(torch.isfinite(w).all())
                                     else math.inf}
                refine = switch = False
            if progress:
                progress(f"{'ibp-from' if 'ibp_from' in stats else 'saturated'} {node.name}")
        if method == "ibp" and _unbounded_everywhere(iv):
            unbounded.add(node.name)

    out = bounds[graph.output]
    if method == "alpha" and "ibp_from" not in stats:
        out = optimize(ctx, graph.output, box, out, iters=options.alpha_iters, progress=progress)
        bounds[graph.output] = out
    seconds = time.perf_counter() - t0
    if arithmetic == "float32-probabilistic":
        stats["rounding_events"] = ctx.events
        stats["rounding_failure"] = fpprob.failure(ctx.events)
    nodes = {k: v.to("cpu") for k, v in bounds.items()}
    return BoundResult(out.lower.cpu(), out.upper.cpu(), nodes, method, seconds, stats)
