"""DDTCDR (Li and Tuzhilin, "Deep Dual Transfer Cross Domain Recommendation", WSDM 2020): a
model per domain, trained together; each domain's user representation is combined with the
other domain's, carried over by a latent orthogonal mapping X (source -> target; X^T back):
u'_t = a u_t + (1 - a) X u_s, u'_s = a u_s + (1 - a) X^T u_t (DDTCDR: a = 0.5).

Here each domain's model is a tower with its own tables (every table per domain: the domains
share nothing but the mapping), and the user id's embedding is the one combined. DDTCDR
learns X with an orthogonality penalty; here X is orthogonal by construction (exp of a
skew-symmetric matrix), which the penalty only approaches.

Warm start: each domain's tables and tower are its single-domain tower's, X starts at the
identity, and 1 - a, the other domain's weight, is learned from 0 (`OwnOrOther`): the two
towers' tables were trained apart, so their axes are unrelated and a fixed a = 0.5 would
replace half of each user embedding with noise at deployment. So each task starts exactly as
its domain's tower and takes in the other domain as far as training finds it useful."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import SOURCE, TARGET, OwnOrOther, TaskTowers, user_tables
from ctnet_rec.modules.joint.orthogonal import OrthogonalMap
from ctnet_rec.modules.tower import TowerOutput


class DDTCDR(TaskTowers):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        keys = [f.name for f in features.id_features if f.column == features.user_column]
        super().__init__(features, model, set(), device, cross=keys)
        (table,) = user_tables(features)
        self.user_keys, self.table = keys, table
        self.mapping = OrthogonalMap(features.table(table).embedding_dim, device)
        self.mix = OwnOrOther([table], device)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                task: int = TARGET) -> TowerOutput:
        (pooled, seq), (other, _) = self.embeddings(sparse, task)
        for k in self.user_keys:
            carried = self.mapping(other[k], inverse=task == SOURCE)
            pooled[k] = self.mix(self.table, pooled[k], carried)
        return self.towers[task](sparse, dense, looked_up=(pooled, seq))
