"""Certified comparison of two versions of a model (``gamma compare``, ``gamma diff``).

Question: over the L-inf box ``[x - eps, x + eps]`` around the reference's
input point, can ``reference(x') - target(x')`` exceed a tolerance anywhere?

The *difference network* is one graph with one shared input node holding both
models' graphs (node names prefixed ``ref.`` / ``tgt.``), ending in::

    diff = add(ref_out, mul_const(tgt_out, -1))             # reference - target

Identical sub-computations (same op, identical parameters, same merged
inputs) are merged into one ``shared.`` node (common-subexpression
elimination), so shared parts are one node and cancel exactly; CROWN and
zonotopes keep the shared input symbolic, so the two models' dependence on
it cancels as far as their weights agree.  Subtracting two independently
bounded outputs (the *naive* bound ``[l1 - u2, u1 - l2]``) cancels nothing.

What the bounds cover: the exact real-valued difference, and the difference
of the two models evaluated in float32 by one deterministic engine (a merged
node is computed once, so identical computations give identical values).  If
both outputs merge into one node the difference is exactly 0.  With
``merge=False`` no node is shared and the bounds also hold when the two models
run on different float32 engines; the naive bound always does.

Results are plain data; nothing here prints.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .attack import pgd_points, sample_points
from .bounds import compute_bounds
from .bounds.interval import Interval
from .errors import GammaError
from .graph import Graph, Node
from .model import Model
from .ops import evaluate
from .progress import BoundsEstimate, CountEstimate
from .verify import check_epsilon, load, parse_tokens, select_blocks, versions

Progress = Optional[Callable[[str], None]]
VERDICTS = ("equivalent", "not equivalent", "unknown")

# config fields that must agree for the two graphs to be comparable (vocab: only for logits)
STRUCTURE = {
    "whisper": ("d_model", "n_mels", "encoder_layers", "encoder_heads", "encoder_ffn_dim",
                "decoder_layers", "decoder_heads", "decoder_ffn_dim"),
    "llama": ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"),
    "qwen3": ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"),
}


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
def _abs_max(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """max(|lower|, |upper|) elementwise; NaN stays NaN."""
    m = torch.maximum(lower.abs(), upper.abs())
    return torch.where(torch.isnan(lower) | torch.isnan(upper), math.nan, m)


def _fmax(t: torch.Tensor) -> float:
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
    dg.graph.to("cpu")
    if dg.identical:
        zero = torch.zeros_like(b.lower)
        att = DiffAttack(zero, zero, 0.0, center.clone(), (0,) * center.dim(), 1, 0, 0.0)
    else:
        if progress:
            progress("attacking the difference")
        att = attack_difference(dg.graph, center.cpu(), eps, b.lower, b.upper, **(attack or {}))
    cert = _abs_max(b.lower, b.upper)
    emp = _abs_max(att.lower, att.upper)
    nav = _abs_max(b.naive.lower, b.naive.upper) if b.naive is not None else None
    c_max, e_max = _fmax(cert), att.max_abs
    n_max = _fmax(nav) if nav is not None else None
    c_width = _fmax(b.upper - b.lower)
    n_width = _fmax(b.naive.width()) if b.naive is not None else None
    rep: dict[str, Any] = {
        "difference_graph": {"reference_nodes": dg.ref_nodes, "target_nodes": dg.tgt_nodes,
                             "shared_nodes": dg.shared_nodes, "nodes": len(dg.graph) - 1,
                             "identical": dg.identical, "merged": merge},
        "output_shape": list(dg.graph.output_shape),
        "certified_max": c_max, "certified_mean": float(cert.mean()) if cert.numel() else 0.0,
        "certified_width": c_width,
        "joint_max": 0.0 if b.joint is None else _fmax(_abs_max(b.joint.lower, b.joint.upper)),
        "joint_width": 0.0 if b.joint is None else _fmax(b.joint.width()),
        "naive_max": n_max, "naive_width": n_width,
        "gain": None if n_width is None else (n_width / c_width if c_width > 0 else math.inf),
        "empirical_max": e_max,
        "nominal_max": _fmax(evaluate(dg.graph, center.cpu()).abs()) if not dg.identical else 0.0,
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
        rep["per_position"].append({"index": i, "certified_max": _fmax(rc[i]), "empirical_max": _fmax(re_[i]),
                                    "naive_max": _fmax(rn[i]) if rn is not None else None})
    flat = torch.nan_to_num(cert.reshape(-1), nan=math.inf)
    for k in torch.argsort(flat, descending=True)[:top].tolist():
        idx = [int(v) for v in np.unravel_index(k, tuple(cert.shape))] if cert.dim() else []
        w = {"index": idx, "certified": [float(b.lower.reshape(-1)[k]), float(b.upper.reshape(-1)[k])],
             "empirical": [float(att.lower.reshape(-1)[k]), float(att.upper.reshape(-1)[k])]}
        if b.naive is not None:
            w["naive"] = [float(b.naive.lower.reshape(-1)[k]), float(b.naive.upper.reshape(-1)[k])]
        rep["worst"].append(w)
    return rep, att.worst_input


# ------------------------------------------------------------------ runs on two checkpoints
@dataclass
class CompareResult:
    """What one run found: ``report`` is the JSON object (floats may be non-finite;
    encode with :func:`gamma.verify.json_safe`); ``counterexample`` is an input
    whose |difference| exceeds the tolerance (block-wise: that block's input)."""
    report: dict
    counterexample: Optional[torch.Tensor] = None
    worst_input: Optional[torch.Tensor] = None

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    @property
    def verdict(self) -> Optional[str]:
        return self.report.get("verdict")

    def save_counterexample(self, path: str) -> bool:
        """Write the counterexample (float64 .npy); False when there is none."""
        if self.counterexample is None:
            return False
        try:
            with open(path, "wb") as f:
                np.save(f, self.counterexample.detach().cpu().double().numpy())
        except OSError as e:
            raise GammaError(f"{path}: cannot write ({e.strerror or e})") from None
        return True


def _model(m) -> tuple[Model, float]:
    if isinstance(m, Model):
        return m, 0.0
    t0 = time.perf_counter()
    return load(m), time.perf_counter() - t0


def check_compatible(ref: Model, tgt: Model, output: str = "hidden") -> None:
    """GammaError naming the first architecture or size mismatch."""
    if ref.arch != tgt.arch:
        raise GammaError(f"reference and target differ in architecture: {ref.arch} vs {tgt.arch}")
    fields = STRUCTURE[ref.arch] + (("vocab_size",) if output == "logits" else ())
    for f in fields:
        a, b = getattr(ref.config, f), getattr(tgt.config, f)
        if a != b:
            raise GammaError(f"reference and target differ in {f}: {a} vs {b}")


def _describe(m: Model) -> dict:
    dtypes: dict[str, int] = {}
    for t in m.ckpt.dtypes.values():
        dtypes[t] = dtypes.get(t, 0) + 1
    return {"path": m.path, "format": m.ckpt.format, "arch": m.arch, "dtypes": dtypes}


def _same_file(a, b) -> bool:
    if isinstance(a, Model) or isinstance(b, Model):
        return False
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return False


def _setup(reference, target, component, seq_len, tokens, input_path, center, output, progress: Progress = None):
    if progress and not isinstance(reference, Model):
        progress("loading the reference")
    ref, t_ref = _model(reference)
    if _same_file(reference, target):                 # one checkpoint against itself: load it once
        tgt, t_tgt = ref, 0.0
    else:
        if progress and not isinstance(target, Model):
            progress("loading the target")
        tgt, t_tgt = _model(target)
    check_compatible(ref, tgt, output)
    t0 = time.perf_counter()
    comp = ref.component(component)
    point = ref.input_point(comp, seq_len, input_path=input_path, tokens=parse_tokens(tokens), center=center)
    seq = point.x.shape[-1] // 2 if comp == "encoder" else point.x.shape[-2]
    graphs = ref.graph(comp, seq, output), tgt.graph(comp, seq, output)
    head = {
        "reference": _describe(ref), "target": _describe(tgt), "component": comp, "output": output,
        "seq_len": seq, "input_point": {"description": point.description, "shape": list(point.x.shape),
                                        "tokens": point.tokens},
    }
    return head, point.x, graphs, {"load": t_ref + t_tgt, "graph": time.perf_counter() - t0}


def compare(reference, target, epsilon: float, tolerance: Optional[float] = None, method: str = "crown", *,
            component: Optional[str] = None, seq_len: int = 8, tokens=None, input_path: Optional[str] = None,
            center: Optional[str] = None, output: str = "hidden", block_wise: bool = False, blocks=None,
            merge: bool = True, naive: bool = False, samples: int = 256, attack_steps: int = 20,
            restarts: int = 2, seed: int = 0, intermediate: str = "crown", device: str = "cpu",
            alpha_iters: int = 20, progress: Progress = None) -> CompareResult:
    """Certified max |reference - target| over the box of radius ``epsilon`` at
    the reference's input point (block-wise: every selected block over the
    reference's nominal block input +- epsilon).

    ``naive``: also bound each model on its own and report the naive bound
    ``[l_ref - u_tgt, u_ref - l_tgt]`` (intersected with the joint one).  Off
    by default: it costs two more whole-model bounds, each as long as
    ``gamma verify --full`` on one model (over 14 minutes for SmolLM2-135M
    compared with itself, where the joint bound is free)."""
    t_start = time.perf_counter()
    eps = check_epsilon(epsilon)
    if tolerance is not None and not (math.isfinite(float(tolerance)) and float(tolerance) >= 0):
        raise GammaError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    for name, v, low in (("--samples", samples, 0), ("--attack-steps", attack_steps, 0), ("--restarts", restarts, 0)):
        if int(v) < low:
            raise GammaError(f"{name} must be >= {low}, got {v}")
    if blocks is not None and not block_wise:
        raise GammaError("--blocks applies to --block-wise runs")
    head, x, (g_ref, g_tgt), timings = _setup(reference, target, component, seq_len, tokens, input_path,
                                              center, output, progress)
    tol = None if tolerance is None else float(tolerance)
    opts = dict(method=method, merge=merge, naive=naive, progress=progress, intermediate=intermediate,
                device=device, alpha_iters=alpha_iters,
                attack=dict(samples=int(samples), steps=int(attack_steps), restarts=int(restarts), seed=seed))
    report: dict[str, Any] = {"command": "compare", "mode": "block_wise" if block_wise else "full", **head,
                              "method": method, "epsilon": eps, "tolerance": tol, "merged": merge}
    result = CompareResult(report)
    if not block_wise:
        body, worst = compare_graphs(g_ref, g_tgt, x, eps, tol, **opts)
        report.update(body)
        result.worst_input = worst
        if body["verdict"] == "not equivalent":
            result.counterexample = worst
    else:
        names = g_ref.blocks()
        picked = select_blocks(blocks, len(names))
        values = evaluate(g_ref, x, keep_all=True)
        rows = []
        blocks_eta = CountEstimate(progress, len(picked)) if progress else None
        for j, k in enumerate(picked):
            b = names[k]
            sub_r, sub_t = g_ref.block_graph(b), g_tgt.block_graph(b)
            xb = values[sub_r.input]
            tag = blocks_eta.start(j, b) if blocks_eta else ""
            opts_b = dict(opts, progress=(lambda m, tag=tag: progress(f"{tag}: {m}")) if progress else None)
            body, worst = compare_graphs(sub_r, sub_t, xb, eps, tol, **opts_b)
            body.pop("per_position")
            rows.append({"block_index": k, "block_name": b, **body})
            if body["verdict"] == "not equivalent" and result.counterexample is None:
                result.counterexample = worst
                report["counterexample_block"] = b
        report["selected_blocks"] = picked
        report["blocks"] = rows
        report["by_drift"] = [r["block_name"] for r in sorted(rows, key=lambda r: -_drift_key(r["certified_max"]))]
        for key in ("certified_max", "empirical_max", "naive_max"):
            vals = [r[key] for r in rows if r[key] is not None]
            report[key] = (math.nan if any(math.isnan(v) for v in vals) else max(vals)) if vals else None
        report["violations"] = sum(r["violations"] for r in rows)
        vs = [r["verdict"] for r in rows]
        report["verdict"] = None if tol is None else ("equivalent" if all(v == "equivalent" for v in vs) else
                                                      "not equivalent" if "not equivalent" in vs else "unknown")
    report["versions"] = versions()
    report["timings"] = {**timings, "total": time.perf_counter() - t_start}
    return result


def _drift_key(v: float) -> float:
    return math.inf if math.isnan(v) else v


# ------------------------------------------------------------------ point-wise diff
def diff(reference, target, *, component: Optional[str] = None, seq_len: int = 8, tokens=None,
         input_path: Optional[str] = None, center: Optional[str] = None, output: str = "hidden",
         tolerance: float = 0.0) -> dict:
    """Nominal outputs and every intermediate node of the two graphs at the
    reference's input point (float64), node by node: max |ref - tgt| per node
    (nodes matched by name) and the first node whose difference exceeds
    ``tolerance`` (default 0: the first node that differs at all)."""
    t_start = time.perf_counter()
    if not (math.isfinite(float(tolerance)) and float(tolerance) >= 0):
        raise GammaError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    tol = float(tolerance)
    head, x, (g_ref, g_tgt), timings = _setup(reference, target, component, seq_len, tokens, input_path,
                                              center, output)
    t0 = time.perf_counter()
    with torch.no_grad():
        v_ref, v_tgt = evaluate(g_ref, x, keep_all=True), evaluate(g_tgt, x, keep_all=True)
    nodes, first, only_ref = [], None, []
    for node in g_ref:
        if node.op == "input":
            continue
        if node.name not in v_tgt or tuple(v_tgt[node.name].shape) != tuple(v_ref[node.name].shape):
            only_ref.append(node.name)
            continue
        a, b = v_ref[node.name], v_tgt[node.name]
        d = _fmax((a - b).abs().reshape(-1))
        scale = _fmax(a.abs().reshape(-1))
        rec = {"name": node.name, "layer_type": node.op, "block": node.block, "max_abs_diff": d,
               "max_abs_reference": scale, "relative": d / scale if scale > 0 else (0.0 if d == 0 else math.inf)}
        nodes.append(rec)
        if first is None and not d <= tol:
            first = rec
    out = _fmax((v_ref[g_ref.output] - v_tgt[g_tgt.output]).abs().reshape(-1))
    blocks = []
    for b in g_ref.blocks():
        recs = [r for r in nodes if r["block"] == b]
        if recs:
            worst = max(recs, key=lambda r: _drift_key(r["max_abs_diff"]))
            _, o = g_ref.block_io(b)
            by_name = {r["name"]: r["max_abs_diff"] for r in recs}
            blocks.append({"block_name": b, "output_diff": by_name.get(o),
                           "max_node_diff": worst["max_abs_diff"], "worst_node": worst["name"]})
    return {"command": "diff", **head, "tolerance": tol, "output_node": g_ref.output,
            "output_max_abs_diff": out, "within_tolerance": out <= tol, "first_exceeding": first,
            "nodes": nodes, "blocks": blocks,
            "only_in_reference": only_ref, "only_in_target": [n for n in v_tgt if n not in v_ref],
            "versions": versions(),
            "timings": {**timings, "evaluate": time.perf_counter() - t0, "total": time.perf_counter() - t_start}}
