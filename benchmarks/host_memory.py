"""The demo tower's training step with glibc's malloc as it comes ("system") and with its
large freed blocks kept for reuse ("kept": `KEPT_ENV`, glibc's mmap and trim thresholds at
1 GiB, so a block freed at one step is not handed back to the system and page-faulted in
again at the next), each run in a fresh process, the two in alternating rounds (their order
swapped each round) so a shared machine's slow spells hit both alike.

Per run: the median step time, page faults and kernel CPU time per step, and peak RSS. Per
batch size: the change of the step time, kept - system, paired by round (mean and 95% t
interval over the rounds).

    python benchmarks/host_memory.py [--rounds 8] [--samples 40960] [--batch-sizes 512 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from common import ROOT, WARMUP, demo_batches, require_demo_world, run_workers, write_result

from ctnet_rec.config import load_config
from ctnet_rec.experiment.significance import paired_interval
from ctnet_rec.training.distributed import init_distributed

RESULT = ROOT / "benchmarks" / "results" / "host_memory.json"
KEPT_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MODES = {"system": {}, "kept": KEPT_ENV}


def run_worker(mode: str, batch_size: int, samples: int, config: str) -> dict:
    """One run: the Base tower sharded as in training, `samples` rows of timed training
    steps (at least 4 steps)."""
    from ctnet_step import build, train_step

    cfg = load_config(config)
    env = init_distributed("cpu")
    step = train_step(build("base", cfg, env)[0], cfg)[0]
    batches = demo_batches(cfg, batch_size, max(samples // batch_size, 4))
    for b in batches[:WARMUP]:
        step(b)
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for b in batches[WARMUP:]:
        start = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = len(times)
    return {"job": mode, "batch_size": batch_size, "steps": n,
            "samples_per_s": round(batch_size / statistics.median(times), 1),
            "step_ms": round(1000 * statistics.median(times), 1),
            "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / n),
            "kernel_cpu_ms_per_step": round(1000 * (after.ru_stime - before.ru_stime) / n, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--samples", type=int, default=40_960, help="rows of timed steps a run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    common = ["--samples", str(args.samples), "--config", args.config]
    if args.worker:
        print(json.dumps([run_worker(args.worker[0], int(args.worker[1]), args.samples,
                                     args.config)]))
        return
    require_demo_world()
    tuned = [k for k in os.environ if k.startswith("MALLOC_")]
    tuned += ["GLIBC_TUNABLES"] if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") else []
    if tuned:
        sys.exit(f"{', '.join(tuned)} set: unset them, the system runs take glibc's defaults")
    runs, summary = [], {}
    for bs in args.batch_sizes:
        by_mode: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in list(MODES)[::1 if r % 2 == 0 else -1]:
                row = run_workers(__file__, [[mode, str(bs)]], common, MODES[mode])[0]
                by_mode[mode].append({**row, "round": r})
        runs += by_mode["system"] + by_mode["kept"]
        change = paired_interval([k["step_ms"] - s["step_ms"] for s, k in
                                  zip(by_mode["system"], by_mode["kept"], strict=True)])
        system_ms = statistics.mean(s["step_ms"] for s in by_mode["system"])
        summary[str(bs)] = {
            "system_step_ms": round(system_ms, 1),
            "kept_step_ms": round(statistics.mean(k["step_ms"] for k in by_mode["kept"]), 1),
            "change_ms": {k: round(v, 1) for k, v in change.items()},
            "change_relative": round(change["mean"] / system_ms, 3),
            **{f"{m}_{key}": statistics.median(x[key] for x in by_mode[m])
               for m in MODES for key in ("page_faults_per_step", "kernel_cpu_ms_per_step",
                                          "peak_rss_mb")}}
        print(bs, json.dumps(summary[str(bs)]), flush=True)
    write_result(RESULT, "host_memory", __file__, args.config, kept_env=KEPT_ENV,
                 summary=summary, runs=runs)


if __name__ == "__main__":
    main()
