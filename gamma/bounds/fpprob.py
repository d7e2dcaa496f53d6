"""A probabilistic model of the dot products' float32 rounding: ``--arithmetic float32-probabilistic``.

The default mode (``float32``) bounds every float32 engine's rounding in any
summation order with no assumption (:mod:`.fpmargin`).  A dot product of n
terms then costs ``~ (n - 1) U max(P, N)`` per element, and CROWN charges
every element of every node with the worst sign: on the whole Whisper tiny.en
encoder that alone is an output width of 0.97 even if every relaxation were
exact (docs/depth.md, sixth round), against 3e-5 that real engines show.

The model (Higham and Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 2019): every rounding error ``delta`` of a
multiplication or an addition inside a dot product (linear layers, convs,
matmuls) satisfies ``|delta| <= U`` and has mean zero given all rounding
errors before it.  Nothing else is assumed: any summation order, blocking or
FMA.  Per element of such a node the error is

    e = sum_i eps_i t_i + sum_k delta_k z_k + sum_j eta_j w_j    (+ underflow)

with coefficient bounds over the node's input box ``|t_i| <= |x_i|max |w_i|``,
``|z_k| <= M (1 + U) + E`` (k - 1 additions), ``|w_j| <= S + E`` (``extra``
roundings after the sum), E the deterministic bound (:func:`.fp.dot_error_signed`),
S = sum |t_i|, M = max(P, N).  So the sum of squared coefficient bounds is

    v <= sum_i t_i,max^2 + (k - 1) (M (1 + U) + E)^2 + extra (S + E)^2.

A CROWN row meets these errors as ``sum_nodes Lambda_k . e_k``: a sum of
martingale increments with bounded coefficients, so by Azuma-Hoeffding it
exceeds ``LAMBDA U sqrt(sum Lambda_k^2 v_k)`` in size with probability at most
``2 exp(-LAMBDA^2 / 2)``, where the default charges ``sum |Lambda_k| E_k``.  A
row takes the smaller of the two (the deterministic one always holds): one
pooled charge per row and pass (:func:`crown.backward`).  A node's own box is
widened by ``det + min(E, LAMBDA U sqrt(v))`` per element (the same
probability per element).  Every bound so obtained is one event; the union
bound over all of them, ``2 N exp(-LAMBDA^2 / 2)``, is reported with the
bounds (:func:`failure`).

A norm's two row sums (its mean and its mean of squares, either variance
formula) are sums of basic operations too: their relative error bound
``gamma_n`` becomes ``LAMBDA U sqrt(n)`` (:func:`norm_sums`, one event per row and
sum), about half for n = 384-576, or less from the terms' sorted sizes in any summation
tree (:func:`norm_sum_tree`, :mod:`.fpsum`); in the ``E[x^2] - E[x]^2`` variance the two sums'
errors are joined in quadrature (:class:`NormSums`, one event); the rest of the norm's
margin (its rsqrt, LayerNorm's hedge for the engine's variance algorithm) stays as in the default
mode.

Left deterministic, as in the default mode: the library functions (GELU,
SiLU, exp), softmax, the norms' rsqrt and products, adds, products of two
activations' elements outside a dot product, underflow, weights a float32
engine rounds on load, and the error of gamma's own float32 products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .. import ops
from . import fp, fpsum
from .fpmargin import _rounded, _row_sum_gap

U = fp.U
LAMBDA = 10.0                   # Azuma's multiplier: 2 exp(-50) = 3.9e-22 per event
EXTRA = 3                       # roundings after the sum (as fp.dot_error_signed)
_F64 = 1.0 + 2.0 ** -40         # float64 rounding of these formulas themselves


@dataclass
class Split:
    """A dot-product node's float32 margin in the two parts the model treats apart
    (tensors of the node's shape): ``det`` is charged as in the default mode;
    ``dot`` (the deterministic bound E of the modelled roundings) or ``var``
    (their v) are pooled over a CROWN row."""
    det: torch.Tensor
    dot: torch.Tensor
    var: torch.Tensor

    def elementwise(self) -> torch.Tensor:
        """Per element: ``det + min(E, LAMBDA U sqrt(v))`` (one event per element)."""
        return self.det + torch.minimum(self.dot, LAMBDA * U * self.var.sqrt() * _F64)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.dot).all()) and bool(torch.isfinite(self.var).all()) \
            and bool(torch.isfinite(self.det).all())


def _parts(s, sq, value_abs, k, det) -> Split:
    """E and v from ``s >= sum|t|``, ``sq >= sum t_max^2``, ``value_abs >= |sum t|`` over
    the box, k terms; ``det``: the node's deterministic extras (underflow added here)."""
    e = fp.dot_error_signed(s, value_abs, k, extra=EXTRA)
    mid = torch.minimum(s, 0.5 * (s + value_abs))
    var = (sq + (k - 1) * (mid * (1 + U) + e) ** 2 + EXTRA * (s + e) ** 2) * _F64
    return Split(det + k * fp.SUBNORMAL, e, var)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x * x * _F64


def _linear(node, ins, out, prev):
    x = ins[0].abs_max()
    w, b = node.params["weight"], node.params.get("bias")
    s = out.abs_sums if out.abs_sums is not None else fp.matmul_upper(x, w.abs().T)
    sq = fp.matmul_upper(_sq(x), _sq(w).T)
    det = torch.zeros_like(s)
    dw, db = _rounded(w), (None if b is None else _rounded(b))
    if dw is not None:
        det = det + 2 * fp.matmul_upper(x, dw.T)
    if b is not None:
        s, sq = s + b.abs(), sq + _sq(b)
        if db is not None:
            det = det + 2 * db
    return _parts(s, sq, out.abs_max(), w.shape[1] + 1, det)


def _conv1d(node, ins, out, prev):
    x = ins[0].abs_max()
    w, b = node.params["weight"], node.params.get("bias")
    if _rounded(w) is not None or (b is not None and _rounded(b) is not None):
        return None                            # not float32-valued: left to the default margin
    k = w.shape[1] * w.shape[2] + 1
    up = 1.0 + (k + 2) * 2.0 ** -53          # float64 sums of k non-negative terms, rounded up
    conv = lambda a, c: ops._conv1d(a, c, None, node.params["stride"], node.params["padding"]) * up
    s, sq = conv(x, w.abs()), conv(_sq(x), _sq(w))
    if b is not None:
        s, sq = s + b.abs()[:, None], sq + _sq(b)[:, None]
    return _parts(s, sq, out.abs_max(), k, torch.zeros_like(s))


def _matmul(node, ins, out, prev):
    x, y = ins[0].abs_max(), ins[1].abs_max()
    s = fp.matmul_upper(x, y.transpose(-1, -2))
    sq = fp.matmul_upper(_sq(x), _sq(y).transpose(-1, -2))
    det = torch.zeros_like(s)
    if node.params.get("rows_sum_to_one"):
        det = det + _row_sum_gap(node, ins[0], prev) * y.mean(-1, keepdim=True).transpose(-1, -2)
    return _parts(s, sq, out.abs_max(), x.shape[-1], det)


SPLIT = {"linear": _linear, "conv1d": _conv1d, "matmul": _matmul}


def split(node, ins, out, prev: Optional[dict] = None) -> Optional[Split]:
    """The node's :class:`Split` (ins: its input boxes, out: its box before the margin,
    prev: the margins so far), or None for an op the model leaves deterministic."""
    rule = SPLIT.get(node.op)
    return None if rule is None else rule(node, ins, out, prev)


class NormSums(NamedTuple):
    """How a norm's row sums are charged in this mode (:func:`.fpmargin._norm`): ``relative(n)``
    the bound of one sum of n terms relative to the sum of their sizes (:func:`norm_sums`), and
    ``model(n)`` the model's alone (no minimum with ``gamma_n``), for errors of two sums taken
    together as one martingale (``sqrt`` of the sum of their squared coefficient bounds).
    ``tree(t)`` and ``coef(t)``: the same from the terms' sizes t (.., n) in any summation tree
    (:mod:`.fpsum`): a sum's error bound (.., 1) (:func:`norm_sum_tree`), and its coefficients'
    norm times ``LAMBDA U`` (:func:`norm_sum_coef`)."""
    relative: Callable[[int], float]
    model: Callable[[int], float]
    tree: Callable[[torch.Tensor], torch.Tensor]
    coef: Callable[[torch.Tensor], torch.Tensor]


def norm_sums_model(n: int) -> float:
    """``LAMBDA U sqrt(n) (1 + gamma_n)``: per unit of the terms' sizes, the bound under the model
    on a sum whose n roundings have coefficients of at most that size each."""
    return LAMBDA * U * math.sqrt(n) * (1 + float(fp.gamma(n))) * _F64


def norm_sums(n: int) -> float:
    """Relative error bound of a norm's row sum of n terms (its mean, its mean of squares) under
    the model, relative to the sum of the terms' sizes: each of the sum's roundings (a square, an
    addition, the division) has a coefficient of at most ``S (1 + gamma_n)``, so the error is within
    ``LAMBDA U sqrt(n) S (1 + gamma_n)`` but with probability ``2 exp(-LAMBDA^2 / 2)`` per row and sum
    (one event each); never above the deterministic ``gamma_n``."""
    return min(float(fp.gamma(n)), norm_sums_model(n))


def norm_sum_coef(t: torch.Tensor) -> torch.Tensor:
    """(.., 1): ``LAMBDA U`` times the norm of a sum's rounding coefficients, from its terms'
    sizes t (.., n) in any summation tree (:func:`.fpsum.tree_coef`): the model's bound on its
    error, one event per row and sum."""
    return LAMBDA * U * fpsum.tree_coef(t) * _F64


def norm_sum_tree(t: torch.Tensor) -> torch.Tensor:
    """(.., 1): a sum's error bound from its terms' sizes: the model's (:func:`norm_sum_coef`),
    never above the deterministic :func:`.fpsum.tree_error`."""
    return torch.minimum(fpsum.tree_error(t), norm_sum_coef(t))


NORM_SUMS = NormSums(norm_sums, norm_sums_model, norm_sum_tree, norm_sum_coef)


def pooled(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A row's charge from its summed ``|Lambda| . E`` (d) and ``Lambda^2 . v`` (v)."""
    return torch.minimum(d, LAMBDA * U * (v + 1e-300).sqrt() * _F64)


def failure(events: int) -> float:
    """Union bound of the probability that any of ``events`` bounds fails under the model."""
    return min(1.0, 2.0 * events * math.exp(-LAMBDA ** 2 / 2))
