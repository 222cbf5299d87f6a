"""Scoring and evaluating any checkpoint (single-domain tower or CTNet): the model is rebuilt
from the config its manifest records, so serving needs nothing but the checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from ctnet_rec.config import Config, ConfigError, ShardingConfig
from ctnet_rec.data.contract import validate_periods, write_parquet
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.modules.kinds import CTNET
from ctnet_rec.training.checkpoint import CheckpointError, Manifest, config_of
from ctnet_rec.training.collectives import from_main
from ctnet_rec.training.deployments import Deployment, trainer_for
from ctnet_rec.training.distributed import init_distributed, require_device
from ctnet_rec.training.trainer import PeriodTrainer

log = logging.getLogger(__name__)


def scoring_device(recorded: str, folder: Path) -> str:
    """Where a checkpoint trained on `recorded` is scored when no device is asked for: there,
    or on the CPU when this host has no GPU (scoring a GPU-trained model on a CPU host)."""
    if recorded == "cuda" and not torch.cuda.is_available():
        log.warning("%s: trained on cuda; this host has no GPU, so it is scored on the CPU "
                    "(--device chooses)", folder)
        return "cpu"
    return recorded


def open_checkpoint(folder: Path, cfg: Config | None = None,
                    sharding: ShardingConfig | None = None,
                    device: str | None = None) -> tuple[PeriodTrainer, Manifest]:
    """The checkpoint's model, restored, on `device` (default: the device its config names,
    `scoring_device`); `cfg` overrides the recorded config of a tower checkpoint, `sharding`
    the plan it was trained under."""
    manifest = Manifest.read(folder)
    cfg = cfg or config_of(manifest, folder)
    if sharding is not None:
        cfg = dataclasses.replace(cfg, sharding=sharding)
    if device is not None:
        require_device(device, f"--device {device}")
    device = device or scoring_device(cfg.train.device, folder)
    if device != cfg.train.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, device=typing.cast(Literal["cpu", "cuda"], device)))
    deployment = Deployment(
        manifest.kind, config_of(manifest, folder, source=True) if manifest.kind == CTNET
        else None, manifest.lineage.get("source_domain"))
    try:
        trainer = trainer_for(deployment, cfg, init_distributed(cfg.train.device))
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    trainer.restore(folder)
    return trainer, manifest


def say_what_is_scored(where: Path, trained_on: str | None, trained_through: int, domain: str,
                       period: int, metrics: bool) -> None:
    """Warn of scoring another domain than the model trained on (a wrong --domain gives
    figures that look like any others) and, for `metrics`, of a period the model has already
    trained on (its AUC is not out of sample). `trained_on`: None where it is not recorded."""
    if trained_on is not None and trained_on != domain:
        log.warning("%s: trained on domain %r; these are its scores on domain %r", where,
                    trained_on, domain)
    if metrics and period <= trained_through:
        log.warning("%s: trained through period %d, so period %d is not out of sample: its "
                    "metrics read higher than the model's on new data (the next period is %d)",
                    where, trained_through, period, trained_through + 1)


def predict_checkpoint(ckpt: Path, data: DataRoot, domain: str, period: int, out: Path,
                       batch_size: int | None = None,
                       sharding: ShardingConfig | None = None,
                       device: str | None = None) -> int:
    """The `ctnet predict` job: one score per row of the period, in file order, with its ids
    and label, written by rank 0 to `out` (Parquet). Returns the number of rows."""
    trainer, manifest = open_checkpoint(ckpt, sharding=sharding, device=device)
    say_what_is_scored(ckpt, manifest.model_domain(), manifest.period, domain, period,
                       metrics=False)
    validate_periods(data, domain, [period], trainer.cfg.features)
    start = time.perf_counter()
    pred = trainer.predict(data, domain, period, batch_size)
    elapsed = time.perf_counter() - start
    if pred is not None:  # rank 0
        write_scores(pred, out, elapsed)
    return from_main(len(pred["p"]) if pred is not None else None)


def write_scores(pred: dict[str, np.ndarray], out: Path, elapsed: float) -> None:
    """`ctnet predict`'s output: user_id, item_id, label and score per row, in file order."""
    write_parquet(pa.table({
        "user_id": pa.array(pred["users"]),
        "item_id": pa.array(pred["items"]),
        "label": pa.array(pred["labels"].astype("int8")),
        "score": pa.array(pred["p"].astype("float32")),
    }), out)
    log.info("%d scores written to %s (%.0f rows/s)", len(pred["p"]), out,
             len(pred["p"]) / elapsed)


def evaluate_checkpoint(ckpt: Path, data: DataRoot, domain: str, period: int,
                        cfg: Config | None = None,
                        sharding: ShardingConfig | None = None,
                        zero_adapters: bool = False,
                        device: str | None = None) -> dict[str, Any]:
    """The `ctnet eval` job: a checkpoint's metrics on one period, with cold-start slices
    relative to the ids the checkpoint had seen in training. `zero_adapters` (CTNet only):
    the same model with its adapters adding nothing."""
    manifest = Manifest.read(ckpt)
    if zero_adapters and manifest.kind != CTNET:
        raise CheckpointError(f"{ckpt}: --zero-adapters needs a CTNet checkpoint, this one "
                              f"holds a {manifest.kind!r} model")
    trainer, manifest = open_checkpoint(ckpt, cfg, sharding, device)
    if zero_adapters:
        trainer.dmp.module.use_adapters = False
    say_what_is_scored(ckpt, manifest.model_domain(), manifest.period, domain, period,
                       metrics=True)
    validate_periods(data, domain, [period], trainer.cfg.features)
    metrics = trainer.evaluate(data, domain, period)
    return {"checkpoint": str(ckpt), "model": manifest.kind, "zero_adapters": zero_adapters,
            "trained_through_period": manifest.period,
            "trained_on_domain": manifest.model_domain(), "domain": domain, "period": period,
            **metrics}
