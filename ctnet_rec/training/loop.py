"""The continual loop and the `ctnet train` job around it: for each period, start from the
previous period's checkpoint, train one pass on that period, evaluate on the next, save.
The job decides what a run folder holds (resume, overwrite, refuse); the loop is the same
for every trainer (a tower, CTNet, a joint model)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ctnet_rec.config import Config
from ctnet_rec.data.contract import list_periods, validate_periods
from ctnet_rec.data.storage import DataFile, DataRoot
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.files import PathArg, read_jsonl, writable_folder, write_atomic
from ctnet_rec.training.checkpoint import (
    MID_PERIOD,
    CheckpointError,
    Manifest,
    complete_checkpoints,
    latest_intact_checkpoint,
    lineage_entry,
    period_dir,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.evaluate import shown
from ctnet_rec.training.metric_sink import TensorBoardSink
from ctnet_rec.training.retention import PRUNED_METRICS, prune_checkpoints
from ctnet_rec.training.run_lock import run_lock
from ctnet_rec.training.trainer import PeriodTrainer

log = logging.getLogger(__name__)

# what a resumed run is warned of when it changes (features and model cannot change: such a
# checkpoint is refused; a sharding plan loads under any other and trains alike)
TRAINING_SECTIONS = ("train", "data")
SCORES = "scores"  # RUN/scores/period=<t>.npy: an evaluation's scores, with `save_scores`


def _write_metrics(run: Path) -> None:
    """metrics.jsonl, rebuilt from the checkpoints' manifests (crash-safe: a line exists
    exactly when its checkpoint is complete) and the lines of periods retention pruned."""
    lines = {}
    pruned = run / PRUNED_METRICS
    if pruned.exists():
        lines = {r["period"]: json.dumps(r, sort_keys=True) for r in read_jsonl(pruned)}
    for period, folder in complete_checkpoints(run).items():
        m = Manifest.read(folder)
        lines[period] = json.dumps({"period": m.period, **m.metrics}, sort_keys=True)
    write_atomic(run / "metrics.jsonl", "".join(lines[t] + "\n" for t in sorted(lines)))


def trained_periods(run: Path) -> list[int]:
    """The periods a run has trained (checkpoints kept or pruned by retention)."""
    path = run / "metrics.jsonl"
    return sorted({int(m["period"]) for m in read_jsonl(path)}) if path.exists() else []


def train_continual(cfg: Config, data: DataRoot, domain: str, periods: Iterable[int],
                    run: PathArg, init: PathArg | None = None, resume: bool = False,
                    evaluate: bool = True,
                    trainer_cls: Callable[[Config, DistEnv], PeriodTrainer] = PeriodTrainer,
                    overwrite: bool = False, allow_domain_change: bool = False,
                    publish: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The `ctnet train` job (of a tower, or of another single-model trainer). Returns the
    metrics of the periods trained by this call. A run that holds checkpoints is continued
    (`resume`) or replaced (`overwrite`), never mixed into; one job writes a run at a time.
    A checkpoint of another domain is refused as `init` unless `allow_domain_change`.
    `publish` (rank 0, after each period) gives a run at a URI its new period."""
    run, init = Path(run), None if init is None else Path(init)
    env = init_distributed(cfg.train.device)
    if init is not None:
        Manifest.read(init).check_domain(domain, init, allow_domain_change)
    with run_lock(run, held=env.is_main):
        return _train_continual(cfg, data, domain, list(periods), run, env, init, resume,
                                evaluate, trainer_cls, overwrite, publish)


def _train_continual(cfg: Config, data: DataRoot, domain: str, periods: list[int], run: Path,
                     env: DistEnv, init: Path | None, resume: bool, evaluate: bool,
                     trainer_cls: Callable[[Config, DistEnv], PeriodTrainer],
                     overwrite: bool, publish: Callable[[], None] | None,
                     ) -> list[dict[str, Any]]:
    if env.is_main:  # before any training: not after the first period
        writable_folder(run / "checkpoints", "run folder")
    existing = sorted(complete_checkpoints(run))
    inside = (run / "checkpoints" / MID_PERIOD / "manifest.json").exists()
    if resume and existing and max(periods, default=-1) <= existing[-1] and \
            latest_intact_checkpoint(run) == period_dir(run, existing[-1]) and \
            Manifest.read(period_dir(run, existing[-1])).config == \
            json.loads(json.dumps(dataclasses.asdict(cfg))):
        log.info("%s: already trained through period %d", run, existing[-1])
        return []  # nothing to train, intact, the same config: no model is built
    if (existing or inside) and not resume:
        if not overwrite:
            raise CheckpointError(
                f"{run}: holds checkpoints of periods {existing}"
                f"{' and one inside a period' if inside else ''}; --resume continues after "
                "them, --overwrite replaces them")
        if env.is_main:
            shutil.rmtree(run / "checkpoints")
            (run / "metrics.jsonl").unlink(missing_ok=True)
            (run / PRUNED_METRICS).unlink(missing_ok=True)
        dist.barrier()
    trainer = trainer_cls(cfg, env)
    for read in trainer.domains_read(domain):  # refuse bad data before training
        validate_periods(data, read, periods, cfg.features)
    if evaluate:  # and the periods scored after them
        validate_periods(data, domain, evaluation_periods(data, domain, periods), cfg.features)
    start = None
    if resume and (latest := latest_intact_checkpoint(run)) is not None:
        recorded = Manifest.read(latest)
        recorded.check_domain(domain, latest)
        changes = cfg.setting_changes(recorded.config, *TRAINING_SECTIONS)
        if changes:
            log.warning("%s: resumed with settings other than it trained with: %s", latest,
                        "; ".join(changes))
        start = trainer.restore(latest).period
        periods = [t for t in periods if t > start]
        log.info("resuming after period %d", start)
    elif init is not None:
        trainer.restore(init)
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    # relative to the checkpoints (all at one depth), like every lineage entry
    lineage = {"init": lineage_entry(period_dir(run, 0), init) if init else None,
               "resumed_after": start}
    return run_periods(trainer, data, domain, periods, run, lambda t: lineage, evaluate,
                       publish)


