"""Verification runs: the whole network, layer by layer, or block by block.

Three modes, one entry point (:func:`verify`, or :func:`run` with the options grouped):

* ``full`` (default): sound bounds of the network output over the L-inf box
  ``[x - eps, x + eps]`` around the input point ``x``, with the width of
  every node on the way.
* ``layer_by_layer``: the same run, reported as width growth node by node and
  block by block, naming the first node where the bounds degrade.
* ``block_wise``: every block verified on its own, over its nominal input
  (the value the exact float64 forward pass gives it at ``x``) +- eps.  This
  measures each block's sensitivity; it does not bound the whole network.
  The checkpoint is loaded lazily and the blocks come one at a time from the
  model's block plan: a Llama / Qwen3 model of any size needs one block's
  weights in memory, not the model's.

One module per job: :mod:`.api` (load, forward, verify, run), :mod:`.spec`
(the input point and run options, checked when made; the bound options are
:class:`gamma.options.BoundOptions`), :mod:`.full` and :mod:`.blockwise` (the
modes), :mod:`.records` (records, :class:`VerifyResult` and its JSON, described
by ``gamma/schemas/verify.schema.json``).  Nothing here prints.

``gamma.verify`` is the function (the package binds it); this package is
``importlib.import_module("gamma.verify")`` or ``from gamma.verify import ...``.
"""

from ..options import ARITHMETIC, INTERMEDIATE, METHODS, BoundOptions, check_epsilon
from .api import as_model, forward, load, run, verify
from .records import (HIGH_SENSITIVITY, MODERATE_SENSITIVITY, SATURATION_WIDTH, SOFTMAX_SATURATION, ForwardResult,
                      VerifyResult, Width, json_safe, schema, summarize, versions)
from .spec import MODES, InputSpec, RunSpec, mode_of, parse_tokens, select_blocks

__all__ = ["verify", "run", "forward", "load", "as_model", "BoundOptions", "InputSpec", "RunSpec", "VerifyResult",
           "ForwardResult", "Width", "json_safe", "schema", "summarize", "versions", "check_epsilon",
           "parse_tokens", "select_blocks", "mode_of", "METHODS", "INTERMEDIATE", "ARITHMETIC", "MODES",
           "SATURATION_WIDTH", "SOFTMAX_SATURATION", "MODERATE_SENSITIVITY", "HIGH_SENSITIVITY"]
