"""The dense parameter groups' optimisers (the tables' are fused into TorchRec's kernels),
made of TorchRec's keyed optimisers: each named group (e.g. the towers' dense layers and
CTNet's adapters) a `KeyedOptimizerWrapper` around its torch optimiser, state keyed by
parameter name, so a checkpoint reloads at any world size and into a model with more groups;
a group with `warmup_steps` inside TorchRec's `WarmupOptimizer`, whose step count is saved with
the rest of the state (a resumed run goes on with its warm-up, whatever the optimiser); the
groups together one `CombinedOptimizer`, which the train pipeline steps."""

from __future__ import annotations

from typing import Any

import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

from ctnet_rec.config import OptimizerConfig

NamedParams = list[tuple[str, torch.Tensor]]
WARMUP = "__warmup"  # a group's warm-up state (steps taken, stage), as TorchRec keeps it


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


def keyed_optimizer(named: NamedParams, cfg: OptimizerConfig) -> KeyedOptimizer:
    """One group's optimiser, keyed by parameter name; with `warmup_steps`, its lr ramps
    linearly from lr / warmup_steps at the first step to lr at step `warmup_steps`."""
    opt = KeyedOptimizerWrapper(dict(named), lambda params: build_optimizer(params, cfg))
    if not cfg.warmup_steps:
        return opt
    warm = WarmupOptimizer(opt, [WarmupStage(WarmupPolicy.LINEAR, max_iters=cfg.warmup_steps,
                                             value=1 / cfg.warmup_steps)],
                           lr=cfg.lr, param_name=WARMUP)
    warm.state[warm.params[WARMUP]] = {"warmup": torch.tensor([0, 0])}  # held up front
    return warm


class GroupOptimizer(CombinedOptimizer):
    """The named groups' keyed optimisers as one, stepping all of them or one group alone
    (CTNet's prequential pass steps its adapters only)."""

    def __init__(self, groups: dict[str, tuple[NamedParams, OptimizerConfig]]) -> None:
        self.groups = {g: keyed_optimizer(named, cfg) for g, (named, cfg) in groups.items()
                       if named}
        super().__init__(list(self.groups.items()))

    def step(self, closure: Any = None, only: str | None = None) -> None:
        """Every group's optimiser steps, or the group `only`'s."""
        if only is None:
            super().step(closure)
        else:
            self.groups[only].step(closure)

    def lr(self, group: str) -> float:
        return float(self.groups[group].param_groups[0]["lr"])

    def state_by_name(self) -> dict[str, dict[str, Any]]:
        """Each parameter's state by its name; each warm-up's by `__warmup/<group>`."""
        return {(f"{WARMUP}/{g}" if name == WARMUP else name): dict(opt.state[p])
                for g, opt in self.groups.items() for name, p in opt.params.items()}

    def load_state_by_name(self, states: dict[str, dict[str, Any]]) -> None:
        """`states` into the live state; a warm-up missing from them starts over."""
        for g, opt in self.groups.items():
            for name, p in opt.params.items():
                key = f"{WARMUP}/{g}" if name == WARMUP else name
                if key in states:
                    opt.state[p].update(states[key])
            if isinstance(opt, WarmupOptimizer):
                opt.post_load_state_dict()  # the lr of the step it has reached
