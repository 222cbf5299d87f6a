"""A source tower's logit fused into a target model's output, its weight fitted out of sample:
logit = target + w (source - c), w chosen on rows the target has not trained on.

Why out of sample: on the rows a target tower has trained on, the source's logit adds nothing
(the tower already fits them: there the best weight is 0), while on the next period's rows it
carries what the target has not learnt yet. So w is chosen on a period's rows before they are
trained on (CTNet with `[ctnet] output_fusion`), or on the previous test period (the
experiment's late-fusion row), never on the rows it is scored on.

With `[ctnet] output_fusion_evidence = "pooled"`, CTNet's w comes from every fit so far
(`PooledEvidence`): whether a source helps persists from period to period, and one
period's few thousand rows cannot tell a weak source from chance."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


@dataclasses.dataclass
class PooledEvidence:
    """Per weight of `WEIGHTS`, the AUC gain of target + w x source over the target alone,
    summed over the fits so far, and the sum of those gains' DeLong variances (the periods'
    rows are disjoint: their errors add). The weight chosen is the one of the largest summed
    gain; with `min_z`, kept only if that sum is at least `min_z` of its standard errors. A
    source that knows nothing lowers the AUC at every w > 0 in expectation (a best weight
    above 0 on one period is chance), so its sums drift below 0 as periods pass; a weak real
    one gains a little each period, and the evidence adds up."""

    gain: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(WEIGHTS))
    variance: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(WEIGHTS))
    fits: int = 0  # the fits added (a period with one class adds none)

    def add(self, labels: np.ndarray, target_logit: np.ndarray,
            source_logit: np.ndarray) -> PooledEvidence:
        """This evidence with one more fit's rows."""
        gain, se = np.array([delong_difference(labels, target_logit + float(w) * source_logit,
                                               target_logit) for w in WEIGHTS]).T
        if np.isnan(gain).any():  # one class: nothing to learn from
            return self
        return PooledEvidence(gain=(np.asarray(self.gain) + gain).tolist(),
                              variance=(np.asarray(self.variance) + se * se).tolist(),
                              fits=self.fits + 1)

    def weight(self, min_z: float = 0.0) -> float:
        """The weight of the largest summed gain (the smallest among ties; 0 with no
        positive gain), 0 if `min_z` > 0 and that gain is under `min_z` standard errors."""
        gain = np.asarray(self.gain)
        best = int(np.argmax(gain))
        if gain[best] <= 0 or gain[best] < min_z * math.sqrt(self.variance[best]):
            return 0.0
        return float(WEIGHTS[best])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PooledEvidence:
        """From `to_json`'s dict, as a manifest's metrics hold it."""
        if len(data["gain"]) != len(WEIGHTS) or len(data["variance"]) != len(WEIGHTS):
            raise ValueError(f"fusion evidence over {len(data['gain'])} weights, "
                             f"not the {len(WEIGHTS)} of WEIGHTS")
        return cls([float(x) for x in data["gain"]], [float(x) for x in data["variance"]],
                   int(data["fits"]))
