"""What a verification reports: widths, per-node and per-block records, the
summary, the result object and its JSON.

A node *degrades* when its bounds contain NaN or inf, or *saturate*: width
above :data:`SATURATION_WIDTH`, or a softmax whose output width reaches
:data:`SOFTMAX_SATURATION` (the [0, 1] bound is then nearly vacuous).

:meth:`VerifyResult.to_dict` is the ``--json`` object described by
``gamma/schemas/verify.schema.json`` (:func:`schema`): NaN and inf are written
as null (:func:`json_safe`), with ``has_nan`` / ``has_infinite`` flags saying
which.  Nothing here computes a bound or prints.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

import numpy as np
import torch

from .. import __version__
from ..errors import GammaError
from ..graph import Graph
from ..models import InputPoint
from ..options import SATURATION_WIDTH

SOFTMAX_SATURATION = 0.99    # a softmax output bound this wide is nearly [0, 1]
MODERATE_SENSITIVITY = 1e3   # block status thresholds on max output width / input width
HIGH_SENSITIVITY = 1e6


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


def widths(graph: Graph, res) -> dict[str, Width]:
    """Width of every node of a :class:`~gamma.bounds.BoundResult`; the output uses the
    method's own (final) bound."""
    out = {}
    for node in graph:
        if node.name == graph.output:
            out[node.name] = Width.of(res.lower, res.upper)
        elif node.name in res.nodes:
            iv = res.nodes[node.name]
            out[node.name] = Width.of(iv.lower, iv.upper)
    return out


def degraded_reason(rec: dict) -> Optional[str]:
    """Why a node record degraded: "nan", "infinite", "saturated", or None."""
    return "nan" if rec["has_nan"] else "infinite" if rec["has_infinite"] else \
        "saturated" if rec["saturated"] else None


def ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)):
        return math.nan
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


# ------------------------------------------------------------------ node records
FULL_NODE_KEYS = ("name", "layer_type", "block", "output_width", "mean_width", "has_nan", "has_infinite",
                  "saturated")
GROWTH_KEYS = ("input_width", "growth")


def node_records(graph: Graph, widths: dict[str, Width], epsilon: float) -> list[dict]:
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
            "growth": ratio(w.max, in_w), "sensitivity": w.max / (2 * epsilon),
            "has_nan": w.has_nan, "has_infinite": w.has_infinite, "saturated": w.saturated(node.op),
        })
    return out


def first_degraded(records: list[dict]) -> Optional[dict]:
    for r in records:
        reason = degraded_reason(r)
        if reason:
            return {"name": r["name"], "layer_type": r["layer_type"], "block": r["block"], "reason": reason,
                    "output_width": r["output_width"]}
    return None


def block_growth(graph: Graph, widths: dict[str, Width], records: list[dict], eps: float) -> list[dict]:
    """Layer by layer: each block's input and output width, growth, first degraded node."""
    rows = []
    for k, b in enumerate(graph.blocks()):
        i, o = graph.block_io(b)
        in_w = widths[i].max if i in widths else 2 * eps
        out_w = widths[o]
        bad = [r["name"] for r in records if r["block"] == b and degraded_reason(r)]
        rows.append({"block_index": k, "block_name": b, "input_width": in_w, "output_width": out_w.max,
                     "growth": ratio(out_w.max, in_w), "degraded": bool(bad),
                     "first_degraded_node": bad[0] if bad else None})
    return rows


# ------------------------------------------------------------------ block records
# (extra per-block width: key -> node suffix); absent nodes are skipped
BLOCK_PROBES = {
    "qk_matmul_width": "attn.qk",
    "attn_width": "attn.o",
    "swiglu_width": "mlp.swiglu",
    "mlp_width": "mlp.fc2",
    "cross_qk_width": "cross.qk",
    "cross_attn_width": "cross.o",
}


def block_row(sub: Graph, index: int, name: str, widths: dict[str, Width], eps: float, seconds: float) -> dict:
    """The record of one block bounded on its own."""
    records = node_records(sub, widths, eps)
    out = widths[sub.output]
    sens = out.max / (2 * eps)
    has_nan = any(r["has_nan"] for r in records)
    has_inf = any(r["has_infinite"] for r in records)
    degraded = has_nan or has_inf or any(r["saturated"] for r in records)
    status = "DEGRADED" if degraded else "HIGH" if sens > HIGH_SENSITIVITY else \
        "MODERATE" if sens > MODERATE_SENSITIVITY else "OK"
    row: dict[str, Any] = {"block_index": index, "block_name": name, "input_width": 2 * eps,
                           "output_width": out.max, "mean_width": out.mean, "sensitivity": sens}
    for key, suffix in BLOCK_PROBES.items():
        node = f"{name}.{suffix}"
        if node in widths:
            row[key] = widths[node].max
    first = first_degraded(records)
    row.update({"status": status, "degraded": degraded, "has_nan": has_nan, "has_infinite": has_inf,
                "first_degraded_node": first["name"] if first else None,
                "num_nodes": len(records),
                "nodes": [{k: r[k] for k in ("name", "layer_type", "input_width", "output_width",
                                             "sensitivity", "has_nan", "has_infinite", "saturated")}
                          for r in records],
                "seconds": seconds})
    return row


def failed_row(index: int, name: str, eps: float, error: str, seconds: float) -> dict:
    """The record of a block that failed twice: no bounds, status FAILED, the error."""
    return {"block_index": index, "block_name": name, "input_width": 2 * eps, "output_width": math.nan,
            "mean_width": math.nan, "sensitivity": math.nan, "status": "FAILED", "degraded": False,
            "has_nan": False, "has_infinite": False, "first_degraded_node": None, "num_nodes": 0,
            "nodes": [], "seconds": seconds, "error": error}


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
        "sensitivity_range": ratio(hi, lo),
        "degraded_blocks": [r["block_name"] for r in rows if r["degraded"]],
        "worst_blocks": [{"name": r["block_name"], "index": r["block_index"], "sensitivity": r["sensitivity"],
                          "input_width": r["input_width"], "output_width": r["output_width"]} for r in worst],
    }


# ------------------------------------------------------------------ results
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


@dataclass
class ForwardResult:
    input: torch.Tensor          # float64, the exact input point
    output: torch.Tensor         # float64, gamma's forward at the input point
    point: InputPoint
    component: str
    seq_len: int


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 CPU array of ``t`` (what ``arrays`` hold)."""
    return t.detach().to("cpu", torch.float64).numpy()


# ------------------------------------------------------------------ JSON
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


def schema() -> dict:
    """The JSON Schema of :meth:`VerifyResult.to_dict` (``gamma/schemas/verify.schema.json``)."""
    return json.loads(resources.files("gamma").joinpath("schemas/verify.schema.json").read_text())
