"""The models gamma verifies: a loaded checkpoint with its graphs and input points.

:class:`Model` (``model.py``) is the facade; what differs between
architectures is data (``archs.py``: components, inputs, builders, block
plans); ``blocks.py`` gives block-wise runs one block at a time; ``llama.py``
and ``whisper.py`` build the graphs as transformers computes them, from the
pieces in ``common.py``.
"""

from .archs import ARCHS, COMPONENTS, default_mel
from .model import InputPoint, Model, check_center, check_output, check_seq_len

__all__ = ["Model", "InputPoint", "ARCHS", "COMPONENTS", "default_mel", "check_seq_len", "check_center",
           "check_output"]
