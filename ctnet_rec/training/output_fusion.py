"""A source tower's logit fused into a target model's output, its weight fitted out of sample:
logit = target + w (source - c), w chosen on rows the target has not trained on.

Why out of sample: on the rows a target tower has trained on, the source's logit adds nothing
(the tower already fits them: there the best weight is 0), while on the next period's rows it
carries what the target has not learnt yet. So w is chosen on a period's rows before they are
trained on (CTNet with `[ctnet] output_fusion`), or on the previous test period (the
experiment's late-fusion row), never on the rows it is scored on."""

from __future__ import annotations

import numpy as np

from ctnet_rec.experiment.significance import delong_difference
from ctnet_rec.metrics import auc

WEIGHTS = np.round(np.arange(0.0, 2.01, 0.1), 1)  # the weights w is chosen from


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def best_weight(labels: np.ndarray, target_logit: np.ndarray, source_logit: np.ndarray,
                min_z: float = 0.0) -> float:
    """The weight of `WEIGHTS` whose target + w x source has the best AUC (the smallest among
    ties: a source that adds nothing gets 0); 0 when the rows have one class only.

    `min_z` > 0 guards against chance: the best weight is kept only if its AUC gain over
    w = 0 on these rows is at least `min_z` standard errors of DeLong's paired test, else 0.
    Picking the best of 21 weights on a few thousand rows finds a gain even where the source
    knows nothing."""
    scores = np.array([auc(labels, target_logit + float(w) * source_logit) for w in WEIGHTS])
    if np.isnan(scores).all():
        return 0.0
    weight = float(WEIGHTS[int(np.nanargmax(scores))])
    if weight > 0 and min_z > 0:
        gain, se = delong_difference(labels, target_logit + weight * source_logit,
                                     target_logit)
        if not gain >= min_z * se:  # NaN (one class) keeps nothing either
            return 0.0
    return weight
