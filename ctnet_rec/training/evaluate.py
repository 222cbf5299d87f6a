"""Metrics on a held-out period: AUC, GAUC (Eq. 6), logloss, NE, predicted vs actual CTR, and
the same split into cold-start slices (users / items never seen in training so far)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ctnet_rec.metrics import auc, gauc


def logloss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def normalized_entropy(labels: np.ndarray, p: np.ndarray) -> float:
    """NE: the logloss divided by the entropy of the period's own click rate (what predicting
    that rate for every row would score); below 1 is better than knowing the rate alone. NaN
    when the period has one class."""
    ctr = float(np.mean(labels)) if len(labels) else float("nan")
    if not 0 < ctr < 1:
        return float("nan")
    return logloss(labels, p) / float(-(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)))


def score(labels: np.ndarray, p: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """The metrics of scores `p`. Scores that are NaN or infinite (a model gone wrong) make
    every metric of `p` NaN, counted in `nonfinite_scores`: a NaN ranks somewhere, and the AUC
    would look like any other."""
    bad = int(np.count_nonzero(~np.isfinite(p)))
    out = {
        "auc": auc(labels, p),
        "gauc": gauc(labels, p, users),
        "logloss": logloss(labels, p),
        "ne": normalized_entropy(labels, p),
        "ctr_pred": float(p.mean()),
        "ctr_true": float(labels.mean()),
        "rows": int(len(labels)),
    }
    if bad:
        # auc and gauc are NaN already (metrics.py)
        out.update({k: math.nan for k in ("logloss", "ne", "ctr_pred")}, nonfinite_scores=bad)
    return out


def evaluate_predictions(
    labels: np.ndarray, p: np.ndarray, users: np.ndarray, items: np.ndarray,
    seen: dict[str, np.ndarray], oracle: np.ndarray | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = score(labels, p, users)
    new_user = ~np.isin(users, seen.get("users", np.zeros(0, np.int64)))
    new_item = ~np.isin(items, seen.get("items", np.zeros(0, np.int64)))
    slices = {"new_users": new_user, "old_users": ~new_user,
              "new_items": new_item, "old_items": ~new_item}
    out["slices"] = {name: score(labels[m], p[m], users[m]) for name, m in slices.items()
                     if m.any()}
    if oracle is not None:
        out["oracle"] = score(labels, oracle, users)
    return out


def shown(value: float) -> str:
    """A metric as printed: "-" where the rows cannot give it (AUC of one class only)."""
    return "-" if math.isnan(value) else f"{value:.4f}"


def format_report(metrics: dict[str, Any]) -> str:
    """A small table: overall, each slice, and the oracle where known."""
    rows = [("all", metrics)] + list(metrics.get("slices", {}).items())
    if "oracle" in metrics:
        rows.append(("oracle (true p)", metrics["oracle"]))
    head = (f"{'':<16}{'rows':>8}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'NE':>8}{'pCTR':>8}"
            f"{'CTR':>8}")
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<16}{m['rows']:>8}{shown(m['auc']):>8}{shown(m['gauc']):>8}"
                     f"{shown(m['logloss']):>9}{shown(m['ne']):>8}{shown(m['ctr_pred']):>8}"
                     f"{shown(m['ctr_true']):>8}")
    if metrics.get("nonfinite_scores"):
        lines.append(f"{metrics['nonfinite_scores']} of {metrics['rows']} scores are NaN or "
                     "infinite: no metric of the model's scores can be given")
    return "\n".join(lines)
