"""The whole network at once: ``full`` (the output's bounds and every node's
width) and ``layer_by_layer`` (the same run, reported as width growth node by
node and block by block, naming the first node where the bounds degrade)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import bounds, tightness
from ..progress import BoundsEstimate
from ..graph import Graph
from ..ops import evaluate
from ..options import BoundOptions
from ..vnnlib import check_property
from .records import FULL_NODE_KEYS, GROWTH_KEYS, as_numpy, block_growth, first_degraded, node_records, widths
from .spec import RunSpec

Progress = Optional[Callable[[str], None]]


def run_full(graph: Graph, x: torch.Tensor, options: BoundOptions, spec: RunSpec, progress: Progress = None):
    """(report body, arrays, timings) of a full or layer-by-layer run of ``graph`` at ``x``."""
    eps, layers = options.epsilon, spec.mode == "layer_by_layer"
    if spec.assertions is not None:
        check_property(spec.assertions, None, None, int(np.prod(graph.output_shape)))  # indices, before the run
    t0 = time.perf_counter()
    nominal = evaluate(graph, x)
    t_nominal = time.perf_counter() - t0
    t0 = time.perf_counter()
    # node i/N with the time left (the whole network: minutes on real models)
    est = BoundsEstimate(progress, graph, "bounds") if progress else None
    res = bounds.compute_bounds(graph, x, options=options, progress=est)
    t_bounds = time.perf_counter() - t0
    lower, upper = res.lower.double().cpu(), res.upper.double().cpu()
    ws = widths(graph, res)
    w = ws[graph.output]
    records = node_records(graph, ws, eps)
    body: dict[str, Any] = {
        "max_width": w.max, "mean_width": w.mean, "has_nan": w.has_nan, "has_infinite": w.has_infinite,
        "lower_min": float(lower.min()) if not w.has_nan else math.nan,
        "upper_max": float(upper.max()) if not w.has_nan else math.nan,
        "seconds": t_bounds,
        "nodes": [{k: r[k] for k in FULL_NODE_KEYS + (GROWTH_KEYS if layers else ())} for r in records],
    }
    if "rounding_failure" in res.stats:                     # float32-probabilistic
        body["rounding_failure"] = res.stats["rounding_failure"]
    if "ibp_from" in res.stats:                             # after_saturation="ibp"
        body["ibp_from"] = res.stats["ibp_from"]
    verdicts = []
    if spec.tolerance is not None:
        ok = not w.degraded and w.max <= spec.tolerance
        body["within_tolerance"] = ok
        verdicts.append(ok)
    if spec.assertions is not None:
        checks = check_property(spec.assertions, lower.flatten(), upper.flatten(), lower.numel())
        body["property"] = {"assertions": checks, "proved": sum(c["proved"] for c in checks),
                            "total": len(checks)}
        verdicts.append(all(c["proved"] for c in checks))
    body["verdict"] = None if not verdicts else ("verified" if all(verdicts) else "unknown")
    body["first_degraded"] = first_degraded(records)
    if layers:
        body["block_growth"] = block_growth(graph, ws, records, eps)
    arrays = {"input": as_numpy(x), "lower": as_numpy(lower), "upper": as_numpy(upper),
              "nominal": as_numpy(nominal)}
    body["attack"] = None
    attack = spec.attack_config()
    if attack is not None:
        if progress:
            progress("attacking the bounds")
        att = tightness.attack_bounds(graph, x, eps, lower, upper, attack)
        body["attack"] = tightness.full_summary(w.max, lower, upper, att, eps, attack)
        arrays.update(attacked_lower=as_numpy(att.lower), attacked_upper=as_numpy(att.upper))
    return body, arrays, {"bounds": t_bounds, "nominal": t_nominal,
                          **({"attack": body["attack"]["seconds"]} if body["attack"] else {})}
