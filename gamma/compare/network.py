"""The difference network of two graphs, its bounds, the attack on it, and one comparison
(:func:`compare_graphs`) on graphs already built.  See :mod:`gamma.compare`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..attack import pgd_points, sample_points
from ..bounds import compute_bounds
from ..bounds.interval import Interval
from ..errors import GammaError
from ..graph import Graph, Node
from ..ops import evaluate
from ..progress import BoundsEstimate

Progress = Optional[Callable[[str], None]]
VERDICTS = ("equivalent", "not equivalent", "unknown")


# ------------------------------------------------------------------ the difference network
@dataclass
class DiffGraph:
    graph: Graph            # input -> ... -> "diff" (reference - target), shape of either output
    ref_output: str         # merged name of the reference's output node
    tgt_output: str
    identical: bool         # both outputs are one node: the difference is exactly 0
    ref_nodes: int          # non-input nodes of each source graph
    tgt_nodes: int
    shared_nodes: int       # merged nodes used by both models


def same_params(a: dict, b: dict) -> bool:
    """Identical parameters: tensors bitwise (dtype, shape, values), the rest by ==."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or not bool(x == y):
            return False
    return True


def difference_graph(ref: Graph, tgt: Graph, merge: bool = True, name: str = "difference") -> DiffGraph:
    """One graph computing ``ref(x) - tgt(x)`` with a shared input ``x``."""
    if tuple(ref.input_shape) != tuple(tgt.input_shape):
        raise GammaError(f"the two graphs take inputs of shape {tuple(ref.input_shape)} and {tuple(tgt.input_shape)}")
    if tuple(ref.output_shape) != tuple(tgt.output_shape):
        raise GammaError(f"the two outputs have shapes {tuple(ref.output_shape)} and {tuple(tgt.output_shape)}")
    # pass 1: merged nodes as [source node, merged input ids, users]; id 0 is the shared input
    merged: list[list] = [[None, (), {"ref", "tgt"}]]
    buckets: dict[tuple, list[int]] = {}
    outputs = {}
    for tag, src in (("ref", ref), ("tgt", tgt)):
        ids = {src.input: 0}
        for node in src:
            if node.op == "input":
                continue
            ins = tuple(ids[i] for i in node.inputs)
            hit = None
            for j in buckets.get((node.op, ins), ()) if merge else ():
                if same_params(merged[j][0].params, node.params):
                    hit = j
                    break
            if hit is None:
                hit = len(merged)
                merged.append([node, ins, set()])
                buckets.setdefault((node.op, ins), []).append(hit)
            merged[hit][2].add(tag)
            ids[node.name] = hit
        outputs[tag] = ids[src.output]
    # pass 2: emit in creation order (topological: inputs are always created first)
    g = Graph(name, ref.input, ref.input_shape)
    names = {0: ref.input}
    for j, (node, ins, users) in enumerate(merged[1:], 1):
        prefix = "shared." if len(users) == 2 else f"{users.pop()}."
        names[j] = prefix + node.name
        g.nodes[names[j]] = Node(names[j], node.op, tuple(names[i] for i in ins), dict(node.params),
                                 node.block, tuple(node.shape))
    r, t = names[outputs["ref"]], names[outputs["tgt"]]
    neg = g.add("diff.neg_target", "mul_const", t, c=-1.0)
    g.add("diff", "add", r, neg)
    for n in (neg, "diff"):
        g.nodes[n].shape = tuple(ref.output_shape)
    g.meta = dict(ref.meta, difference=True)
    count = lambda s: sum(1 for n in s if n.op != "input")
    return DiffGraph(g, r, t, r == t, count(ref), count(tgt),
                     sum(1 for node, _, users in merged[1:] if len(users) == 2))


# ------------------------------------------------------------------ bounds
@dataclass
class DiffBounds:
    lower: torch.Tensor                 # certified: joint intersected with naive (or exactly 0)
    upper: torch.Tensor
    joint: Optional[Interval]           # the difference network's own bound (None when identical)
    naive: Optional[Interval]           # [l_ref - u_tgt, u_ref - l_tgt] from independent bounds
    seconds: float
    naive_seconds: float = 0.0


