"""Engine tunings: how the bounds are computed, not what they bound.

One frozen :class:`Tunings` travels with a run (``compute_bounds(...,
tunings=)``, :class:`gamma.bounds.crown.Context`); tests and benchmarks pass
another one instead of flipping module globals.  Every setting gives sound
bounds; the defaults are the measured best (docs/design.md), the alternatives
are there to compare against (``benchmarks/norm_relax.py``) and to test that
two paths agree (dense and token-compact cotangents, float32 and float64
transposes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import GammaError


@dataclass(frozen=True)
class Tunings:
    # CROWN's walk
    compact_rows: bool = True         # token-compact cotangents (rows.py); False: always dense
    float32_transpose: bool = True    # linear transposes as float32 products, their error in the constant
    chunk_elems: int = 1 << 22        # spec rows per backward pass: this many elements over (2 x the widest node)
    shared_halves: bool = True        # [lam; -lam] walked as one lam until a sign-dependent rule (rows.Sym)
    # CROWN's relaxations
    # attention @ V by sign-chosen McCormick planes in the output's pass (False: their half-sums, whose
    # value-side remainder is tighter: Whisper block 2 0.670 with planes, 0.598 without; docs/depth.md)
    matmul_planes: bool = False
    value_side: bool = True           # attention @ V's remainder also through the value layer (value_side.py)
    value_input: bool = True          # attention @ V's remainder also through V's linear bounds over the input (value_input.py)
    score_side: bool = True           # q k^T's remainder also through both projections (score_side.py)
    score_spectral: bool = True       # with score_side, its quadratic term also by the heads' spectral norms
    score_input: bool = True          # q k^T's remainder also from both sides' linear bounds over the input (score_input.py)
    norm_side: bool = True            # an RMSNorm's product remainder also through the projection before it (norm_side.py)
    row_remainder: bool = True        # decomposed forms' remainders keep what a row shares (RowRemainder)
    norm_internals: bool = True       # norms' centred input and mean square by their own backward passes
    norm_input_from_centre: bool = True   # a LayerNorm input's box as centred input + mean (no pass of its own)
    softmax_pairs: bool = True        # softmax's box from its score differences' own backward pass
    softmax_shift: bool = True        # with softmax_pairs, its mean-value remainder on those differences (shift invariance)
    norm_splits: int = 1              # pieces of a norm's mean square for the row-local nodes after it (split.py)
    product_sums: bool = True         # x * y also by (s^2 - d^2) / 4 with CROWN bounds of s = x + y, d = x - y
    # linearisations (CROWN and zonotopes)
    norm_decomposed: bool = True      # LayerNorm / RMSNorm may take the decomposed form (False: mean value only)
    softmax_decomposed: bool = True   # softmax likewise
    softmax_taylor: bool = True       # softmax's mean-value remainder also by Taylor's, its Hessian's signed terms
    softmax_simplex: bool = True      # softmax's remainders charged knowing that they sum to a known value per row
    softmax_stages: int = 16          # softmax's mean-value remainder integrated in this many steps (1: plain)
    row_chunk_elems: int = 1 << 22    # dense per-row Jacobian entries processed at once

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise GammaError(f"tuning {f.name} must be True or False, got {v!r}")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise GammaError(f"tuning {f.name} must be a positive integer, got {v!r}")


DEFAULT = Tunings()
