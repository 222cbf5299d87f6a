"""The dense parameter groups' optimisers (the tables' are fused into TorchRec's kernels): one
torch optimiser per named group, e.g. the towers' dense layers and CTNet's adapters, each
built from its `OptimizerConfig`, with its linear warm-up."""

from __future__ import annotations

from typing import Any

import torch

from ctnet_rec.config import OptimizerConfig

NamedParams = list[tuple[str, torch.Tensor]]


def build_optimizer(params: list[torch.Tensor], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimiser with its state created up front: checkpoints are loaded into the state
    a fresh trainer holds, so every entry must exist before the first step."""
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr,
                                   initial_accumulator_value=cfg.initial_accumulator)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for p in params:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        return opt
    return torch.optim.SGD(params, lr=cfg.lr)  # stateless


class GroupOptimizer:
    """Several parameter groups, each with its own optimiser; state keyed by parameter name
    (so a checkpoint reloads at any world size and into a model with more groups)."""

    def __init__(self, groups: dict[str, tuple[NamedParams, OptimizerConfig]]) -> None:
        self.groups = {g: (named, cfg, build_optimizer([p for _, p in named], cfg))
                       for g, (named, cfg) in groups.items() if named}
        self._steps = dict.fromkeys(self.groups, 0)  # for optimisers that keep no step count

    def zero_grad(self) -> None:
        for _, _, opt in self.groups.values():
            opt.zero_grad()

    def step(self, only: str | None = None) -> None:
        """Every group's optimiser steps, or the group `only`'s."""
        for g, (_, cfg, opt) in self.groups.items():
            if only is not None and g != only:
                continue
            if cfg.warmup_steps:
                scale = min(1.0, (self.steps_taken(g) + 1) / cfg.warmup_steps)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * scale
            opt.step()
            self._steps[g] += 1

    def steps_taken(self, group: str) -> int:
        """The group's step count: the optimiser's own where it keeps one (it is saved with
        the checkpoint), else the steps of this process."""
        named, _, opt = self.groups[group]
        step = opt.state.get(named[0][1], {}).get("step")
        return int(step) if step is not None else self._steps[group]

    def lr(self, group: str) -> float:
        return float(self.groups[group][2].param_groups[0]["lr"])

    def state_by_name(self) -> dict[str, dict[str, Any]]:
        return {name: dict(opt.state[p]) for named, _, opt in self.groups.values()
                for name, p in named}

    def load_state_by_name(self, states: dict[str, dict[str, Any]]) -> None:
        for named, _, opt in self.groups.values():
            for name, p in named:
                opt.state[p].update(states[name])
