"""What the step benchmarks share: in-memory demo batches, one process per measurement (so
each peak RSS is its own), and the result file's machine description."""

from __future__ import annotations

import json
import os
import platform
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
from ctnet_rec.experiment.jobs import peak_rss_mb

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


def time_steps(steps: dict[str, Callable[[Batch], None]],
               batches: list[Batch]) -> dict[str, dict[str, Any]]:
    """Each named step on every batch, the steps interleaved batch by batch (so a slow spell
    of a shared machine hits all of them alike); per step its median time (robust to the odd
    slow step) and the process's peak RSS so far."""
    for b in batches[:WARMUP]:
        for step in steps.values():
            step(b)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for b in batches[WARMUP:]:
        for name, step in steps.items():
            start = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - start)
    size = len(batches[0])
    rss = round(peak_rss_mb(), 1)
    return {name: {"batch_size": size, "steps": len(t),
                   "samples_per_s": round(size / statistics.median(t), 1),
                   "step_ms": round(1000 * statistics.median(t), 1), "peak_rss_mb": rss}
            for name, t in times.items()}


# the kinds of work of a step, by the name of the profiled op: the first rule that matches
PROFILE_KINDS = [
    ("embedding lookups (fbgemm, fused update in backward)", ("fbgemm::", "[lookup]", "dist]")),
    ("attention kernels", ("aten::_scaled_dot_product", "aten::_softmax")),
    ("matmuls (MLP, attention projections, DIN unit)", ("aten::mm", "aten::addmm", "aten::bmm",
                                                        "aten::addmv")),
    ("dense optimiser", ("Optimizer.",)),
    ("autograd engine", ("autograd::", "<built-in method run_backward")),
    ("other tensor ops (copies, elementwise, reductions)", ("aten::",)),
]


def step_profile(step: Callable[[Batch], None], batches: list[Batch]) -> dict[str, float]:
    """Milliseconds per step by kind of work (torch.profiler's self CPU time of each op,
    classified by `PROFILE_KINDS`); "python and framework overhead" is the step's wall time
    less all of them."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches[:WARMUP]:
        step(b)
    timed = batches[WARMUP:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for b in timed:
            step(b)
        wall = (time.perf_counter() - start) * 1000 / len(timed)
    out = {kind: 0.0 for kind, _ in PROFILE_KINDS}
    for event in prof.key_averages():
        kind = next((k for k, prefixes in PROFILE_KINDS
                     if any(event.key.startswith(p) or p in event.key for p in prefixes)), None)
        if kind is not None:
            out[kind] += event.self_cpu_time_total / 1000 / len(timed)
    out["python and framework overhead"] = wall - sum(out.values())
    out["step (profiled)"] = wall
    return {k: round(v, 2) for k, v in out.items()}


def run_workers(script: str, jobs: list[list[str]], common: list[str],
                env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run `script --worker JOB... COMMON...` per job, each in a fresh process (so each peak
    RSS is its own) with `env` added to the environment; each prints a JSON list of result
    rows as its last line."""
    rows = []
    for job in jobs:
        cmd = [sys.executable, script, "--worker", *job, *common]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, **(env or {})}).stdout
        got = json.loads(out.strip().splitlines()[-1])
        rows += got
        print("  ", " ".join(job), "->", ", ".join(f"{r.get('path') or r.get('job')} "
                                                  f"{r['samples_per_s']:,.0f} samples/s"
                                                  for r in got), flush=True)
    return rows


def write_result(path: Path, name: str, script: str, config: str,
                 **fields: Any) -> None:
    result = {
        "benchmark": name,
        **fields,
        "command": "python " + " ".join([os.path.relpath(script, ROOT), *sys.argv[1:]]),
        "config": os.path.relpath(config, ROOT),
        "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    # the instruction set torch's kernels use: AVX2 and AVX-512 machines
                    # of the same core count differ in speed and in float results
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "torchrec": torchrec.__version__},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
