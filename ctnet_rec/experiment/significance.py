"""Intervals for the report's gains. The unit is a seed (a world and a training run): the test
periods of one run share its training and are not independent.

- Several seeds (K): a row's gain over a reference is, per seed, its mean over the test
  periods; the 95% interval is Student's t over those K gains (K - 1 degrees of freedom).
- One seed: per period, the paired DeLong test on the rows both models scored (DeLong,
  DeLong & Clarke-Pearson, 1988; computed with midranks, Sun & Xu, 2014), where the run kept
  both models' scores; otherwise each AUC's standard error from its test rows (Hanley &
  McNeil, 1982), conservative since the two models score the same rows. A mean over P periods
  has standard error sqrt(sum of the periods' variances) / P. One training run: the
  training's own noise (another seed, another float order) is not in it.

Each interval also says the smallest gain it would detect (`detectable`: two-sided 5% level,
80% power, for the spread measured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
Z975 = 1.959964
# Student's t 0.80 quantile (power 80%), for 1..30 degrees of freedom
_T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873,
        0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857,
        0.856, 0.856, 0.855, 0.855, 0.854, 0.854]
Z80 = 0.841621


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (beyond 30 degrees of freedom, within 0.2% of it)."""
    return _T975[df - 1] if df <= len(_T975) else Z975 + 2.4 / df


def t80(df: int) -> float:
    """The 0.80 quantile of Student's t (beyond 30 degrees of freedom, the normal's)."""
    return _T80[df - 1] if df <= len(_T80) else Z80


def paired_interval(diffs: Sequence[float]) -> dict[str, float]:
    """Mean of the paired differences with its 95% t-interval and the smallest mean gain
    detectable (5% two-sided, 80% power) at their spread; NaN bounds with one pair or none
    (an interval needs at least two). NaN differences (a metric that could not be computed)
    are left out."""
    xs = [x for x in diffs if not math.isnan(x)]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0,
                "detectable": math.nan}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1,
                "detectable": math.nan}
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    half = t975(n - 1) * se
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n,
            "detectable": (t975(n - 1) + t80(n - 1)) * se}


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's standard error of an AUC measured on `positives` + `negatives` rows."""
    if positives == 0 or negatives == 0 or math.isnan(auc):
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def mark(interval: dict[str, float]) -> str:
    """'+' when the whole interval is above 0, '-' when below, '' otherwise (or unknown)."""
    if math.isnan(interval["low"]) or math.isnan(interval["high"]):
        return ""
    return "+" if interval["low"] > 0 else "-" if interval["high"] < 0 else ""


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def delong_difference(labels: np.ndarray, first: np.ndarray,
                      second: np.ndarray) -> tuple[float, float]:
    """AUC(first) - AUC(second) on the same rows, and that difference's standard error by
    DeLong's paired test (the two models' errors on shared rows correlate, which the unpaired
    standard errors ignore). NaN for a period with one class."""
    pos = np.asarray(labels) == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0:
        return math.nan, math.nan
    v10, v01 = [], []
    for scores in (np.asarray(first, np.float64), np.asarray(second, np.float64)):
        whole = midranks(scores)
        v10.append((whole[pos] - midranks(scores[pos])) / n)  # per positive: negatives below
        v01.append(1.0 - (whole[~pos] - midranks(scores[~pos])) / m)  # per negative
    c = np.array([1.0, -1.0])
    s10 = np.cov(np.vstack(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack(v01)) if n > 1 else np.zeros((2, 2))
    var = float(c @ s10 @ c) / m + float(c @ s01 @ c) / n
    return float(v10[0].mean() - v10[1].mean()), math.sqrt(max(var, 0.0))
