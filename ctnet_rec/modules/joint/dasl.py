"""DASL (Li and Tuzhilin, "Dual Attentive Sequential Learning for Cross-Domain Click-Through
Rate Prediction", KDD 2021): dual embedding, each domain's user and item embeddings learned
together with the other domain's through orthogonal mappings, and dual attention, each
domain's behaviours attended with what both domains know of them.

Here, every table has a copy per domain; each id (user, target item and category, every
behaviour's item and category) is looked up in both domains' tables and its embedding is
e = a e_own + (1 - a) X e_other (one orthogonal map X per table, X^T back), so the
tower's attention units (target attention, SIM, ETA) attend over behaviours carrying both
domains' embeddings: the dual attention, with one attention per tower rather than DASL's
separate attention per domain's sequence (a row carries one sequence of each kind).

Warm start, as DDTCDR's: each domain's tables and tower from its single-domain tower, X at the
identity, and the other domain's weight 1 - a learned from 0 per table (`OwnOrOther`; DASL's
0.5 would mix in half of an embedding from a table whose axes are unrelated), so each task
starts exactly as its domain's tower."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import SOURCE, TARGET, OwnOrOther, TaskTowers
from ctnet_rec.modules.joint.orthogonal import OrthogonalMap
from ctnet_rec.modules.tower import TowerOutput


class DASL(TaskTowers):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        tables = {f.table for f in features.id_features
                  if f.column in (features.user_column, features.item_column,
                                  features.category_column)} | features.sequence_tables()
        table_of = {k: t for k in features.sparse_keys()
                    if (t := features.table_of(k)) is not None and t in tables}
        super().__init__(features, model, set(), device, cross=list(table_of))
        self.table_of = table_of
        self.maps = nn.ModuleDict({t: OrthogonalMap(features.table(t).embedding_dim, device)
                                   for t in sorted(tables)})
        self.mix = OwnOrOther(sorted(tables), device)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                task: int = TARGET) -> TowerOutput:
        (pooled, seq), (other_pooled, other_seq) = self.embeddings(sparse, task)
        back = task == SOURCE

        def dual(key: str, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            table = self.table_of[key]
            return self.mix(table, own, self.maps[table](other, inverse=back))

        pooled = {k: dual(k, v, other_pooled[k]) if k in other_pooled else v
                  for k, v in pooled.items()}
        seq = {k: JaggedTensor(values=dual(k, v.values(), other_seq[k].values()),
                               lengths=v.lengths()) if k in other_seq else v
               for k, v in seq.items()}
        return self.towers[task](sparse, dense, looked_up=(pooled, seq))
