"""Comparisons of two checkpoints: :func:`compare` (certified, full or block-wise) and
:func:`diff` (point-wise, node by node).  See :mod:`gamma.compare`."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..bounds import Tunings
from ..errors import GammaError
from ..io import ggml
from ..models import Model
from ..ops import evaluate
from ..progress import CountEstimate
from ..options import BoundOptions, check_tolerance
from ..verify import load, parse_tokens, select_blocks, versions
from .network import Progress, compare_graphs, max_value

# config fields that must agree for the two graphs to be comparable (vocab: only for logits)
STRUCTURE = {
    "whisper": ("d_model", "n_mels", "encoder_layers", "encoder_heads", "encoder_ffn_dim",
                "decoder_layers", "decoder_heads", "decoder_ffn_dim"),
    "llama": ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"),
    "qwen3": ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"),
}


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
    return {"path": m.path, "format": m.ckpt.format, "arch": m.arch, "dtypes": m.ckpt.dtype_counts()}


def _same_file(a, b) -> bool:
    if isinstance(a, Model) or isinstance(b, Model):
        return False
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return False


def _setup(reference, target, component, seq_len, tokens, input_path, center, output, progress: Progress = None,
           engine: str = "float32"):
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
    if engine == "llama.cpp":
        for m in (ref, tgt):
            ggml.check_checkpoint(m.ckpt, output)
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
            alpha_iters: int = 20, progress: Progress = None, arithmetic: str = "float32",
            layernorm_variance: str = "any", engine: str = "float32", norm_splits: int = 1) -> CompareResult:
    """Certified max |reference - target| over the box of radius ``epsilon`` at
    the reference's input point (block-wise: every selected block over the
    reference's nominal block input +- epsilon).

    ``naive``: also bound each model on its own and report the naive bound
    ``[l_ref - u_tgt, u_ref - l_tgt]`` (intersected with the joint one).  Off
    by default: it costs two more whole-model bounds, each as long as
    ``gamma verify --full`` on one model (over 14 minutes for SmolLM2-135M
    compared with itself, where the joint bound is free).  ``arithmetic`` and
    ``layernorm_variance`` and ``engine``: what the bounds hold for, as in :func:`gamma.verify` (the
    float32 margins apply to both models' nodes; ``engine="llama.cpp"``: both run by llama.cpp, so
    both must be GGUF files).  ``norm_splits``: as in :func:`gamma.verify`, each norm's mean square in
    that many pieces for the nodes after it, in both models (:mod:`gamma.bounds.split`)."""
    t_start = time.perf_counter()
    checked = BoundOptions(epsilon, method, intermediate, arithmetic, device=device, alpha_iters=alpha_iters,
                           layernorm_variance=layernorm_variance, engine=engine, norm_splits=norm_splits)
    eps = checked.epsilon
    tol = check_tolerance(tolerance)
    for name, v, low in (("--samples", samples, 0), ("--attack-steps", attack_steps, 0), ("--restarts", restarts, 0)):
        if int(v) < low:
            raise GammaError(f"{name} must be >= {low}, got {v}")
    if blocks is not None and not block_wise:
        raise GammaError("--blocks applies to --block-wise runs")
    head, x, (g_ref, g_tgt), timings = _setup(reference, target, component, seq_len, tokens, input_path,
                                              center, output, progress, checked.engine)
    opts = dict(method=method, merge=merge, naive=naive, progress=progress, intermediate=intermediate,
                device=device, alpha_iters=alpha_iters, arithmetic=checked.arithmetic,
                layernorm_variance=checked.layernorm_variance, engine=checked.engine,
                **({"tunings": Tunings(norm_splits=checked.norm_splits)} if checked.norm_splits > 1 else {}),
                attack=dict(samples=int(samples), steps=int(attack_steps), restarts=int(restarts), seed=seed))
    report: dict[str, Any] = {"command": "compare", "mode": "block_wise" if block_wise else "full", **head,
                              "method": method, "epsilon": eps, "tolerance": tol, "merged": merge,
                              "arithmetic": checked.arithmetic, "layernorm_variance": checked.layernorm_variance,
                              "engine": checked.engine, "norm_splits": checked.norm_splits}
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
        report["by_drift"] = [r["block_name"] for r in sorted(rows, key=lambda r: -drift_key(r["certified_max"]))]
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


def drift_key(v: float) -> float:
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
        d = max_value((a - b).abs().reshape(-1))
        scale = max_value(a.abs().reshape(-1))
        rec = {"name": node.name, "layer_type": node.op, "block": node.block, "max_abs_diff": d,
               "max_abs_reference": scale, "relative": d / scale if scale > 0 else (0.0 if d == 0 else math.inf)}
        nodes.append(rec)
        if first is None and not d <= tol:
            first = rec
    out = max_value((v_ref[g_ref.output] - v_tgt[g_tgt.output]).abs().reshape(-1))
    blocks = []
    for b in g_ref.blocks():
        recs = [r for r in nodes if r["block"] == b]
        if recs:
            worst = max(recs, key=lambda r: drift_key(r["max_abs_diff"]))
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