def evaluation_periods(data: DataRoot, domain: str, periods: list[int]) -> list[int]:
    """The periods `run_periods` will score: each trained period's next, where it exists."""
    available = list_periods(data, domain)
    return sorted({t + 1 for t in periods if t + 1 in available} - set(periods))


def scored_part(period: int, ev: dict[str, Any] | None) -> str:
    """The period line's evaluation, if any. A metric the period cannot give shows as "-",
    with why: no AUC when its labels are all one class, no GAUC when no user has both."""
    if not ev:
        return ""
    why = f" ({ev['nonfinite_scores']} score(s) NaN or infinite)" if ev.get("nonfinite_scores") \
        else f" (every label is {ev['ctr_true']:.0f})" if math.isnan(ev["auc"]) else \
        " (no user has both labels)" if math.isnan(ev["gauc"]) else ""
    return f", period {period}: AUC {shown(ev['auc'])} GAUC {shown(ev['gauc'])}{why}"


def run_periods(trainer: PeriodTrainer, data: DataRoot, domain: str, periods: list[int], run: Path,
                before_period: Callable[[int], dict[str, Any]], evaluate: bool = True,
                publish: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The continual loop: for each period, `before_period(t)` (which returns the lineage to
    record), train one pass, evaluate on t + 1 when it exists (and `evaluate`), checkpoint,
    rewrite metrics.jsonl, `publish` (a run at a URI). Returns the periods' metrics."""
    available = list_periods(data, domain)
    trainer.run = run
    if periods:
        trainer.resume_inside(run, periods[0])
    if trainer.env.is_main and periods:
        trainer.sink = TensorBoardSink(run)
        done = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        trainer.rows_trained = sum(  # every domain's rows (joint learning reads two)
            sum(m.get("train_rows_by_domain", {domain: m["train_rows"]}).values())
            for m in done if m["period"] < periods[0])
    try:
        return _run_periods(trainer, data, domain, periods, run, before_period, evaluate,
                            available, publish)
    finally:
        if trainer.sink is not None:
            trainer.sink.close()
            trainer.sink = None


def _run_periods(trainer: PeriodTrainer, data: DataRoot, domain: str, periods: list[int],
                 run: Path, before_period: Callable[[int], dict[str, Any]], evaluate: bool,
                 available: dict[int, list[DataFile]],
                 publish: Callable[[], None] | None) -> list[dict[str, Any]]:
    results = []
    for t in periods:
        lineage = before_period(t)
        metrics: dict[str, Any] = {"domain": domain, **trainer.train_period(data, domain, t)}
        if evaluate and t + 1 in available:  # validated before training
            metrics["eval_period"] = t + 1
            scores = run / SCORES / f"period={t + 1}.npy" if trainer.cfg.train.save_scores \
                else None
            metrics["eval"] = trainer.evaluate(data, domain, t + 1, scores)
        trainer.save(period_dir(run, t), t, metrics, lineage)
        if trainer.sink is not None:
            trainer.sink.period(t, metrics)
        if trainer.env.is_main:
            shutil.rmtree(run / "checkpoints" / MID_PERIOD, ignore_errors=True)
            prune_checkpoints(run, trainer.cfg.train.keep_checkpoints)
            _write_metrics(run)
            if publish is not None:
                publish()
            log.info("period %d: %d rows, %.0f samples/s, loss %.4f%s", t, metrics["train_rows"],
                     metrics["train_rows"] / max(metrics["train_seconds"], 1e-9),
                     metrics["train_loss"], scored_part(t + 1, metrics.get("eval")))
        results.append(metrics)
    return results
