"""The Dual Embedding baseline (paper, Table 2): "ID embeddings from the latest source domain
model are added into the target domain model as extra embeddings, so that there are two item
IDs, user IDs, etc. in the model. All parameters and features are updated in training."
The ID embeddings are those of the tables the experiment names (`[experiment]
id_embedding_tables`; the paper's footnote 3: user, item, category and seller ids).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.embeddings import LookedUp
from ctnet_rec.modules.mlp import TowerMLP
from ctnet_rec.modules.tower import BehaviourPositions, Tower

DUAL_PREFIX = "dual_"


def dual_features(features: FeatureConfig, tables: Collection[str]) -> list[tuple[str, str]]:
    """(feature, table) of the ID features that get a second embedding: those of `tables`."""
    return [(f.name, f.table) for f in features.id_features if f.table in tables]


class DualEmbeddingTower(Tower):
    """The target tower plus a second, trainable embedding of the user and item ids (tables
    `dual_<table>`, initialised from the source model's), concatenated to the MLP input E.
    The first MLP layer gains the matching input columns; everything else keeps the target
    tower's shapes, so the target model's parameters are all reused."""

    def __init__(self, features: FeatureConfig, model: TowerConfig, tables: Collection[str],
                 device: torch.device | None = None) -> None:
        super().__init__(features, model, device)
        pairs = dual_features(features, tables)
        managed = sorted({t for _, t in pairs} & features.managed_tables())
        if managed:
            raise ValueError(f"Dual Embedding copies the source's rows of {managed} into plain "
                             "tables, which need the modulo or hash id policy, not managed")
        self.dual_keys = [name for name, _ in pairs]
        self.dual = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=DUAL_PREFIX + table,
                               num_embeddings=features.table(table).num_embeddings,
                               embedding_dim=features.table(table).embedding_dim,
                               feature_names=[name])
            for name, table in pairs], device=device)
        extra = sum(features.table(table).embedding_dim for _, table in pairs)
        width = self.mlp.in_dim
        self.new_columns = slice(width, width + extra)  # the dual embeddings, after E
        self.mlp = TowerMLP(width + extra, model.mlp_hidden, model.leaky_relu_slope)

    def embed(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
              long_interest: list[torch.Tensor] | None = None,
              looked_up: LookedUp | None = None,
              positions: BehaviourPositions | None = None) -> tuple[torch.Tensor,
                                                                    list[torch.Tensor]]:
        inputs, interest = super().embed(sparse, dense, long_interest, looked_up, positions)
        keys = sparse.keys()
        second = self.dual(sparse.permute([keys.index(k) for k in self.dual_keys])).to_dict()
        return torch.cat([inputs, *(second[k] for k in self.dual_keys)], dim=-1), interest
