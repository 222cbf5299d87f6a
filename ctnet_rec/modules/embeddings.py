"""The tower's ID embeddings, built from the feature config."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
)
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig


class TowerEmbeddings(nn.Module):
    """Pooled features through an EmbeddingBagCollection; the target item/category and the
    behaviour sequences through one EmbeddingCollection, so that the target item and the
    behaviour items share the item table (one row per id, sharded once), likewise categories.

    Input: the reader's KJT (pooled keys first, then sequence keys)."""

    def __init__(self, features: FeatureConfig, device: torch.device | None = None,
                 data_type: DataType = DataType.FP32) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        self.pooled_keys = features.pooled_keys()
        self.sequence_keys = features.sequence_keys()
        by_table = features.columns_by_table()
        shared = features.sequence_tables()
        bag_tables = [
            EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings,
                               embedding_dim=t.embedding_dim, feature_names=by_table[t.name],
                               data_type=data_type)
            for t in features.tables if t.name in by_table and t.name not in shared
        ]
        bag_tables += [
            EmbeddingBagConfig(name=f"bucket_{n.name}", num_embeddings=len(n.boundaries) + 1,
                               embedding_dim=n.embedding_dim, feature_names=[n.name],
                               data_type=data_type)
            for n in features.numeric if n.bucketized
        ]
        seq_tables = [
            EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings,
                            embedding_dim=t.embedding_dim, feature_names=by_table[t.name],
                            data_type=data_type)
            for t in features.tables if t.name in shared
        ]
        self.pooled = EmbeddingBagCollection(tables=bag_tables, device=device)
        self.sequence = EmbeddingCollection(tables=seq_tables, device=device)
        self.pooled_dim = sum(t.embedding_dim * len(t.feature_names) for t in bag_tables)
        self.token_dim = seq_tables[0].embedding_dim if seq_tables else 0

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[KeyedTensor, dict[str, JaggedTensor]]:
        pooled_kjt, seq_kjt = kjt.split([len(self.pooled_keys), len(self.sequence_keys)])
        return self.pooled(pooled_kjt), self.sequence(seq_kjt)
