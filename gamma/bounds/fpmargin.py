"""Per-node float32 rounding margins.

gamma bounds the real-valued function in float64 and then, at every node,
adds an outward margin ``m`` that bounds |fl32(op(x)) - op(x)| for every x
in the node's input box, where fl32 is any float32 evaluation of the op
(any summation order, FMA or not, scale applied before or after a matmul).
By induction over the graph, bounds that contain the float32 inputs of a
node and are widened by its margin contain its float32 output.  IBP and
zonotopes add ``m`` to the node's radius; CROWN adds ``|Lambda| . m`` to the
constant of the backward bound at that node.

The float64 rounding of gamma's own bound arithmetic is about 2^29 times
smaller than these float32 margins at the same magnitudes, so the margins
cover it as well.

Each rule takes ``(node, inputs: list[Interval], out: Interval)`` and
returns a tensor of the node's shape, or None for exact ops (permutations).
"""

from __future__ import annotations

import math
import struct
from typing import Callable, NamedTuple, Optional

import torch

from .. import ops
from ..float32 import is_exact32
from . import fp, fpsum
from .interval import Interval
from .norm import norm_stats

U = 2.0 ** -24
# Rules proven for IEEE float32 arithmetic in any evaluation order (dot products, sums,
# products, RoPE's two products and sum) are charged as derived.  Rules that also model an
# algorithm or a library an engine may implement its own way (elementwise functions: the
# library's ulp accuracy; softmax: exp's accuracy and where the division sits; LayerNorm:
# two-pass, E[x^2]-E[x]^2 or Welford-style moments) keep a doubling as a hedge.  RMSNorm has no
# variance formula to choose (a mean of squares: a sum in any tree, :mod:`.fpsum`, then a
# division, the eps add, the rsqrt and two products): its rule is derived but for the library's
# rsqrt, and only that allowance is doubled (RSQRT_U, HEDGE).  LayerNorm likewise where the engine
# is known to compute its variance by one of the two formulas (``--layernorm-variance formula``) or by
# the two-pass one (``two-pass``), which also drops the one-pass form's error.
HEDGED = {"gelu", "gelu_tanh", "silu", "softmax", "layernorm"}
HEDGE = 2.0
RSQRT_U = 6.0                   # the library's rsqrt (or 1 / sqrt, or the division by sqrt): 6 U relative


def hedged(op: str, variance: str = "any") -> bool:
    """Whether the op's margin is doubled as a whole (:data:`HEDGED`): LayerNorm's not where the
    engine computes its variance by a formula (``variance``, :data:`gamma.options.LAYERNORM_VARIANCE`:
    "formula", E[x^2] - E[x]^2 or mean((x - mean)^2), or "two-pass", the latter only; both derived
    in :func:`_norm`), only its rsqrt's."""
    return op in HEDGED and not (variance != "any" and op == "layernorm")


def _rounded(c):
    """``|c - fl32(c)|`` for a constant a float32 engine rounds on load (a tensor or a
    float), or None where c is float32-valued already (checkpoint weights, RoPE tables)."""
    if isinstance(c, torch.Tensor):
        return None if is_exact32(c) else (c - c.to(torch.float32).to(c.dtype)).abs()
    try:
        d = abs(float(c) - struct.unpack("f", struct.pack("f", float(c)))[0])   # no tensor: no device
    except (OverflowError, struct.error):                                        # beyond float32's range
        return math.inf
    return d or None


def _rel(out: Interval, k: float) -> torch.Tensor:
    return k * U * out.abs_max()


def _dot(s, out, n_terms, value_abs: bool = False):
    """Margin of a dot-product node from ``s >= sum|terms|`` over the box and the
    node's interval (|value| over the box; ``value_abs``: ``out`` is that bound
    already): :func:`fp.dot_error_signed`."""
    return fp.dot_error_signed(s, out if value_abs else out.abs_max(), n_terms)


