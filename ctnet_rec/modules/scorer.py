"""What serving runs: a model's click probabilities for a batch."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor


class Scorer(nn.Module):
    """sigmoid(logits) of any model here (tower, CTNet, Dual Embedding, joint), the one
    interface of an exported artifact. `task`: a joint model's task whose logits are scored
    (its target's), None for single-output models.

    Input: the KJT of table rows in the model's key order and the dense numerics, as the
    reader builds them (the artifact's metadata names the keys, tables and id mapping)."""

    def __init__(self, model: nn.Module, task: int | None = None) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        if len(dense) == 0:  # no rows: nothing to look up (torchrec 1.6 cannot split an
            return dense.new_zeros(0)  # empty KJT by key)
        out = self.model(sparse, dense) if self.task is None else \
            self.model(sparse, dense, self.task)
        return torch.sigmoid(out.logits)
