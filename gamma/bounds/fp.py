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
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Union

import torch

from ..errors import UnsupportedOp
from ..float32 import is_exact32, weight32
from ..ops import matmul_sparse_rows
from . import relax

__all__ = ["U", "FLOOR", "F32Model", "MODELS", "gamma", "dot_error", "elementwise_error", "abs_matmul_upper",
           "matmul_upper", "f32_matmul_is_ieee", "CotangentProduct", "linear_image", "AbsCache",
           "ABS_CACHE"]

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


def dot_error_signed(abs_sum, value_abs, n_terms, extra: int = 3) -> torch.Tensor:
    """Bound of |fl32(sum of n_terms terms) - exact sum| that uses the cancellation
    between the terms; never looser than ``dot_error(abs_sum, n_terms + extra)``.

    ``abs_sum`` >= S = sum|t_i| (t_i = a_i b_i of float32 values, or float32
    values such as a bias) and ``value_abs`` >= |sum t_i|, both over the whole
    input box; ``extra`` roundings of the result follow (a scale, a division).

    Any summation tree, FMA or not: the error is ``sum_i eps_i t_i + sum_k
    delta_k z_k`` (|eps_i|, |delta_k| <= U), z_k the exact sum of the two
    computed operands of addition k.  Each operand is the computed sum of a
    subset of the terms, so ``|z_k| <= max(P, N) (1 + U) + E`` with P (N) the
    sum of the positive (negative) terms and E the error bound itself.  Since
    ``P + N = S`` and ``P - N = sum t_i``, ``max(P, N) = (S + |sum t_i|) / 2
    =: M``, and solving for E over the ``n_terms - 1`` additions and ``extra``
    final roundings (each at most ``U (|sum| + E) <= U (S + E)``):

        E <= [(1 + extra) U S + (n_terms - 1) U (1 + U) M] / (1 - (n_terms + extra) U)

    plus ``n_terms 2^-149`` for underflowing products.  With terms of both
    signs (M near S / 2) this is about half of ``gamma_n S``; with one sign it
    is the same."""
    s = torch.as_tensor(abs_sum, dtype=torch.float64)
    y = torch.as_tensor(value_abs, dtype=torch.float64)
    k = float(n_terms)
    nu = (k + extra) * U
    if nu >= 1:
        return torch.full_like(s + y, math.inf)
    mid = torch.minimum(s, 0.5 * (s + y))
    err = ((1 + extra) * U * s + (k - 1) * U * (1 + U) * mid) / (1 - nu) + k * SUBNORMAL
    err = err * (1.0 + 2.0 ** -40)   # float64 rounding of this formula itself
    over = s * (1.0 + gamma(k + extra)) >= FLT_MAX
    return torch.where(over | torch.isnan(err), torch.full_like(err, math.inf), err)


def elementwise_error(fn: str, l, u, image=None) -> torch.Tensor:
    """Per-element bound of |fl32(fn(x)) - fn(x)| for float32 x in [l, u].

    l, u: tensors (broadcast); float64 result of the broadcast shape.
    ``image``: ``relax.interval(fn, l, u)`` when the caller has it (or any
    enclosure of fn over [l, u]).
    """
    model = MODELS.get(fn)
    if model is None:
        raise UnsupportedOp(str(fn), "fp")
    lo, hi = image if image is not None else relax.interval(fn, l, u)
    l, u = torch.broadcast_tensors(torch.as_tensor(l, dtype=torch.float64),
                                   torch.as_tensor(u, dtype=torch.float64))
    fmag = torch.maximum(lo.abs(), hi.abs())
    xmag = torch.maximum(l.abs(), u.abs())
    err = U * (model.rel * fmag + model.lin * xmag) + FLOOR
    if model.daz:
        err = torch.where(l < NORMAL_MIN, err + model.daz, err)
    err = err * (1.0 + 2.0 ** -40)   # float64 rounding of this formula itself
    over = (u > model.overflow_above) | (l < model.overflow_below) | (xmag > model.overflow_abs)
    # err >= 0 or NaN: every non-finite entry becomes inf, as does every entry that may overflow
    return err.masked_fill_(over, math.inf).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)


