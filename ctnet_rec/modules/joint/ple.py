"""PLE (Tang et al., "Progressive Layered Extraction", RecSys 2020): per level, experts of each
task and shared experts; each task's gate mixes its own and the shared experts, a shared gate
mixes all of them for the next level; a tower per task on the last level's mixture.

As in the CTNet paper's comparison, the bottom is the towers' own: every table shared by the
two domains and one set of attention units (short sequence, SIM, ETA) computing E. The levels
take the place of the towers' first MLP layers: level k's experts are shaped like a tower's
layer k (Linear -> BatchNorm -> LeakyReLU), the task towers are the remaining layers. Two
levels, two shared experts and one expert per task.

Warm start (`warm_start_key`): every expert of level k is the single-domain tower's layer k (a
task's own experts its domain's tower, the shared experts the target's), each task tower the
rest of its domain's tower, the bottom the target's. The gates start routed (`reset_gates`):
the source task's gates to its own experts, the shared gates away from the source task's
experts; the target task's gates start even, since every expert they mix is a copy of the
target's layer on the target's path. The target task then scores as the target model does
(within 1e-4, tested), and every gate stays trainable (a bias, not a mask)."""

from __future__ import annotations

import typing

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctnet_rec.config import FeatureConfig, TowerConfig
from ctnet_rec.modules.joint.common import (
    SOURCE,
    SUFFIXES,
    TARGET,
    JointEmbeddings,
    JointModel,
)
from ctnet_rec.modules.mlp import TowerMLP
from ctnet_rec.modules.tower import Tower, TowerOutput

SHARED = len(SUFFIXES)  # index of the shared input among a level's inputs
# a gate's starting bias towards (or away from) an expert: e^-12 of the mix goes elsewhere
ROUTE = 12.0


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
        self.per_task = per_task
        self.task_experts = nn.ModuleList(
            nn.ModuleList(_expert(in_dim, width, slope) for _ in range(per_task))
            for _ in SUFFIXES)
        self.shared_experts = nn.ModuleList(_expert(in_dim, width, slope) for _ in range(shared))
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, per_task + shared) for _ in SUFFIXES)
        self.shared_gate = None if top else nn.Linear(in_dim, len(SUFFIXES) * per_task + shared)
        self.reset_gates()

    def reset_gates(self) -> None:
        """Weights zero; biases route: the source task's gate to its own experts (+ROUTE),
        the shared gate away from the source task's experts (-ROUTE); the target task's gate
        even (its experts all start as the target's layer on the target's path)."""
        gates = [*self.task_gates, *([self.shared_gate] if self.shared_gate else [])]
        with torch.no_grad():
            for gate in gates:
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
            # a gate's experts: its task's own first, then the shared; the shared gate's:
            # each task's own in task order, then the shared
            typing.cast(nn.Linear, self.task_gates[SOURCE]).bias[: self.per_task] = ROUTE
            if self.shared_gate is not None:
                start = SOURCE * self.per_task
                self.shared_gate.bias[start: start + self.per_task] = -ROUTE

    def forward(self, xs: list[torch.Tensor | None], task: int) -> list[torch.Tensor | None]:
        shared = [e(xs[SHARED]) for e in self.shared_experts]
        needed = range(len(SUFFIXES)) if self.shared_gate is not None else [task]
        own = {t: [e(xs[t]) for e in typing.cast(nn.ModuleList, self.task_experts[t])]
               for t in needed}
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
        if levels > len(model.mlp_hidden):
            raise ValueError(f"PLE's {levels} levels replace as many of the towers' "
                             f"{len(model.mlp_hidden)} MLP layers")
        self.embeddings = JointEmbeddings(features, {t.name for t in features.tables}, device)
        self.bottom = Tower(features, model, device, lookups=False)
        dims = [self.bottom.mlp.in_dim, *model.mlp_hidden]
        del self.bottom.mlp  # the experts and the task towers take its place
        slope = model.leaky_relu_slope
        self.levels = nn.ModuleList(
            ExtractionLayer(dims[k], dims[k + 1], shared_experts, task_experts,
                            k == levels - 1, slope) for k in range(levels))
        self.towers = nn.ModuleList(TowerMLP(dims[levels], model.mlp_hidden[levels:], slope)
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

    def warm_start_key(self, key: str, shared_from: int = TARGET) -> tuple[int, str] | None:
        """Level k's experts from the towers' MLP layer k (Linear `.0`, BatchNorm `.1`), the
        task towers' layer i from layer i + levels, the bottom from the target's tower."""
        parts = key.split(".")
        if parts[0] == "levels" and parts[2] in ("task_experts", "shared_experts"):
            task = int(parts[3]) if parts[2] == "task_experts" else TARGET
            kind, rest = parts[-2], parts[-1]
            layer = "linears" if kind == "0" else "norms"
            return task, f"mlp.{layer}.{parts[1]}.{rest}"
        if parts[0] == "towers" and parts[2] in ("linears", "norms"):
            return int(parts[1]), \
                f"mlp.{parts[2]}.{int(parts[3]) + len(self.levels)}.{'.'.join(parts[4:])}"
        if parts[0] == "towers":
            return int(parts[1]), "mlp." + ".".join(parts[2:])
        if parts[0] == "bottom":
            return TARGET, ".".join(parts[1:])
        return super().warm_start_key(key, shared_from)
