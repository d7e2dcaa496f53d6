"""Block-wise runs spread over local processes or a Ray cluster, with a resume file.

One entry point, :func:`run_blocks`: it takes one :class:`BlockTask` per
block (the block's own subgraph, whose constants are only that block's
weights, or a ``source`` that builds it where the task runs: for a lazy
checkpoint the table of where its tensors lie in the file, so a worker reads
its own block's weights there; and the block's nominal input) and a picklable
``solve(task, progress)`` that returns the block's record and output bounds.
Each outcome carries the pid and peak resident memory of the process that
computed it.  It knows
nothing about bounds or records; it only decides where each block runs:

* serially in this process (the default);
* ``workers=N``: N spawned local processes, each with ``cores // N`` torch
  threads, at most N blocks in flight (each pickled when it is sent);
* ``ray=ADDRESS`` (``auto``, ``local`` or ``host:port``): tasks on a Ray
  cluster, each block's graph sent once through ``ray.put``.

Every placement gives the same numbers bit for bit: a block is the same
float64 computation wherever it runs.  A block whose solve raises (or whose
worker dies) is retried once; a second failure is returned as an outcome
with ``error`` set, never dropped.  A :class:`~gamma.errors.GammaError` (a
problem with the user's input, the same for every block) is not retried and
ends the run.

``checkpoint=FILE`` (``gamma verify --checkpoint``) appends every finished
block to a resume file (:class:`ResumeFile`, JSON lines, fsync'd): a header
line with the run's ``key`` (model, method, epsilon, input, ...), then one line
per block with its record and its bounds (float64, base64).  A restarted run
with the same key reads the blocks already done instead of computing them; a
different key is a GammaError.

One module per job: :mod:`.tasks` (what is sent and what comes back),
:mod:`.runners` (where it runs: :func:`run_blocks`), :mod:`.resume` (the
resume file).
"""

from .resume import RESUME_VERSION, ResumeFile, run_key, tensor_sha256
from .runners import ATTEMPTS, check_workers, cpu_count, import_ray, run_blocks
from .tasks import BlockOutcome, BlockTask, compact_graph, peak_rss_mb, task_bytes

__all__ = ["run_blocks", "BlockTask", "BlockOutcome", "ResumeFile", "run_key", "tensor_sha256", "task_bytes",
           "compact_graph", "check_workers", "cpu_count", "import_ray", "peak_rss_mb", "ATTEMPTS",
           "RESUME_VERSION"]