def _linear(node, ins, out):
    """``x W^T + b``: n products and the bias, ``S = |x|max |W|^T + |b|``."""
    s = out.abs_sums                          # left by the IBP rule: the same product, computed once
    if s is None:
        s = ins[0].abs_max() @ node.params["weight"].abs().T
    b = node.params.get("bias")
    if b is not None:
        s = s + b.abs()
    m = _dot(s, out, node.params["weight"].shape[1] + 1)
    dw, db = _rounded(node.params["weight"]), (None if b is None else _rounded(b))
    if dw is not None:                       # weights that are not float32 values: their rounding on load
        m = m + 2 * (ins[0].abs_max() @ dw.T)
    if db is not None:
        m = m + 2 * db
    return m


def _conv1d(node, ins, out):
    w = node.params["weight"]
    s = ops._conv1d(ins[0].abs_max(), w.abs(), None, node.params["stride"], node.params["padding"])
    b = node.params.get("bias")
    if b is not None:
        s = s + b.abs()[:, None]
    return _dot(s, out, w.shape[1] * w.shape[2] + 1)


def _conv2d(node, ins, out):
    w = node.params["weight"]
    s = ops._conv2d_abs(node, ins[0].abs_max())
    b = node.params.get("bias")
    if b is not None:
        s = s + b.abs()[:, None, None]
    return fp.dot_error(s, w.shape[1] * w.shape[2] * w.shape[3] + 4)


def _reduce_mean(node, ins, out):
    """A sum of n terms, then one division."""
    axes = node.params["axes"]
    n = 1
    for a in axes:
        n *= ins[0].lower.shape[a]
    return fp.dot_error(ops.FORWARD["reduce_mean"](node, ins[0].abs_max()), n + 4) + _rel(out, 1.0)


def _matmul(node, ins, out, prev=None):
    """``x y^T``, x (.., T, a), y (.., S, a).  For attention @ V (x: probabilities)
    the bound rules use ``x y^T = x (y - m)^T + m^T``, which assumes rows of x
    summing to one; a float32 softmax's rows miss one by at most their summed
    margins, so ``|rowsum(x) - 1| |m|`` is charged here as well (|m| <= mean |y|,
    whatever centre a method shifts by)."""
    x, y = ins[0].abs_max(), ins[1].abs_max()
    m = _dot(fp.matmul_upper(x, y.transpose(-1, -2)), out, x.shape[-1])
    if node.params.get("rows_sum_to_one"):
        m = m + _row_sum_gap(node, ins[0], prev) * y.mean(-1, keepdim=True).transpose(-1, -2)
    return m


def _row_sum_gap(node, x: Interval, prev) -> torch.Tensor:
    """(.., T, 1) bound of ``|rowsum(p) - 1|`` for the float32 probabilities p in
    the box ``x``: the softmax's summed margins (the real softmax sums to one),
    or, where they are not known, what the box itself allows."""
    sm = None if prev is None else prev.get(node.inputs[0])
    if sm is not None:
        return sm.sum(-1, keepdim=True) * (1.0 + 2.0 ** -40)
    gap = torch.maximum(x.upper.sum(-1, keepdim=True) - 1, 1 - x.lower.sum(-1, keepdim=True))
    return gap.clamp_min(0) * (1.0 + 2.0 ** -40) + 2.0 ** -60


def _matmul_const(node, ins, out):
    """``x c``; a c that is not float32-valued is rounded by the engine: |x| |dc| more
    in the value and in the sums the dot error sees."""
    c = node.params["c"]
    x = ins[0].abs_max()
    dc = _rounded(c)
    extra = 0.0 if dc is None else x @ dc
    return _dot(x @ c.abs() + extra, out.abs_max() + extra, c.shape[-2], True) + extra


def _rope(node, ins, out):
    x = ins[0].abs_max()
    s = x * node.params["cos"].abs() + ops.rotate_half_abs(x) * node.params["sin"].abs()
    m = 3 * U * (1 + U) * s                 # two products and their sum, each rounded once
    dcos, dsin = _rounded(node.params["cos"]), _rounded(node.params["sin"])
    if dcos is not None or dsin is not None:  # tables that are not float32 values (transformers' are)
        z = torch.zeros_like(x)
        m = m + 2 * (x * (z if dcos is None else dcos) + ops.rotate_half_abs(x) * (z if dsin is None else dsin))
    return m


