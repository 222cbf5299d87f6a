"""The promotion gate: whether a candidate model may replace the served one, from both
models' metrics on rows neither has trained on."""

from __future__ import annotations

import math
from typing import Any

from ctnet_rec.config import PipelineConfig
from ctnet_rec.training.evaluate import shown


def calibration(metrics: dict[str, Any]) -> float:
    """Predicted over actual click rate (1: calibrated; NaN without clicks)."""
    return metrics["ctr_pred"] / metrics["ctr_true"] if metrics["ctr_true"] > 0 else math.nan


def decide(candidate: dict[str, Any], serving: dict[str, Any] | None,
           rule: PipelineConfig) -> tuple[bool, str]:
    """(promote, why). Kept out: scores that are NaN or infinite, calibration outside the
    bounds, or an AUC below the served model's by more than the margin (a one-class period,
    whose AUC is undefined, promotes on calibration alone)."""
    if candidate.get("nonfinite_scores"):
        return False, f"{candidate['nonfinite_scores']} row(s) scored NaN or infinite"
    low, high = rule.calibration_bounds
    c = calibration(candidate)
    if math.isfinite(c) and not low <= c <= high:
        return False, f"calibration {c:.3f} outside [{low}, {high}]"
    if serving is None:
        return True, "nothing served yet"
    auc, served_auc = candidate["auc"], serving["auc"]
    if math.isfinite(auc) and math.isfinite(served_auc) and auc < served_auc - rule.auc_margin:
        return False, (f"AUC {auc:.4f} below the served model's {served_auc:.4f} by more than "
                       f"{rule.auc_margin}")
    return True, f"AUC {shown(auc)} vs the served model's {shown(served_auc)}" + (
        "" if math.isfinite(auc) else " (one class only: no AUC to compare)")
