"""Serving latency of exported artifacts: Base, CTNet, and CTNet sharing the source's
long-sequence attention (the paper's section 4.7), per request batch of 1, 64 and 512 rows.

The three models are deployed from the demo run's period-5 checkpoints (what `ctnet
experiment` deploys CTNet from: B's warm-up tower and A's source tower), exported with `ctnet
export` (fp32 tables) and loaded from the artifact as a serving process would. Requests are
consecutive rows of B's periods 6-9, scored one request at a time in inference mode with torch's
default threads; the figure is the wall time of `scorer(kjt, dense)` per request (features
already built: the reader's work is not a serving cost measured here).

Also: per model, the fp16 and int8 artifacts' scores against the fp32 one's (max and mean
|difference|, AUC change) on the same rows, and each artifact's size; and offline scoring of
the whole period by `ctnet predict --ckpt` (the checkpoint under DistributedModelParallel,
no_grad) vs `--export` (the artifact, inference mode), rows/s of the scoring loop alone, for
Base and CTNet.

    python benchmarks/serve.py [--requests 70]

Results: benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import DATA, ROOT, require_demo_world, write_result

from ctnet_rec.config import load_config
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.metrics import auc
from ctnet_rec.serving.export import ExportedModel, export_checkpoint
from ctnet_rec.training.inference import open_checkpoint
from ctnet_rec.training.transfer import INIT, transfer_init

RESULT = ROOT / "benchmarks" / "results" / "serve.json"
RUNS = ROOT / "runs" / "demo"
DEPLOY, SCORED = 5, 6
BATCHES = [1, 64, 512]


def checkpoints(config: str, work: Path) -> dict[str, Path]:
    """Base (B's warm-up tower) and the two CTNets deployed from it and A's source tower."""
    cfg = load_config(config)
    source = RUNS / cfg.experiment.source_domain / "checkpoints" / f"period={DEPLOY}"
    target = RUNS / "B" / "base" / "checkpoints" / f"period={DEPLOY}"
    for ckpt in (source, target):
        if not ckpt.is_dir():
            raise SystemExit(f"{ckpt}: run `make demo` first (its checkpoints are deployed)")
    out = {"Base": target}
    for name, share in (("CTNet", False), ("CTNet, shared long-sequence attention", True)):
        cfg.ctnet = dataclasses.replace(cfg.ctnet, share_long_sequence_attention=share,
                                        source_long_interest="own" if share else
                                        cfg.ctnet.source_long_interest)
        run = work / name.replace(" ", "_").replace(",", "")
        transfer_init(cfg, source, target, run)
        out[name] = run / INIT
    return out


def latency(model: ExportedModel, batch_size: int, requests: int) -> dict[str, float]:
    cfg = model.config
    reader = ParquetBatchReader(DATA, "B", list(range(SCORED, SCORED + 4)), cfg.features,
                                cfg.data, batch_size=batch_size, shuffle=False)
    batches = [b for b, _ in zip(reader, range(requests + 5), strict=False)
               if len(b) == batch_size]
    times = []
    for i, b in enumerate(batches):
        start = time.perf_counter()
        model(b.sparse, b.dense)
        if i >= 5:  # the first calls allocate
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"requests": len(times), "p50_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3)}


def offline(ckpt: Path, export: ExportedModel) -> dict[str, float]:
    """Rows/s scoring the period: the checkpoint's `ctnet predict` loop vs the artifact's."""
    trainer, _ = open_checkpoint(ckpt)
    start = time.perf_counter()
    rows = len(trainer.predict(DATA, "B", SCORED)["p"])
    by_ckpt = rows / (time.perf_counter() - start)
    cfg = export.config
    start = time.perf_counter()
    for b in ParquetBatchReader(DATA, "B", [SCORED], cfg.features, cfg.data,
                                batch_size=cfg.train.eval_batch_size, shuffle=False):
        export(b.sparse, b.dense)
    by_export = rows / (time.perf_counter() - start)
    return {"rows": rows, "checkpoint_rows_per_s": round(by_ckpt),
            "export_rows_per_s": round(by_export), "speedup": round(by_export / by_ckpt, 2)}


def quantised(folder: Path, ckpt: Path, model: ExportedModel) -> dict[str, Any]:
    """fp16 and int8 tables vs fp32: scores and AUC on the requests' rows, artifact sizes."""
    cfg = model.config
    batches = list(ParquetBatchReader(DATA, "B", list(range(SCORED, SCORED + 4)), cfg.features,
                                      cfg.data, batch_size=cfg.train.eval_batch_size,
                                      shuffle=False))
    labels = torch.cat([b.labels for b in batches]).double().numpy()
    full = torch.cat([model(b.sparse, b.dense) for b in batches]).double().numpy()
    out: dict[str, Any] = {"fp32": {"artifact_mb": round((folder / "model.pt").stat().st_size
                                                         / 2**20, 2)}}
    for dtype in ("fp16", "int8"):
        small_dir = folder.with_name(folder.name + "-" + dtype)
        export_checkpoint(ckpt, small_dir, dtype)
        small = ExportedModel(small_dir)
        scores = torch.cat([small(b.sparse, b.dense) for b in batches]).double().numpy()
        diff = abs(scores - full)
        out[dtype] = {"max_abs_diff": float(f"{diff.max():.2g}"),
                      "mean_abs_diff": float(f"{diff.mean():.2g}"),
                      "auc_change": round(auc(labels, scores) - auc(labels, full), 5),
                      "artifact_mb": round((small_dir / "model.pt").stat().st_size / 2**20, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=70, help="timed requests per batch size")
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    args = p.parse_args()
    require_demo_world()
    results: dict[str, Any] = {}
    scoring: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = checkpoints(args.config, Path(tmp))
        for name, ckpt in ckpts.items():
            folder = Path(tmp) / "export" / name.replace(" ", "_")
            export_checkpoint(ckpt, folder)
            model = ExportedModel(folder)
            results[name] = {str(bs): latency(model, bs, args.requests) for bs in BATCHES}
            tables[name] = quantised(folder, ckpt, model)
            if name != "CTNet, shared long-sequence attention":
                scoring[name] = offline(ckpt, model)
            print(name, results[name], flush=True)
    base = results["Base"]["512"]["p50_ms"]
    ratio = {name: round(r["512"]["p50_ms"] / base, 3) for name, r in results.items()}
    print("p50 at 512 relative to Base:", ratio)
    print("table dtypes vs fp32:", json.dumps(tables))
    print("offline scoring:", scoring)
    write_result(RESULT, "serve", __file__, args.config, threads=torch.get_num_threads(),
                 latency=results, p50_512_vs_base=ratio, table_dtypes=tables,
                 offline_scoring=scoring,
                 deployed_from_period=DEPLOY, scored_period=SCORED)


if __name__ == "__main__":
    main()
