"""Peak memory per rank evaluating a 10-million-row period at 2 ranks.

Evaluation gathers what it scored to compute AUC, GAUC and the cold-start slices; this
measures what that costs each rank. The world is written here: a small tower's features (user,
item and category ids, a short behaviour list of up to 4) over a 50,000-row training period
and a `--rows`-row scored period, a tower trained on the first (one process), then `ctnet
eval`'s work on the second under torchrun with 2 gloo processes, each reporting its peak
resident memory and how much of it evaluation added.

    python benchmarks/eval_memory.py [--rows 10000000]

Results: benchmarks/results/eval_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import ROOT, write_result

from ctnet_rec.config import (
    Config,
    FeatureConfig,
    IdFeatureConfig,
    SequenceConfig,
    TableConfig,
    load_config,
)
from ctnet_rec.data.contract import write_parquet

RESULT = ROOT / "benchmarks" / "results" / "eval_memory.json"
TRAIN_ROWS = 50_000


def small_config() -> Config:
    cfg = load_config(ROOT / "examples" / "demo.toml")
    cfg.features = FeatureConfig(
        tables=[TableConfig("user", 1_000_000, 8), TableConfig("item", 1_000_000, 8),
                TableConfig("category", 1000, 8)],
        id_features=[IdFeatureConfig("user_id", "user"), IdFeatureConfig("item_id", "item"),
                     IdFeatureConfig("category_id", "category")],
        sequences=[SequenceConfig("short", "hist_item_ids", "hist_category_ids", 4)])
    cfg.features.validate("features")
    cfg.model.mlp_hidden = [32]
    cfg.model.short_sequence, cfg.model.use_sim, cfg.model.use_eta = "din", False, False
    cfg.train.eval_batch_size = 65536
    cfg.experiment.id_embedding_tables = []
    return cfg


def write_period(root: Path, period: int, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "B" / f"period={period}"
    folder.mkdir(parents=True)
    chunk = 2_000_000
    for i, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        lengths = rng.integers(0, 5, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        items = rng.integers(0, 2**40, n)
        behaviours = int(offsets[-1])
        write_parquet(pa.table({
            "ts": np.full(n, period, np.int64), "label": (rng.random(n) < 0.1).astype(np.int8),
            "user_id": rng.integers(0, 2**40, n), "item_id": items,
            "category_id": items % 997,
            "hist_item_ids": pa.ListArray.from_arrays(
                offsets, rng.integers(0, 2**40, behaviours)),
            "hist_category_ids": pa.ListArray.from_arrays(
                offsets, rng.integers(0, 997, behaviours)),
        }), folder / f"part-{i}.parquet")


def worker(ckpt: str, data: str) -> None:
    """One rank: the checkpoint restored, then evaluated on period 1; its memory."""
    from ctnet_rec.experiment.jobs import peak_rss_mb, rss_mb
    from ctnet_rec.training.inference import open_checkpoint

    trainer, _ = open_checkpoint(Path(ckpt))
    before = peak_rss_mb()
    start = time.perf_counter()
    metrics = trainer.evaluate(Path(data), "B", 1)
    row = {"rank": trainer.env.rank, "peak_rss_mb": round(peak_rss_mb(), 1),
           "peak_before_eval_mb": round(before, 1), "rss_after_mb": round(rss_mb(), 1),
           "eval_seconds": round(time.perf_counter() - start, 1), "auc": metrics["auc"],
           "rows": metrics["rows"]}
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--worker", nargs=2, metavar=("CKPT", "DATA"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from ctnet_rec.training.loop import train_continual

    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        write_period(data, 0, TRAIN_ROWS, 0)
        write_period(data, 1, args.rows, 1)
        cfg = small_config()
        train_continual(cfg, data, "B", [0], run, evaluate=False)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29533", __file__, "--worker",
               str(run / "checkpoints" / "period=0"), str(data)]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            sys.exit(f"the 2-rank evaluation failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        out = done.stdout
    ranks = sorted((json.loads(x.split("RESULT ", 1)[1]) for x in out.splitlines()
                    if x.startswith("RESULT ")), key=lambda r: r["rank"])
    for r in ranks:
        print(r)
    write_result(RESULT, "eval_memory", __file__, str(ROOT / "examples" / "demo.toml"),
                 rows=args.rows, world_size=2, ranks=ranks)


if __name__ == "__main__":
    main()
