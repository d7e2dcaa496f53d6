"""Where each block-wise task runs: serially here, in local worker processes, or
as Ray tasks (:func:`run_blocks`, the entry point), with retries and the resume file."""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Iterable, Optional

import torch

from ..errors import GammaError
from ..extras import require
from .resume import ResumeFile, tensor_sha256
from .tasks import (BlockOutcome, BlockTask, Solve, describe, failure, outcome, peak_rss_mb, solve_bytes,
                    task_bytes)

log = logging.getLogger("gamma.parallel")

Progress = Optional[Callable[[str], None]]
ATTEMPTS = 2                 # a failed block is retried once


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
        store = ResumeFile(checkpoint, key)
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
                    record.retry(task, describe(e))
                    continue
                record(failure(task, describe(e), attempt, time.perf_counter() - t0))
                break
            record(outcome(task, result, attempt, time.perf_counter() - t0, (os.getpid(), peak_rss_mb())))
            break


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


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
                    fut = pool.submit(solve_bytes, solve, task_bytes(task))
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
                        self._failed(task, attempt, describe(e), t0, pending, record)
                    else:
                        record(outcome(task, result, attempt, seconds, where))
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
            record(failure(task, error, attempt, time.perf_counter() - t0))


# ------------------------------------------------------------------ Ray
def import_ray():
    """The ray module, or GammaError naming the extra to install."""
    return require("gamma verify --ray", "ray")


def _ray_entry(solve: Solve, blob: bytes, threads: int):
    return solve_bytes(solve, blob, threads)


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
                raise GammaError(f"--ray {self.address}: cannot connect ({describe(e)})") from None
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
                        err = describe(cause) if cause is not None else describe(e)
                        _PoolRunner._failed(task, attempt, err, t0, pending, record)
                    else:
                        record(outcome(task, result, attempt, seconds, where))
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)