def _elementwise(node, ins, out):
    return fp.elementwise_error(node.op, ins[0].lower, ins[0].upper, image=(out.lower, out.upper))


def _softmax(node, ins, out):
    x = ins[0]
    mask = node.params.get("mask")
    n = x.lower.shape[-1]
    hi = x.upper if mask is None else x.upper.masked_fill(~mask, float("-inf"))
    row_max = hi.max(-1, keepdim=True).values
    lo = x.lower if mask is None else x.lower.masked_fill(~mask, 0.0)
    span = (row_max - lo).clamp_min(0)                    # |x_j - max| over the box
    e = U * span + 4 * U                                  # relative error of each exp term
    e_max = e if mask is None else e.masked_fill(~mask, 0.0)
    rel = e + e_max.max(-1, keepdim=True).values + fp.gamma(n + 2) + 2 * U
    m = out.upper * rel + 2.0 ** -126
    return m if mask is None else m.masked_fill(~mask, 0.0)


class CommonModes(NamedTuple):
    """A margin split into an elementwise part and row-shared errors:
    ``fl32(y) - y = e + sum_k t_k v_k`` with ``|e| <= elem`` elementwise and, per row
    (last axis), one scalar ``|t_k| <= s_k`` (.., 1) times a vector ``v_k`` that lies
    in ``vc_k +- vr_k`` (the node's shape).  CROWN charges ``|lam| . elem + sum_k
    sum_rows s_k |lam_row . vc_k| + |lam| . (s_k vr_k)``: the shared error of a row
    costs what its signed sum costs, not the sum of its absolute values."""
    elem: torch.Tensor
    modes: tuple

    def total(self) -> torch.Tensor:
        """The elementwise margin the split comes from: ``elem + sum_k s_k |v_k|``."""
        m = self.elem
        for vc, vr, s in self.modes:
            m = m + s * (vc.abs() + vr)
        return m

    def finite(self) -> bool:
        return bool(torch.isfinite(self.elem).all()) and all(
            bool(torch.isfinite(s).all()) and bool(torch.isfinite(vc).all()) and bool(torch.isfinite(vr).all())
            for vc, vr, s in self.modes)


def norm_modes(node, ins, out, sums=None, variance: str = "any") -> CommonModes:
    """The norm's float32 margin as :class:`CommonModes` (hedged like the other
    norm margins).  The row's inverse scale is computed once: ``r' = r (1 + t)``
    with ``|t| <= rel_s``, a shared error ``t n_i`` of every normalised value, so
    ``t w_i n_i`` in the output; LayerNorm's mean is computed once: ``mu' = mu + e``
    with ``|e| <= e_mu``, a shared ``-e r w_i`` in the output (``|e r| <= e_mu
    s_hi``).  What is left per element: the centring's own rounding, the two
    products and the bias add, and the cross terms of the shared errors.  ``variance``: how the
    engine computes LayerNorm's variance (:func:`hedged`)."""
    parts = _norm(node, ins, out, sums, variance)
    h = HEDGE if hedged(node.op, variance) else 1.0
    return CommonModes(h * parts.elem, tuple((vc, vr, h * s) for vc, vr, s in parts.modes))


def _norm_margin(node, ins, out, variance: str = "any"):
    return _norm(node, ins, out, variance=variance).total()