def bound_difference(dg: DiffGraph, ref: Graph, tgt: Graph, center: torch.Tensor, eps: float,
                     method: str = "crown", naive: bool = True, progress: Progress = None, **opts) -> DiffBounds:
    """Sound bounds of ``ref(x') - tgt(x')`` over the box; ``opts`` go to compute_bounds."""
    t0 = time.perf_counter()
    joint = None
    if dg.identical:
        zero = torch.zeros(dg.graph.output_shape, dtype=torch.float64)
        lower, upper = zero, zero.clone()
    else:
        res = compute_bounds(dg.graph, center, eps, method, progress=_estimate(progress, dg.graph, "difference"),
                             **opts)
        joint = Interval(res.lower.double(), res.upper.double())
        lower, upper = joint.lower, joint.upper
    seconds = time.perf_counter() - t0
    nv, t_naive = None, 0.0
    if naive:
        t0 = time.perf_counter()
        a = compute_bounds(ref, center, eps, method, progress=_estimate(progress, ref, "naive 1/2 (reference)"),
                           **opts)
        b = compute_bounds(tgt, center, eps, method, progress=_estimate(progress, tgt, "naive 2/2 (target)"),
                           **opts)
        nv = Interval(a.lower.double() - b.upper.double(), a.upper.double() - b.lower.double())
        t_naive = time.perf_counter() - t0
        if not dg.identical:                       # two sound enclosures: their intersection is sound
            lower, upper = torch.maximum(lower, nv.lower), torch.minimum(upper, nv.upper)
    return DiffBounds(lower, upper, joint, nv, seconds, t_naive)


def _estimate(progress: Progress, graph: Graph, label: str) -> Progress:
    return BoundsEstimate(progress, graph, label) if progress else None


# ------------------------------------------------------------------ attack
@dataclass
class DiffAttack:
    lower: torch.Tensor                 # elementwise min / max of the differences seen
    upper: torch.Tensor
    max_abs: float
    worst_input: torch.Tensor           # input of the largest |difference| seen
    worst_index: tuple
    points: int
    violations: int                     # differences outside the certified bounds (if given)
    seconds: float


