"""The entry points: :func:`load`, :func:`forward`, :func:`verify` (keyword
arguments, the Python API) and :func:`run` (the grouped, checked arguments the
CLI builds: model, :class:`~gamma.options.BoundOptions`, :class:`InputSpec`,
:class:`RunSpec`).  Results are plain data; nothing here prints."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence, Union

from .. import parallel
from ..attack import AttackConfig
from ..errors import GammaError
from ..io import ggml, load_checkpoint, zoo
from ..models import Model
from ..ops import evaluate
from ..options import BoundOptions
from ..vnnlib import Assertion
from .blockwise import run_blocks
from .full import run_full
from .records import ForwardResult, VerifyResult, versions
from .spec import InputSpec, RunSpec, mode_of, select_blocks

Progress = Optional[Callable[[str], None]]


# ------------------------------------------------------------------ loading
def load(path: Optional[Union[str, os.PathLike]] = None, lazy: bool = False) -> Model:
    """Load a checkpoint (safetensors / GGUF / CTranslate2 / PyTorch, detected
    by content).  ``None`` loads the default real model, Whisper tiny.en.
    ``lazy``: read the header only; each tensor is read from the file when a
    graph uses it (GGUF and safetensors; :mod:`gamma.io.lazy`)."""
    path = zoo.whisper_tiny_en() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise GammaError(f"{path}: no such file or directory")
    return Model(load_checkpoint(path, lazy=lazy))


def as_model(model, lazy: bool = False) -> tuple[Model, float]:
    """(a :class:`Model`, seconds spent loading it) from a Model, a path or None."""
    if isinstance(model, Model):
        return model, 0.0
    t0 = time.perf_counter()
    m = load(model, lazy=lazy)
    return m, time.perf_counter() - t0


def _point(model: Model, inputs: InputSpec):
    comp = model.component(inputs.component)
    point = model.input_point(comp, inputs.seq_len, input_path=inputs.input_path, tokens=inputs.tokens,
                              center=inputs.center)
    return comp, model.seq_len_of(comp, point.x), point


# ------------------------------------------------------------------ forward
def forward(model=None, *, component: Optional[str] = None, seq_len: int = 8, tokens=None,
            input_path: Optional[str] = None, center: Optional[str] = None,
            output: str = "hidden") -> ForwardResult:
    """gamma's exact float64 forward pass at the input point the same options
    give :func:`verify`."""
    inputs = InputSpec(component, seq_len, tokens, input_path, center, output)
    model, _ = as_model(model)
    comp, seq, point = _point(model, inputs)
    return ForwardResult(point.x, evaluate(model.graph(comp, seq, output), point.x), point, comp, seq)


# ------------------------------------------------------------------ verify
def verify(model=None, epsilon: float = 1e-3, method: str = "crown", *, block_wise: bool = False,
           layer_by_layer: bool = False, component: Optional[str] = None, seq_len: int = 8,
           tokens=None, input_path: Optional[str] = None, center: Optional[str] = None,
           output: str = "hidden", blocks=None, tolerance: Optional[float] = None,
           property: Union[str, Sequence[Assertion], None] = None, worst_k: int = 5,
           intermediate: str = "crown", device: str = "cpu", alpha_iters: int = 20,
           workers: Optional[int] = None, ray: Optional[str] = None, checkpoint: Optional[str] = None,
           progress: Progress = None, arithmetic: str = "float32",
           attack: Union[bool, AttackConfig, None] = None, products: str = "polar",
           after_saturation: str = "crown", layernorm_variance: str = "any", engine: str = "float32",
           norm_splits: int = 1) -> VerifyResult:
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
    block-wise runs (cheap next to the bounds), off otherwise.  ``after_saturation``: "crown"
    (default) or "ibp": interval bounds from the first node wider than 1e6 (or unbounded) on
    (``ibp_from`` in the report says where).  ``layernorm_variance``: "any" (default),
    "formula": the float32 bounds then hold for engines that compute LayerNorm's variance as
    E[x^2] - E[x]^2 or mean((x - mean)^2) (CTranslate2, llama.cpp), not by running moments
    (PyTorch's CPU kernel), and its margin is not doubled as a whole, or "two-pass":
    mean((x - mean)^2) only (llama.cpp, whisper.cpp), not CTranslate2's E[x^2] - E[x]^2.
    ``engine``: "float32" (default: any engine computing in float32, such as transformers) or
    "llama.cpp" (a GGUF file as ggml's CPU backend computes it: quantized or F16 activations in the
    matmuls, an F16 KV cache, ggml's RoPE angles; :mod:`gamma.bounds.fpggml`).  ``norm_splits``: 1
    (default) or K > 1: CROWN bounds the nodes after each norm (up to the next norm or attention) once
    per piece of K of the norm's mean square and takes their union (:mod:`gamma.bounds.split`):
    tighter where the norm's scale varies over the box, at up to K times those nodes' passes.

    The arguments are checked here, before the model is read, grouped into
    :class:`~gamma.options.BoundOptions`, :class:`InputSpec` and :class:`RunSpec`,
    and run by :func:`run`.
    """
    options = BoundOptions(epsilon, method, intermediate, arithmetic, device, alpha_iters, products, after_saturation,
                           layernorm_variance, engine, norm_splits)
    spec = RunSpec(mode_of(block_wise, layer_by_layer), blocks, tolerance, property, worst_k, workers, ray,
                   checkpoint, attack)
    inputs = InputSpec(component, seq_len, tokens, input_path, center, output)
    return run(model, options, inputs, spec, progress)


