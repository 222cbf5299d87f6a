"""Our DIN row vs torch-rechub's DIN (a maintained plain-PyTorch CTR library), trained on the
same rows in one run: samples/s of each and the next period's AUC of each.

Same rows (the demo world's domain A, periods 6-8 trained once, period 9 scored), same batch
size, embedding dim (16 for every table on both sides: the peer stacks its features' embeddings
and needs one width), MLP sizes (the demo's [256, 128, 64]), attention unit [80, 40] with PReLU,
and threads (each side in its own process with torch's default, one per core).

What each side's time includes:
- ours: `PeriodTrainer.train_period` per period, end to end from Parquet: reading, decoding,
  id mapping and KJT assembly (in its background threads), the DMP step with fused row-wise
  AdaGrad on the tables, AdaGrad on the dense layers;
- peer: `CTRTrainer.train_one_epoch` (its own loop, Adam over every parameter, its defaults)
  over tensors batched in memory beforehand from the same rows (its reading is not counted).

    python benchmarks/vs_peer.py [--batch-sizes 512 4096]     # needs `pip install -e .[bench]`

Results: benchmarks/results/vs_peer.json (`ratio` = ours / peer samples/s per batch size), with
a profile of our step (`profile`: ms per step by kind of work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import DATA, ROOT, require_demo_world, run_workers, step_profile, write_result

from ctnet_rec.config import Config, load_config
from ctnet_rec.data.batch import Batch
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.experiment.runner import din_config

RESULT = ROOT / "benchmarks" / "results" / "vs_peer.json"
DOMAIN, TRAIN, TEST = "A", [6, 7, 8], 9
DIM = 16


def bench_config(config: str, batch_size: int) -> Config:
    """The demo's DIN row with every table 16 wide and the given batch size."""
    cfg = din_config(load_config(config))
    cfg.features.tables = [dataclasses.replace(t, embedding_dim=DIM) for t in cfg.features.tables]
    cfg.features.numeric = [dataclasses.replace(n, embedding_dim=DIM)
                            for n in cfg.features.numeric]
    cfg.data.batch_size = batch_size
    return cfg


def run_ours(cfg: Config) -> dict[str, Any]:
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.trainer import PeriodTrainer

    trainer = PeriodTrainer(cfg, init_distributed(cfg.train.device))
    rows, seconds = 0, 0.0
    for period in TRAIN:
        start = time.perf_counter()
        metrics = trainer.train_period(DATA, DOMAIN, period)
        seconds += time.perf_counter() - start
        rows += metrics["train_rows"]
    auc = trainer.evaluate(DATA, DOMAIN, TEST)["auc"]
    reader = ParquetBatchReader(DATA, DOMAIN, [TRAIN[0]], trainer.features_read(), cfg.data,
                                seed=0)
    start = time.perf_counter()
    batches = list(reader)
    reading = (time.perf_counter() - start) * 1000 / len(batches)
    profile = step_profile(lambda b: _ours_step(trainer, b), batches[:12])
    return {"samples_per_s": round(rows / seconds, 1), "rows": rows,
            "seconds": round(seconds, 2), "auc": round(auc, 4),
            "profile_ms_per_step": {"input: read, decode, KJT (background threads; alone)":
                                    round(reading, 2), **profile}}


def _ours_step(trainer: Any, batch: Batch) -> None:
    """One step as `train_steps` takes it (for the profile)."""
    import torch.nn.functional as F

    loss = F.binary_cross_entropy_with_logits(trainer.logits(batch, DOMAIN), batch.labels)
    trainer.dense_opt.zero_grad()
    loss.backward()
    trainer.dense_opt.step()


