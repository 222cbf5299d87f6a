"""The tower's ID embeddings, built from the feature config."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig
from ctnet_rec.modules.id_mapping import managed_collisions

# pooled embeddings and sequence embeddings, each by key (what TowerEmbeddings returns)
LookedUp = tuple[dict[str, torch.Tensor], dict[str, JaggedTensor]]


@dataclass
class EmbeddingLayout:
    """What a tower needs to know of its embeddings to size itself: the pooled keys (in the
    order of E), the width they add up to, and the width of a sequence id's embedding."""

    pooled_keys: list[str]
    pooled_dim: int
    token_dim: int

    @classmethod
    def of(cls, features: FeatureConfig) -> "EmbeddingLayout":
        dims = {t.name: t.embedding_dim for t in features.tables}
        dims |= {n.name: n.embedding_dim for n in features.numeric if n.bucketized}
        pooled = features.pooled_keys()
        tables = [features.table_of(k) for k in pooled]
        seq = sorted(features.sequence_tables())
        return cls(pooled, sum(dims[t or k] for k, t in zip(pooled, tables, strict=True)),
                   dims[seq[0]] if seq else 0)


class TowerEmbeddings(nn.Module):
    """Pooled features through an EmbeddingBagCollection; the target item/category and the
    behaviour sequences through one EmbeddingCollection, so that the target item and the
    behaviour items share the item table (one row per id, sharded once), likewise categories.

    Tables with the managed id policy live in their own collections (`managed_pooled`,
    `managed_sequence`), wrapped in TorchRec's managed-collision modules, which map the raw ids
    to rows themselves; the others (`pooled`, `sequence`) get rows from the reader.

    Input: a KJT with at least these features' keys, in the same order at every call (the
    reader's; other keys are skipped). Output: pooled embeddings and sequence embeddings, each
    by key."""

    def __init__(self, features: FeatureConfig, device: torch.device | None = None,
                 data_type: DataType = DataType.FP32) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        self.pooled_keys = features.pooled_keys()
        self.sequence_keys = features.sequence_keys()
        by_table = features.columns_by_table()
        shared = features.sequence_tables()
        managed = features.managed_tables()
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
        def mine(tables: list[Any], is_managed: bool) -> list[Any]:
            return [t for t in tables if (t.name in managed) == is_managed]

        def lookup(tables: list[Any], bag: bool, is_managed: bool) -> nn.Module | None:
            tables = mine(tables, is_managed)
            if not tables:
                return None
            ec = EmbeddingBagCollection(tables=tables, device=device) if bag \
                else EmbeddingCollection(tables=tables, device=device)
            if not is_managed:
                return ec
            mc = ManagedCollisionEmbeddingBagCollection if bag \
                else ManagedCollisionEmbeddingCollection
            return mc(ec, managed_collisions(tables, features.evict_after_periods, device))

        self.pooled = lookup(bag_tables, True, False)
        self.managed_pooled = lookup(bag_tables, True, True)
        self.sequence = lookup(seq_tables, False, False)
        self.managed_sequence = lookup(seq_tables, False, True)

    def forward(self, kjt: KeyedJaggedTensor) -> LookedUp:
        """Every collection takes the batch's KJT as it is and reads its own keys by name (a
        sharded one fixes their order at its first call): nothing between the batch and the
        lookups, so TorchRec's train pipeline can start their input distribution early."""
        lookups = (self.pooled, self.managed_pooled, self.sequence, self.managed_sequence)
        return by_key([None if m is None else m(kjt) for m in lookups])


@torch.fx.wrap
def by_key(outputs: list[Any]) -> LookedUp:
    """The four collections' outputs (pooled, managed pooled, sequence, managed sequence; None
    where absent) as embeddings by key. An opaque call to torch.fx: the train pipeline's
    trace stops at the lookups."""
    pooled: dict[str, torch.Tensor] = {}
    sequence: dict[str, JaggedTensor] = {}
    for i, out in enumerate(outputs):
        if out is None:
            continue
        if isinstance(out, tuple):  # a managed collection: (embeddings, remapped ids)
            out = out[0]
        if i < 2:
            pooled.update(out.to_dict())
        else:
            sequence.update(out)
    return pooled, sequence
