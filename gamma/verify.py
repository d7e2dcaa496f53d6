"""Verification runs: the whole network, layer by layer, or block by block.

Three modes, one entry point (:func:`verify`):

* ``full`` (default): sound bounds of the network output over the L-inf box
  ``[x - eps, x + eps]`` around the input point ``x``, with the width of
  every node on the way.
* ``layer_by_layer``: the same run, reported as width growth node by node and
  block by block, naming the first node where the bounds degrade.
* ``block_wise``: every block verified on its own, over its nominal input
  (the value the exact float64 forward pass gives it at ``x``) +- eps.  This
  measures each block's sensitivity; it does not bound the whole network.
  The checkpoint is loaded lazily and the blocks come one at a time from the
  model's block plan (:mod:`gamma.blocks`): a Llama / Qwen3 model of any size
  needs one block's weights in memory, not the model's.

A node *degrades* when its bounds contain NaN or inf, or *saturate*: width
above :data:`SATURATION_WIDTH`, or a softmax whose output width reaches
:data:`SOFTMAX_SATURATION` (the [0, 1] bound is then nearly vacuous).

Results are plain data (:class:`VerifyResult`); nothing here prints.
:meth:`VerifyResult.to_dict` is the ``--json`` object described by
``gamma/schemas/verify.schema.json``: NaN and inf are written as null, with
``has_nan`` / ``has_infinite`` flags saying which.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__, bounds, parallel, tightness
from .attack import AttackConfig
from .bounds import ARITHMETIC, METHODS
from .bounds.engine import INTERMEDIATE       # crown, cut, ibp
from .errors import GammaError
from .graph import Graph
from .model import InputPoint, Model
from .ops import evaluate
from .vnnlib import Assertion, check_property, parse_property

MODES = ("full", "layer_by_layer", "block_wise")

SATURATION_WIDTH = 1e6       # a node whose bound is wider than this carries no information
SOFTMAX_SATURATION = 0.99    # a softmax output bound this wide is nearly [0, 1]
MODERATE_SENSITIVITY = 1e3   # block status thresholds on max output width / input width
HIGH_SENSITIVITY = 1e6

Progress = Optional[Callable[[str], None]]


# ------------------------------------------------------------------ loading
def load(path: Optional[Union[str, os.PathLike]] = None, lazy: bool = False) -> Model:
    """Load a checkpoint (safetensors / GGUF / CTranslate2 / PyTorch, detected
    by content).  ``None`` loads the default real model, Whisper tiny.en.
    ``lazy``: read the header only; each tensor is read from the file when a
    graph uses it (GGUF and safetensors; :mod:`gamma.io.lazy`)."""
    if path is None:
        from .io.zoo import whisper_tiny_en
        path = whisper_tiny_en()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GammaError(f"{path}: no such file or directory")
    from .io import load_checkpoint
    return Model(load_checkpoint(path, lazy=lazy))


def _as_model(model, lazy: bool = False) -> tuple[Model, float]:
    if isinstance(model, Model):
        return model, 0.0
    t0 = time.perf_counter()
    m = load(model, lazy=lazy)
    return m, time.perf_counter() - t0


# ------------------------------------------------------------------ validation
def check_epsilon(epsilon, shown: Optional[str] = None) -> float:
    """A finite float > 0, or GammaError naming the value as the user wrote it."""
    shown = str(epsilon) if shown is None else shown
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        eps = float("nan")
    if not (math.isfinite(eps) and eps > 0):
        raise GammaError(f"--epsilon must be a finite number > 0, got {shown}")
    return eps


def parse_tokens(text: Union[str, Sequence[int], None]) -> Optional[list[int]]:
    """``"1,2,3"`` -> [1, 2, 3]."""
    if text is None or not isinstance(text, str):
        return None if text is None else [int(t) for t in text]
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GammaError(f"--tokens must be comma-separated integers, got '{text}'") from None
    if not tokens:
        raise GammaError("--tokens is empty")
    return tokens


def select_blocks(spec, n: int) -> list[int]:
    """Block indices from ``"0:4"`` (slice), ``"3"`` or ``"0,2,5"`` (negative
    indices count from the end).  Indices outside the model are an error."""
    if spec is None:
        return list(range(n))
    text = spec if isinstance(spec, str) else ",".join(str(int(i)) for i in spec)
    s = text.replace(" ", "")
    where = f"--blocks {text}: the model has {n} blocks (0..{n - 1})"
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            ints = [int(p) if p else None for p in parts]
            if len(ints) == 3 and ints[2] == 0:
                raise GammaError(f"--blocks {text}: slice step cannot be zero")
            for v in ints[:2]:
                if v is not None and not -n <= v <= n:
                    raise GammaError(f"{where}; {v} is out of range")
            picked = list(range(n))[slice(*ints)]
        else:
            picked = []
            for v in (int(p) for p in s.split(",")):
                if not -n <= v < n:
                    raise GammaError(f"{where}; block {v} is out of range")
                if v % n not in picked:
                    picked.append(v % n)
    except ValueError:
        raise GammaError(f"--blocks must be a slice (0:4), an index (3) or a list (0,2,5), got '{text}'") from None
    if not picked:
        raise GammaError(f"{where}; '{text}' selects none")
    return picked


def _check_options(method: str, intermediate: str, device: str, tolerance, worst_k: int,
                   arithmetic: str = "float32") -> None:
    if arithmetic not in ARITHMETIC:
        raise GammaError(f"unknown --arithmetic '{arithmetic}' (choose from {', '.join(ARITHMETIC)})")
    if method not in METHODS:
        raise GammaError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if intermediate not in INTERMEDIATE:
        raise GammaError(f"unknown --intermediate '{intermediate}' (choose from {', '.join(INTERMEDIATE)})")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise GammaError(f"--device {device}: CUDA is not available on this machine")
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise GammaError(f"unknown --device '{device}' (choose cpu or cuda)")
    if tolerance is not None and not (math.isfinite(float(tolerance)) and float(tolerance) >= 0):
        raise GammaError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if worst_k < 1:
        raise GammaError(f"--worst-k must be >= 1, got {worst_k}")


# ------------------------------------------------------------------ widths
@dataclass
class Width:
    """Width statistics of one bound: ``max``/``mean`` of upper - lower.

    NaN anywhere makes both NaN; otherwise an infinite bound, or a width that
    overflows float64 (bounds near +-1.8e308), makes them inf."""
    max: float
    mean: float
    has_nan: bool
    has_infinite: bool

    @staticmethod
    def of(lower: torch.Tensor, upper: torch.Tensor) -> "Width":
        if lower.numel() == 0:
            return Width(0.0, 0.0, False, False)
        lower, upper = lower.double(), upper.double()
        w = torch.where(torch.isinf(lower) | torch.isinf(upper), math.inf, upper - lower)
        w = torch.where(torch.isnan(lower) | torch.isnan(upper), math.nan, w)
        has_nan = bool(torch.isnan(w).any())
        has_inf = bool(torch.isinf(w).any() or torch.isinf(lower).any() or torch.isinf(upper).any())
        if has_nan:
            return Width(math.nan, math.nan, True, has_inf)
        if has_inf:
            return Width(math.inf, math.inf, False, True)
        return Width(float(w.max()), float(w.mean()), False, False)

    def saturated(self, op: str) -> bool:
        if not math.isfinite(self.max):
            return False
        return self.max > SATURATION_WIDTH or (op == "softmax" and self.max >= SOFTMAX_SATURATION)

    @property
    def degraded(self) -> bool:
        return self.has_nan or self.has_infinite


def _degraded_reason(rec: dict) -> Optional[str]:
    """Why a node record degraded: "nan", "infinite", "saturated", or None."""
    return "nan" if rec["has_nan"] else "infinite" if rec["has_infinite"] else \
        "saturated" if rec["saturated"] else None


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)):
        return math.nan
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


def _node_records(graph: Graph, widths: dict[str, Width], epsilon: float) -> list[dict]:
    """One record per non-input node, in graph order."""
    out = []
    for node in graph:
        if node.op == "input":
            continue
        w = widths[node.name]
        ins = [widths[i].max if i in widths else 2 * epsilon for i in node.inputs]
        in_w = math.nan if any(math.isnan(v) for v in ins) else max(ins, default=0.0)
        out.append({
            "name": node.name, "layer_type": node.op, "block": node.block,
            "input_width": in_w, "output_width": w.max, "mean_width": w.mean,
            "growth": _ratio(w.max, in_w), "sensitivity": w.max / (2 * epsilon),
            "has_nan": w.has_nan, "has_infinite": w.has_infinite, "saturated": w.saturated(node.op),
        })
    return out


def _first_degraded(records: list[dict]) -> Optional[dict]:
    for r in records:
        reason = _degraded_reason(r)
        if reason:
            return {"name": r["name"], "layer_type": r["layer_type"], "block": r["block"], "reason": reason,
                    "output_width": r["output_width"]}
    return None


# ------------------------------------------------------------------ result
@dataclass
class VerifyResult:
    """What one run found.  ``report`` is the JSON object (floats may be
    non-finite here; :meth:`to_dict` encodes them as null); ``arrays`` are
    what ``--save-bounds`` writes."""
    mode: str
    report: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    @property
    def verdict(self) -> Optional[str]:
        return self.report.get("verdict")

    def to_dict(self) -> dict:
        return json_safe(self.report)

    def save_bounds(self, path: str) -> None:
        """Write ``arrays`` as an .npz (float64), exactly at ``path``."""
        try:
            with open(path, "wb") as f:
                np.savez(f, **self.arrays)
        except OSError as e:
            raise GammaError(f"{path}: cannot write bounds ({e.strerror or e})") from None


def json_safe(obj):
    """Non-finite floats -> None; numpy scalars -> Python; tuples -> lists."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def versions() -> dict[str, str]:
    return {"gamma": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------ forward
@dataclass
class ForwardResult:
    input: torch.Tensor          # float64, the exact input point
    output: torch.Tensor         # float64, gamma's forward at the input point
    point: InputPoint
    component: str
    seq_len: int


def _point_and_graph(model: Model, component, seq_len, tokens, input_path, center, output):
    comp = model.component(component)
    point = model.input_point(comp, seq_len, input_path=input_path, tokens=parse_tokens(tokens), center=center)
    seq = point.x.shape[-1] // 2 if comp == "encoder" else point.x.shape[-2]
    graph = model.graph(comp, seq, output)
    return comp, seq, point, graph


def _point_and_plan(model: Model, component, seq_len, tokens, input_path, center, output):
    """Like :func:`_point_and_graph`, with the model's block plan (:mod:`gamma.blocks`) for the graph."""
    comp = model.component(component)
    point = model.input_point(comp, seq_len, input_path=input_path, tokens=parse_tokens(tokens), center=center)
    seq = point.x.shape[-1] // 2 if comp == "encoder" else point.x.shape[-2]
    return comp, seq, point, model.block_plan(comp, seq, output)


def forward(model=None, *, component: Optional[str] = None, seq_len: int = 8, tokens=None,
            input_path: Optional[str] = None, center: Optional[str] = None,
            output: str = "hidden") -> ForwardResult:
    """gamma's exact float64 forward pass at the input point the same options
    give :func:`verify`."""
    model, _ = _as_model(model)
    comp, seq, point, graph = _point_and_graph(model, component, seq_len, tokens, input_path, center, output)
    return ForwardResult(point.x, evaluate(graph, point.x), point, comp, seq)


# ------------------------------------------------------------------ verify
def verify(model=None, epsilon: float = 1e-3, method: str = "crown", *, block_wise: bool = False,
           layer_by_layer: bool = False, component: Optional[str] = None, seq_len: int = 8,
           tokens=None, input_path: Optional[str] = None, center: Optional[str] = None,
           output: str = "hidden", blocks=None, tolerance: Optional[float] = None,
           property: Union[str, Sequence[Assertion], None] = None, worst_k: int = 5,
           intermediate: str = "crown", device: str = "cpu", alpha_iters: int = 20,
           workers: Optional[int] = None, ray: Optional[str] = None, checkpoint: Optional[str] = None,
           progress: Progress = None, arithmetic: str = "float32",
           attack: Union[bool, AttackConfig, None] = None) -> VerifyResult:
    """Bound ``model`` over the L-inf box of radius ``epsilon`` at its input point.

    ``model`` is a :class:`Model`, a path, or None (the default Whisper tiny.en).
    ``tolerance``: verdict "verified" iff every output width (block-wise:
    every selected block's max output width) is <= tolerance.  ``property``:
    a VNN-LIB file (or parsed assertions) that the output bounds must prove.
    ``workers`` / ``ray`` / ``checkpoint`` (block-wise only): spread the
    blocks over local processes or a Ray cluster, and resume from a
    checkpoint file (:mod:`gamma.parallel`).  ``arithmetic``: "float32"
    (default: the bounds hold for any float32 engine, rounding included) or
    "real" (the real-valued function only, as other verifiers bound it).
    ``attack``: also attack every bound computed (:mod:`gamma.tightness`):
    True (default :class:`AttackConfig`), a config, False, or None: on in
    block-wise runs (cheap next to the bounds), off otherwise.
    """
    t_start = time.perf_counter()
    eps = check_epsilon(epsilon)
    _check_options(method, intermediate, device, tolerance, worst_k, arithmetic)
    if block_wise and layer_by_layer:
        raise GammaError("--block-wise and --layer-by-layer are exclusive")
    mode = "block_wise" if block_wise else "layer_by_layer" if layer_by_layer else "full"
    attack_cfg = _attack_config(attack, mode)
    if blocks is not None and mode != "block_wise":
        raise GammaError("--blocks applies to --block-wise runs")
    scale = {"workers": parallel.check_workers(workers), "ray": ray, "checkpoint": checkpoint}
    for opt, value in (("--workers", workers), ("--ray", ray), ("--checkpoint", checkpoint)):
        if value is not None and mode != "block_wise":
            raise GammaError(f"{opt} applies to --block-wise runs")
    if ray is not None:
        parallel.import_ray()            # a missing ray is one line now, not after the model loads
    assertions = None
    if property is not None:
        if mode == "block_wise":
            raise GammaError("--property needs a full-network run (not --block-wise)")
        assertions = parse_property(property) if isinstance(property, (str, os.PathLike)) else list(property)

    if progress and not isinstance(model, Model):
        progress("loading model")
    model, t_load = _as_model(model, lazy=mode == "block_wise")     # block-wise: one block in memory at a time
    t0 = time.perf_counter()
    if mode == "block_wise":
        comp, seq, point, graph = _point_and_plan(model, component, seq_len, tokens, input_path, center, output)
    else:
        comp, seq, point, graph = _point_and_graph(model, component, seq_len, tokens, input_path, center, output)
    t_graph = time.perf_counter() - t0

    report: dict[str, Any] = {
        "mode": mode,
        "model": {"path": model.path, "format": model.ckpt.format, "arch": model.arch},
        "component": comp, "output": output, "seq_len": seq,
        "method": method, "intermediate": intermediate, "epsilon": eps, "device": str(device),
        "arithmetic": arithmetic,
        "input_point": {"description": point.description, "shape": list(point.x.shape), "tokens": point.tokens},
        "output_node": graph.output_node if mode == "block_wise" else graph.output,
        "output_shape": list(graph.output_shape),
        "num_blocks": len(graph.names) if mode == "block_wise" else len(graph.blocks()),
        "tolerance": None if tolerance is None else float(tolerance),
    }
    opts = dict(method=method, intermediate=intermediate, device=device, alpha_iters=alpha_iters,
                arithmetic=arithmetic)
    if mode == "block_wise":
        scale["key"] = parallel.run_key(report, alpha_iters, point.x)
        body, arrays, timings = _run_blocks(graph, point.x, eps, select_blocks(blocks, len(graph.names)),
                                            worst_k, tolerance, opts, progress, scale, attack_cfg)
    else:
        body, arrays, timings = _run_full(graph, point.x, eps, mode, tolerance, assertions, opts, progress,
                                          attack_cfg)
    report.update(body)
    report["versions"] = versions()
    report["timings"] = {"load": t_load, "graph": t_graph, **timings,
                         "total": time.perf_counter() - t_start}
    return VerifyResult(mode, report, arrays)


def _attack_config(attack, mode: str) -> Optional[AttackConfig]:
    if attack is None:
        attack = mode == "block_wise"
    if isinstance(attack, AttackConfig):
        try:
            return attack.checked()
        except ValueError as e:
            raise GammaError(str(e)) from None
    return AttackConfig() if attack else None


def _compute(graph: Graph, center: torch.Tensor, eps: float, opts: dict, progress: Progress):
    return bounds.compute_bounds(graph, center, eps, opts["method"], intermediate=opts["intermediate"],
                          device=opts["device"], alpha_iters=opts["alpha_iters"], progress=progress,
                          arithmetic=opts.get("arithmetic", "float32"))


def _widths(graph: Graph, res) -> dict[str, Width]:
    """Width of every node; the output uses the method's own (final) bound."""
    out = {}
    for node in graph:
        if node.name == graph.output:
            out[node.name] = Width.of(res.lower, res.upper)
        elif node.name in res.nodes:
            iv = res.nodes[node.name]
            out[node.name] = Width.of(iv.lower, iv.upper)
    return out


def _run_full(graph, x, eps, mode, tolerance, assertions, opts, progress, attack_cfg=None):
    if assertions is not None:
        check_property(assertions, None, None, int(np.prod(graph.output_shape)))   # indices, before the long run
    t0 = time.perf_counter()
    nominal = evaluate(graph, x)            # before the bounds: they may move the graph to the device
    t_nominal = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = _compute(graph, x, eps, opts, progress)
    t_bounds = time.perf_counter() - t0
    lower, upper = res.lower.double().cpu(), res.upper.double().cpu()
    widths = _widths(graph, res)
    w = widths[graph.output]
    records = _node_records(graph, widths, eps)
    body: dict[str, Any] = {
        "max_width": w.max, "mean_width": w.mean, "has_nan": w.has_nan, "has_infinite": w.has_infinite,
        "lower_min": float(lower.min()) if not w.has_nan else math.nan,
        "upper_max": float(upper.max()) if not w.has_nan else math.nan,
        "seconds": t_bounds,
        "nodes": [{k: r[k] for k in _FULL_NODE_KEYS + (_GROWTH_KEYS if mode == "layer_by_layer" else ())}
                  for r in records],
    }
    verdicts = []
    if tolerance is not None:
        ok = not w.degraded and w.max <= tolerance
        body["within_tolerance"] = ok
        verdicts.append(ok)
    if assertions is not None:
        checks = check_property(assertions, lower.flatten(), upper.flatten(), lower.numel())
        body["property"] = {"assertions": checks, "proved": sum(c["proved"] for c in checks),
                            "total": len(checks)}
        verdicts.append(all(c["proved"] for c in checks))
    body["verdict"] = None if not verdicts else ("verified" if all(verdicts) else "unknown")
    if mode == "layer_by_layer":
        body["block_growth"] = _block_growth(graph, widths, records, eps)
        body["first_degraded"] = _first_degraded(records)
    arrays = {"input": _np(x), "lower": _np(lower), "upper": _np(upper), "nominal": _np(nominal)}
    body["attack"] = None
    if attack_cfg is not None:
        if progress:
            progress("attacking the bounds")
        att = tightness.attack_bounds(graph, x, eps, lower, upper, attack_cfg)
        body["attack"] = tightness.full_summary(w.max, lower, upper, att, eps, attack_cfg)
        arrays.update(attacked_lower=_np(att.lower), attacked_upper=_np(att.upper))
    return body, arrays, {"bounds": t_bounds, "nominal": t_nominal,
                          **({"attack": body["attack"]["seconds"]} if body["attack"] else {})}


_FULL_NODE_KEYS = ("name", "layer_type", "block", "output_width", "mean_width", "has_nan", "has_infinite",
                   "saturated")
_GROWTH_KEYS = ("input_width", "growth")


def _block_growth(graph: Graph, widths: dict[str, Width], records: list[dict], eps: float) -> list[dict]:
    rows = []
    for k, b in enumerate(graph.blocks()):
        i, o = graph.block_io(b)
        in_w = widths[i].max if i in widths else 2 * eps
        out_w = widths[o]
        bad = [r["name"] for r in records if r["block"] == b and _degraded_reason(r)]
        rows.append({"block_index": k, "block_name": b, "input_width": in_w, "output_width": out_w.max,
                     "growth": _ratio(out_w.max, in_w), "degraded": bool(bad),
                     "first_degraded_node": bad[0] if bad else None})
    return rows


def _run_blocks(plan, x, eps, picked, worst_k, tolerance, opts, progress, scale=None, attack_cfg=None):
    """Every selected block of ``plan`` (:mod:`gamma.blocks`): the nominal forward pass, then
    each block built where it is bounded (here, a worker or a Ray task) and dropped after."""
    names = plan.names
    t0 = time.perf_counter()
    nominal = plan.nominal(x, picked, progress)
    t_nominal = time.perf_counter() - t0
    arrays = {"input": _np(x)}
    if nominal.output is not None:              # a streamed pass stops at the last selected block
        arrays["nominal"] = _np(nominal.output)
    rows = []
    t_all = time.perf_counter()
    tasks = []
    for k in picked:
        source = plan.source(k)
        tasks.append(parallel.BlockTask(k, names[k], None if source is not None else plan.block(k),
                                        nominal.centers[k], eps, opts, source))
    outcomes = parallel.run_blocks(tasks, _solve_block, progress=progress, **(scale or {}))
    for task, out in zip(tasks, outcomes):
        k = task.index
        if out.failed:
            rows.append(_failed_row(k, task.name, eps, out.error, out.seconds))
            continue
        rows.append(out.row)
        arrays.update({f"block{k}_input": _np(nominal.centers[k]), f"block{k}_lower": out.lower,
                       f"block{k}_upper": out.upper, f"block{k}_nominal": _np(nominal.outputs[k])})
    t_bounds = time.perf_counter() - t_all
    t_attack, points = time.perf_counter(), 0
    for j, (task, out) in enumerate(zip(tasks, outcomes) if attack_cfg is not None else ()):
        if out.failed:
            continue
        if progress:
            progress(f"attack {j + 1}/{len(tasks)} {task.name}")
        lo, hi = torch.tensor(out.lower), torch.tensor(out.upper)          # copies: the arrays stay as they are
        att = tightness.attack_bounds(task.block_graph(), task.center, eps, lo, hi, attack_cfg)
        out.row.update(tightness.figures(out.row["output_width"], att, eps))
        arrays.update({f"block{task.index}_attacked_lower": _np(att.lower),
                       f"block{task.index}_attacked_upper": _np(att.upper)})
        points += att.points
    t_attack = time.perf_counter() - t_attack
    body: dict[str, Any] = {
        "selected_blocks": picked,
        "blocks": rows,
        "summary": summarize(rows, worst_k),
        "has_nan": any(r["has_nan"] for r in rows),
        "has_infinite": any(r["has_infinite"] for r in rows),
        "seconds": t_bounds,
        "failed_blocks": [o.name for o in outcomes if o.failed],
        "resumed_blocks": [o.index for o in outcomes if o.resumed],
        "memory": _memory(outcomes),
        "attack": None if attack_cfg is None else tightness.block_summary(rows, attack_cfg, worst_k, points, t_attack),
    }
    if tolerance is not None:
        for r in rows:
            r["within_tolerance"] = not (r["has_nan"] or r["has_infinite"]) and r["output_width"] <= tolerance
        body["verdict"] = "verified" if all(r["within_tolerance"] for r in rows) else "unknown"
    else:
        body["verdict"] = None
    return body, arrays, {"bounds": t_bounds, "nominal": t_nominal,
                          **({"attack": t_attack} if attack_cfg is not None else {})}


# (extra per-block width: key -> node suffix); absent nodes are skipped
_BLOCK_PROBES = {
    "qk_matmul_width": "attn.qk",
    "attn_width": "attn.o",
    "swiglu_width": "mlp.swiglu",
    "mlp_width": "mlp.fc2",
    "cross_qk_width": "cross.qk",
    "cross_attn_width": "cross.o",
}


def _solve_block(task, progress: Progress = None):
    """One block: (record, lower, upper); run by :mod:`gamma.parallel` here or in a worker
    (which builds the block from its source: its weights read from the checkpoint file there)."""
    graph = task.block_graph()
    t0 = time.perf_counter()
    res = _compute(graph, task.center, task.epsilon, task.opts, progress)
    seconds = time.perf_counter() - t0
    row = _block_row(graph, task.index, task.name, _widths(graph, res), task.epsilon, seconds)
    return row, _np(res.lower), _np(res.upper)


def _memory(outcomes) -> dict:
    """Peak resident memory (MiB): this process, and each worker process with its blocks."""
    workers: dict[int, dict] = {}
    for o in outcomes:
        if o.pid is None or o.pid == os.getpid() or o.peak_rss_mb is None:
            continue
        w = workers.setdefault(o.pid, {"pid": o.pid, "peak_rss_mb": 0.0, "blocks": []})
        w["peak_rss_mb"] = max(w["peak_rss_mb"], o.peak_rss_mb)
        w["blocks"].append(o.index)
    return {"peak_rss_mb": parallel.peak_rss_mb(), "workers": list(workers.values())}


def _failed_row(index: int, name: str, eps: float, error: str, seconds: float) -> dict:
    """The record of a block that failed twice: no bounds, status FAILED, the error."""
    return {"block_index": index, "block_name": name, "input_width": 2 * eps, "output_width": math.nan,
            "mean_width": math.nan, "sensitivity": math.nan, "status": "FAILED", "degraded": False,
            "has_nan": False, "has_infinite": False, "first_degraded_node": None, "num_nodes": 0,
            "nodes": [], "seconds": seconds, "error": error}


def _block_row(sub: Graph, index: int, name: str, widths: dict[str, Width], eps: float, seconds: float) -> dict:
    records = _node_records(sub, widths, eps)
    out = widths[sub.output]
    sens = out.max / (2 * eps)
    has_nan = any(r["has_nan"] for r in records)
    has_inf = any(r["has_infinite"] for r in records)
    degraded = has_nan or has_inf or any(r["saturated"] for r in records)
    status = "DEGRADED" if degraded else "HIGH" if sens > HIGH_SENSITIVITY else \
        "MODERATE" if sens > MODERATE_SENSITIVITY else "OK"
    row: dict[str, Any] = {"block_index": index, "block_name": name, "input_width": 2 * eps,
                           "output_width": out.max, "mean_width": out.mean, "sensitivity": sens}
    for key, suffix in _BLOCK_PROBES.items():
        node = f"{name}.{suffix}"
        if node in widths:
            row[key] = widths[node].max
    first = _first_degraded(records)
    row.update({"status": status, "degraded": degraded, "has_nan": has_nan, "has_infinite": has_inf,
                "first_degraded_node": first["name"] if first else None,
                "num_nodes": len(records),
                "nodes": [{k: r[k] for k in ("name", "layer_type", "input_width", "output_width",
                                             "sensitivity", "has_nan", "has_infinite", "saturated")}
                          for r in records],
                "seconds": seconds})
    return row


def _sens_key(v: float) -> float:
    return math.inf if math.isnan(v) else v     # NaN counts as the worst


def summarize(rows: list[dict], worst_k: int = 5) -> dict:
    """Sensitivity statistics over per-block rows (NaN counts as worst)."""
    sens = [_sens_key(r["sensitivity"]) for r in rows]
    lo, hi = min(sens), max(sens)
    worst = sorted(rows, key=lambda r: -_sens_key(r["sensitivity"]))[:worst_k]
    return {
        "num_blocks": len(rows),
        "max_sensitivity": hi,
        "min_sensitivity": lo,
        "median_sensitivity": statistics.median(sens),
        "sensitivity_range": _ratio(hi, lo),
        "degraded_blocks": [r["block_name"] for r in rows if r["degraded"]],
        "worst_blocks": [{"name": r["block_name"], "index": r["block_index"], "sensitivity": r["sensitivity"],
                          "input_width": r["input_width"], "output_width": r["output_width"]} for r in worst],
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def schema() -> dict:
    """The JSON Schema of :meth:`VerifyResult.to_dict` (``gamma/schemas/verify.schema.json``)."""
    import json
    from importlib import resources
    return json.loads(resources.files("gamma").joinpath("schemas/verify.schema.json").read_text())
