"""Output properties for ``gamma verify --property FILE``: a small VNN-LIB subset.

Assertions bound single outputs of the flattened output vector; a property
is verified iff the certified output bounds prove every assertion.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .errors import GammaError


@dataclass(frozen=True)
class Assertion:
    """``Y[index] <op> bound`` on the flattened output; ``op`` is "<=" or ">="."""
    index: int
    op: str
    bound: float
    where: str = ""              # "FILE:LINE" for messages


_ASSERT = re.compile(r"^\(\s*assert\s+\(\s*(<=|>=)\s+Y_(\d+)\s+(\S+?)\s*\)\s*\)$")
_DECLARE = re.compile(r"^\(\s*declare-const\s+[XY]_\d+\s+Real\s*\)$")


def parse_property(path: Union[str, os.PathLike]) -> list[Assertion]:
    """Parse a small VNN-LIB subset: one s-expression per line,
    ``(assert (<= Y_i c))`` / ``(assert (>= Y_i c))`` on flattened output
    indices, ``(declare-const X_i Real)`` / ``(declare-const Y_i Real)``
    (ignored) and ``;`` comments.

    Unlike VNN-LIB's convention (assertions describe a counterexample), the
    assertions here are what must hold: the property is verified iff the
    output bounds prove every one of them."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise GammaError(f"{path}: no such file or directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GammaError(f"{path}: cannot read property file ({type(e).__name__})") from None
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.split(";", 1)[0].strip()
        if not line or _DECLARE.match(line):
            continue
        m = _ASSERT.match(line)
        where = f"{path}:{n}"
        if not m:
            raise GammaError(f"{where}: unsupported property line '{line}' "
                             "(supported: (assert (<= Y_i c)), (assert (>= Y_i c)), (declare-const Y_i Real))")
        try:
            bound = float(m.group(3))
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise GammaError(f"{where}: bound must be a finite number, got '{m.group(3)}'")
        out.append(Assertion(int(m.group(2)), m.group(1), bound, where))
    if not out:
        raise GammaError(f"{path}: no assertions (expected lines like (assert (<= Y_0 1.5)))")
    return out


def check_property(assertions: Sequence[Assertion], lower: Optional[torch.Tensor],
                   upper: Optional[torch.Tensor], size: int) -> list[dict]:
    """Which assertions the flattened output bounds prove.  With
    ``lower``/``upper`` None only checks that every index is in range."""
    out = []
    for a in assertions:
        if not 0 <= a.index < size:
            raise GammaError(f"{a.where}: Y_{a.index} is out of range (the output has {size} values)")
        if lower is None:
            continue
        lo, hi = float(lower[a.index]), float(upper[a.index])
        proved = hi <= a.bound if a.op == "<=" else lo >= a.bound    # False on NaN
        out.append({"index": a.index, "op": a.op, "bound": a.bound, "lower": lo, "upper": hi,
                    "proved": bool(proved)})
    return out
