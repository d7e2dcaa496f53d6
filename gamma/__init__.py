"""gamma: certified lower/upper bounds for real transformer checkpoints.

Public API::

    model = gamma.load("model.gguf")          # or gamma.load() for Whisper tiny.en
    result = gamma.verify(model, epsilon=1e-3, method="crown", block_wise=True)
    result.to_dict()                          # the JSON that `gamma verify --json` prints
    out = gamma.forward(model, seq_len=8)     # exact float64 forward at the input point

Every problem with the user's input raises :class:`GammaError`.
"""

__version__ = "0.1.0"

from .errors import GammaError, UnsupportedOp  # noqa: E402
from .models import Model  # noqa: E402
# binds the name gamma.verify to the function (the module stays importable as `from gamma.verify import ...`)
from .verify import ForwardResult, VerifyResult, forward, load, verify  # noqa: E402

__all__ = ["load", "verify", "forward", "Model", "GammaError", "UnsupportedOp", "VerifyResult",
           "ForwardResult", "__version__"]