def f32_matmul_is_ieee(device) -> bool:
    """Whether float32 matmuls on ``device`` are IEEE float32 (no TF32 / bf16
    shortcuts), which :func:`abs_matmul_upper`'s error bound assumes."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(mk, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    if torch.device(device).type == "cuda":
        cm = torch.backends.cuda.matmul
        if cm.allow_tf32 or getattr(cm, "fp32_precision", "none") not in ("none", "ieee"):
            return False
    return torch.device(device).type in ("cpu", "cuda")


def _up32(t: torch.Tensor) -> torch.Tensor:
    """float32 values >= t (t >= 0, float64): round-to-nearest of
    ``t (1 + 2^-23) + 2^-149`` is never below t; above FLT_MAX it is inf."""
    return (t * (1.0 + 2.0 ** -23) + SUBNORMAL).to(torch.float32)


def abs_matmul_upper(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float64 upper bound of ``a @ |w|^T`` for ``a >= 0`` (.., n) and w (m, n),
    computed as one float32 product (about twice the speed of float64 on CPU
    and half the memory traffic for |w|).

    Both operands are rounded up to float32 (:func:`_up32`), so their exact
    product S is at least the wanted one; the float32 result P of any
    summation order satisfies ``P >= (1 - gamma_n) S - n 2^-149``, hence
    ``S <= (P + n 2^-149) / (1 - gamma_n)``, evaluated in float64 with a
    relative slack for its own rounding.  Falls back to float64 when float32
    matmuls may use TF32 / bf16.
    """
    w32 = ABS_CACHE.get(w) if f32_matmul_is_ieee(a.device) else None
    if w32 is None:
        return _up64(a @ w.abs().T, w.shape[-1])
    return _from32(_up32(a) @ w32.T, w.shape[-1])


