"""PLE (Tang et al., "Progressive Layered Extraction", RecSys 2020): per level, experts of each
task and shared experts; each task's gate mixes its own and the shared experts, a shared gate
mixes all of them for the next level; a tower per task on the last level's mixture.

As in the CTNet paper's comparison, the bottom is the towers' own: every table shared by the
two domains and one set of attention units (short sequence, SIM, ETA) computing E; the experts
have the width of the towers' first MLP layer (Linear -> BatchNorm -> LeakyReLU), the task
towers the remaining layers. Two levels, two shared experts and one expert per task."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import SUFFIXES, TARGET, JointEmbeddings, JointModel
from ctnet_rec.modules.mlp import TowerMLP
from ctnet_rec.modules.tower import Tower, TowerOutput

SHARED = len(SUFFIXES)  # index of the shared input among a level's inputs


def _expert(in_dim: int, width: int, slope: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.LeakyReLU(slope))


def _mix(gate_logits: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    weights = torch.softmax(gate_logits, dim=-1).unsqueeze(-1)
    return (weights * torch.stack(experts, dim=1)).sum(dim=1)


class ExtractionLayer(nn.Module):
    """One PLE level. Inputs and outputs: [source task's, target task's, shared]; a batch
    belongs to one task, whose output is the one needed (plus the shared one below the top)."""

    def __init__(self, in_dim: int, width: int, shared: int, per_task: int, top: bool,
                 slope: float) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            nn.ModuleList(_expert(in_dim, width, slope) for _ in range(per_task))
            for _ in SUFFIXES)
        self.shared_experts = nn.ModuleList(_expert(in_dim, width, slope) for _ in range(shared))
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, per_task + shared) for _ in SUFFIXES)
        self.shared_gate = None if top else nn.Linear(in_dim, len(SUFFIXES) * per_task + shared)

    def forward(self, xs: list[torch.Tensor | None], task: int) -> list[torch.Tensor | None]:
        shared = [e(xs[SHARED]) for e in self.shared_experts]
        needed = range(len(SUFFIXES)) if self.shared_gate is not None else [task]
        own = {t: [e(xs[t]) for e in self.task_experts[t]] for t in needed}
        out: list[torch.Tensor | None] = [None] * (len(SUFFIXES) + 1)
        out[task] = _mix(self.task_gates[task](xs[task]), own[task] + shared)
        if self.shared_gate is not None:
            everything = [x for t in needed for x in own[t]] + shared
            out[SHARED] = _mix(self.shared_gate(xs[SHARED]), everything)
            for t in needed:
                if t != task:
                    out[t] = _mix(self.task_gates[t](xs[t]), own[t] + shared)
        return out


class PLE(JointModel):
    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None, levels: int = 2, shared_experts: int = 2,
                 task_experts: int = 1) -> None:
        super().__init__()
        self.embeddings = JointEmbeddings(features, {t.name for t in features.tables}, device)
        self.bottom = Tower(features, model, device, lookups=False)
        in_dim = self.bottom.mlp.linears[0].in_features
        self.bottom.mlp = None  # the experts and the task towers take its place
        width, slope = model.mlp_hidden[0], model.leaky_relu_slope
        self.levels = nn.ModuleList(
            ExtractionLayer(in_dim if k == 0 else width, width, shared_experts, task_experts,
                            k == levels - 1, slope) for k in range(levels))
        self.towers = nn.ModuleList(TowerMLP(width, model.mlp_hidden[1:], slope)
                                    for _ in SUFFIXES)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                task: int = TARGET) -> TowerOutput:
        mine, _ = self.embeddings(sparse, task)
        e, interest = self.bottom.embed(sparse, dense, looked_up=mine)
        xs: list[torch.Tensor | None] = [e] * (len(SUFFIXES) + 1)
        for level in self.levels:
            xs = level(xs, task)
        x = xs[task]
        assert x is not None
        logits, hidden = self.towers[task](x)
        return TowerOutput(logits, e, hidden, interest)
