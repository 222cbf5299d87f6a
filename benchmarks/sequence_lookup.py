"""The demo tower's sequence-table lookups on the CPU: fbgemm's kernel without pooling vs its
pooled kernel with one id per bag (`sharding/sequence_lookup.py`, what training uses on the
CPU), forward and backward with the fused row-wise AdaGrad update, on the same batches.

Both sharded the production way (`sharding.tower.shard_model`), one process, 2 threads, the
demo world's in-memory batches of domain A; per path the median ms per step, steps
interleaved (`time_steps`). Also the ids each step looks up and how many are distinct: the
kernels' cost follows the distinct rows.

    python benchmarks/sequence_lookup.py [--batch-size 512] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
from common import ROOT, demo_batches, require_demo_world, time_steps, write_result

import sharding.tower
from ctnet_rec.config import load_config
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.distributed import init_distributed
from sharding.sequence_lookup import pool_sequence_lookups

RESULT = ROOT / "benchmarks" / "results" / "sequence_lookup.json"
CONFIG = ROOT / "examples" / "demo.toml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    require_demo_world()
    torch.set_num_threads(2)
    cfg, env = load_config(CONFIG), init_distributed("cpu")
    batches = demo_batches(cfg, args.batch_size, args.steps)
    steps = {}
    for path, route in (("unpooled kernel", lambda model: 0),
                        ("pooled kernel, one id per bag", pool_sequence_lookups)):
        sharding.tower.pool_sequence_lookups = route
        torch.manual_seed(0)
        tower = sharding.tower.shard_model(
            Tower(cfg.features, cfg.model, device=torch.device("meta")), env,
            cfg.train.tables.lr)
        lookup = tower.module.embeddings.sequence

        def step(b, lookup=lookup) -> None:
            out = lookup(b.sparse)
            torch.cat([jt.values() for jt in out.values()]).sum().backward()

        steps[path] = step
    timed = time_steps(steps, batches)
    sparse = batches[0].sparse
    tables = cfg.features.columns_by_table()
    looked_up = {t: torch.cat([sparse[k].values() for k in tables[t]])
                 for t in cfg.features.sequence_tables()}
    per_table = {t: {"ids": v.numel(), "distinct": v.unique().numel()}
                 for t, v in looked_up.items()}
    rows = [{"path": path, "ms_per_step": r["step_ms"]} for path, r in timed.items()]
    print("ids per step by table:", ", ".join(f"{t} {c['ids']:,} ({c['distinct']:,} distinct)"
                                              for t, c in per_table.items()))
    for r in rows:
        print(f"{r['path']:<32}{r['ms_per_step']:>8.1f} ms")
    write_result(RESULT, "sequence_lookup", __file__, str(CONFIG), batch_size=args.batch_size,
                 steps=args.steps, ids_per_step=per_table, runs=rows)


if __name__ == "__main__":
    main()