def _norm(node, ins, out, sums=None, variance: str = "any") -> CommonModes:
    """LayerNorm / RMSNorm evaluated as mean, centre, mean of squares (or
    E[x^2] - E[x]^2), rsqrt, two products and a bias add.  ``sums``: how a row's
    sums are charged (:class:`.fpprob.NormSums`: ``relative(n)`` the error bound of a
    sum of n terms and its division, relative to the sum of the terms' sizes, and
    ``model(n)`` for two sums' errors taken together); ``fp.gamma`` (any order, no
    assumption) when None.  ``variance``: see :func:`hedged`; "two-pass" drops the
    one-pass form's error (:func:`one_pass_variance_error`)."""
    x = ins[0]
    centered = node.op == "layernorm"
    d = x.lower.shape[-1]
    eps = node.params["eps"]
    w = node.params["weight"].abs()
    stats = out.stats if out.stats is not None else norm_stats(x, eps, centered)
    (nl, nu), (sl, su), (vl, vh), (cl, cu) = stats
    xa = x.abs_max()
    g = fp.gamma(d + 4) if sums is None else sums.relative(d + 4)
    tree = fpsum.tree_error if sums is None else sums.tree         # a sum's error from its terms' sizes
    c_abs = torch.maximum(cl.abs(), cu.abs())
    if centered:
        e_mu = torch.minimum(g * xa.mean(-1, keepdim=True), tree(xa) / d)
        e_d = U * (c_abs + e_mu)                  # the centring's own rounding
        e_c = e_mu + e_d
    else:
        e_mu, e_d = 0.0, 0.0
        e_c = torch.zeros_like(c_abs)
    # float32 (v + eps) = (v + eps)(1 + t), |t| <= q.  Two-pass form: the rounded c'_i = c_i - e + d_i
    # (e the mean's error, shared; |d_i| <= e_d), and sum_i c_i = 0 exactly, so
    # sum c'^2 - sum c^2 = 2 sum c_i d_i + sum (d_i - e)^2: off by at most A = mean(2|c| e_d + e_c^2) (the
    # shared e's first-order term cancels), then a sum of non-negative terms (relative g) and the eps
    # add (U): q = A (1 + g)(1 + U) / (v + eps) + g + U + g U; RMSNorm has A = 0, so q does not depend
    # on the box.  E[x^2] - E[x]^2 form: an absolute error, divided by the smallest v + eps.
    a_two = (2 * c_abs * e_d + e_c * e_c).mean(-1, keepdim=True)
    q = a_two * (1 + g) * (1 + U) / (vl + eps) + (g + U + g * U)
    q = torch.minimum(q, two_pass_variance_error(c_abs, e_mu, e_d, vh, eps, tree) / (vl + eps))
    if centered and variance != "two-pass":
        joint = None if sums is None else sums.model(d + 4)
        q = torch.maximum(q, one_pass_variance_error(x, vh, eps, g, joint, tree, None if sums is None else sums.coef)
                          / (vl + eps))
    # rsqrt of (v + eps)(1 + t): relative error (1 - q)^-1/2 (1 + 6U) - 1, not its first-order part
    # q / 2 (which stays finite where the float32 variance may reach zero); where the margin is not
    # hedged as a whole (RMSNorm; LayerNorm by a variance formula) its rsqrt's allowance is doubled here
    lib = RSQRT_U * U * (1.0 if hedged(node.op, variance) else HEDGE)
    rel_s = torch.where(q < 1, torch.rsqrt((1 - q).clamp_min(1e-300)) * (1 + lib) - 1,
                        torch.full_like(q, math.inf))
    n_abs = torch.maximum(nl.abs(), nu.abs())
    # fl(c' r') = (c - e + d_c)(r (1 + t))(1 + d): c r t (shared t) - e r (shared e) + the rest, per element
    grow = (1 + rel_s) * (1 + U)
    e_n = e_d * su * grow + e_mu * su * (grow - 1) + n_abs * U * (1 + rel_s)
    elem = w * e_n + 2 * U * (w * n_abs + out.abs_max()) + 2.0 ** -126
    ws = node.params["weight"]
    modes = [((nl + nu) * 0.5 * ws, (nu - nl) * 0.5 * w, rel_s)]          # t w n, n in [nl, nu]
    if centered:
        modes.append((ws, torch.zeros_like(ws), e_mu * su))                  # e r w
    return CommonModes(elem, tuple(modes))


