"""CTNet with a source tower that knows nothing, over seeds. `tests/test_no_harm.py` checks
one world (seed 0 here); this runs the same kind of world (`shuffled_source_world`: the
source domain's labels shuffled within each period) at K seeds, each a world and a training
run. Per seed and candidate (the adapters alone; with the output fusion, its weight kept
whatever its gain or only beyond noise, on the period's evidence or every period's), CTNet's
next-period AUC gain over Base on B's periods 3-6 and, with the fusion, the weights fitted;
over the seeds, the mean gain with its 95% t interval (`significance.paired_interval`), how
many periods fall below Base by more than 2 standard errors of Base's AUC, and how many
fitted weights exceed 0.3.

    python benchmarks/no_harm_seeds.py [--seeds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import write_result  # noqa: E402

from ctnet_rec.experiment.runner import metrics_by_period, run_ctnet  # noqa: E402
from ctnet_rec.experiment.significance import auc_standard_error, paired_interval  # noqa: E402
from ctnet_rec.files import read_jsonl  # noqa: E402
from ctnet_rec.training.loop import train_continual  # noqa: E402
from tests.conftest import DEMO_CONFIG, shuffled_source_world, write_tower_config  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "no_harm_seeds.json"
CANDIDATES = {"CTNet": {"output_fusion": False},
              "CTNet + output fusion": {"output_fusion": True, "output_fusion_min_z": 0.0},
              "CTNet + output fusion, weight beyond noise": {"output_fusion": True,
                                                             "output_fusion_min_z": 1.96},
              "CTNet + output fusion, pooled weight beyond noise": {
                  "output_fusion": True, "output_fusion_evidence": "pooled",
                  "output_fusion_min_z": 1.96}}
PERIODS = range(3, 7)  # B's periods CTNet trains (deployed at 3), each tested on the next
LARGE_WEIGHT = 0.3


def one_seed(seed: int, root: Path) -> dict[str, Any]:
    """Base and every candidate on the world of `seed`: per candidate the gains by period,
    the periods below Base by more than 2 standard errors, the fusion weights."""
    root.mkdir(parents=True)
    cfg = write_tower_config(root / "small.toml")
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=seed),
        experiment=dataclasses.replace(cfg.experiment, deploy_period=3, periods=len(PERIODS),
                                       target_domains=["B"]))
    world = shuffled_source_world(cfg, root, seed)
    torch.manual_seed(seed)
    train_continual(cfg, world, "A", range(6), root / "A", evaluate=False)
    train_continual(cfg, world, "B", range(7), root / "B" / "base")
    base = metrics_by_period(root / "B" / "base")
    out: dict[str, Any] = {}
    for name, overrides in CANDIDATES.items():
        run = root / name.replace(" ", "_").replace("+", "plus")
        run_ctnet(cfg, overrides, world, "B", root / "A", root / "B" / "base", run)
        got = metrics_by_period(run)
        gains, below = [], 0
        for t in PERIODS:
            gains.append(got[t]["auc"] - base[t]["auc"])
            positives = round(base[t]["rows"] * base[t]["ctr_true"])
            se = auc_standard_error(base[t]["auc"], positives, base[t]["rows"] - positives)
            below += gains[-1] < -2 * se
        weights = [m["fusion_weight"] for m in read_jsonl(run / "metrics.jsonl")
                   if "fusion_weight" in m]
        out[name] = {"gains": gains, "mean_gain": statistics.fmean(gains),
                     "below_2se": below, "fusion_weights": weights}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    seeds: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for seed in range(args.seeds):
            start = time.perf_counter()
            seeds[str(seed)] = one_seed(seed, work / f"seed={seed}")
            print(f"seed {seed} ({time.perf_counter() - start:.0f} s):",
                  json.dumps(seeds[str(seed)]), flush=True)
    summary = {}
    for name in CANDIDATES:
        rows = [s[name] for s in seeds.values()]
        weights = [w for r in rows for w in r["fusion_weights"]]
        summary[name] = {
            "mean_gain": paired_interval([r["mean_gain"] for r in rows]),
            "seeds_mean_gain_below_-0.002": sum(r["mean_gain"] < -0.002 for r in rows),
            "periods_below_2se": sum(r["below_2se"] for r in rows),
            "periods": len(rows) * len(PERIODS),
            "fusion_weights_above_0.3": sum(w > LARGE_WEIGHT for w in weights),
            "fusion_weights_above_0": sum(w > 0 for w in weights),
            "fusion_weights": len(weights),
        }
    print(json.dumps(summary, indent=1))
    write_result(RESULT, "no_harm_seeds", __file__, str(DEMO_CONFIG), seeds=seeds,
                 summary=summary, config_changes="tests/conftest.py write_tower_config")


if __name__ == "__main__":
    main()
