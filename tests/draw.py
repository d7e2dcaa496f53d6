"""Seeded float64 draws for tests that build graphs at module level: ``rnd(*shape)``
reads one generator, which conftest's autouse ``_reseed_draw`` fixture reseeds before
every test from that test's own seed, so a test's values never depend on which tests
ran before it."""

from __future__ import annotations

import torch

G = torch.Generator()


def rnd(*shape, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=G, dtype=torch.float64) * scale


def tensor(*rows) -> torch.Tensor:
    """A float64 tensor from numbers or lists (a hand case's constants)."""
    return torch.tensor(rows[0] if len(rows) == 1 and isinstance(rows[0], list) else rows, dtype=torch.float64)