def two_pass_variance_error(c_abs: torch.Tensor, e_mu, e_d, vh: torch.Tensor, eps: float,
                            tree: Callable = fpsum.tree_error) -> torch.Tensor:
    """(.., 1): a bound on ``|fl(fl(mean(c'^2)) + eps) - (v + eps)|``, the variance by two passes:
    ``c'_i = fl(x_i - mu')`` with the mean's error ``|mu' - mu| <= e_mu`` and ``|c'_i - (c_i - (mu' - mu))|
    <= e_d`` (elementwise), ``|c_i| <= c_abs`` over the box (c the exact centred row).  Since
    ``sum_i c_i = 0``, ``sum c'^2 - sum c^2 = 2 sum c_i d_i + sum (d_i - e)^2``: within
    ``A = mean(2 |c| e_d + (e_mu + e_d)^2)`` (the shared error's first-order term cancels).  The
    mean of the c'^2 then within ``tree`` (:func:`.fpsum.tree_error`, or the model's) of terms
    ``(c_abs + e_mu + e_d)^2``, its own roundings included, and the eps add as in
    :func:`one_pass_variance_error`: ``(1 + U)^2 (A + E_sq) + U (2 + U) (vh + eps)``."""
    d = c_abs.shape[-1]
    e_c = e_mu + e_d
    a = (2 * c_abs * e_d + e_c * e_c).mean(-1, keepdim=True)
    e_sq = tree((c_abs + e_c) ** 2) / d
    return ((1 + U) ** 2 * (a + e_sq) + U * (2 + U) * (vh + eps)) * (1 + 2.0 ** -40)


def one_pass_variance_error(x: Interval, vh: torch.Tensor, eps: float, g, joint: Optional[float] = None,
                            tree: Optional[Callable] = None, coef: Optional[Callable] = None) -> torch.Tensor:
    """(.., 1): a bound on ``|fl(fl(s2 - fl(s1 s1)) + eps) - (v + eps)|`` over the box ``x``
    (rows on the last axis), the variance by ``E[x^2] - E[x]^2``: ``s1`` the row mean and ``s2``
    the row mean of squares, each summed in any order within ``g`` of the sum of its terms'
    sizes (``|s1' - s1| <= e1 = g mean|x|``, ``|s2' - s2| <= g A``, ``A = mean(x^2)``).

    The product: ``|fl(s1' s1') - s1^2| <= E_m = e1 (2 S1 + e1) + U (S1 + e1)^2`` with
    ``S1 >= |s1|`` over the box (the mean is monotone in x).  The subtraction and the eps add,
    one rounding each (eps itself rounded to float32: one more ``U eps``):

        (1 + U)^2 (g A + E_m) + U (2 + U) (vh + eps),

    ``vh`` an upper bound of the variance.  An FMA or a clamp of a negative variance to 0 only
    removes error.  (Against ``2 g (A + mean|x|^2)``: the same leading ``g A``, and the mean's
    part scales with ``|s1|`` instead of ``mean|x|``, so rows whose mean is small next to their
    spread lose most of it.)

    ``joint`` (the probabilistic mode, :func:`.fpprob.norm_sums_model`): the two sums' errors
    enter to first order as ``(s2' - s2) - 2 s1 (s1' - s1)``, one martingale over both sums'
    roundings whose coefficients are at most ``A`` and ``2 S1 mean|x|`` per unit of ``g``, so
    that part is at most ``joint sqrt(A^2 + (2 S1 mean|x|)^2)`` under the model (one event),
    and never more than the sum ``g (A + 2 S1 mean|x|)``.

    ``tree`` (:func:`.fpsum.tree_error` or the model's counterpart): each sum's error also from
    its terms' sizes in any summation tree; ``coef`` (the model's, :class:`.fpprob.NormSums`): the
    joint part from the two sums' coefficient norms, ``sqrt(c(x^2)^2 + (2 S1 c(|x|))^2) / d``.  Each
    bound holds, so the smaller is taken."""
    xa = x.abs_max()
    d = xa.shape[-1]
    a = (xa * xa).mean(-1, keepdim=True)
    m = xa.mean(-1, keepdim=True)
    s1 = torch.maximum(x.lower.mean(-1, keepdim=True).abs(), x.upper.mean(-1, keepdim=True).abs())
    e1 = g * m
    e2 = g * a
    if tree is not None:
        e1 = torch.minimum(e1, tree(xa) / d)
        e2 = torch.minimum(e2, tree(xa * xa) / d)
    lin = e2 + 2 * s1 * e1                          # (s2' - s2) - 2 s1 (s1' - s1), any signs
    if joint is not None:
        lin = torch.minimum(lin, joint * (a * a + (2 * s1 * m) ** 2).sqrt() * (1 + 2.0 ** -40))
    if coef is not None:
        lin = torch.minimum(lin, (coef(xa * xa) ** 2 + (2 * s1 * coef(xa)) ** 2).sqrt() / d * (1 + 2.0 ** -40))
    e_m = e1 * e1 + U * (s1 + e1) ** 2              # (s1' - s1)^2 and the square's rounding
    return ((1 + U) ** 2 * (lin + e_m) + U * (2 + U) * (vh + eps)) * (1 + 2.0 ** -40)