class AbsCache:
    """|W| in float32 of the most recently used float32-valued weights, at most
    ``budget`` bytes (least recently used first out), keyed by the weight tensor
    and dropped when it dies or is modified in place, so a loaded model forms
    each |W| once instead of on every bound call."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._store: "OrderedDict[int, tuple]" = OrderedDict()   # id(w) -> (|w| float32, w's version)

    def __contains__(self, w: torch.Tensor) -> bool:
        return id(w) in self._store

    def fits(self, w: torch.Tensor) -> bool:
        """Whether |w| in float32 would fit in the budget."""
        return w.numel() * 4 <= self.budget

    def get(self, w: torch.Tensor):
        """|w| in float32 when w is float32-valued (:func:`gamma.float32.is_exact32`), else None
        (kept when it fits)."""
        key = id(w)
        hit = self._store.get(key)
        if hit is not None and hit[1] == w._version and hit[0].device == w.device:
            self._store.move_to_end(key)
            return hit[0]
        w32 = weight32(w)
        if w32 is None:
            return None
        a = w32.abs()
        size = a.numel() * a.element_size()
        if size <= self.budget:
            self._drop(key)
            self._store[key] = (a, w._version)
            self.bytes += size
            weakref.finalize(w, self._drop, key)
            while self.bytes > self.budget:
                self._drop(next(iter(self._store)))
        return a

    def _drop(self, key: int) -> None:
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= old[0].numel() * old[0].element_size()


ABS_CACHE = AbsCache(512 << 20)     # the process's cache of |W| (512 MiB)


ABS_CHUNK = 1 << 20         # default: weights above 4x this many entries get |W| a chunk of rows at a time


def _abs_max(w: torch.Tensor) -> float:
    """max|w|, computed once per tensor (remembered while it lives)."""
    v = _ABSMAX.get(id(w))
    if v is None:
        v = float(torch.stack(list(w.aminmax())).abs().max()) if w.numel() else 0.0
        _ABSMAX[id(w)] = v
        weakref.finalize(w, _ABSMAX.pop, id(w), None)
    return v


_ABSMAX: dict = {}


def _center_abs_products(c32: torch.Tensor, a32: torch.Tensor, w32: torch.Tensor, absw, chunk: int):
    """``c32 @ W^T`` and ``a32 @ |W|^T`` in float32 (``absw``: |W| when cached).
    Otherwise, for large W (an lm_head) |W| is formed a chunk of rows at a time into one reused buffer instead of
    one full-size temporary of fresh pages per call."""
    m, n = w32.shape
    if absw is not None:
        return c32 @ w32.T, a32 @ absw.T
    if m * n <= 4 * chunk:
        return c32 @ w32.T, a32 @ w32.abs().T
    step = max(1, chunk // max(1, n))
    p = torch.empty(c32.shape[:-1] + (m,), dtype=torch.float32, device=c32.device)
    s = torch.empty(a32.shape[:-1] + (m,), dtype=torch.float32, device=c32.device)
    buf = torch.empty(step, n, dtype=torch.float32, device=c32.device)
    for i in range(0, m, step):
        wc = w32[i:i + step]
        k = wc.shape[0]
        p[..., i:i + k] = c32 @ wc.T
        s[..., i:i + k] = a32 @ torch.abs(wc, out=buf[:k]).T
    return p, s


def linear_image(c: torch.Tensor, r: torch.Tensor, w: torch.Tensor, *, cache: AbsCache = ABS_CACHE,
                 chunk: int = ABS_CHUNK):
    """IBP of ``x W^T`` over the box ``|x - c| <= r`` (c, r: float64 (.., n);
    W: (m, n)).  Returns float64 ``(p, rad, sums)``: ``x W^T`` lies in
    ``p +- rad`` for every x in the box and ``sums >= |x| |W|^T`` (what the
    float32 margin needs).

    With float32-valued W and IEEE float32 matmuls all three come from two
    float32 products, about twice the speed of float64 and with no
    conversion of W when its float32 source is registered (:func:`gamma.float32.register_f32`).
    With ``c32 = fl32(c)`` (``|c - c32| <= U |c32| + 2^-150``), ``r32 >= r``
    (the next float32 up), ``P = fl32(c32 W^T)`` and ``[S_r; S_c] =
    fl32([r32; |c32|] |W|^T)``, any summation order or FMA:

    * ``A_r = |W| r32 <= k (S_r + n 2^-149)`` and ``A_c = |W| |c32| <= k (S_c + n 2^-149)``,
      ``k = 1 / (1 - gamma_n)`` (a sum of non-negative terms);
    * ``|P - W c32| <= gamma_n A_c + n 2^-149``;
    * ``|W x - W c32| <= A_r + U A_c + n 2^-150 max|W|``;

    so ``rad = k S_r + k (gamma_n + U) S_c + F`` with
    ``F = n 2^-147 (1 + max|W|)`` covering every underflow term, and
    ``sums = k S_r + k (1 + U) S_c + F``; times ``1 + 2^-40`` for their own
    float64 rounding.  The centre's rounding costs one more float32 dot error
    (``gamma_n A_c``), about half the node's own float32 margin.  Where a
    product may have overflowed (or met ``inf * 0``) the radius is inf.
    Without float32-valued W: the float64 products ``c W^T`` and
    :func:`abs_matmul_upper`.  ``cache``: where |W| is kept (when it fits);
    ``chunk``: rows of a larger |W| are formed about this many entries at a time."""
    n = w.shape[-1]
    w32 = weight32(w) if f32_matmul_is_ieee(c.device) else None
    if w32 is None:
        p = c @ w.T
        s = abs_matmul_upper(torch.stack([r, c.abs()]), w)
        return p, s[0], s[0] + s[1]
    if r.numel() and not bool(torch.isfinite(r.amin())):       # r >= 0: one finite entry makes the min finite
        # every input unbounded: so is every output (a zero row of W would give
        # exactly 0, reported as unbounded: sound, and no products are spent)
        inf = torch.full(c.shape[:-1] + (w.shape[0],), math.inf, dtype=c.dtype, device=c.device)
        return torch.zeros_like(inf), inf, inf
    c32 = c.to(torch.float32)
    a32 = torch.empty((2,) + tuple(c.shape), dtype=torch.float32, device=c.device)
    torch.nextafter(r.to(torch.float32), torch.tensor(math.inf, device=c.device), out=a32[0])
    torch.abs(c32, out=a32[1])
    absw = cache.get(w) if cache.fits(w) else None      # else formed in chunks
    p32, s32 = _center_abs_products(c32, a32, w32, absw, chunk)
    g = gamma(n)
    slack = 1.0 + 2.0 ** -40
    k = slack / (1.0 - g)
    f = n * 2.0 ** -147 * (1.0 + _abs_max(w)) * slack
    s = s32.to(c.dtype)
    rad = s[0].mul(k).add_(s[1], alpha=k * (g + U)).add_(f)
    sums = torch.add(rad, s[1], alpha=k * (1.0 - g))          # k (1 + U) - k (g + U)
    p = p32.to(c.dtype)
    if not float(s32.amax()) < 2.0 ** 120:      # overflow, inf or NaN somewhere: take the careful path
        bad = torch.isfinite(p + rad).logical_not_()            # rad >= 0 or NaN
        rad.masked_fill_(bad, math.inf)
        sums.nan_to_num_(nan=math.inf, posinf=math.inf)
        p.masked_fill_(bad, 0.0)
    return p, rad, sums


def matmul_upper(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 upper bound of ``a @ b`` for ``a, b >= 0`` (float64, matmul
    shapes, batched), by one float32 product as :func:`abs_matmul_upper`."""
    if not f32_matmul_is_ieee(a.device):
        return _up64(a @ b, a.shape[-1])
    return _from32(_up32(a) @ _up32(b), a.shape[-1])


