"""The late-fusion row: Base's logit plus w times the Source model's (centred), no training.

The floor any transfer from the source tower must beat: a model that reads the whole source
tower through adapters should at least match a one-weight fusion of the two towers' outputs.
For the test of period t + 1, Base is its checkpoint of period t and the source tower the one
CTNet reads when it trains on t (period t - `source_lag`); w is the weight with the best AUC
(`output_fusion.best_weight`) on the previous test (period t's rows, scored by the checkpoints
of t - 1), 1.0 for the first test, so it is never chosen on the rows it is scored on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ctnet_rec.config import Config
from ctnet_rec.data.contract import read_oracle
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.files import write_atomic
from ctnet_rec.training.checkpoint import CheckpointError, complete_checkpoints
from ctnet_rec.training.evaluate import evaluate_predictions
from ctnet_rec.training.inference import open_checkpoint
from ctnet_rec.training.loop import SCORES
from ctnet_rec.training.output_fusion import best_weight, logit

FIRST_WEIGHT = 1.0  # the first test's (nothing earlier to choose on)


def fused(base: np.ndarray, source: np.ndarray, w: float) -> np.ndarray:
    """Click probabilities of Base's logit + w x the source's (both given as probabilities),
    the source's logit centred on its mean over the scored rows: a constant, so the ranking
    (AUC, GAUC) is that of Base + w x Source, while the click rate stays Base's instead of
    taking w times the source's intercept too (no labels are read)."""
    centred = logit(source) - logit(source).mean()
    return 1.0 / (1.0 + np.exp(-(logit(base) + w * centred)))


def _scores(ckpt: Path, data: DataRoot, domain: str, period: int) -> tuple[dict[str, np.ndarray],
                                                                       dict[str, np.ndarray]]:
    """A checkpoint's predictions of a period's rows (file order) and the ids it had seen."""
    trainer, _ = open_checkpoint(ckpt)
    pred = trainer.predict(data, domain, period)
    assert pred is not None  # one process
    return pred, trainer.seen


def late_fusion(cfg: Config, data: DataRoot, domain: str, source_run: Path, base_run: Path,
                periods: list[int], scores: Path | None = None) -> dict[int, dict[str, Any]]:
    """Per trained period t, the fusion's metrics on period t + 1 (with `fusion_weight`);
    its scores written to `scores`/period=<t + 1>.npy when given."""
    base, source = complete_checkpoints(base_run), complete_checkpoints(source_run)
    lag = cfg.ctnet.source_lag
    results: dict[int, dict[str, Any]] = {}
    previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for t in periods:
        missing = [f"{run}: period {p}" for run, have, p in ((base_run, base, t),
                                                              (source_run, source, t - lag))
                   if p not in have]
        if missing:
            raise CheckpointError(f"late fusion needs checkpoints it cannot find: {missing}")
        b, seen = _scores(base[t], data, domain, t + 1)
        s, _ = _scores(source[t - lag], data, domain, t + 1)
        w = FIRST_WEIGHT if previous is None else best_weight(*previous)
        p = fused(b["p"], s["p"], w)
        if scores is not None:
            scores.mkdir(parents=True, exist_ok=True)
            np.save(scores / f"period={t + 1}.npy", p)
        oracle = read_oracle(data, domain, t + 1, b["users"], b["items"])
        results[t] = {**evaluate_predictions(b["labels"], p, b["users"], b["items"], seen,
                                             oracle), "fusion_weight": w}
        previous = (b["labels"], logit(b["p"]), logit(s["p"]))
    return results


def run_late_fusion(cfg: Config, data: DataRoot, domain: str, source_run: Path, base_run: Path,
                    out: Path) -> None:
    """The experiment's job: `late_fusion` over its trained periods, written to `out` once
    (OUT/metrics.json; its scores in OUT/scores/ with `[train] save_scores`)."""
    if (out / "metrics.json").exists():
        return
    e = cfg.experiment
    results = late_fusion(cfg, data, domain, source_run, base_run,
                          list(range(e.deploy_period, e.last_period() + 1)),
                          out / SCORES if cfg.train.save_scores else None)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json",
                 json.dumps({str(t): m for t, m in results.items()}, indent=1) + "\n")
