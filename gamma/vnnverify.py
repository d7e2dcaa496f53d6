"""Verify an ONNX model against a standard VNN-LIB property.

``verify_vnnlib(model, property, timeout)`` answers as VNN-COMP does:

* ``unsat``: no input of the box reaches the unsafe region (verified);
* ``sat``: a counterexample was found and confirmed by running the model
  (onnxruntime when installed, else gamma's float64 forward pass);
* ``unknown``: neither, in the time given; ``timeout``: the time ran out
  before a phase could decide.

Phases, cheapest first, per input box of the property: a PGD attack on the
unsafe cases; CROWN with the property's rows as the final linear layer
(spec as layer: the bounds are of ``C y + d`` itself, not of y); alpha-CROWN
on the cases still open if the time left allows.  A case (a conjunction of
rows ``C_k y + d_k <= 0``) is refuted when one of its rows has a certified
lower bound > 0.

Arithmetic: the bounds are of the real-valued network (``arithmetic="real"``
in :func:`gamma.bounds.compute_bounds`, as other VNN-COMP verifiers bound
it), with the ONNX file's float32 constants taken as exact; float32 rounding
of an inference engine is not covered.  Results are plain data.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .bounds import compute_bounds
from .errors import GammaError
from .graph import Graph, Node
from .io.onnx_load import load_onnx, read_bytes
from .ops import evaluate
from .vnnspec import Region, Spec, parse_vnnlib

ARITHMETIC = "real"
ATTACK_STEPS = 60
ATTACK_RESTARTS = 4
Progress = Optional[Callable[[str], None]]


@dataclass
class VnnResult:
    result: str                              # unsat | sat | unknown | timeout
    model: str
    property: str
    seconds: float
    phases: list = field(default_factory=list)
    counterexample: Optional[dict] = None    # {"x": [...], "y": [...], "checked_by": ...}
    over_time: bool = False                  # decided, but after the timeout

    def to_dict(self) -> dict:
        return {"result": self.result, "model": self.model, "property": self.property,
                "arithmetic": ARITHMETIC, "seconds": round(self.seconds, 3), "over_time": self.over_time,
                "phases": self.phases, "counterexample": self.counterexample}


# ---------------------------------------------------------------- spec as layer
def spec_graph(model: Graph, region: Region, rows: Optional[list] = None) -> Graph:
    """``z`` in [-1, 1]^n -> ``x = c + r z`` (the region's box) -> the model ->
    ``C y + d`` (the property's rows, all or ``rows``): shape (1, K)."""
    shape = model.input_shape
    c = ((region.lower + region.upper) / 2).reshape(shape)
    r = ((region.upper - region.lower) / 2).reshape(shape)
    g = Graph(f"{model.name}+spec", "box.z", shape)
    g.add("box.scale", "mul_const", "box.z", c=r)
    g.add("box.x", "add_const", "box.scale", c=c)
    for node in model:
        if node.op == "input":
            continue
        if node.name in g.nodes:
            raise GammaError(f"model node name {node.name} clashes with the property's nodes")
        ins = tuple("box.x" if i == model.input else i for i in node.inputs)
        g.nodes[node.name] = Node(node.name, node.op, ins, node.params, node.block, node.shape)
    g.output = model.output
    n_out = math.prod(model.output_shape)
    if tuple(model.output_shape) != (1, n_out):
        g.add("spec.flat", "reshape", model.output, in_shape=tuple(model.output_shape), shape=(1, n_out))
    idx = list(range(len(region.d))) if rows is None else rows
    g.add("spec", "linear", g.output, weight=region.C[idx].contiguous(), bias=region.d[idx].contiguous())
    return g.infer_shapes()


# ---------------------------------------------------------------- attack
def _in_box32(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x rounded to float32 values inside [lo, hi] (float64 comparison), as float64."""
    x32 = x.to(torch.float32)
    lo32, hi32 = lo.to(torch.float32), hi.to(torch.float32)
    up = torch.nextafter(lo32, torch.full_like(lo32, math.inf))
    lo32 = torch.where(lo32.double() < lo, up, lo32)                  # smallest float32 >= lo
    dn = torch.nextafter(hi32, torch.full_like(hi32, -math.inf))
    hi32 = torch.where(hi32.double() > hi, dn, hi32)                   # largest float32 <= hi
    return torch.minimum(torch.maximum(x32, lo32), hi32).double()


def attack(g: Graph, region: Region, deadline: float, seed: int = 0, steps: int = ATTACK_STEPS,
           restarts: int = ATTACK_RESTARTS) -> tuple[float, Optional[torch.Tensor], int]:
    """PGD (sign steps in the box's z coordinates) minimising, per case, the largest
    of its rows, on a float32 copy of ``g`` (candidates are confirmed by
    :func:`check_point`).  Returns (best value of any case, its z or None, case index)."""
    g = copy.deepcopy(g).to(dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    K = len(region.d)
    cases = region.cases
    member = torch.zeros(len(cases), K, dtype=torch.bool)
    for j, case in enumerate(cases):
        member[j, case] = True
    M = member.repeat(restarts, 1)                                    # (B, K)
    B = M.shape[0]
    shape = g.input_shape
    z = torch.rand((B, *shape), generator=gen, dtype=torch.float32) * 2 - 1
    z[:len(cases)] = 0                                                # one start at the centre per case
    best, best_z, best_case = math.inf, None, -1
    for step in range(steps):
        z = z.detach().requires_grad_(True)
        out = evaluate(g, z).reshape(B, K)
        loss = out.masked_fill(~M, -math.inf).amax(1)                 # (B,): <= 0 means unsafe
        (grad,) = torch.autograd.grad(loss.sum(), z)
        with torch.no_grad():
            i = int(loss.argmin())
            if float(loss[i]) < best:
                best, best_z, best_case = float(loss[i]), z[i].detach().double(), i % len(cases)
            size = 0.5 * (1 - step / steps) + 0.02
            z = (z - size * torch.sign(grad)).clamp(-1, 1)
        if best < 0 and step >= steps // 3 or time.perf_counter() > deadline:
            break
    return best, best_z, best_case


def check_point(model_path: str, model: Graph, region: Region, case: list, x: torch.Tensor) -> dict:
    """Run the model at x (float32 values in the box): onnxruntime if installed, else
    gamma's float64 forward pass; whether every row of ``case`` holds there."""
    y = None
    checked_by = "gamma float64 forward"
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(read_bytes(model_path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        y = torch.from_numpy(sess.run(None, {name: x.reshape(model.input_shape).float().numpy()})[0]).double()
        checked_by = "onnxruntime"
    except ImportError:
        y = evaluate(model, x.reshape(model.input_shape))
    y = y.reshape(-1)
    rows = region.C[case] @ y + region.d[case]
    inside = bool((x >= region.lower).all() and (x <= region.upper).all())
    return {"unsafe": inside and bool((rows <= 0).all()), "x": x.tolist(), "y": y.tolist(),
            "checked_by": checked_by, "worst_row": float(rows.max()) if len(case) else -math.inf}


# ---------------------------------------------------------------- the run
def verify_vnnlib(model_path: str, property_path: str, timeout: float = 100.0, alpha_iters: int = 20,
                  progress: Progress = None, seed: int = 0) -> VnnResult:
    t0 = time.perf_counter()
    if not (timeout > 0 and math.isfinite(timeout)):
        raise GammaError(f"--timeout must be a finite number of seconds > 0, got {timeout}")
    deadline = t0 + timeout
    model = load_onnx(model_path)
    spec: Spec = parse_vnnlib(property_path)
    spec.check_sizes(math.prod(model.input_shape), math.prod(model.output_shape), model_path)
    phases: list = []
    res = lambda r, cex=None: VnnResult(r, model_path, property_path, time.perf_counter() - t0, phases, cex,
                                        over_time=r in ("unsat", "sat") and time.perf_counter() > deadline)
    open_regions = []
    for k, region in enumerate(spec.regions):
        if any(not case for case in region.cases):                 # no output rows: the whole box is unsafe
            x = _in_box32((region.lower + region.upper) / 2, region.lower, region.upper)
            chk = check_point(model_path, model, region, [], x)
            phases.append({"phase": "attack", "region": k, "seconds": 0.0, "best": None, "found": True})
            return res("sat", chk)
        g = spec_graph(model, region)
        t = time.perf_counter()
        if progress:
            progress(f"region {k}: attack")
        best, z, case = attack(g, region, deadline, seed=seed)
        entry = {"phase": "attack", "region": k, "seconds": round(time.perf_counter() - t, 3), "best": best,
                 "found": False}
        phases.append(entry)
        if z is not None and best <= 0:
            x = _in_box32(region.lower + (region.upper - region.lower) / 2 * (1 + z.reshape(-1)), region.lower,
                          region.upper)
            chk = check_point(model_path, model, region, region.cases[case], x)
            entry["found"] = chk["unsafe"]
            if chk["unsafe"]:
                return res("sat", chk)
        open_regions.append((k, region, g, best))
    for k, region, g, best in open_regions:
        if time.perf_counter() > deadline:
            return res("timeout")
        verdict = _bound_region(k, region, g, model, deadline, alpha_iters, phases, progress)
        if verdict != "unsat":
            return res(verdict)
    return res("unsat")


def _bound_region(k: int, region: Region, g: Graph, model: Graph, deadline: float, alpha_iters: int,
                  phases: list, progress: Progress) -> str:
    """CROWN, then alpha on the open rows: 'unsat', 'unknown' or 'timeout'."""
    zero = torch.zeros(g.input_shape, dtype=torch.float64)
    t = time.perf_counter()
    r = compute_bounds(g, zero, 1.0, "crown", arithmetic=ARITHMETIC, progress=progress)
    t_crown = time.perf_counter() - t
    lower = r.lower.reshape(-1)
    done = _refuted(region.cases, lower > 0)
    phases.append({"phase": "crown", "region": k, "seconds": round(t_crown, 3), "cases": len(region.cases),
                   "refuted": sum(done), "worst_lower": _worst(region.cases, lower)})
    if all(done):
        return "unsat"
    left = deadline - time.perf_counter()
    # one alpha iteration is one output pass (about half a CROWN run on the vit models): 1.5x as a margin
    iters = min(alpha_iters, int(left / (1.5 * t_crown + 1e-9)) - 1)
    if iters < 1:
        return "unknown" if left > 0 else "timeout"
    open_rows = sorted({i for c, ok in zip(region.cases, done) if not ok for i in c if not lower[i] > 0})
    g2 = spec_graph(model, region, open_rows)
    t = time.perf_counter()
    r2 = compute_bounds(g2, zero, 1.0, "alpha", arithmetic=ARITHMETIC, alpha_iters=iters, progress=progress)
    lower2 = lower.clone()
    lower2[open_rows] = torch.maximum(lower[open_rows], r2.lower.reshape(-1))
    done = _refuted(region.cases, lower2 > 0)
    phases.append({"phase": "alpha", "region": k, "seconds": round(time.perf_counter() - t, 3), "iters": iters,
                   "cases": len(region.cases), "refuted": sum(done), "worst_lower": _worst(region.cases, lower2)})
    if all(done):
        return "unsat"
    return "unknown" if time.perf_counter() <= deadline else "timeout"


def _refuted(cases: list, positive: torch.Tensor) -> list:
    return [bool(positive[c].any()) for c in cases]


def _worst(cases: list, lower: torch.Tensor) -> float:
    """The smallest over cases of the best certified row lower bound (> 0: all refuted)."""
    return min(float(lower[c].max()) for c in cases)


# ---------------------------------------------------------------- output
def counterexample_text(result: VnnResult) -> str:
    """VNN-COMP result file: the result line, then for sat the assignment
    ``((X_0 v) ... (Y_0 v) ...)`` of the confirmed counterexample."""
    if result.result != "sat" or result.counterexample is None:
        return result.result + "\n"
    cex = result.counterexample
    lines = [f"(X_{i} {repr(float(v))})" for i, v in enumerate(cex["x"])]
    lines += [f"(Y_{i} {repr(float(v))})" for i, v in enumerate(cex["y"])]
    return "sat\n(" + "\n ".join(lines) + ")\n"


def write_counterexample(path: str, result: VnnResult) -> None:
    try:
        with open(path, "w") as f:
            f.write(counterexample_text(result))
    except OSError as e:
        raise GammaError(f"{path}: cannot write ({e.strerror or e})") from None


def result_lines(result: VnnResult) -> list:
    out = [f"result: {result.result}" + (" (decided after the timeout)" if result.over_time else ""),
           f"model: {result.model}",
           f"property: {result.property}",
           "arithmetic: real (bounds of the real-valued network with the file's float32 constants as exact; "
           "float32 rounding of an inference engine is not covered)"]
    for p in result.phases:
        where = f"region {p['region']} " if p.get("region") else ""
        if p["phase"] == "attack":
            best = "n/a" if p["best"] is None else f"{p['best']:+.6g}"
            out.append(f"{where}attack (PGD): smallest unsafe-case value {best} "
                       f"({'counterexample' if p['found'] else 'no counterexample'}) [{p['seconds']:.2f} s]")
        else:
            extra = f", {p['iters']} iterations" if "iters" in p else ""
            out.append(f"{where}{p['phase']}: {p['refuted']}/{p['cases']} unsafe cases refuted, worst certified "
                       f"margin {p['worst_lower']:+.6g}{extra} [{p['seconds']:.2f} s]")
    if result.counterexample is not None:
        out.append(f"counterexample checked by {result.counterexample['checked_by']}")
    out.append(f"time: {result.seconds:.2f} s")
    return out
