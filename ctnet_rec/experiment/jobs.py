"""The experiment's jobs, each run in a process of its own and measured there.

A fresh process per job is what makes the cost table's peak memory that job's alone: a
process's peak RSS never goes down, and the allocator keeps what an earlier model freed. The
processes are forked from a server that imported the library once, so a job starts in
milliseconds, not seconds."""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from ctnet_rec.data.contract import list_periods, parquet_file
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.log_setup import FORMAT, configure_logging

log = logging.getLogger(__name__)

EVAL_WEIGHT = 0.25  # a scored row costs about a quarter of a trained one (forward only)


Key = tuple[str, str]  # a job's (name, domain)


@dataclass(frozen=True)
class Job:
    """One model's training (or scoring) on one target domain, as the cost table sees it."""

    name: str
    domain: str
    fn: Callable[[], object]  # picklable: a functools.partial of a module-level function
    trains: Sequence[int] = ()  # periods it trains on (in `domain`'s data)
    scores: Sequence[int] = ()  # periods it scores
    run: Path | None = None  # where its metrics.jsonl is, for the samples it read
    also_reads: str | None = None  # a domain whose data of the same periods it trains on too
    needs: Sequence[Key] = ()  # jobs that must have finished before it starts

    @property
    def key(self) -> Key:
        return self.name, self.domain


