"""Optional dependencies: one table, one check, one message.

A command that needs a package outside the core dependencies calls
:func:`require` before any work starts, so that a missing package costs the
user one line on stderr (exit status 2), not a long run and a traceback::

    gamma: error: gamma analyze needs matplotlib: pip install gamma-bounds[report]

The extras named here are those of ``pyproject.toml``
(``[project.optional-dependencies]``); a test checks that each one lists its
module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import GammaError

DISTRIBUTION = "gamma-bounds"
# module -> the extra that installs it
EXTRAS = {
    "matplotlib": "report",          # gamma analyze, gamma regress report (plots)
    "ray": "ray",                    # gamma verify --ray
    "transformers": "fixtures",      # gamma regress cases on fixture:NAME models
}


def missing(feature: str, module: str) -> str:
    """The one-line message: ``<feature> needs <module>: pip install gamma-bounds[<extra>]``."""
    return f"{feature} needs {module}: pip install {DISTRIBUTION}[{EXTRAS[module]}]"


def require(feature: str, module: str) -> ModuleType:
    """``module``, imported; GammaError with :func:`missing`'s message when it cannot be.

    ``feature`` says what needs it, as the user asked for it ("gamma analyze",
    "gamma verify --ray").  Any ImportError counts as missing: a package that
    is absent, blocked (``sys.modules[name] = None``) or broken on import."""
    if module not in EXTRAS:
        raise KeyError(f"{module} is not an optional dependency (known: {', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GammaError(missing(feature, module)) from None
