"""The models a suite names: ``zoo:NAME`` (installed from PyPI), ``fixture:NAME`` (built here) or a path."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Optional

import torch

from ..errors import GammaError
from ..extras import require
from ..io import zoo
from ..model import Model
from ..verify import load
from .suite import Case

ZOO = {"whisper_tiny_en": "whisper-tiny.en", "smollm2_135m": "smollm2-135m"}
# tiny random models built here with transformers (seeded: the same function every time)
FIXTURES = {
    "tiny-qwen3": {"arch": "qwen3", "seed": 1234, "config": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0)},
}


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
            from importlib.metadata import version
            ver = version(pip_name)
        except Exception:    # PackageNotFoundError, or an unusual install
            ver = None
        return path, {"zoo": zname, "package": pip_name, "version": ver}
    if kind == "fixture" and name:
        path, digest = build_fixture(name, cache_dir)
        return path, {"fixture": name, "digest": digest}
    path = spec if os.path.isabs(spec) else os.path.join(suite_dir, spec)
    return path, {"path": spec}


def build_fixture(name: str, cache_dir: str) -> tuple[str, str]:
    """(folder, weight digest) of a :data:`FIXTURES` model, built once into ``cache_dir``.

    Every weight is drawn from one seeded generator (linear weights N(0, 1/fan_in),
    embeddings N(0, 1), norm gains 1 + 0.1 N(0, 1)), independent of transformers'
    own initialisation, which (std 0.02) makes RMSNorm inputs tiny and bounds huge."""
    if name not in FIXTURES:
        raise GammaError(f"unknown fixture '{name}' (known: {', '.join(FIXTURES)})")
    spec = FIXTURES[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f"{name}-{key}")
    meta = os.path.join(folder, "fixture.json")
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            return folder, json.load(f)["digest"]
    tf = require(f"fixture:{name}", "transformers")
    from transformers.utils import logging as tf_logging
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    classes = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[spec["arch"]]
    model = model_cls(cfg_cls(**spec["config"])).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            z = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * z if p.ndim == 1 else z if "embed" in pname else z / math.sqrt(p.shape[1]))
            digest.update(pname.encode() + str(tuple(p.shape)).encode() + p.numpy().tobytes())
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    os.chmod(tmp, 0o755)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "fixture.json"), "w", encoding="utf-8") as f:
        json.dump({**spec, "name": name, "digest": digest.hexdigest()}, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:                      # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest.hexdigest()


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
