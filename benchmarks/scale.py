"""CTNet with over 100 million embedding rows (source and target tables together) training on
this machine: peak memory, throughput, and TorchRec's planner's memory estimate beside the
measured memory.

The demo config's tables are scaled up (user 20M, item 25M, category 1M, seller 5M rows per
tower: 51M per tower, 102M in all); everything else is the demo's. The batches are the demo
world's (ids mapped into the big tables by the config's id policy); the weights are the
initial ones (a step costs the same). Measured memory is the process's peak RSS minus its RSS
before the model was built (imports and batches excluded); the planner's figure is its
estimate for the single rank (tables, their optimiser state, lookup buffers).

    python benchmarks/scale.py [--steps 300] [--batch-size 512] [--source-table-dtype fp32]

(The demo world's A periods 8-9 hold 234 batches of 512: the timed steps stop there.)
Results: benchmarks/results/scale.json (fp32 source tables), scale-fp16.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import ROOT, demo_batches, require_demo_world, time_steps, write_result
from ctnet_step import train_step

from ctnet_rec.config import ShardingConfig, load_config
from ctnet_rec.experiment.jobs import peak_rss_mb, rss_mb
from ctnet_rec.modules.ctnet import build_ctnet
from ctnet_rec.training.distributed import init_distributed
from sharding.plan import plan_tables
from sharding.tower import shard_model

RESULT = ROOT / "benchmarks" / "results" / "scale.json"
ROWS = {"user": 20_000_000, "item": 25_000_000, "category": 1_000_000, "seller": 5_000_000}
MB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--source-table-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    args = p.parse_args()
    require_demo_world()
    cfg = load_config(args.config)
    cfg.features.tables = [dataclasses.replace(t, num_embeddings=ROWS.get(t.name,
                                                                          t.num_embeddings))
                           for t in cfg.features.tables]
    cfg.sharding = ShardingConfig(source_table_dtype=args.source_table_dtype)
    env = init_distributed("cpu")
    batches = demo_batches(cfg, args.batch_size, args.steps)

    plan = plan_tables(cfg, 1, "cpu", hbm_gb=0, ddr_gb=24, source_cfg=cfg)
    planned = plan.ranks[0]
    rows = sum(t.rows for t in plan.tables)

    before = rss_mb()
    start = time.perf_counter()
    net = build_ctnet((cfg.features, cfg.model), (cfg.features, cfg.model), cfg.ctnet,
                      torch.device("meta"), cfg.sharding.source_table_dtype)
    dmp = shard_model(net, env, cfg.train.tables.lr, frozen=net.source, sharding=cfg.sharding)
    built_s = time.perf_counter() - start
    after_build = rss_mb()
    step, _ = train_step(dmp, cfg)
    timed = time_steps({"ctnet": step}, batches)["ctnet"]
    peak = peak_rss_mb()
    measured = peak - before
    predicted = planned.total / MB
    result = {
        "embedding_rows": rows,
        "source_table_dtype": args.source_table_dtype,
        "batch_size": args.batch_size, "steps": timed["steps"],
        "samples_per_s": timed["samples_per_s"], "step_ms": timed["step_ms"],
        "build_s": round(built_s, 1),
        "peak_rss_mb": round(peak, 1),
        "rss_before_model_mb": round(before, 1),
        "model_after_build_mb": round(after_build - before, 1),
        "measured_model_and_training_mb": round(measured, 1),
        "planner_predicted_mb": round(predicted, 1),
        "planner_weights_mb": round(planned.weights / MB, 1),
        "planner_optimizer_mb": round(planned.optimizer / MB, 1),
        "planner_other_mb": round(planned.other / MB, 1),
        "measured_over_predicted": round(measured / predicted, 3),
    }
    for k, v in result.items():
        print(f"{k:>32}: {v}")
    path = RESULT if args.source_table_dtype == "fp32" else RESULT.with_name("scale-fp16.json")
    write_result(path, "scale", __file__, args.config, **result)


if __name__ == "__main__":
    main()
