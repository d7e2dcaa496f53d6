"""Block-wise runs spread over local processes or a Ray cluster, with a checkpoint.

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

``checkpoint=FILE`` appends every finished block to a JSON-lines file
(fsync'd): a header line with the run's ``key`` (model, method, epsilon,
input, ...), then one line per block with its record and its bounds
(float64, base64).  A restarted run with the same key reads the blocks
already done instead of computing them; a different key is a GammaError.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from .errors import GammaError
from .graph import Graph
from .options import BoundOptions

log = logging.getLogger(__name__)

Progress = Optional[Callable[[str], None]]
CHECKPOINT_VERSION = 1
ATTEMPTS = 2                 # a failed block is retried once


@dataclass
class BlockTask:
    index: int                   # block index in the model (layer3 -> 3)
    name: str                    # "layer3"
    graph: Optional[Graph]       # the block's subgraph: only its own weights; None: built from source
    center: torch.Tensor         # float64 nominal input of the block, graph.input_shape
    options: BoundOptions        # how to bound it (epsilon included): frozen, checked, picklable
    source: Any = None           # without a graph: a recipe with build() -> Graph and portable
                                 # (gamma.blocks.BlockSource: the worker reads its block from the file)

    def block_graph(self) -> Graph:
        """The block's graph: the one given, or built now from the source (its weights read
        here, freed with the graph)."""
        return self.graph if self.graph is not None else self.source.build()


@dataclass
class BlockOutcome:
    index: int
    name: str
    row: Optional[dict]          # the block's record from solve; None when it failed
    lower: Optional[np.ndarray]  # float64 output bounds of the block
    upper: Optional[np.ndarray]
    error: Optional[str] = None  # "ValueError: ..." after the last failed attempt
    attempts: int = 1
    seconds: float = 0.0         # wall time of the last attempt (as seen by the scheduler)
    resumed: bool = False        # read from the checkpoint, not computed
    pid: Optional[int] = None    # the process that computed it (this one when serial)
    peak_rss_mb: Optional[float] = None   # that process's peak resident memory after the block

    @property
    def failed(self) -> bool:
        return self.error is not None


Solve = Callable[..., tuple]     # solve(task, progress) -> (row, lower ndarray, upper ndarray)


# ------------------------------------------------------------------ entry point
def run_blocks(tasks: Iterable[BlockTask], solve: Solve, *, workers: Optional[int] = None,
               ray: Optional[str] = None, checkpoint: Optional[str] = None, key: Optional[dict] = None,
               threads: Optional[int] = None, progress: Progress = None) -> list[BlockOutcome]:
    """Solve every task; outcomes in task order.

    ``workers``: local processes (None or 1: serial, in this process), or with
    ``ray`` the most tasks in flight (default: the cluster's CPUs / threads).
    ``threads``: torch threads per worker (default: cores // workers; Ray:
    1).  ``checkpoint`` needs ``key``, the dict that identifies the run.
    """
    tasks = list(tasks)
    workers = check_workers(workers)
    if threads is not None and int(threads) < 1:
        raise GammaError(f"threads per worker must be >= 1, got {threads}")
    done: dict[int, BlockOutcome] = {}
    store = None
    if checkpoint is not None:
        if key is None:
            raise ValueError("a checkpoint needs the run's key")
        store = Checkpoint(checkpoint, key)
        done = store.load(tasks)
        if done and progress:
            progress(f"checkpoint {os.path.basename(checkpoint)}: {len(done)} of {len(tasks)} blocks already done")
    todo = [t for t in tasks if t.index not in done]
    record = _Recorder(done, store, tasks, progress)
    try:
        if not todo:
            pass
        elif ray is not None:
            runner = _RayRunner(ray, workers, threads)
            runner.run(todo, solve, record)
        elif workers is not None and workers > 1:
            runner = _PoolRunner(workers, threads or max(1, cpu_count() // workers))
            runner.run(todo, solve, record)
        else:
            _run_serial(todo, solve, record, progress)
    finally:
        if store is not None:
            store.close()
    return [done[t.index] for t in tasks]


def check_workers(workers) -> Optional[int]:
    if workers is None:
        return None
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = 0
    if isinstance(workers, bool) or n < 1 or n != workers:
        raise GammaError(f"--workers must be an integer >= 1, got {workers}")
    return n


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


class _Recorder:
    """Collects outcomes, writes successes to the checkpoint, reports progress."""

    def __init__(self, done: dict, store, tasks: list[BlockTask], progress: Progress):
        self.done, self.store, self.progress = done, store, progress
        self.tasks = {t.index: t for t in tasks}
        self.total = len(tasks)

    def __call__(self, out: BlockOutcome) -> None:
        self.done[out.index] = out
        if self.store is not None and not out.failed:
            self.store.append(out, tensor_sha256(self.tasks[out.index].center))
        if self.progress:
            what = f"FAILED after {out.attempts} attempts ({out.error})" if out.failed else \
                f"done in {out.seconds:.1f}s"
            self.progress(f"{len(self.done)}/{self.total} blocks: {out.name} {what}")

    def retry(self, task: BlockTask, error: str) -> None:
        log.warning("block %s failed (%s); retrying", task.name, error)
        if self.progress:
            self.progress(f"block {task.name} failed ({error}); retrying")


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and text[0] else type(e).__name__


def _outcome(task: BlockTask, result, attempts: int, seconds: float, where=(None, None)) -> BlockOutcome:
    row, lower, upper = result
    return BlockOutcome(task.index, task.name, row, lower, upper, None, attempts, seconds,
                        pid=where[0], peak_rss_mb=where[1])


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory so far, in MiB (None where unknown)."""
    try:
        import resource
    except ImportError:          # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024     # bytes on macOS, KiB on Linux


def _failure(task: BlockTask, error: str, attempts: int, seconds: float) -> BlockOutcome:
    return BlockOutcome(task.index, task.name, None, None, None, error, attempts, seconds)


# ------------------------------------------------------------------ serial
def _run_serial(tasks: list[BlockTask], solve: Solve, record: _Recorder, progress: Progress) -> None:
    for j, task in enumerate(tasks):
        tag = f"block {j + 1}/{len(tasks)} {task.name}"
        for attempt in range(1, ATTEMPTS + 1):
            if progress:
                progress(tag)
            t0 = time.perf_counter()
            try:
                result = solve(task, (lambda m, tag=tag: progress(f"{tag}: {m}")) if progress else None)
            except GammaError:
                raise
            except Exception as e:  # a failed block is retried once, then reported
                if attempt < ATTEMPTS:
                    record.retry(task, _describe(e))
                    continue
                record(_failure(task, _describe(e), attempt, time.perf_counter() - t0))
                break
            record(_outcome(task, result, attempt, time.perf_counter() - t0, (os.getpid(), peak_rss_mb())))
            break


# ------------------------------------------------------------------ what a worker gets
def compact_graph(graph: Graph) -> Graph:
    """A copy of ``graph`` whose tensors own exactly their data.

    A block's weights may be views into a larger storage (a memory-mapped
    file, a fused tensor); pickling a view would send the whole storage."""
    out = Graph(graph.name, graph.input, graph.input_shape)
    out.nodes = {}
    for name, node in graph.nodes.items():
        params = {k: _own(v) for k, v in node.params.items()}
        out.nodes[name] = type(node)(node.name, node.op, node.inputs, params, node.block, node.shape)
    out.output = graph.output
    out.meta = dict(graph.meta)
    return out


def _own(v):
    if isinstance(v, torch.Tensor):
        if v.untyped_storage().nbytes() != v.numel() * v.element_size() or not v.is_contiguous():
            return v.detach().clone(memory_format=torch.contiguous_format)
        return v.detach()
    return v


def task_bytes(task: BlockTask) -> bytes:
    """The pickled task a worker receives: a portable source (the worker reads its block's
    weights from the checkpoint file), else the graph compacted to its own weights."""
    graph, source = task.graph, task.source
    if graph is None and not getattr(source, "portable", False):
        graph, source = task.block_graph(), None          # weights in this process's memory: send them
    t = BlockTask(task.index, task.name, None if graph is None else compact_graph(graph),
                  _own(task.center).cpu(), task.options, source)
    return pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _solve_bytes(solve: Solve, blob: bytes, threads: Optional[int] = None):
    """Worker side: unpickle the task and solve it (no progress callback); returns the
    result, the seconds and (pid, peak resident MiB) of this worker."""
    if threads is not None:
        torch.set_num_threads(threads)
    task = pickle.loads(blob)
    t0 = time.perf_counter()
    result = solve(task, None)
    return result, time.perf_counter() - t0, (os.getpid(), peak_rss_mb())


# ------------------------------------------------------------------ local processes
class _PoolRunner:
    """A spawn-context process pool with at most ``workers`` blocks in flight.

    A worker that dies (killed for memory, a crash) breaks the pool and takes
    every block in flight with it, so the culprit is unknown: the pool is
    restarted and those blocks are rerun one at a time, where a death counts
    as a failed attempt of the block that was alone in the pool."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads

    def _pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.threads,))

    def run(self, tasks: list[BlockTask], solve: Solve, record: _Recorder) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool
        pending = collections.deque((t, 1, False) for t in tasks)     # (task, attempt, run alone)
        inflight: dict = {}
        pool = self._pool()
        try:
            while pending or inflight:
                while pending and len(inflight) < self.workers:
                    task, attempt, alone = pending[0]
                    if inflight and (alone or any(a for _, _, a, _ in inflight.values())):
                        break                       # a suspect runs by itself
                    pending.popleft()
                    fut = pool.submit(_solve_bytes, solve, task_bytes(task))
                    inflight[fut] = (task, attempt, alone, time.perf_counter())
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                broken = False
                for fut in finished:
                    task, attempt, alone, t0 = inflight.pop(fut)
                    try:
                        result, seconds, where = fut.result()
                    except GammaError:
                        raise
                    except BrokenProcessPool:
                        broken = True
                        if alone:
                            self._failed(task, attempt, "worker process died", t0, pending, record)
                        else:
                            pending.appendleft((task, attempt, True))
                    except Exception as e:  # retried once, then reported
                        self._failed(task, attempt, _describe(e), t0, pending, record)
                    else:
                        record(_outcome(task, result, attempt, seconds, where))
                if broken:
                    for fut, (task, attempt, alone, t0) in list(inflight.items()):
                        pending.appendleft((task, attempt, True))
                    inflight.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._pool()
        finally:
            pool.shutdown(wait=not inflight, cancel_futures=True)

    @staticmethod
    def _failed(task, attempt, error, t0, pending, record) -> None:
        if attempt < ATTEMPTS:
            record.retry(task, error)
            pending.appendleft((task, attempt + 1, error == "worker process died"))
        else:
            record(_failure(task, error, attempt, time.perf_counter() - t0))


# ------------------------------------------------------------------ Ray
def import_ray():
    """The ray module, or GammaError naming the extra to install."""
    from .extras import require
    return require("gamma verify --ray", "ray")


def _ray_entry(solve: Solve, blob: bytes, threads: int):
    return _solve_bytes(solve, blob, threads)


class _RayRunner:
    """Tasks on a Ray cluster: ``local`` starts a private local cluster (shut
    down at the end), ``auto`` joins the running one, anything else is an
    address (``host:port`` or ``ray://host:port``)."""

    def __init__(self, address: str, workers: Optional[int], threads: Optional[int]):
        self.address, self.workers, self.threads = str(address), workers, threads

    def run(self, tasks: list[BlockTask], solve: Solve, record: _Recorder) -> None:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                if self.address == "local":
                    ray.init(address="local", **kw)
                else:
                    ray.init(address=self.address, **kw)
            except Exception as e:   # ConnectionError, ValueError, RuntimeError from ray
                raise GammaError(f"--ray {self.address}: cannot connect ({_describe(e)})") from None
            started = True
        try:
            self._run(ray, tasks, solve, record)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, tasks, solve, record) -> None:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = self.threads or 1
        limit = self.workers or max(1, cpus // threads)
        remote = ray.remote(_ray_entry).options(num_cpus=min(threads, cpus), max_retries=0,
                                                 retry_exceptions=False)
        solve_ref = ray.put(solve)
        pending = collections.deque((t, 1) for t in tasks)
        inflight: dict = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < limit:
                    task, attempt = pending.popleft()
                    ref = remote.remote(solve_ref, ray.put(task_bytes(task)), threads)
                    inflight[ref] = (task, attempt, time.perf_counter())
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    task, attempt, t0 = inflight.pop(ref)
                    try:
                        result, seconds, where = ray.get(ref)
                    except Exception as e:  # RayTaskError wraps the worker's exception
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, GammaError):
                            raise cause from None
                        err = _describe(cause) if cause is not None else _describe(e)
                        _PoolRunner._failed(task, attempt, err, t0, pending, record)
                    else:
                        record(_outcome(task, result, attempt, seconds, where))
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)


