"""Share Bottom (Caruana, "Multitask learning", 1997; the shared-bottom baseline of MMoE), as
the CTNet paper uses it: "shares the parameters of the bottom layers (i.e., the embedding layer
of shared features in source and target domains)": every id table serves both domains' towers
(the two domains share one schema here); each domain keeps its attention units and MLP.
Simplification: the numeric features' bucket tables stay per domain (a few rows each)."""

from __future__ import annotations

import torch

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import TaskTowers


class ShareBottom(TaskTowers):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        super().__init__(features, model, {t.name for t in features.tables}, device)
