"""Every block on its own: ``block_wise``.

Each selected block is verified over its nominal input (the value the exact
float64 forward pass gives it at the input point) +- eps.  This measures each
block's sensitivity; it does not bound the whole network.  The blocks come one
at a time from the model's block plan (:mod:`gamma.models.blocks`), and each is
built where it is bounded (here, a worker process or a Ray task:
:mod:`gamma.parallel`) and dropped after.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import torch

from .. import bounds, parallel, tightness
from ..options import BoundOptions
from .records import as_numpy, block_row, failed_row, summarize, widths
from .spec import RunSpec

Progress = Optional[Callable[[str], None]]


def run_blocks(plan, x: torch.Tensor, options: BoundOptions, spec: RunSpec, picked: list[int],
               key: Optional[dict] = None, progress: Progress = None):
    """(report body, arrays, timings) of the selected blocks of ``plan``; ``key`` identifies the
    run in a resume file (:func:`gamma.parallel.run_key`)."""
    eps, names = options.epsilon, plan.names
    t0 = time.perf_counter()
    nominal = plan.nominal(x, picked, progress)
    t_nominal = time.perf_counter() - t0
    arrays = {"input": as_numpy(x)}
    if nominal.output is not None:              # a streamed pass stops at the last selected block
        arrays["nominal"] = as_numpy(nominal.output)
    rows = []
    t_all = time.perf_counter()
    tasks = []
    for k in picked:
        source = plan.source(k)
        tasks.append(parallel.BlockTask(k, names[k], None if source is not None else plan.block(k),
                                        nominal.centers[k], options, source))
    outcomes = parallel.run_blocks(tasks, solve_block, workers=spec.workers, ray=spec.ray,
                                   checkpoint=spec.checkpoint, key=key, progress=progress)
    for task, out in zip(tasks, outcomes):
        k = task.index
        if out.failed:
            rows.append(failed_row(k, task.name, eps, out.error, out.seconds))
            continue
        rows.append(out.row)
        arrays.update({f"block{k}_input": as_numpy(nominal.centers[k]), f"block{k}_lower": out.lower,
                       f"block{k}_upper": out.upper, f"block{k}_nominal": as_numpy(nominal.outputs[k])})
    t_bounds = time.perf_counter() - t_all
    attack = spec.attack_config()
    t_attack, points = time.perf_counter(), 0
    for j, (task, out) in enumerate(zip(tasks, outcomes) if attack is not None else ()):
        if out.failed:
            continue
        if progress:
            progress(f"attack {j + 1}/{len(tasks)} {task.name}")
        lo, hi = torch.tensor(out.lower), torch.tensor(out.upper)          # copies: the arrays stay as they are
        att = tightness.attack_bounds(task.block_graph(), task.center, eps, lo, hi, attack)
        out.row.update(tightness.figures(out.row["output_width"], att, eps))
        arrays.update({f"block{task.index}_attacked_lower": as_numpy(att.lower),
                       f"block{task.index}_attacked_upper": as_numpy(att.upper)})
        points += att.points
    t_attack = time.perf_counter() - t_attack
    body: dict[str, Any] = {
        "selected_blocks": picked,
        "blocks": rows,
        "summary": summarize(rows, spec.worst_k),
        "has_nan": any(r["has_nan"] for r in rows),
        "has_infinite": any(r["has_infinite"] for r in rows),
        "seconds": t_bounds,
        "failed_blocks": [o.name for o in outcomes if o.failed],
        "resumed_blocks": [o.index for o in outcomes if o.resumed],
        "memory": memory(outcomes),
        "attack": None if attack is None else tightness.block_summary(rows, attack, spec.worst_k, points, t_attack),
    }
    if options.arithmetic == "float32-probabilistic":       # the union bound over the blocks
        body["rounding_failure"] = min(1.0, sum(r.get("rounding_failure", 0.0) for r in rows))
    if spec.tolerance is not None:
        for r in rows:
            r["within_tolerance"] = not (r["has_nan"] or r["has_infinite"]) and r["output_width"] <= spec.tolerance
        body["verdict"] = "verified" if all(r["within_tolerance"] for r in rows) else "unknown"
    else:
        body["verdict"] = None
    return body, arrays, {"bounds": t_bounds, "nominal": t_nominal,
                          **({"attack": t_attack} if attack is not None else {})}


def solve_block(task: parallel.BlockTask, progress: Progress = None):
    """One block: (record, lower, upper); run by :mod:`gamma.parallel` here or in a worker
    (which builds the block from its source: its weights read from the checkpoint file there)."""
    graph = task.block_graph()
    t0 = time.perf_counter()
    res = bounds.compute_bounds(graph, task.center, options=task.options, progress=progress)
    seconds = time.perf_counter() - t0
    row = block_row(graph, task.index, task.name, widths(graph, res), task.options.epsilon, seconds)
    if "rounding_failure" in res.stats:                     # float32-probabilistic
        row["rounding_failure"] = res.stats["rounding_failure"]
    if "ibp_from" in res.stats:                             # after_saturation="ibp"
        row["ibp_from"] = res.stats["ibp_from"]
    return row, as_numpy(res.lower), as_numpy(res.upper)


def memory(outcomes) -> dict:
    """Peak resident memory (MiB): this process, and each worker process with its blocks."""
    workers: dict[int, dict] = {}
    for o in outcomes:
        if o.pid is None or o.pid == os.getpid() or o.peak_rss_mb is None:
            continue
        w = workers.setdefault(o.pid, {"pid": o.pid, "peak_rss_mb": 0.0, "blocks": []})
        w["peak_rss_mb"] = max(w["peak_rss_mb"], o.peak_rss_mb)
        w["blocks"].append(o.index)
    return {"peak_rss_mb": parallel.peak_rss_mb(), "workers": list(workers.values())}
