"""MLP++ (Hu et al., CoNet, CIKM 2018, its multi-task MLP baseline), as the CTNet paper uses it:
"a multi-task model that shares the parameters of the user embeddings only. We treat each
domain as a task": a tower per domain, the user table shared, every other table per domain."""

from __future__ import annotations

import torch

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import TaskTowers, user_tables


class MLPPlusPlus(TaskTowers):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        super().__init__(features, model, user_tables(features), device)
