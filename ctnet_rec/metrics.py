"""AUC (torchmetrics) and the paper's GAUC (Eq. 6, vectorised with numpy).

TorchRec's GAUC averages sessions without weights and its grouped AUC counts one-class groups
as 0.5; the paper's GAUC weights each user's AUC by the user's impressions and leaves out users
whose impressions are all of one class, so it is implemented here.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc


def _grouped_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC (ties count one half) and per-group impression counts; NaN AUC for groups
    with one class only."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_group) - 1
    pos = np.arange(len(g)) - np.flatnonzero(new_group)[gid] + 1.0
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tid = np.cumsum(new_tie) - 1
    rank = (np.bincount(tid, weights=pos) / np.bincount(tid))[tid]
    n = np.bincount(gid).astype(np.float64)
    n_pos = np.bincount(gid, weights=y)
    n_neg = n - n_pos
    rank_sum = np.bincount(gid, weights=rank * y)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return auc, n


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (exact, ties count one half); NaN with one class only, or
    where a score is NaN or infinite (it would rank somewhere and give a plausible AUC)."""
    labels, scores = np.asarray(labels), np.array(scores, np.float64)  # a copy
    if len(labels) == 0 or labels.min() == labels.max() or not np.isfinite(scores).all():
        return float("nan")
    return float(binary_auroc(torch.from_numpy(scores), torch.as_tensor(labels.astype(np.int64))))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes (Eq. 6); NaN
    where a score is NaN or infinite."""
    if not np.isfinite(np.asarray(scores, np.float64)).all():
        return float("nan")
    a, n = _grouped_auc(labels, scores, np.asarray(users))
    valid = ~np.isnan(a)
    if not valid.any():
        return float("nan")
    return float((a[valid] * n[valid]).sum() / n[valid].sum())