def _logging_levels() -> dict[str, int]:
    """The levels set in this process: the root's and each logger given one."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _child_init(levels: dict[str, int], submitter: int) -> None:
    _die_with(submitter)
    configure_logging(levels[""])  # a library imported here may have set up logging first
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    gc.freeze()  # the library's import-time objects need no rescans by the collector


def _die_with(pid: int) -> None:
    """End this worker as soon as process `pid`, the one that submits its jobs, ends, however
    it ends (SIGKILL, SIGTERM's default, the OOM killer). Without this a job trains on as an
    orphan, holding its run's lock, its memory and any GPU, and keeps the forkserver alive."""
    try:
        watched = os.pidfd_open(pid)  # names that process, never a later one with its pid
    except ProcessLookupError:  # it ended before this worker started
        os._exit(1)

    def watch() -> None:
        select.select([watched], [], [])  # readable once the process has exited
        os._exit(1)  # at once, as a kill would (runs resume from their last checkpoint)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measured(fn: Callable[[], object], label: str, threads: int | None) -> dict[str, float]:
    """Wall time and memory of `fn` in this (fresh) process: the RSS it starts with (the
    imported libraries) and its peak. Its log lines carry `label` (jobs may run side by side);
    `threads`: torch's intra-op threads, None for torch's default."""
    import torch

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", f"[{label}] %(name)s")))
    if threads is not None:
        torch.set_num_threads(threads)
    start_rss, start = rss_mb(), time.perf_counter()
    fn()
    usage = {"seconds": time.perf_counter() - start, "start_rss_mb": start_rss,
             "peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_initialized():
        usage["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return usage


def torch_threads(workers: int) -> int | None:
    """Intra-op threads per job when `workers` run at a time: the cores shared out; None (torch's
    default, every core) for one at a time."""
    return None if workers == 1 else max(1, len(os.sched_getaffinity(0)) // workers)


class JobKilled(RuntimeError):
    """A job's process ended without a result: killed by a signal (the kernel's out-of-memory
    killer, an operator) or crashed in native code."""


# torch's availability check asks the CUDA runtime by default, and a process that did so cannot
# fork a child that uses CUDA ("Cannot re-initialize CUDA in forked subprocess"); asked through
# NVML, it can. fbgemm_gpu's import runs that check, so any process that imports the library
# and then forks the jobs would fork them unable to train on the GPU.
NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def keep_forks_cuda_capable() -> None:
    """Have torch check for CUDA through NVML, in this process and the ones it starts, so
    that the processes they fork can still use the GPU. Called before the library is imported
    by a process that forks (the job server, the GPU suite); a value the user set stays."""
    os.environ.setdefault(NVML_CUDA_CHECK, "1")


def start_job_server(preload: Sequence[str]) -> multiprocessing.context.ForkServerContext:
    """The server `IsolatedRunner`'s processes fork from, started now if it is not running:
    it imports `preload` (the library) once, so that each job starts with it imported. Started
    first thing by a command that runs jobs, it imports on another core while the command's
    own process imports the library too. One per process: a later call with other modules
    finds it running and changes nothing."""
    keep_forks_cuda_capable()  # the server imports the library, then forks every job
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()
    return context


class IsolatedRunner:
    """Runs callables, up to `workers` at a time, each in a new process; each returns its wall
    time and peak memory. Exceptions (bad data, a refused checkpoint) come back to the caller
    as raised. Each job has a pool of its own, so a process that dies (the out-of-memory
    killer) fails its job alone, not the jobs beside or after it; and the processes end with
    the one that made the runner, however it ends."""

    def __init__(self, preload: Sequence[str], workers: int = 1) -> None:
        self.context = start_job_server(preload)
        self.workers, self.threads = workers, torch_threads(workers)
        self.init_args = (_logging_levels(), os.getpid())
        self.slots = threading.BoundedSemaphore(workers)
        self.watchers: set[threading.Thread] = set()

    def submit(self, fn: Callable[[], object], label: str) -> Future[dict[str, float]]:
        """Start `fn` in a new process as soon as fewer than `workers` jobs run (until then
        this waits)."""
        self.slots.acquire()
        try:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=self.context,
                                       initializer=_child_init, initargs=self.init_args)
            job = pool.submit(_measured, fn, label, self.threads)
        except BaseException:
            self.slots.release()
            raise
        outcome: Future[dict[str, float]] = Future()

        def watch() -> None:
            """Wait for the job, then for its process to exit (so its memory is free), then
            free its slot and report. A thread of its own, not a callback of the future: the
            pool calls those holding a lock that `shutdown` takes."""
            error = job.exception()
            pool.shutdown()
            self.slots.release()  # before the caller hears of it: it may submit at once
            if isinstance(error, BrokenProcessPool):
                error = JobKilled(f"{label}: its process ended without a result (killed by a "
                                  "signal, e.g. the kernel's out-of-memory killer: see "
                                  "`dmesg`; or crashed); rerunning resumes it")
            if error is None:
                outcome.set_result(job.result())
            else:
                outcome.set_exception(error)
            self.watchers.discard(threading.current_thread())

        watcher = threading.Thread(target=watch, name=f"job {label}", daemon=True)
        self.watchers.add(watcher)
        watcher.start()
        return outcome

    def close(self) -> None:
        """Wait for the jobs still running."""
        for watcher in list(self.watchers):
            watcher.join()


def run_in_order(jobs: Sequence[Job], runner: IsolatedRunner, starting: Callable[[int], None],
                 finished: Callable[[int, dict[str, float] | BaseException], None]) -> None:
    """Run every job, at most the runner's workers at a time, each once the jobs it needs have
    finished (succeeded or failed), the earliest in `jobs` first (one at a time: exactly in
    order). `finished(i, usage or the exception)` may raise, which stops the scheduling (the
    jobs running then are waited for)."""
    waiting, running = list(range(len(jobs))), dict[Future[dict[str, float]], int]()
    ended: set[Key] = set()
    while waiting or running:
        for i in list(waiting):
            if len(running) == runner.workers:
                break
            if all(k in ended for k in jobs[i].needs):
                waiting.remove(i)
                starting(i)
                running[runner.submit(jobs[i].fn, f"{jobs[i].name} {jobs[i].domain}")] = i
        if not running:
            raise ValueError(f"jobs wait for jobs that never run: {[jobs[i].key for i in waiting]}")
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            i = running.pop(future)
            ended.add(jobs[i].key)
            error = future.exception()
            finished(i, error if error is not None else future.result())


@functools.cache
def period_rows(data: DataRoot, domain: str, period: int) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in list_periods(data, domain)[period])


def work(job: Job, data: DataRoot) -> float:
    """A job's size for the ETA: rows trained plus rows scored at EVAL_WEIGHT."""
    read = [job.domain, job.also_reads] if job.also_reads else [job.domain]
    return (sum(period_rows(data, d, t) for d in read for t in job.trains)
            + EVAL_WEIGHT * sum(period_rows(data, job.domain, t) for t in job.scores))


class Progress:
    """One log line per job: which model, domain and periods, elapsed time and an ETA from
    the work done so far (each job shows its own per-period bar beneath)."""

    def __init__(self, jobs: Sequence[Job], data: DataRoot) -> None:
        self.sizes = [work(j, data) for j in jobs]
        self.jobs, self.start, self.done = jobs, time.perf_counter(), 0.0

    def starting(self, i: int) -> None:
        job, elapsed = self.jobs[i], time.perf_counter() - self.start
        eta = "unknown"
        if self.done > 0:
            eta = _clock(elapsed / self.done * (sum(self.sizes) - self.done))
        periods = f"periods {job.trains[0]}-{job.trains[-1]}" if job.trains else "scoring"
        log.info("[%d/%d] %s on %s (%s) | elapsed %s, ETA %s", i + 1, len(self.jobs), job.name,
                 job.domain, periods, _clock(elapsed), eta)

    def finished(self, i: int) -> None:
        self.done += self.sizes[i]


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
