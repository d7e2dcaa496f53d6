"""Verification regression suite: cases, soundness-checked runs, history, baseline check, trends.

A suite is a TOML file of ``[[case]]`` tables (see ``suites/default.toml``)::

    [[case]]
    name = "tiny-qwen3-crown-full"
    model = "fixture:tiny-qwen3"      # a path (relative to the suite file), zoo:NAME or fixture:NAME
    method = "crown"
    epsilon = 1e-3
    mode = "full"                     # or "block-wise"
    seq_len = 2
    track = ["max_width", "seconds"]  # the figures check compares
    tolerance = 0.01                  # relative, on bound figures
    time_factor = 3.0

:func:`run_case` verifies one case with :func:`gamma.verify`, then tests the
bounds with samples and a PGD attack (:mod:`gamma.attack`) on gamma's own
float64 forward pass (per block, on its block graph, for block-wise cases),
and returns one history record.  The history is append-only JSON Lines
(:func:`append_record`, :func:`read_history`); :func:`compare` sets the newest
records against a baseline.  Nothing here prints; the tables and the trend
report (Markdown + PNG) are drawn by :mod:`gamma.commands.regress`.

Modules: :mod:`.suite` (cases), :mod:`.models` (zoo / fixture / path models),
:mod:`.measure` (one case run, its soundness attack and record), :mod:`.history`
(JSON Lines history, baselines, the check).
"""

from ..io.tiny import FIXTURES, build_fixture
from .history import (History, append_record, compare, failed, judge, load_baseline, read_history,
                      write_baseline)
from .measure import (PeakMemory, attack_config, attacked_figures, figure, figures, now_utc, provenance, run_case,
                      soundness, unsound)
from .models import ZOO, Models, check_requirements, resolve_model
from .suite import (CONFIG_KEYS, DEFAULT_TRACK, FAILING, FIGURES, MIN_MEMORY_MB, MIN_SECONDS, MODES, SCHEMA, Case,
                    load_suite)

__all__ = ["History", "append_record", "compare", "failed", "judge", "load_baseline", "read_history",
           "write_baseline", "PeakMemory", "attack_config", "attacked_figures", "figure", "figures", "now_utc",
           "provenance", "run_case", "soundness", "unsound", "FIXTURES", "ZOO", "Models", "build_fixture",
           "check_requirements", "resolve_model", "CONFIG_KEYS", "DEFAULT_TRACK", "FAILING", "FIGURES",
           "MIN_MEMORY_MB", "MIN_SECONDS", "MODES", "SCHEMA", "Case", "load_suite"]
