"""Float32 error model of the reference engines (PyTorch, transformers, ctranslate2).

Approach: gamma bounds the *real-valued* function in float64 and, at each op,
adds an outward margin that bounds ``|fl32(op(x)) - op(x)|`` for every x in
the op's input interval, where ``fl32(op)`` is the float32 evaluation a
reference engine performs.  Inputs of an op are already float32 values, so
rounding them is not part of the model; what is modelled is the rounding of
every float32 operation inside the op's formula and the error of the float32
library functions it calls.  With ``U = 2**-24`` (unit roundoff):

* elementwise functions (:func:`elementwise_error`): per function, constants
  ``rel`` and ``lin`` (data in :data:`MODELS`) such that
  ``|fl32(f(x)) - f(x)| <= U*(rel*|f(x)| + lin*|x|) + FLOOR`` for every
  float32 x; over an interval we use ``sup|f|`` (from :func:`relax.interval`)
  and ``sup|x|``.  ``FLOOR = 2**-120`` covers underflow, subnormal results,
  flush-to-zero, and exp overflowing to inf inside silu/sigmoid (where the true
  value is below 2.7e-37).  Inputs where float32 itself overflows (exp above
  88.7, square above 1.8e19, reciprocal/rsqrt below 2**-126) give ``inf``.
  Assumed library accuracy: exp, tanh, erf, sqrt-style calls within 4 ulp,
  or erf within 17 U absolute (PyTorch's CPU GELU uses the
  Abramowitz-Stegun 7.1.26 erf, about 6 U absolute in float32).  Formulas
  (derivations at each entry): gelu ``0.5*x*(1+erf(x/sqrt2))``, gelu_tanh
  ``0.5*x*(1+tanh(k*(x+0.044715*x^3)))``, silu ``x/(1+exp(-x))`` or
  ``x*sigmoid(x)``, sigmoid ``1/(1+exp(-x))``, rsqrt ``1/sqrt(x)`` or a
  <= 3 ulp rsqrt, ``x*x`` (IEEE), ``1/x`` and ``sqrt`` within 2 ulp (torch's
  CPU float32 sqrt is not correctly rounded: 0.75 ulp).  Inputs are
  not flushed (DAZ off), except that sqrt pays 2**-63 and reciprocal/rsqrt
  give inf below 2**-126 in case they are.
* dot products and sums (:func:`dot_error`): ``gamma(n) * sum|a_i b_i|``
  with ``gamma(n) = n U / (1 - n U)``, valid for any summation order, blocking
  and FMA, plus ``n * 2**-149`` for underflow of the products.

Validated empirically in ``tests/test_fp.py`` against torch float32 on about
a million points per function and on float32 matmul / sum of random vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from ..errors import UnsupportedOp
from . import relax

__all__ = ["U", "FLOOR", "F32Model", "MODELS", "gamma", "dot_error", "elementwise_error"]

U = 2.0 ** -24                    # float32 unit roundoff
FLOOR = 2.0 ** -120               # absolute floor: underflow / FTZ / silu overflow
SUBNORMAL = 2.0 ** -149           # smallest positive float32
NORMAL_MIN = 2.0 ** -126
FLT_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class F32Model:
    """``|fl32(f(x)) - f(x)| <= U*(rel*|f(x)| + lin*|x|) + FLOOR`` on float32 x.

    ``overflow_above`` / ``overflow_below``: inputs beyond which the float32
    result may be inf (error bound inf).  ``daz``: extra absolute error if
    subnormal inputs are flushed to zero.
    """

    rel: float
    lin: float = 0.0
    overflow_above: float = math.inf
    overflow_below: float = -math.inf
    overflow_abs: float = math.inf     # |x| above this may overflow
    daz: float = 0.0


MODELS = {
    # y = x/sqrt2 (2U rel) -> erf: own error E <= 17U abs, plus argument error
    # 2U|y| erf'(y) <= 1U; s = 1 + erf (1U rel); 0.5*x*s (2U rel).  So
    # err <= 3U|f| + 0.5|x|(E + 1U + 3U E) + O(U^2) <= U(4|f| + 10|x|).
    "gelu": F32Model(rel=4.0, lin=10.0),
    # z = k(x + c x^3): <= 8U rel (x^3, rounded c and k, sum of like signs);
    # tanh: 4 ulp = 8U|tanh| + sech^2(z) 8U|z| <= 3.6U; 1 + t, 0.5*x*(.):
    # err <= 3U|f| + 0.5|x|(8U + 3.6U) <= U(4|f| + 6|x|).
    "gelu_tanh": F32Model(rel=4.0, lin=6.0),
    # e = exp(-x) 4 ulp = 8U rel, 1 + e, x / (.) or x * (1/(.)): relative
    # <= 8U + 3U; exp overflow (x < -88.7) returns -0, |f| < 2.7e-37 < FLOOR.
    "silu": F32Model(rel=12.0),
    "sigmoid": F32Model(rel=12.0),
    # 4 ulp library function
    "exp": F32Model(rel=8.0, overflow_above=88.7),
    "tanh": F32Model(rel=8.0),
    # 1/x, sqrt: 2 ulp allowed (torch CPU float32 sqrt is 0.75 ulp, not correctly
    # rounded); rsqrt: 1/sqrt(x), two roundings, or a <= 3 ulp rsqrt
    "reciprocal": F32Model(rel=4.0, overflow_below=NORMAL_MIN),
    "rsqrt": F32Model(rel=6.0, overflow_below=NORMAL_MIN),
    "sqrt": F32Model(rel=4.0, daz=2.0 ** -63),
    "square": F32Model(rel=2.0, overflow_abs=1.8e19),
}


def gamma(n) -> Union[float, torch.Tensor]:
    """``gamma_n = n U / (1 - n U)`` (inf when n U >= 1); int or tensor n."""
    if isinstance(n, torch.Tensor):
        nu = n.to(torch.float64) * U
        return torch.where(nu < 1, nu / (1 - nu), torch.full_like(nu, math.inf))
    nu = float(n) * U
    return nu / (1.0 - nu) if nu < 1 else math.inf


def dot_error(abs_sum, n) -> torch.Tensor:
    """Bound of |fl32(sum of n terms) - exact sum| given ``abs_sum = sum|terms|``.

    Terms are products ``a_i*b_i`` of float32 values (or float32 values
    themselves); any summation order, blocking or FMA.  ``abs_sum`` is a tensor
    (any shape, any float dtype; returned as float64), ``n`` an int or a
    tensor broadcastable to it.  Where the float32 evaluation may overflow the
    bound is inf.
    """
    s = torch.as_tensor(abs_sum, dtype=torch.float64)
    g = gamma(n)
    nn = n.to(torch.float64) if isinstance(n, torch.Tensor) else float(n)
    err = g * s + nn * SUBNORMAL
    err = err * (1.0 + 2.0 ** -40)   # float64 rounding of this formula itself
    over = s * (1.0 + g) >= FLT_MAX
    return torch.where(over | torch.isnan(err), torch.full_like(err, math.inf), err)


def elementwise_error(fn: str, l, u) -> torch.Tensor:
    """Per-element bound of |fl32(fn(x)) - fn(x)| for float32 x in [l, u].

    l, u: tensors (broadcast); float64 result of the broadcast shape.
    """
    model = MODELS.get(fn)
    if model is None:
        raise UnsupportedOp(str(fn), "fp")
    lo, hi = relax.interval(fn, l, u)
    l, u = torch.broadcast_tensors(torch.as_tensor(l, dtype=torch.float64),
                                   torch.as_tensor(u, dtype=torch.float64))
    fmag = torch.maximum(lo.abs(), hi.abs())
    xmag = torch.maximum(l.abs(), u.abs())
    err = U * (model.rel * fmag + model.lin * xmag) + FLOOR
    if model.daz:
        err = torch.where(l < NORMAL_MIN, err + model.daz, err)
    err = err * (1.0 + 2.0 ** -40)   # float64 rounding of this formula itself
    over = (u > model.overflow_above) | (l < model.overflow_below) | (xmag > model.overflow_abs)
    over = over | ~torch.isfinite(err)
    return torch.where(over, torch.full_like(err, math.inf), err)
