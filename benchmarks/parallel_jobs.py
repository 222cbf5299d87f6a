"""Jobs side by side: rows trained per second, end to end from Parquet, by one job with every
core's torch thread against several one-thread jobs at once (what `[experiment]
parallel_jobs` does). Each job trains the demo's Base tower on domain A's periods 1-2 of the
demo world (fresh process, fresh model, the production loop: reader, step, checkpoint-free).

    python benchmarks/parallel_jobs.py [--rounds 2]

Rounds interleave the layouts (a shared machine's slow spells hit all of them alike); each
layout reports its median over the rounds. Results: benchmarks/results/parallel_jobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import DATA, ROOT, require_demo_world, write_result

RESULT = ROOT / "benchmarks" / "results" / "parallel_jobs.json"
CONFIG = ROOT / "examples" / "demo.toml"
PERIODS = (1, 2)


def worker(threads: int) -> None:
    import torch

    from ctnet_rec.config import load_config
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.trainer import PeriodTrainer

    torch.set_num_threads(threads)
    trainer = PeriodTrainer(load_config(CONFIG), init_distributed("cpu"))
    start, rows = time.perf_counter(), 0
    for period in PERIODS:
        rows += trainer.train_period(DATA, "A", period)["train_rows"]
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))


def layout(jobs: int, threads: int) -> float:
    """Rows per second of `jobs` one-period-pair jobs started together, all of them summed."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(threads)],
                              stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a worker failed")
    return sum(r["rows"] / r["seconds"] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    require_demo_world()
    cores = len(os.sched_getaffinity(0))
    layouts = {f"1 job x {cores} threads": (1, cores), "1 job x 1 thread": (1, 1),
               f"{cores} jobs x 1 thread": (cores, 1)}
    runs: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, (jobs, threads) in layouts.items():
            runs[name].append(layout(jobs, threads))
            print(f"  {name}: {runs[name][-1]:,.0f} samples/s", flush=True)
    rows = [{"layout": name, "jobs": jobs, "threads_per_job": threads,
             "samples_per_s": round(statistics.median(runs[name])),
             "samples_per_s_runs": [round(x) for x in runs[name]]}
            for name, (jobs, threads) in layouts.items()]
    one = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_one_job"] = round(r["samples_per_s"] / one, 2)
        print(f"{r['layout']:<22}{r['samples_per_s']:>10,} samples/s  x{r['vs_one_job']}")
    write_result(RESULT, "parallel_jobs", __file__, str(CONFIG), runs=rows)


if __name__ == "__main__":
    main()