def peer_inputs(cfg: Config, periods: list[int], shuffle: bool) -> list[tuple[dict, torch.Tensor]]:
    """Our reader's batches as the peer takes them: a tensor per feature, rows + 1 so that 0
    pads the behaviour lists (the peer's convention), lists padded to their max_len."""
    f = cfg.features.for_model(cfg.model)
    seqs = {s.item_column: s.max_len for s in f.sequences} | \
        {s.category_column: s.max_len for s in f.sequences}
    out = []
    reader = ParquetBatchReader(DATA, DOMAIN, periods, f, cfg.data, shuffle=shuffle, seed=0)
    for b in reader:
        x = {}
        for key, jt in b.sparse.to_dict().items():
            ids = jt.values() + 1
            if key in seqs:
                x[key] = torch.ops.fbgemm.jagged_to_padded_dense(
                    ids.unsqueeze(-1).float(), [jt.offsets()], [seqs[key]], 0.0
                ).squeeze(-1).long()
            else:
                x[key] = ids
        out.append((x, b.labels))
    return out


def peer_model(cfg: Config) -> torch.nn.Module:
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import DIN

    f = cfg.features
    size = {t.name: t.num_embeddings + 1 for t in f.tables}
    size |= {n.name: len(n.boundaries) + 2 for n in f.numeric if n.bucketized}
    short = next(s for s in f.sequences if s.kind == "short")
    target = [SparseFeature(f.item_column, size[short.item_table], DIM, padding_idx=0),
              SparseFeature(f.category_column, size[short.category_table], DIM, padding_idx=0)]
    history = [SequenceFeature(short.item_column, size[short.item_table], DIM, pooling="concat",
                               shared_with=f.item_column),
               SequenceFeature(short.category_column, size[short.category_table], DIM,
                               pooling="concat", shared_with=f.category_column)]
    targets = {f.item_column, f.category_column}
    profile = [SparseFeature(i.name, size[i.table], DIM) for i in f.id_features
               if i.name not in targets]
    profile += [SparseFeature(n.name, size[n.name], DIM) for n in f.numeric if n.bucketized]
    return DIN(profile, history, target, mlp_params={"dims": cfg.model.mlp_hidden},
               attention_mlp_params={"dims": [80, 40], "activation": "prelu"})


def run_peer(cfg: Config) -> dict[str, Any]:
    from torch_rechub.trainers import CTRTrainer

    torch.manual_seed(cfg.train.seed)
    train = peer_inputs(cfg, TRAIN, shuffle=True)
    test = peer_inputs(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, batch_size=cfg.train.eval_batch_size)), [TEST], shuffle=False)
    trainer = CTRTrainer(peer_model(cfg), n_epoch=1, model_path=str(Path("/tmp")))
    start = time.perf_counter()
    trainer.train_one_epoch(train)
    seconds = time.perf_counter() - start
    rows = sum(len(y) for _, y in train)
    auc = trainer.evaluate(trainer.model, test)
    return {"samples_per_s": round(rows / seconds, 1), "rows": rows,
            "seconds": round(seconds, 2), "auc": round(float(auc), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, batch_size = args.worker[0], int(args.worker[1])
        cfg = bench_config(args.config, batch_size)
        got = run_ours(cfg) if side == "ours" else run_peer(cfg)
        print(json.dumps([{"path": side, "batch_size": batch_size, **got}]))
        return
    require_demo_world()
    jobs = [[side, str(bs)] for bs in args.batch_sizes for side in ("ours", "peer")]
    rows = run_workers(__file__, jobs, ["--config", args.config])
    by = {(r["path"], r["batch_size"]): r for r in rows}
    ratio = {str(bs): round(by["ours", bs]["samples_per_s"] / by["peer", bs]["samples_per_s"], 3)
             for bs in args.batch_sizes}
    print(f"{'side':<6}{'batch':>7}{'samples/s':>12}{'AUC':>8}")
    for r in rows:
        print(f"{r['path']:<6}{r['batch_size']:>7}{r['samples_per_s']:>12,.0f}{r['auc']:>8.4f}")
    print("ratio (ours / peer):", ratio)
    write_result(RESULT, "vs_peer", __file__, args.config, peer="torch-rechub==0.9.0 DIN",
                 runs=rows, ratio=ratio)


if __name__ == "__main__":
    main()
