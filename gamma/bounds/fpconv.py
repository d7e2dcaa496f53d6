"""A conv1d's CROWN transpose as one float32 GEMM, its rounding in the bound.

The conv twin of :class:`.fp.CotangentProduct`.  For ``y = conv(x, W) + b``
(W: (C_out, C_in, K), float32-valued) and a cotangent lam of y, the backward
step needs ``lam . y = (lam conv^T) . x + lam . b``.  It uses
``L = conv^T(lam)`` from :func:`gamma.ops._conv1d_T` with the GEMM in float32
(lam rounded to float32, one dot of C_out terms per tap) and the taps' sum in
float64 (at most K of them per entry), and writes, with x0 the centre and r
the radius of x's bounds,

    lam . y = L . x + [lam . (conv(x0) + b) - L . x0] + (lam conv^T - L) . (x - x0)

The bracket is evaluated in float64.  Per entry of L, the GEMM's error
(``gamma_{C_out + 1}``: lam's rounding and the dot in any order, FMA or not)
and the float64 sum of the taps (``2 K 2^-53`` of the same absolute sum)
give ``|lam conv^T - L| <= c (|lam| conv^T |W|)`` with
``c = gamma_{C_out + 1} + K 2^-52``, plus, for underflow and flush to zero,
``K (C_out + 1) 2^-125 (1 + max|W|)`` per entry.  So

    (lam conv^T - L) . (x - x0)  >=  -|lam| . (c conv(r, |W|)) - floor,

with ``conv(r, |W|)`` an upper bound computed once per node (the float64 conv
of non-negative terms, widened by its own rounding) and
``floor = K (C_out + 1) 2^-125 (1 + max|W|) sum(r)``.  ``err = c conv(r, |W|)``
is charged like the node's float32 margin.  A finite result shows that float32
did not overflow; otherwise the float64 transpose is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..float32 import is_exact32, weight32
from ..ops import _conv1d, _conv1d_T
from .fp import f32_matmul_is_ieee, gamma


@dataclass
class ConvCotangent:
    w32: torch.Tensor        # (C_out, C_in K) float32
    weight: torch.Tensor     # (C_out, C_in, K) as given (for the shapes)
    stride: int
    padding: int
    y0: torch.Tensor         # conv(x0) + b, the node's shape
    x0: torch.Tensor         # centre of x's bounds, the input's shape
    err: torch.Tensor        # upper bound of c conv(r, |W|), the node's shape
    floor: float

    @staticmethod
    def build(w: torch.Tensor, b, stride: int, padding: int, x_lower: torch.Tensor, x_upper: torch.Tensor):
        """The per-node constants, or None where the float32 GEMM does not apply:
        weights not float32-valued, non-IEEE float32 matmuls, unbounded inputs."""
        if not f32_matmul_is_ieee(w.device) or not is_exact32(w):
            return None
        if not (bool(torch.isfinite(x_lower).all()) and bool(torch.isfinite(x_upper).all())):
            return None
        c_out, c_in, k = w.shape
        x0 = (x_lower + x_upper) / 2
        r = torch.maximum(x_upper - x0, x0 - x_lower) * (1.0 + 2.0 ** -52)     # >= |x - x0| on the box
        y0 = _conv1d(x0, w, b, stride, padding)
        # float64 conv of non-negative terms: relative error <= gamma64(C_in K), covered by the factor
        wide = 1.0 + (c_in * k + 2) * 2.0 ** -52
        absconv = _conv1d(r, w.abs(), None, stride, padding) * wide
        c = (gamma(c_out + 1) + k * 2.0 ** -52) * (1.0 + 2.0 ** -40)
        err = absconv * c
        wmax = float(w.abs().max()) if w.numel() else 0.0
        floor = k * (c_out + 1) * 2.0 ** -125 * (1.0 + wmax) * float(r.sum()) * (1.0 + 2.0 ** -40)
        if not math.isfinite(floor) or not bool(torch.isfinite(err).all()):
            return None
        w32 = weight32(w).reshape(c_out, c_in * k)
        return ConvCotangent(w32, w, stride, padding, y0, x0, err, floor)

    def product(self, lam: torch.Tensor, in_len: int) -> torch.Tensor:
        """``L``: lam (..., C_out, L') -> (..., C_in, in_len), float64."""
        return _conv1d_T(lam, self.weight, self.stride, self.padding, in_len,
                         compute=torch.float32, w_mat=self.w32)