def _up64(p: torch.Tensor, n: int) -> torch.Tensor:
    """The float64 fallback made an upper bound as well: a float64 sum of n
    non-negative terms is within ``(n + 1) 2^-53`` relative of its exact value,
    plus underflow."""
    return p.mul_(1.0 + (n + 2) * 2.0 ** -53).add_(n * 2.0 ** -1074)


def _from32(p: torch.Tensor, n: int) -> torch.Tensor:
    """``S <= (P + n 2^-149) / (1 - gamma_n)`` for the float32 result P of an
    n-term product of non-negative float32 operands with exact value S."""
    k = (1.0 + 2.0 ** -50) / (1.0 - gamma(n))
    out = p.to(torch.float64).mul_(k).add_(n * SUBNORMAL * k)
    return out.nan_to_num_(nan=math.inf, posinf=math.inf)     # inf * 0 in the product: unbounded, never NaN


@dataclass
class CotangentProduct:
    """A linear layer's CROWN transpose ``lam W`` as one float32 product, with
    the rounding error moved into the bound's constant.

    For ``y = W x + b`` (W: (out, in), float32-valued) and a cotangent lam of
    y, the backward step needs ``lam . y = (lam W) . x + lam . b``.  It uses
    ``L = fl32(fl32(lam) @ W)`` (float64 result) instead of ``lam W`` and
    writes, with x0 the centre and r the radius of x's bounds,

        lam . y = L . x + [lam . (W x0 + b) - L . x0] + (lam W - L) . (x - x0)

    The bracket is evaluated in float64 (two dot products per row).  The last
    term is at most ``|lam W - L| . r``; rounding lam to float32 (relative U)
    and the n-term float32 dot products (``gamma_n``, any order, FMA) give
    ``|lam W - L| <= gamma_{n+1} |lam| |W| + (n + 1) 2^-125 (1 + max|W|)``
    per entry (n = out; the absolute part covers underflow and flush to
    zero), so

        (lam W - L) . (x - x0)  >=  -|lam| . (gamma_{n+1} |W| r) - floor,

    with ``|W| r`` an upper bound computed once per node and
    ``floor = (n + 1) 2^-125 (1 + max|W|) sum(r)``.  ``err = gamma_{n+1} |W| r``
    is charged like a float32 margin of the node (the CROWN walk already
    forms ``|lam| . margin`` there), and it is at most ``r / |x|max`` times
    that margin.  The bound holds when the float32 evaluation did not
    overflow, which a finite result shows (an overflow leaves inf or NaN in
    L and so in ``L . x0``); otherwise the float64 product is used.
    """

    w32: torch.Tensor        # (out, in) float32
    y0: torch.Tensor         # W x0 + b, the node's shape
    x0: torch.Tensor         # centre of x's bounds, the input's shape
    err: torch.Tensor        # upper bound of gamma_{out+1} |W| r, the node's shape
    floor: float

    @staticmethod
    def build(w: torch.Tensor, b, x_lower: torch.Tensor, x_upper: torch.Tensor):
        """The per-node constants, or None where the float32 product does not
        apply: weights not float32-valued, non-IEEE float32 matmuls, or
        unbounded inputs."""
        if not f32_matmul_is_ieee(w.device) or not is_exact32(w):
            return None
        if not (bool(torch.isfinite(x_lower).all()) and bool(torch.isfinite(x_upper).all())):
            return None
        x0 = (x_lower + x_upper) / 2
        r = torch.maximum(x_upper - x0, x0 - x_lower) * (1.0 + 2.0 ** -52)   # >= |x - x0| on the box
        y0 = x0 @ w.T
        if b is not None:
            y0 = y0 + b
        n = w.shape[0]
        err = abs_matmul_upper(r, w).mul_(gamma(n + 1) * (1.0 + 2.0 ** -40))
        wmax = float(w.abs().max()) if w.numel() else 0.0
        floor = (n + 1) * 2.0 ** -125 * (1.0 + wmax) * float(r.sum()) * (1.0 + 2.0 ** -40)
        if not math.isfinite(floor) or not bool(torch.isfinite(err).all()):
            return None
        return CotangentProduct(weight32(w), y0, x0, err, floor)

    def product(self, lam: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        """``fl32(fl32(lam) @ W)`` as float64 (zero rows skipped unless ``sparse=False``)."""
        return matmul_sparse_rows(lam, self.w32, torch.float32, sparse)
