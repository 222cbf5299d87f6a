from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from ctnet_rec.metrics import auc, gauc


def _pairwise_auc(y, s):
    pos = [si for si, yi in zip(s, y, strict=True) if yi == 1]
    neg = [si for si, yi in zip(s, y, strict=True) if yi == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_and_torchmetrics_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # coarse scores: many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-6)  # torchmetrics: float32
    ref = binary_auroc(torch.tensor(s), torch.tensor(y)).item()
    assert auc(y, s) == pytest.approx(ref, abs=1e-6)
    # GAUC's grouped AUC (float64) agrees when everyone is one group
    assert gauc(y, s, np.zeros(len(y))) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_gauc_is_impression_weighted_and_skips_one_class_users():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 600)
    y = rng.integers(0, 2, 600)
    y[users == 3] = 1  # one-class users are left out
    y[users == 4] = 0
    s = rng.random(600) + 0.5 * y * (users % 3)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if y[m].min() == y[m].max():
            continue
        num += m.sum() * _pairwise_auc(y[m], s[m])
        den += m.sum()
    assert gauc(y, s, users) == pytest.approx(num / den, abs=1e-12)


def test_degenerate_inputs_are_nan():
    assert np.isnan(auc(np.ones(5), np.arange(5)))
    assert np.isnan(gauc(np.ones(5), np.arange(5), np.arange(5)))


def test_gauc_hand_worked_example():
    # user 1: the click outranks both non-clicks          -> AUC 1.0, 3 impressions
    # user 2: clicks 0.2, 0.6 vs non-clicks 0.4, 0.1: 3 of 4 pairs ordered -> 0.75, 4
    # user 3: no click at all                             -> left out
    # user 4: click and non-click tie at 0.5              -> 0.5, 2 impressions
    # GAUC = (3 * 1.0 + 4 * 0.75 + 2 * 0.5) / (3 + 4 + 2) = 7 / 9
    # (an unweighted mean over users, as torchrec's GAUC computes, would give 0.75)
    users = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0])
    scores = np.array([0.9, 0.3, 0.5, 0.2, 0.6, 0.4, 0.1, 0.7, 0.8, 0.5, 0.5])
    assert gauc(labels, scores, users) == pytest.approx(7 / 9, abs=1e-12)


def test_normalized_entropy_by_hand():
    import math

    from ctnet_rec.training.evaluate import normalized_entropy

    labels = np.array([1, 0, 0, 0])
    p = np.array([0.8, 0.1, 0.2, 0.3])
    logloss = -(math.log(0.8) + math.log(0.9) + math.log(0.8) + math.log(0.7)) / 4
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(labels, p) == pytest.approx(logloss / entropy)
    assert normalized_entropy(labels, np.full(4, 0.25)) == pytest.approx(1.0)  # the rate alone
    assert math.isnan(normalized_entropy(np.ones(3), np.full(3, 0.5)))


def test_the_evaluation_table_shows_a_metric_a_slice_cannot_give_as_missing():
    """`ctnet eval`'s table: a slice whose labels are all one class has no AUC ("-", not
    "nan", which reads like a diverged model)."""
    from ctnet_rec.training.evaluate import evaluate_predictions, format_report

    labels = np.array([0, 1, 0, 1, 0, 0])
    p = np.array([0.2, 0.7, 0.3, 0.6, 0.1, 0.4])
    users, items = np.array([1, 1, 2, 2, 3, 3]), np.array([10, 11, 12, 13, 14, 15])
    seen = {"users": np.array([1, 2]), "items": np.array([10, 11, 12, 13, 14, 15])}
    table = format_report(evaluate_predictions(labels, p, users, items, seen))
    new_users = next(line for line in table.splitlines() if line.startswith("new_users"))
    assert new_users.split()[1:4] == ["2", "-", "-"]  # user 3: two rows, both 0
    assert "nan" not in table


def test_scores_that_are_not_finite_give_no_metrics():
    """A NaN score ranks somewhere: [0.9, nan, 0.1, 0.2] against [0, 1, 0, 1] gave an AUC of
    0.75, which reads like any other. Every metric of such scores is missing, counted, and the
    pipeline's gate keeps the model out whatever else it scores."""
    from ctnet_rec.config import PipelineConfig
    from ctnet_rec.pipeline.gate import decide
    from ctnet_rec.training.evaluate import format_report, score
    from ctnet_rec.training.loop import scored_part

    labels, users = np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2])
    for bad in (np.nan, np.inf):
        p = np.array([0.9, bad, 0.1, 0.2])
        assert np.isnan(auc(labels, p)) and np.isnan(gauc(labels, p, users))
        got = score(labels, p, users)
        assert got["nonfinite_scores"] == 1 and got["rows"] == 4
        assert all(np.isnan(got[k]) for k in ("auc", "gauc", "logloss", "ne", "ctr_pred"))
        promote, why = decide(got, {"auc": 0.5}, PipelineConfig())
        assert not promote and why == "1 row(s) scored NaN or infinite"
        assert not decide(got, None, PipelineConfig())[0]  # nothing served yet: still out
        assert scored_part(3, got) == ", period 3: AUC - GAUC - (1 score(s) NaN or infinite)"
        assert "1 of 4 scores are NaN or infinite" in format_report(got)
    assert "nonfinite_scores" not in score(labels, np.array([0.9, 0.8, 0.1, 0.2]), users)
