"""What the user chooses about the bounds, checked once: :class:`BoundOptions`.

One frozen object (method, epsilon, intermediate bounds, arithmetic, device,
alpha-CROWN iterations, the product relaxation, what follows saturation, the engine's LayerNorm
variance) is built where the user's input enters (the CLI from
its arguments, :func:`gamma.verify` from its keyword arguments, a direct
:func:`gamma.bounds.compute_bounds` call from its own) and travels unchanged to
the engine and to worker processes (it pickles).  Each field has one check
here, with one message in the CLI's words; every entry point raises the same
:class:`~gamma.errors.GammaError` for the same bad value.

This module imports nothing of gamma but the errors, so the engine itself can
check through it.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import GammaError

METHODS = ("ibp", "crown", "alpha", "zonotope")
INTERMEDIATE = ("crown", "cut", "ibp")
# what the bounds contain: "float32" every output of a float32 engine (rounding margins at every
# node, the default); "float32-probabilistic" the same with the rounding of dot products and norms' sums under a
# probabilistic model (gamma.bounds.fpprob: independent mean-zero rounding errors, a failure probability
# reported); "real" the real-valued function only, as auto_LiRPA / alpha-beta-CROWN bound it
ARITHMETIC = ("float32", "float32-probabilistic", "real")
# how CROWN relaxes an elementwise product of two bounded nodes (SwiGLU's gate * up): "polar" also by
# (s^2 - d^2) / 4 with CROWN bounds of s and d (tighter, about 2x a Llama-family block's time);
# "half-sum" by the half-sum of the McCormick planes only
PRODUCTS = ("polar", "half-sum")
# what bounds the nodes after the first saturated one (a bound wider than SATURATION_WIDTH, or unbounded,
# somewhere in the node): "crown" CROWN passes as everywhere else (the default: as tight as gamma gets);
# "ibp" interval bounds with the float32 margins and the ops' caps from there on (no more passes: far faster
# in depth, and no tighter)
AFTER_SATURATION = ("crown", "ibp")
SATURATION_WIDTH = 1e6       # a node whose bound is wider than this carries no information
# how the float32 engine the bounds hold for computes LayerNorm's variance: "any" (the default: any
# algorithm; running moments, as PyTorch's CPU kernel keeps them, covered by doubling the margin derived
# for the two formulas); "formula": E[x^2] - E[x]^2 or mean((x - mean)^2) evaluated in float32, in any
# summation order (CTranslate2's and llama.cpp's kernels), so the derived margin itself, with only its
# rsqrt allowance doubled (as RMSNorm's); "two-pass": mean((x - mean)^2) only, the mean computed first
# (ggml's norm: llama.cpp, whisper.cpp; its sums in double are covered), so the one-pass form's error
# (E[x^2] - E[x]^2, which cancels where the mean is large next to the spread) drops out too
LAYERNORM_VARIANCE = ("any", "formula", "two-pass")
# which engine's arithmetic the float32 bounds hold for: "float32" any engine computing every op in float32
# (transformers, CTranslate2 in float32); "llama.cpp" ggml's CPU backend on a GGUF file: matmul activations
# converted to the weight type's vec_dot type (Q8_0 / Q8_1 blocks, F16, BF16), an F16 KV cache without flash
# attention, ggml's own RoPE angles (gamma.bounds.fpggml)
ENGINES = ("float32", "llama.cpp")


# ------------------------------------------------------------------ one check per option
def check_epsilon(epsilon, shown: Optional[str] = None) -> float:
    """A finite float > 0, or GammaError naming the value as the user wrote it
    (``shown``; default ``str(epsilon)``, which is the text itself for a string)."""
    shown = str(epsilon) if shown is None else shown
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        eps = float("nan")
    if not (math.isfinite(eps) and eps > 0):
        raise GammaError(f"--epsilon must be a finite number > 0, got {shown}")
    return eps


def _choice(option: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise GammaError(f"unknown {option} '{value}' (choose from {', '.join(choices)})")
    return value


def check_method(method) -> str:
    return _choice("method", method, METHODS)


def check_intermediate(intermediate) -> str:
    return _choice("--intermediate", intermediate, INTERMEDIATE)


def check_arithmetic(arithmetic) -> str:
    return _choice("--arithmetic", arithmetic, ARITHMETIC)


def check_products(products) -> str:
    return _choice("--products", products, PRODUCTS)


def check_after_saturation(value) -> str:
    return _choice("--after-saturation", value, AFTER_SATURATION)


def check_layernorm_variance(value) -> str:
    return _choice("--layernorm-variance", value, LAYERNORM_VARIANCE)


def check_engine(value) -> str:
    return _choice("--engine", value, ENGINES)


def check_device(device) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, the latter two only where CUDA is available."""
    name = str(device)
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise GammaError(f"unknown --device '{name}' (choose cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GammaError(f"--device {name}: CUDA is not available on this machine")
    return name


def check_alpha_iters(iters) -> int:
    """An integer >= 0 (0: alpha-CROWN returns CROWN's bounds)."""
    try:
        n = -1 if isinstance(iters, bool) else operator.index(iters)
    except TypeError:
        n = -1
    if n < 0:
        raise GammaError(f"--alpha-iters must be an integer >= 0, got {iters}")
    return n


MAX_NORM_SPLITS = 64


def check_norm_splits(value) -> int:
    """An integer from 1 (no split) to :data:`MAX_NORM_SPLITS`."""
    try:
        n = 0 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = 0
    if not 1 <= n <= MAX_NORM_SPLITS:
        raise GammaError(f"--norm-splits must be an integer from 1 to {MAX_NORM_SPLITS}, got {value}")
    return n


def check_tolerance(tolerance) -> Optional[float]:
    """None, or a finite float >= 0."""
    if tolerance is None:
        return None
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        tol = float("nan")
    if not (math.isfinite(tol) and tol >= 0):
        raise GammaError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    return tol


# ------------------------------------------------------------------ the options
@dataclass(frozen=True)
class BoundOptions:
    """How to bound: checked when made (each field by its check above), then read only.

    ``epsilon`` may be given as the user's text (``"1e-3"``): a bad value is
    reported as written."""
    epsilon: float
    method: str = "crown"
    intermediate: str = "crown"       # bounds of intermediate nodes for crown / alpha
    arithmetic: str = "float32"
    device: str = "cpu"
    alpha_iters: int = 20
    products: str = "polar"           # elementwise products: PRODUCTS
    after_saturation: str = "crown"   # AFTER_SATURATION
    layernorm_variance: str = "any"   # LAYERNORM_VARIANCE
    engine: str = "float32"           # ENGINES
    norm_splits: int = 1              # pieces of each norm's mean square (1: no split; gamma.bounds.split)

    def __post_init__(self):
        checked = {"epsilon": check_epsilon(self.epsilon), "method": check_method(self.method),
                   "intermediate": check_intermediate(self.intermediate),
                   "arithmetic": check_arithmetic(self.arithmetic), "device": check_device(self.device),
                   "alpha_iters": check_alpha_iters(self.alpha_iters), "products": check_products(self.products),
                   "after_saturation": check_after_saturation(self.after_saturation),
                   "layernorm_variance": check_layernorm_variance(self.layernorm_variance),
                   "engine": check_engine(self.engine), "norm_splits": check_norm_splits(self.norm_splits)}
        if checked["engine"] != "float32" and checked["arithmetic"] == "real":
            raise GammaError("--engine llama.cpp bounds a float32 engine: it needs --arithmetic float32 or "
                             "float32-probabilistic, not real")
        if checked["norm_splits"] > 1 and (checked["method"] not in ("crown", "alpha")
                                           or checked["intermediate"] != "crown"):
            raise GammaError("--norm-splits needs --method crown or alpha with --intermediate crown")
        for name, value in checked.items():
            object.__setattr__(self, name, value)
