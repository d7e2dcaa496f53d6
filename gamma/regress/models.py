"""The models a suite names: ``zoo:NAME`` (installed from PyPI), ``fixture:NAME``
(built by :func:`gamma.io.tiny.build_fixture`) or a path."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Optional

from ..extras import require
from ..io import zoo
from ..io.tiny import build_fixture
from ..models import Model
from ..verify import load
from .suite import Case

ZOO = {"whisper_tiny_en": "whisper-tiny.en", "smollm2_135m": "smollm2-135m"}


def resolve_model(spec: str, suite_dir: str, cache_dir: str) -> tuple[str, dict]:
    """(checkpoint path, identity) for ``zoo:NAME``, ``fixture:NAME`` or a path.

    The identity says which function the path holds (a fixture's weight digest,
    a zoo package's version); check refuses to compare records whose differ."""
    kind, _, name = spec.partition(":")
    if kind == "zoo" and name:
        zname = ZOO.get(name, name)
        path = zoo.locate(zname)
        pip_name = zoo.MODELS[zname][2]
        try:
            ver = version(pip_name)
        except Exception:    # PackageNotFoundError, or an unusual install
            ver = None
        return path, {"zoo": zname, "package": pip_name, "version": ver}
    if kind == "fixture" and name:
        path, digest = build_fixture(name, cache_dir)
        return path, {"fixture": name, "digest": digest}
    path = spec if os.path.isabs(spec) else os.path.join(suite_dir, spec)
    return path, {"path": spec}


def check_requirements(cases: list[Case]) -> None:
    """GammaError naming the extra to install when a case's model needs a missing package."""
    for case in cases:
        kind, _, name = case.model.partition(":")
        if kind == "fixture" and name:
            require(case.model, "transformers")


class Models:
    """Loads each model once and keeps only the latest resident (so that one
    case's memory figure does not depend on which models ran before it)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.key: Optional[tuple] = None
        self.value: Optional[tuple[Model, dict]] = None

    def get(self, case: Case) -> tuple[Model, dict]:
        key = (case.model, case.suite_dir)
        if key != self.key:
            self.key = self.value = None
            path, ident = resolve_model(case.model, case.suite_dir, self.cache_dir)
            self.value, self.key = (load(path), ident), key
        return self.value
