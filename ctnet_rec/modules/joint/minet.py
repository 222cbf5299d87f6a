"""MiNet (Ouyang et al., "Mixed Interest Network for Cross-Domain Click-Through Rate
Prediction", CIKM 2020): three kinds of user interest, (1) long-term interest across domains,
(2) short-term interest from the source domain, (3) short-term interest in the target domain;
item-level attention builds (2) and (3) from behaviours, interest-level attention weighs the
three, a_i = exp(g_i([v_i, target item, user])) (exp, not softmax, so they need not sum to 1).

Here: (1) is the user id's embedding, in a table both domains share (every table is shared,
so the source's behaviours embed alike in both tasks); (3) is the tower's target attention
over the short sequence (the row's own domain); (2) is a target attention over the newest
behaviours of the long sequence, which holds the user's clicks in every domain: the rows carry
no source-only sequence, so the recent cross-domain clicks stand in for it. The tower's SIM
and ETA interests stay, unweighted (same features as the towers). A tower per domain.

Warm start: each domain's tower is its single-domain tower, with (2)'s columns of the first
MLP layer at zero and the interest-level scores at zero (every weight exp(0) = 1), so each task
starts exactly as its domain's tower. Every table is shared (see `JointModel`)."""

from __future__ import annotations

import typing

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.attention import TargetAttention, pad
from ctnet_rec.modules.joint.common import TaskTowers, user_tables
from ctnet_rec.modules.mlp import TowerMLP
from ctnet_rec.modules.tower import Tower

SCORE_HIDDEN = 32  # the interest-level attention's hidden units
MAX_LOG_WEIGHT = 10.0  # exp() of a larger score would overflow the MLP input


class MiNetTower(Tower):
    """A tower whose interests are weighed by MiNet's interest-level attention."""

    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        super().__init__(features, model, device, lookups=False)
        long = next((s for s in features.sequences if s.kind == "long"), None)
        if self.short is None or long is None:
            raise ValueError("MiNet needs a short and a long behaviour sequence")
        self.recent_of = long
        self.user_key = next(f.name for f in features.id_features
                             if f.column == features.user_column)
        token = 2 * self.layout.token_dim
        (table,) = user_tables(features)
        user = features.table(table).embedding_dim
        self.recent = TargetAttention(token, model.attention_heads)
        lasts = [nn.Linear(SCORE_HIDDEN, 1) for _ in range(3)]
        for last in lasts:  # weights start at exp(0) = 1: the tower's own interests
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.scores = nn.ModuleList(
            nn.Sequential(nn.Linear(dim + token + user, SCORE_HIDDEN), nn.ReLU(), last)
            for dim, last in zip((user, token, token), lasts, strict=True))
        # long-term, target short-term, recent
        width = self.mlp.in_dim
        # E: the tower's parts, the recent interest, then the dense features
        start = width - len(features.dense_names())
        self.new_columns = slice(start, start + token)
        self.mlp = TowerMLP(width + token, model.mlp_hidden, model.leaky_relu_slope)

    def combine(self, pooled: dict[str, torch.Tensor], emb: dict[str, JaggedTensor],
                target: torch.Tensor, interests: list[torch.Tensor]) -> list[torch.Tensor]:
        s, short = self.recent_of, self.short
        assert short is not None  # refused at construction otherwise
        tokens, mask = pad(self.behaviours(emb, s), short.max_len)
        recent = self.recent(target, tokens, mask)
        user = pooled[self.user_key]
        vectors = [user, interests[0], recent]
        weights = [torch.exp(torch.clamp(g(torch.cat([v, target, user], dim=-1)),
                                         max=MAX_LOG_WEIGHT))
                   for g, v in zip(self.scores, vectors, strict=True)]
        pooled = {**pooled, self.user_key: weights[0] * user}
        weighed = [weights[1] * interests[0], *interests[1:], weights[2] * recent]
        return super().combine(pooled, emb, target, weighed)


class MiNet(TaskTowers):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None) -> None:
        super().__init__(features, model, {t.name for t in features.tables}, device,
                         tower=MiNetTower)

    def widened_inputs(self, task: int) -> slice | None:
        return typing.cast(MiNetTower, self.towers[task]).new_columns
