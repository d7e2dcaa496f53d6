"""Certified against attacked: how loose is a bound, where?

A certified width alone does not say whether a block is sensitive or the
relaxation is loose.  ``gamma verify`` therefore attacks every bound it
computes (:func:`gamma.attack.attack_range` on gamma's own float64 forward
pass, inside the same box) and reports, beside each certified figure, the
attacked one and their ratio:

* attacked width: max over outputs of (max - min of the output over the
  points found); an inner bound of the true width, so
  ``attacked <= true <= certified`` and ``ratio = certified / attacked >= 1``;
* attacked sensitivity: attacked width / input width (2 epsilon);
* block-wise: the Spearman rank agreement between the blocks' certified and
  attacked sensitivities, and the blocks with the largest ratio (where the
  relaxation, not the model, makes the width).

Plain data in, plain data out; nothing here prints.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from .attack import AttackConfig, AttackRange, attack_range
from .graph import Graph
from .ops import evaluate
from .stats import spearman


def attack_bounds(graph: Graph, center: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor,
                  config: AttackConfig) -> AttackRange:
    """Attack ``graph`` (float64, on the CPU) over ``center +- eps``, aiming at its widest certified outputs."""
    graph = graph.on("cpu")
    return attack_range(lambda z: evaluate(graph, z), center.detach().to("cpu", torch.float64), eps,
                        lower.detach().to("cpu", torch.float64), upper.detach().to("cpu", torch.float64), config)


def ratio(certified: float, attacked: float) -> float:
    """certified / attacked; inf when only the attack found nothing; NaN when either is unknown."""
    if math.isnan(certified) or math.isnan(attacked):
        return math.nan
    if attacked == 0:
        return 0.0 if certified == 0 else math.inf
    return certified / attacked


def _max(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    return math.nan if bool(torch.isnan(t).any()) else float(t.max())


def figures(certified_width: float, att: AttackRange, eps: float) -> dict:
    """The attacked figures of one bound (a block's output, or the network's)."""
    w = att.width()
    aw = _max(w)
    return {"attacked_width": aw, "attacked_mean_width": float(w.mean()) if w.numel() else 0.0,
            "attacked_sensitivity": aw / (2 * eps), "ratio": ratio(certified_width, aw),
            "attack_violations": att.violations}


def per_position(lower: torch.Tensor, upper: torch.Tensor, att: AttackRange) -> list[dict]:
    """Certified and attacked max width per output position (the first axis: the token)."""
    cw = _rows(upper.double() - lower.double())
    aw = _rows(att.width())
    out = []
    for i in range(cw.shape[0]):
        c, a = _max(cw[i]), _max(aw[i])
        out.append({"index": i, "certified_width": c, "attacked_width": a, "ratio": ratio(c, a)})
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(torch.isinf(t), math.inf, t)
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def full_summary(certified_width: float, lower: torch.Tensor, upper: torch.Tensor, att: AttackRange, eps: float,
                 config: AttackConfig) -> dict:
    """``report["attack"]`` of a full (or layer-by-layer) run."""
    f = figures(certified_width, att, eps)
    return {"config": config.to_dict(), "max_width": f["attacked_width"], "mean_width": f["attacked_mean_width"],
            "sensitivity": f["attacked_sensitivity"], "ratio": f["ratio"], "violations": att.violations,
            "points": att.points, "targets": len(att.targets), "seconds": att.seconds,
            "per_position": per_position(lower, upper, att)}


def _key(v: Optional[float]) -> float:
    return math.inf if v is None or math.isnan(v) else v       # unknown counts as the worst


def block_summary(rows: list[dict], config: AttackConfig, worst_k: int, points: int, seconds: float) -> dict:
    """``report["attack"]`` of a block-wise run: ratios, rank agreement, worst-ratio blocks."""
    hit = [r for r in rows if r.get("attacked_width") is not None]
    both = [r for r in hit if all(math.isfinite(r[k]) for k in ("sensitivity", "attacked_sensitivity"))]
    ratios = [r["ratio"] for r in hit if math.isfinite(r["ratio"])]
    worst = sorted(hit, key=lambda r: -_key(r["ratio"]))[:worst_k]
    return {
        "config": config.to_dict(),
        "blocks": len(hit),
        "spearman": spearman([r["sensitivity"] for r in both], [r["attacked_sensitivity"] for r in both]),
        "spearman_n": len(both),
        "max_ratio": max(ratios) if ratios else math.nan,
        "median_ratio": statistics.median(ratios) if ratios else math.nan,
        "min_ratio": min(ratios) if ratios else math.nan,
        "worst_ratio_blocks": [{"name": r["block_name"], "index": r["block_index"], "ratio": r["ratio"],
                                "sensitivity": r["sensitivity"], "attacked_sensitivity": r["attacked_sensitivity"]}
                               for r in worst],
        "violations": sum(r["attack_violations"] for r in hit),
        "points": points, "seconds": seconds,
    }
