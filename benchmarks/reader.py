"""Reader throughput: Parquet -> shuffled KJT batches, on the demo schema at batch 4096.

Writes a Parquet dataset in the demo schema whose behaviour sequences have average lengths 30
(short) and 200 (long), item and category per behaviour: about 467 ids per row. Reads it with
the training settings of examples/demo.toml (shuffle on, its shuffle window, decode threads
and prefetch) and reports samples/s after one warm-up pass (the steady state a long training
run sees). With --full-sequences the config's max_len is lifted so every behaviour is
delivered; otherwise the demo's limits (30, 128) truncate, as in training.

The data is written twice: as ctnet's own producers write it (`write_parquet`: non-null schema,
LZ4) -> `samples_per_s`, and with pyarrow's defaults (nullable, snappy) ->
`samples_per_s_pyarrow_defaults`.

    python benchmarks/reader.py [--rows 400000] [--repeats 3] [--full-sequences]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchrec

from ctnet_rec.config import load_config
from ctnet_rec.data.contract import write_parquet
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.synth import raw_ids

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "reader.json"
ROW_GROUP_SIZE = 16_384


def _lists(rng: np.random.Generator, n: int, mean: int, pool: np.ndarray) -> tuple:
    lens = rng.poisson(mean, n)
    off = np.zeros(n + 1, np.int32)
    np.cumsum(lens, out=off[1:])
    picks = np.minimum(rng.zipf(1.2, off[-1]) - 1, len(pool) - 1)
    items = pool[picks]
    cats = raw_ids("category", picks % 100)
    o = pa.array(off)
    return pa.ListArray.from_arrays(o, pa.array(items)), pa.ListArray.from_arrays(o, pa.array(cats))


def write_dataset(root: Path, rows: int, defaults: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    item_pool = raw_ids("item", rng.permutation(200_000))
    per_file = 100_000
    for i, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        hi, hc = _lists(rng, n, 30, item_pool)
        li, lc = _lists(rng, n, 200, item_pool)
        table = pa.table({
            "ts": pa.array(1_700_000_000 + np.sort(rng.integers(0, 86_400, n))),
            "label": pa.array((rng.random(n) < 0.15).astype(np.int8)),
            "user_id": pa.array(raw_ids("user", rng.integers(0, 50_000, n))),
            "item_id": pa.array(item_pool[np.minimum(rng.zipf(1.2, n) - 1, 199_999)]),
            "category_id": pa.array(raw_ids("category", rng.integers(0, 100, n))),
            "seller_id": pa.array(raw_ids("seller", rng.integers(0, 2_000, n))),
            "age_group": pa.array(rng.integers(0, 8, n)),
            "hour": pa.array(rng.integers(0, 24, n)),
            "price": pa.array(np.round(rng.lognormal(3.0, 0.86, n), 2)),
            "hist_item_ids": hi,
            "hist_category_ids": hc,
            "long_hist_item_ids": li,
            "long_hist_category_ids": lc,
        })
        path = root / "A" / "period=0" / f"part-{i}.parquet"
        if defaults:
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE)
        else:
            write_parquet(table, path, row_group_size=ROW_GROUP_SIZE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--full-sequences", action="store_true",
                   help="lift the config's max_len so every behaviour is delivered")
    args = p.parse_args()
    cfg = load_config(args.config)
    if args.full_sequences:
        for s in cfg.features.sequences:
            s.max_len = 1000  # deliver every behaviour, not the config's newest max_len
    gc.freeze()  # as the trainer does: the collector need not rescan torch's objects

    def measure(defaults: bool) -> tuple[list[float], float]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_dataset(root, args.rows, defaults)
            runs, ids, rows = [], 0, 0
            for r in range(args.repeats + 1):  # the first pass warms allocators and caches
                reader = ParquetBatchReader(root, "A", [0], cfg.features, cfg.data,
                                            batch_size=args.batch_size, shuffle=True, seed=r)
                t0 = time.perf_counter()
                rows = ids = 0
                for batch in reader:
                    rows += len(batch)
                    ids += batch.sparse.values().numel()
                if r:
                    runs.append(rows / (time.perf_counter() - t0))
            return runs, ids / rows

    runs, ids_per_sample = measure(defaults=False)
    runs_defaults, _ = measure(defaults=True)
    result = {
        "benchmark": "reader",
        "samples_per_s": round(statistics.median(runs), 1),
        "samples_per_s_runs": [round(x, 1) for x in runs],
        "samples_per_s_pyarrow_defaults": round(statistics.median(runs_defaults), 1),
        "samples_per_s_pyarrow_defaults_runs": [round(x, 1) for x in runs_defaults],
        "ids_per_sample_delivered": round(ids_per_sample, 1),
        "ids_per_sample_stored": 6 + 2 * (30 + 200),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "settings": {
            "shuffle": True,
            "full_sequences": args.full_sequences,
            "max_len": [s.max_len for s in cfg.features.sequences],
            "row_group_size": ROW_GROUP_SIZE,
            **{k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "batch_size"},
            "sequence_mean_lengths": {"short": 30, "long": 200},
        },
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": {
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torchrec": torchrec.__version__,
            "pyarrow": pa.__version__,
        },
    }
    print(f"{'format':<28}{'samples/s (median)':>20}  runs")
    print(f"{'write_parquet (lz4, non-null)':<28}{result['samples_per_s']:>20,.0f}  {runs}")
    print(f"{'pyarrow defaults (snappy)':<28}"
          f"{result['samples_per_s_pyarrow_defaults']:>20,.0f}  {runs_defaults}")
    print(f"ids per sample delivered: {result['ids_per_sample_delivered']}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
