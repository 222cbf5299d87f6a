"""What the step benchmarks share: in-memory demo batches, one process per measurement (so
each peak RSS is its own), and the result file's machine description."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchrec

from ctnet_rec.config import Config
from ctnet_rec.data.batch import Batch
from ctnet_rec.data.reader import ParquetBatchReader

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "runs" / "demo" / "data"
WARMUP = 2  # steps before timing: allocations, first-call kernels


def require_demo_world() -> None:
    if not (DATA / "world.json").exists():
        sys.exit(f"{DATA}: run `make demo` (or `ctnet demo`) first to create the demo world")


def demo_batches(cfg: Config, batch_size: int, steps: int) -> list[Batch]:
    """Full batches from the demo world's domain A (read once, kept in memory: the benchmarks
    measure the step, not the reader)."""
    reader = ParquetBatchReader(DATA, "A", [8, 9], cfg.features, cfg.data,
                                batch_size=batch_size, seed=0)
    batches = []
    for b in reader:
        if len(b) == batch_size:
            batches.append(b)
        if len(batches) == steps + WARMUP:
            break
    return batches


def time_steps(step: Callable[[Batch], None], batches: list[Batch]) -> dict[str, Any]:
    """The median step (robust to the odd slow step of a shared machine)."""
    for b in batches[:WARMUP]:
        step(b)
    times = []
    for b in batches[WARMUP:]:
        start = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - start)
    median, size = statistics.median(times), len(batches[0])
    return {
        "batch_size": size,
        "steps": len(times),
        "samples_per_s": round(size / median, 1),
        "step_ms": round(1000 * median, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_workers(script: str, jobs: list[list[str]], common: list[str],
                repeats: int = 1) -> list[dict[str, Any]]:
    """Run `script --worker JOB... COMMON...` per job in a fresh process, each prints its
    result as its last line of JSON. With repeats, the jobs run round-robin (so a slow spell
    of the machine hits all of them alike) and each job keeps its median run by step time."""
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(jobs))}
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            cmd = [sys.executable, script, "--worker", *job, *common]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[i].append(json.loads(out.strip().splitlines()[-1]))
            print("  ", " ".join(job), "->", runs[i][-1]["samples_per_s"], "samples/s",
                  flush=True)
    rows = []
    for i in range(len(jobs)):
        ordered = sorted(runs[i], key=lambda r: r["step_ms"])
        rows.append({**ordered[len(ordered) // 2],
                     "step_ms_runs": [r["step_ms"] for r in runs[i]]})
    return rows


def write_result(path: Path, name: str, script: str, config: str,
                 **fields: Any) -> None:
    result = {
        "benchmark": name,
        **fields,
        "command": "python " + " ".join([os.path.relpath(script, ROOT), *sys.argv[1:]]),
        "config": os.path.relpath(config, ROOT),
        "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torchrec": torchrec.__version__},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