def _float64_attack(report: dict) -> None:
    """The attack evaluates gamma's float64 forward, which bounds for another engine's arithmetic
    (``--engine llama.cpp``) need not contain: its points outside them are no violation of those
    bounds, and are reported as ``float64_outside`` instead (``violations`` 0: nothing tested them)."""
    a = report.get("attack")
    if a:
        a["float64_outside"], a["violations"] = a["violations"], 0
    for row in report.get("blocks", []):
        if "attack_violations" in row:
            row["float64_outside"], row["attack_violations"] = row["attack_violations"], 0


def run(model, options: BoundOptions, inputs: InputSpec = InputSpec(), spec: RunSpec = RunSpec(),
        progress: Progress = None) -> VerifyResult:
    """:func:`verify` with its arguments checked and grouped: ``model`` (a :class:`Model`, a
    path or None), how to bound, where the box is, and what to run."""
    t_start = time.perf_counter()
    for arg, cls in ((options, BoundOptions), (inputs, InputSpec), (spec, RunSpec)):
        if not isinstance(arg, cls):
            raise GammaError(f"expected a {cls.__name__}, got {type(arg).__name__}")
    block_wise = spec.mode == "block_wise"
    if progress and not isinstance(model, Model):
        progress("loading model")
    model, t_load = as_model(model, lazy=block_wise)     # block-wise: one block in memory at a time
    if options.engine == "llama.cpp":
        ggml.check_checkpoint(model.ckpt, inputs.output)
    t0 = time.perf_counter()
    comp, seq, point = _point(model, inputs)
    graph = model.block_plan(comp, seq, inputs.output) if block_wise else model.graph(comp, seq, inputs.output)
    t_graph = time.perf_counter() - t0

    report: dict[str, Any] = {
        "mode": spec.mode,
        "model": {"path": model.path, "format": model.ckpt.format, "arch": model.arch,
                  "dtypes": model.ckpt.dtype_counts()},
        "component": comp, "output": inputs.output, "seq_len": seq,
        "method": options.method, "intermediate": options.intermediate, "epsilon": options.epsilon,
        "device": options.device, "arithmetic": options.arithmetic, "products": options.products,
        "after_saturation": options.after_saturation, "layernorm_variance": options.layernorm_variance,
        "engine": options.engine, "norm_splits": options.norm_splits,
        "input_point": {"description": point.description, "shape": list(point.x.shape), "tokens": point.tokens},
        "output_node": graph.output_node if block_wise else graph.output,
        "output_shape": list(graph.output_shape),
        "num_blocks": len(graph.names) if block_wise else len(graph.blocks()),
        "tolerance": spec.tolerance,
    }
    if block_wise:
        key = parallel.run_key(report, options.alpha_iters, point.x)
        body, arrays, timings = run_blocks(graph, point.x, options, spec, select_blocks(spec.blocks, len(graph.names)),
                                           key, progress)
    else:
        body, arrays, timings = run_full(graph, point.x, options, spec, progress)
    report.update(body)
    if options.engine != "float32":
        _float64_attack(report)
    report["versions"] = versions()
    report["timings"] = {"load": t_load, "graph": t_graph, **timings,
                         "total": time.perf_counter() - t_start}
    return VerifyResult(spec.mode, report, arrays)
