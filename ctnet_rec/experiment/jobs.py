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
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ctnet_rec.data.contract import list_periods
from ctnet_rec.log_setup import configure_logging

log = logging.getLogger(__name__)

EVAL_WEIGHT = 0.25  # a scored row costs about a quarter of a trained one (forward only)


@dataclass(frozen=True)
class Job:
    """One model's training (or scoring) on one target domain, as the cost table sees it."""

    name: str
    domain: str
    fn: Callable[[], None]  # picklable: a functools.partial of a module-level function
    trains: Sequence[int] = ()  # periods it trains on (in `domain`'s data)
    scores: Sequence[int] = ()  # periods it scores
    run: Path | None = None  # where its metrics.jsonl is, for the samples it read
    also_reads: str | None = None  # a domain whose data of the same periods it trains on too


def _logging_levels() -> dict[str, int]:
    """The levels set in this process: the root's and each logger given one."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _child_init(levels: dict[str, int]) -> None:
    configure_logging(levels[""])  # a library imported here may have set up logging first
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    gc.freeze()  # the library's import-time objects need no rescans by the collector


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measured(fn: Callable[[], None]) -> dict[str, float]:
    """Wall time and memory of `fn` in this (fresh) process: the RSS it starts with (the
    imported libraries) and its peak."""
    start_rss, start = rss_mb(), time.perf_counter()
    fn()
    usage = {"seconds": time.perf_counter() - start, "start_rss_mb": start_rss,
             "peak_rss_mb": peak_rss_mb()}
    import torch

    if torch.cuda.is_initialized():
        usage["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return usage


class IsolatedRunner:
    """Runs callables one at a time, each in a new process; returns its wall time and peak
    memory. Exceptions (bad data, a refused checkpoint) come back to the caller as raised."""

    def __init__(self, preload: Sequence[str]) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        self.pool = ProcessPoolExecutor(
            max_workers=1, mp_context=ctx, max_tasks_per_child=1, initializer=_child_init,
            initargs=(_logging_levels(),))

    def __call__(self, fn: Callable[[], None]) -> dict[str, float]:
        return self.pool.submit(_measured, fn).result()

    def close(self) -> None:
        self.pool.shutdown()


@functools.cache
def period_rows(data: Path, domain: str, period: int) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in list_periods(data, domain)[period])


def work(job: Job, data: Path) -> float:
    """A job's size for the ETA: rows trained plus rows scored at EVAL_WEIGHT."""
    read = [job.domain, job.also_reads] if job.also_reads else [job.domain]
    return (sum(period_rows(data, d, t) for d in read for t in job.trains)
            + EVAL_WEIGHT * sum(period_rows(data, job.domain, t) for t in job.scores))


class Progress:
    """One log line per job: which model, domain and periods, elapsed time and an ETA from
    the work done so far (each job shows its own per-period bar beneath)."""

    def __init__(self, jobs: Sequence[Job], data: Path) -> None:
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