def output_cap(node):
    """A bound that every float32 evaluation of the node obeys whatever its input, or
    None.  RMSNorm: the float32 mean square is at least ``(1 - gamma_{d+2}) x_i^2 / d``
    (a sum of non-negative terms), so ``|x_i rsqrt(ms + eps)| <= sqrt(d / (1 -
    gamma_{d+2})) (1 + 6U)`` and ``|y_i| <= (|w_i| K + |b_i|)(1 + U)^3``; K below is
    rounded up.  (LayerNorm has no such bound for every variance algorithm.)"""
    if node.op != "rmsnorm":
        return None
    w = node.params["weight"].abs()
    d = w.shape[-1]
    k = math.sqrt(d / (1 - fp.gamma(d + 8))) * (1 + 16 * U)
    b = node.params.get("bias")
    return (w * k + (0 if b is None else b.abs())) * (1 + 4 * U) + 2.0 ** -126


def _add(node, ins, out):
    """``fl(a + b) = (a + b)(1 + d)``; add_const's c is rounded to float32 first."""
    m = _rel(out, 1.0)
    dc = _rounded(node.params["c"]) if node.op == "add_const" else None
    return m if dc is None else m + 2 * dc


def _mul(node, ins, out):
    return _rel(out, 1.0) + 2.0 ** -149


def _mul_const(node, ins, out):
    """``fl(x fl32(c))``: one rounding, plus ``|x| |fl32(c) - c|``."""
    m = _rel(out, 1.0) + 2.0 ** -149
    dc = _rounded(node.params["c"])
    return m if dc is None else m + 2 * ins[0].abs_max() * dc


MARGIN = {
    "linear": _linear, "conv1d": _conv1d, "matmul": _matmul, "matmul_const": _matmul_const,
    "rope": _rope, "gelu": _elementwise, "gelu_tanh": _elementwise, "silu": _elementwise,
    "softmax": _softmax, "layernorm": _norm_margin, "rmsnorm": _norm_margin,
    "add": _add, "add_const": _add, "mul": _mul, "mul_const": _mul_const,
    "transpose": None, "split_heads": None, "merge_heads": None, "repeat_kv": None,
    # imported graphs: relu and the plumbing ops are exact in float32
    "conv2d": _conv2d, "reduce_mean": _reduce_mean, "relu": None,
    "permute": None, "reshape": None, "slice": None, "concat": None,
}


def margin(node, ins: list[Interval], out: Interval, prev: Optional[dict] = None, variance: str = "any"):
    """Float32 rounding margin of ``node`` (tensor of its shape) or None if exact.
    ``prev``: the margins of the nodes before it (name -> tensor or None); ``variance``: how the
    engine computes LayerNorm's variance (:func:`hedged`)."""
    rule = MARGIN[node.op]
    if rule is None:
        return None
    if rule is _matmul:
        m = rule(node, ins, out, prev)
    elif rule is _norm_margin:
        m = rule(node, ins, out, variance)
    else:
        m = rule(node, ins, out)
    return HEDGE * m if hedged(node.op, variance) else m


def margin_split(node, ins: list[Interval], out: Interval, prev: Optional[dict] = None, sums=None,
                 variance: str = "any"):
    """``(margin, CommonModes or None)``: the norms' margin also as its split
    (:func:`norm_modes`, with ``sums`` and ``variance`` as there), whose total the margin is."""
    if node.op in ("layernorm", "rmsnorm"):
        parts = norm_modes(node, ins, out, sums, variance)
        return parts.total(), parts
    return margin(node, ins, out, prev, variance), None