# ------------------------------------------------------------------ checkpoint
def run_key(report: dict, alpha_iters: int, x: torch.Tensor) -> dict:
    """What must match for a checkpoint to be resumed: model, component,
    output, sequence length, method, intermediate, epsilon and the input."""
    model = dict(report["model"])
    model["path"] = os.path.realpath(model["path"]) if model.get("path") else model.get("path")
    key = {"model": model}
    key.update({k: report[k] for k in ("component", "output", "seq_len", "method", "intermediate", "epsilon")})
    key["arithmetic"] = report.get("arithmetic", "float32")
    if report["method"] == "alpha":
        key["alpha_iters"] = int(alpha_iters)
    key["input_sha256"] = tensor_sha256(x)
    return key


def tensor_sha256(t: torch.Tensor) -> str:
    a = np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def _enc(a: Optional[np.ndarray]):
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"shape": list(a.shape), "f8": base64.b64encode(a.tobytes()).decode("ascii")}


def _dec(d) -> Optional[np.ndarray]:
    if d is None:
        return None
    return np.frombuffer(base64.b64decode(d["f8"]), dtype="<f8").reshape(d["shape"]).copy()


@dataclass
class Checkpoint:
    """Append-only JSON lines: a header ``{"gamma_checkpoint": 1, "key": {...}}``,
    then one finished block per line.  Floats are written by ``repr`` (exact);
    bounds as base64 little-endian float64.  A partial last line (a run killed
    while writing) is dropped."""
    path: str
    key: dict
    _file: Any = field(default=None, repr=False)

    def load(self, tasks: list[BlockTask]) -> dict[int, BlockOutcome]:
        key = json.loads(json.dumps(self.key))           # the key as it reads back
        lines, keep = self._read()
        if lines is None:                                # new (or empty) file
            self._open(truncate=0)
            self._write({"gamma_checkpoint": CHECKPOINT_VERSION, "key": key})
            return {}
        head = lines[0]
        if not isinstance(head, dict) or head.get("gamma_checkpoint") != CHECKPOINT_VERSION:
            raise GammaError(f"{self.path}: not a gamma checkpoint (or another version)")
        if head.get("key") != key:
            old = head.get("key") or {}
            diff = [f"{k}: {old.get(k)!r} here, {key.get(k)!r} now" for k in sorted(set(old) | set(key))
                    if old.get(k) != key.get(k)]
            raise GammaError(f"{self.path}: checkpoint of another run ({'; '.join(diff)}); "
                             "use another file or delete it")
        by_index = {t.index: t for t in tasks}
        done = {}
        for n, rec in enumerate(lines[1:], 2):
            try:
                k, name = int(rec["block_index"]), rec["block_name"]
                task = by_index.get(k)
                if task is None:
                    continue                                # a block this run does not select
                if name != task.name or rec["input_sha256"] != tensor_sha256(task.center):
                    raise GammaError(f"{self.path}:{n}: block {k} ({name}) was computed on a different "
                                     "block input: the checkpoint belongs to another model or input")
                done[k] = BlockOutcome(k, name, rec["row"], _dec(rec["lower"]), _dec(rec["upper"]),
                                       None, int(rec.get("attempts", 1)), float(rec.get("seconds", 0.0)),
                                       resumed=True)
            except (KeyError, TypeError, ValueError):
                raise GammaError(f"{self.path}:{n}: corrupt checkpoint record") from None
        self._open(truncate=keep)
        return done

    def _read(self):
        """(parsed lines, bytes of complete lines) or (None, 0) for a new file."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, 0
        except OSError as e:
            raise GammaError(f"{self.path}: cannot read checkpoint ({e.strerror or e})") from None
        complete = data[:data.rfind(b"\n") + 1]            # a partial last line is dropped
        raws = complete.splitlines(keepends=True)
        lines, keep = [], 0
        for n, raw in enumerate(raws, 1):
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    if n == len(raws):
                        break                               # torn last line
                    raise GammaError(f"{self.path}:{n}: corrupt checkpoint line") from None
            keep += len(raw)
        if not lines:
            if data.strip():
                raise GammaError(f"{self.path}: not a gamma checkpoint")
            return None, 0
        return lines, keep

    def _open(self, truncate: int) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise GammaError(f"{self.path}: cannot write checkpoint (no such directory {folder})")
        try:
            f = open(self.path, "r+b" if os.path.exists(self.path) else "w+b")
        except OSError as e:
            raise GammaError(f"{self.path}: cannot write checkpoint ({e.strerror or e})") from None
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:          # not on POSIX: no lock
            pass
        except OSError:
            f.close()
            raise GammaError(f"{self.path}: checkpoint is in use by another run") from None
        f.truncate(truncate)
        f.seek(truncate)
        self._file = f

    def _write(self, obj) -> None:
        self._file.write(json.dumps(obj, allow_nan=True).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, out: BlockOutcome, input_sha256: str) -> None:
        self._write({"block_index": out.index, "block_name": out.name, "input_sha256": input_sha256,
                     "attempts": out.attempts, "seconds": out.seconds, "row": out.row,
                     "lower": _enc(out.lower), "upper": _enc(out.upper)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
