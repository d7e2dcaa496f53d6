"""The scalar elementwise functions as data: one :class:`ScalarFn` record per
function in :data:`FUNCTIONS`, with its float64 formula, first and second
derivatives and its facts (monotonicity, the pieces of the real line on which
it is convex or concave, the global minimum of the non-monotone ones, and how
accurate its float64 formula is).  The rules that turn these facts into sound
interval and linear bounds are in :mod:`.relax`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..errors import UnsupportedOp

Tensor = torch.Tensor
INF = math.inf

_SQRT1_2 = 0.7071067811865476            # 1/sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327       # 1/sqrt(2*pi)
_K_TANH = 0.7978845608028654             # sqrt(2/pi)
_C_TANH = 0.044715


@dataclass(frozen=True)
class ScalarFn:
    """Facts about one scalar function, as data.

    ``pieces``: ``(start, end, +1 convex / -1 concave)`` covering the domain;
    the ends are float64 approximations (within ``delta``) of the true
    inflection points and ``m3`` bounds ``|f'''|`` near them.
    ``monotone``: +1 increasing, -1 decreasing, 0 unimodal (then ``argmin``,
    ``argmin_tol`` and ``fmin_lo <= min f`` are given).
    ``domain``: ``(bound, strict)`` meaning ``x > bound`` (strict) or
    ``x >= bound``; ``None`` is the whole real line.
    Float64 accuracy: ``|fl(f(x)) - f(x)| <= EPS*(rel64*|f(x)| + abs64) + TINY``
    and the same for ``df`` with ``drel64``, ``dabs64``.
    """

    name: str
    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    d2f: Callable[[Tensor], Tensor]
    pieces: tuple
    monotone: int = 0
    domain: Optional[tuple] = None
    argmin: float = math.nan
    argmin_tol: float = 0.0
    fmin_lo: float = math.nan
    rel64: float = 16.0
    abs64: float = 0.0
    drel64: float = 16.0
    dabs64: float = 0.0
    delta: float = 0.0
    m3: float = 0.0
    d12: Optional[Callable] = None     # (f', f'') sharing work; Newton only

    @property
    def convex(self) -> bool:
        return all(s > 0 for _, _, s in self.pieces)

    @property
    def concave(self) -> bool:
        return all(s < 0 for _, _, s in self.pieces)


# ----------------------------------------------------------------------------
# float64 formulas (stable forms: no 1 + erf / 1 + tanh cancellation)

def _sig(x):
    return torch.sigmoid(x)


def _dsig(x):                      # s(x) s(-x), no 1 - s cancellation
    return torch.sigmoid(x) * torch.sigmoid(-x)


def _gelu(x):
    return 0.5 * x * torch.special.erfc(-x * _SQRT1_2)


def _gelu_d(x):
    return 0.5 * torch.special.erfc(-x * _SQRT1_2) + x * (_INV_SQRT_2PI * torch.exp(-0.5 * x * x))


def _gelu_d2(x):
    return torch.nan_to_num(_INV_SQRT_2PI * torch.exp(-0.5 * x * x) * (2.0 - x * x))


def _gelu_d12(x):
    e = _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    return (0.5 * torch.special.erfc(-x * _SQRT1_2) + x * e,
            torch.nan_to_num(e * (2.0 - x * x)))


def _gt_w(x):                      # 1 + tanh(z) = 2 sigmoid(2z), z = k (x + c x^3)
    return (2.0 * _K_TANH) * (x + _C_TANH * x * x * x)


def _gt_w1(x):
    return (2.0 * _K_TANH) * (1.0 + 3.0 * _C_TANH * x * x)


def _gelu_tanh(x):
    return x * _sig(_gt_w(x))


def _gelu_tanh_d(x):
    x = x.clamp(-1e30, 1e30)       # f' is exactly 0 / 1 in float64 beyond; avoids 0*inf
    w = _gt_w(x)
    return _sig(w) + x * _dsig(w) * _gt_w1(x)


def _gelu_tanh_d2(x):
    x = x.clamp(-1e30, 1e30)
    w, w1 = _gt_w(x), _gt_w1(x)
    s1 = _dsig(w)
    s2 = -s1 * torch.tanh(0.5 * w)
    w2 = (12.0 * _K_TANH * _C_TANH) * x
    return torch.nan_to_num(2.0 * s1 * w1 + x * s2 * w1 * w1 + x * s1 * w2)


def _gelu_tanh_d12(x):
    x = x.clamp(-1e30, 1e30)
    w, w1 = _gt_w(x), _gt_w1(x)
    sp, sm = _sig(w), _sig(-w)
    s1 = sp * sm
    d1 = sp + x * s1 * w1
    d2 = 2.0 * s1 * w1 + x * s1 * (sm - sp) * w1 * w1 + x * s1 * ((12.0 * _K_TANH * _C_TANH) * x)
    return d1, torch.nan_to_num(d2)


def _silu(x):
    return x * _sig(x)


def _silu_d(x):
    return _sig(x) + x * _dsig(x)


def _silu_d2(x):
    return torch.nan_to_num(_dsig(x) * (2.0 - x * torch.tanh(0.5 * x)))


def _silu_d12(x):
    sp, sm = _sig(x), _sig(-x)
    s1 = sp * sm
    return sp + x * s1, torch.nan_to_num(s1 * (2.0 + x * (sm - sp)))


def _sig_d12(x):
    sp, sm = _sig(x), _sig(-x)
    s1 = sp * sm
    return s1, s1 * (sm - sp)


def _tanh_d12(x):
    sp, sm = _sig(2.0 * x), _sig(-2.0 * x)
    d1 = 4.0 * sp * sm
    return d1, -2.0 * (sp - sm) * d1


def _tanh_d(x):
    return 4.0 * _dsig(2.0 * x)


def _tanh_d2(x):
    return -2.0 * torch.tanh(x) * _tanh_d(x)


_ALL = ((-INF, INF, +1),)


def _fns() -> dict:
    r2 = 1.4142135623730951        # gelu inflections: +-sqrt(2)
    xs = 2.3993572805154675        # silu inflections: x tanh(x/2) = 2
    xt = 1.4185040087908283        # gelu_tanh inflections (mpmath, 50 digits)
    table = [
        # gelu: f' = Phi + x phi; for x < 0 the sign of Phi/phi + x, whose
        # derivative 2 + x Phi/phi > 1 (Mills ratio), so one root: unimodal.
        ScalarFn("gelu", _gelu, _gelu_d, _gelu_d2,
                 ((-INF, -r2, -1), (-r2, r2, +1), (r2, INF, -1)),
                 argmin=-0.7517915246935645, argmin_tol=1e-12,
                 fmin_lo=-0.16997120747990388, abs64=2.0, dabs64=4.0,
                 delta=1e-15, m3=2.0, d12=_gelu_d12),
        # gelu_tanh = x s(w): f' = s(w) (1 + x s(-w) w'); for x < 0,
        # q = x s(-w) w' is strictly increasing from -inf to 0: unimodal.
        ScalarFn("gelu_tanh", _gelu_tanh, _gelu_tanh_d, _gelu_tanh_d2,
                 ((-INF, -xt, -1), (-xt, xt, +1), (xt, INF, -1)),
                 argmin=-0.7524614220710163, argmin_tol=1e-12,
                 fmin_lo=-0.17004075057125428, abs64=4.0, dabs64=8.0,
                 delta=1e-12, m3=2.0, d12=_gelu_tanh_d12),
        # silu: the gelu_tanh argument with w = x.
        ScalarFn("silu", _silu, _silu_d, _silu_d2,
                 ((-INF, -xs, -1), (-xs, xs, +1), (xs, INF, -1)),
                 argmin=-1.2784645427610737, argmin_tol=1e-12,
                 fmin_lo=-0.27846454276107424, abs64=1.0, dabs64=4.0,
                 delta=1e-12, m3=1.0, d12=_silu_d12),
        ScalarFn("exp", torch.exp, torch.exp, torch.exp, _ALL, monotone=+1),
        ScalarFn("reciprocal", torch.reciprocal, lambda x: -1.0 / (x * x),
                 lambda x: 2.0 / (x * x * x), ((0.0, INF, +1),), monotone=-1,
                 domain=(0.0, True), rel64=4.0, drel64=4.0),
        ScalarFn("rsqrt", torch.rsqrt, lambda x: -0.5 * torch.rsqrt(x) / x,
                 lambda x: 0.75 * torch.rsqrt(x) / (x * x), ((0.0, INF, +1),),
                 monotone=-1, domain=(0.0, True), rel64=4.0, drel64=8.0),
        ScalarFn("sqrt", torch.sqrt, lambda x: 0.5 / torch.sqrt(x),
                 lambda x: -0.25 / (x * torch.sqrt(x)), ((0.0, INF, -1),),
                 monotone=+1, domain=(0.0, False), rel64=4.0, drel64=4.0),
        ScalarFn("square", lambda x: x * x, lambda x: 2.0 * x,
                 lambda x: torch.full_like(x, 2.0), _ALL,
                 argmin=0.0, argmin_tol=0.0, fmin_lo=0.0, rel64=4.0, drel64=4.0),
        ScalarFn("sigmoid", _sig, _dsig, lambda x: -_dsig(x) * torch.tanh(0.5 * x),
                 ((-INF, 0.0, +1), (0.0, INF, -1)), monotone=+1, dabs64=4.0, d12=_sig_d12),
        ScalarFn("tanh", torch.tanh, _tanh_d, _tanh_d2,
                 ((-INF, 0.0, +1), (0.0, INF, -1)), monotone=+1, dabs64=4.0, d12=_tanh_d12),
    ]
    return {s.name: s for s in table}


FUNCTIONS: dict = _fns()


def get(fn: Union[str, ScalarFn]) -> ScalarFn:
    """The :class:`ScalarFn` named ``fn``; an unknown name raises UnsupportedOp."""
    if isinstance(fn, ScalarFn):
        return fn
    try:
        return FUNCTIONS[fn]
    except (KeyError, TypeError):
        raise UnsupportedOp(str(fn), "relax") from None
