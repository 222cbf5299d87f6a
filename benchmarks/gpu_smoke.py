"""What a user with one GPU runs first: 50 training steps of the demo tower and of CTNet on the
GPU, a per-device summary of every parameter and buffer, samples/s. Exits 1 when anything the
model holds is not on the GPU (sharding refuses such a model, naming the tensor), 2 when there
is no GPU.

    python benchmarks/gpu_smoke.py                 # on cuda:0
    python benchmarks/gpu_smoke.py --device cpu    # the same on the CPU, as a dry run

Uses the demo config on the small world of `ctnet experiment --quick` (written to a temporary
folder), so it needs nothing but the installed package. Results: benchmarks/results/
gpu_smoke-<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

from ctnet_rec.config import load_config
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.synth import synthesize
from ctnet_rec.experiment.runner import quick
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import PeriodTrainer
from ctnet_rec.training.transfer import CTNetTrainer
from sharding.tower import PlacementError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50


def placement(trainer: PeriodTrainer) -> dict[str, int]:
    """Parameters and buffers (elements) per device, table shards included."""
    counts: collections.Counter[str] = collections.Counter()
    for t in itertools.chain(trainer.dmp.parameters(), trainer.dmp.buffers()):
        counts[str(t.device)] += t.numel()
    return dict(counts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    cfg = quick(load_config(ROOT / "examples" / "demo.toml"))
    cfg.train.device = args.device
    results = {"device": args.device, "steps": STEPS, "batch_size": cfg.data.batch_size,
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(cfg.synth, data, seed=0)
        env = init_distributed(args.device)
        for name, domain, build in (("tower", "A", lambda: PeriodTrainer(cfg, env)),
                                    ("ctnet", "B", lambda: CTNetTrainer(cfg, cfg, env))):
            try:
                trainer = build()
            except PlacementError as e:
                print(f"{name}: {e}", file=sys.stderr)
                return 1
            reader = ParquetBatchReader(data, domain, [0, 1, 2], cfg.features, cfg.data,
                                        seed=0)
            steps = itertools.islice(itertools.cycle((domain, b) for b in reader), STEPS)
            metrics = trainer.train_steps(steps, STEPS, domain, 0)
            if args.device == "cuda":
                torch.cuda.synchronize()
            results[name] = {
                "placement": placement(trainer),
                "samples_per_s": round(metrics["train_rows"] / metrics["train_seconds"]),
                "train_loss": metrics["train_loss"]}
            print(f"{name}: {results[name]['samples_per_s']} samples/s over {STEPS} steps; "
                  f"elements by device {results[name]['placement']}")
    out = ROOT / "benchmarks" / "results" / f"gpu_smoke-{args.device}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