def attack_difference(graph: Graph, center: torch.Tensor, eps: float, lower: Optional[torch.Tensor] = None,
                      upper: Optional[torch.Tensor] = None, *, samples: int = 256, steps: int = 20,
                      restarts: int = 2, n_targets: int = 8, seed: int = 0, chunk: int = 64) -> DiffAttack:
    """Largest |difference| found: the centre, box samples (a quarter at corners) and
    projected sign-gradient ascent/descent on random outputs, the nominal
    extremes and (given bounds) the outputs with the widest certified bound."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    fn = lambda x: evaluate(graph, x)              # float64: the real-valued difference
    with torch.no_grad():
        nominal = fn(center[None])[0]
    pts = [center[None]]
    if samples > 0:
        pts.append(sample_points(center, eps, samples, gen))
    if steps > 0 and restarts > 0:
        flat = nominal.reshape(-1)
        idx = [torch.randperm(flat.numel(), generator=gen)[:n_targets], flat.argmax()[None], flat.argmin()[None]]
        if lower is not None:
            idx += [upper.reshape(-1).argmax()[None], lower.reshape(-1).argmin()[None]]
        targets = torch.unique(torch.cat(idx))
        pts.append(pgd_points(fn, center, eps, flat.numel(), gen, steps=steps, restarts=restarts, targets=targets))
    lo = hi = worst = None
    best, n, bad, where = -1.0, 0, 0, 0
    for p in pts:
        for c in torch.split(p, chunk):
            with torch.no_grad():
                y = fn(c).double()
            n += len(c)
            lo = y.min(0).values if lo is None else torch.minimum(lo, y.min(0).values)
            hi = y.max(0).values if hi is None else torch.maximum(hi, y.max(0).values)
            a = y.abs().reshape(len(c), -1)
            m, k = a.max(1)
            i = int(m.argmax())
            if float(m[i]) > best or math.isnan(float(m[i])):
                best, worst, where = float(m[i]), c[i].clone(), int(k[i])
            if lower is not None:
                bad += int(((y < lower) | (y > upper) | torch.isnan(y)).sum())
    index = tuple(int(v) for v in np.unravel_index(where, tuple(nominal.shape))) if nominal.dim() else ()
    return DiffAttack(lo, hi, best, worst, index, n, bad, time.perf_counter() - t0)


# ------------------------------------------------------------------ one comparison
def abs_max(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """max(|lower|, |upper|) elementwise; NaN stays NaN."""
    m = torch.maximum(lower.abs(), upper.abs())
    return torch.where(torch.isnan(lower) | torch.isnan(upper), math.nan, m)


def max_value(t: torch.Tensor) -> float:
    """Largest entry as a float (nan if any entry is nan; 0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    return math.nan if bool(torch.isnan(t).any()) else float(t.max())


def verdict(certified: float, empirical: float, tolerance: Optional[float]) -> Optional[str]:
    if tolerance is None:
        return None
    if math.isfinite(certified) and certified <= tolerance:
        return "equivalent"
    if empirical > tolerance:
        return "not equivalent"
    return "unknown"


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def compare_graphs(ref: Graph, tgt: Graph, center: torch.Tensor, eps: float, tolerance: Optional[float] = None, *,
                   method: str = "crown", merge: bool = True, naive: bool = True, attack: Optional[dict] = None,
                   top: int = 5, progress: Progress = None, **opts) -> tuple[dict, Optional[torch.Tensor]]:
    """Bound and attack ``ref - tgt`` over the box; (report, input of the largest |difference| found)."""
    t0 = time.perf_counter()
    if progress:
        progress("building the difference network" + (" (merging identical computations)" if merge else ""))
    dg = difference_graph(ref, tgt, merge)
    t_graph = time.perf_counter() - t0
    b = bound_difference(dg, ref, tgt, center, eps, method, naive, progress, **opts)
    if dg.identical:
        zero = torch.zeros_like(b.lower)
        att = DiffAttack(zero, zero, 0.0, center.clone(), (0,) * center.dim(), 1, 0, 0.0)
    else:
        if progress:
            progress("attacking the difference")
        att = attack_difference(dg.graph, center.cpu(), eps, b.lower, b.upper, **(attack or {}))
    cert = abs_max(b.lower, b.upper)
    emp = abs_max(att.lower, att.upper)
    nav = abs_max(b.naive.lower, b.naive.upper) if b.naive is not None else None
    c_max, e_max = max_value(cert), att.max_abs
    n_max = max_value(nav) if nav is not None else None
    c_width = max_value(b.upper - b.lower)
    n_width = max_value(b.naive.width()) if b.naive is not None else None
    rep: dict[str, Any] = {
        "difference_graph": {"reference_nodes": dg.ref_nodes, "target_nodes": dg.tgt_nodes,
                             "shared_nodes": dg.shared_nodes, "nodes": len(dg.graph) - 1,
                             "identical": dg.identical, "merged": merge},
        "output_shape": list(dg.graph.output_shape),
        "certified_max": c_max, "certified_mean": float(cert.mean()) if cert.numel() else 0.0,
        "certified_width": c_width,
        "joint_max": 0.0 if b.joint is None else max_value(abs_max(b.joint.lower, b.joint.upper)),
        "joint_width": 0.0 if b.joint is None else max_value(b.joint.width()),
        "naive_max": n_max, "naive_width": n_width,
        "gain": None if n_width is None else (n_width / c_width if c_width > 0 else math.inf),
        "empirical_max": e_max,
        "nominal_max": max_value(evaluate(dg.graph, center.cpu()).abs()) if not dg.identical else 0.0,
        "tightness": (e_max / c_max) if c_max > 0 else 1.0,
        "violations": att.violations, "points": att.points,
        "worst_empirical_index": list(att.worst_index),
        "verdict": verdict(c_max, e_max, tolerance),
        "per_position": [],
        "worst": [],
        "seconds": {"graph": t_graph, "bounds": b.seconds, "naive": b.naive_seconds, "attack": att.seconds},
    }
    rc, re_, rn = _rows(cert), _rows(emp), _rows(nav) if nav is not None else None
    for i in range(rc.shape[0]):
        rep["per_position"].append({"index": i, "certified_max": max_value(rc[i]), "empirical_max": max_value(re_[i]),
                                    "naive_max": max_value(rn[i]) if rn is not None else None})
    flat = torch.nan_to_num(cert.reshape(-1), nan=math.inf)
    for k in torch.argsort(flat, descending=True)[:top].tolist():
        idx = [int(v) for v in np.unravel_index(k, tuple(cert.shape))] if cert.dim() else []
        w = {"index": idx, "certified": [float(b.lower.reshape(-1)[k]), float(b.upper.reshape(-1)[k])],
             "empirical": [float(att.lower.reshape(-1)[k]), float(att.upper.reshape(-1)[k])]}
        if b.naive is not None:
            w["naive"] = [float(b.naive.lower.reshape(-1)[k]), float(b.naive.upper.reshape(-1)[k])]
        rep["worst"].append(w)
    return rep, att.worst_input
