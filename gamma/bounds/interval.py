"""The interval domain: :class:`Interval` is the one bound type every method
reports (IBP's rules are in :mod:`.ibp`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class Interval:
    lower: Tensor
    upper: Tensor
    # linear nodes' IBP image only: |x|max |W|^T, reused by the float32 margin
    abs_sums: Optional[Tensor] = field(default=None, repr=False, compare=False)
    # norm nodes' IBP image only: the input's ``norm.norm_stats``, reused by the float32 margin
    stats: Optional[tuple] = field(default=None, repr=False, compare=False)

    @staticmethod
    def from_center(center: Tensor, radius) -> "Interval":
        return Interval(center - radius, center + radius)

    # computed once per interval (bounds are never modified in place)
    @cached_property
    def center(self) -> Tensor:
        return (self.lower + self.upper) / 2

    @cached_property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    def width(self) -> Tensor:
        return self.upper - self.lower

    def abs_max(self) -> Tensor:
        return torch.maximum(self.lower.abs(), self.upper.abs())

    def widen(self, margin) -> "Interval":
        if margin is None:
            return self
        return Interval(self.lower - margin, self.upper + margin)

    def intersect(self, other: "Interval") -> "Interval":
        return Interval(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        return (x >= self.lower - tol) & (x <= self.upper + tol)

    def to(self, *args, **kw) -> "Interval":
        return Interval(self.lower.to(*args, **kw), self.upper.to(*args, **kw))
