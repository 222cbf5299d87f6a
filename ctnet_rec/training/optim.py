"""The optimisers as TorchRec's keyed optimisers: each named dense group (e.g. the towers'
dense layers and CTNet's adapters) a `KeyedOptimizerWrapper` around its torch optimiser, state
keyed by parameter name, so a checkpoint reloads at any world size and into a model with more
groups; a group with `warmup_steps` inside TorchRec's `WarmupOptimizer`, whose step count is
saved with the rest of the state (a resumed run goes on with its warm-up, whatever the
optimiser); with a table warm-up, the tables' fused optimiser (DMP's, its state saved apart)
inside one too; all together one `CombinedOptimizer`, which the train pipeline steps."""

from __future__ import annotations

import typing
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


def warmed_up(opt: KeyedOptimizer, lr: float, steps: int) -> KeyedOptimizer:
    """`opt` whose lr ramps linearly from lr / steps at the first step to lr after `steps`
    steps (TorchRec's WarmupOptimizer), its step count held from the start (checkpoints load into
    the state a fresh trainer holds)."""
    if not steps:
        return opt
    warm = WarmupOptimizer(opt, [WarmupStage(WarmupPolicy.LINEAR, max_iters=steps,
                                             value=1 / steps)], lr=lr, param_name=WARMUP)
    warm.state[warm.params[WARMUP]] = {"warmup": torch.tensor([0, 0])}
    return warm


def keyed_optimizer(named: NamedParams, cfg: OptimizerConfig) -> KeyedOptimizer:
    """One group's optimiser, keyed by parameter name, with its warm-up."""
    return warmed_up(KeyedOptimizerWrapper(dict(named),
                                           lambda params: build_optimizer(params, cfg)),
                     cfg.lr, cfg.warmup_steps)


TABLES = "tables"  # the group of the tables' fused optimiser, when it warms up


class GroupOptimizer(CombinedOptimizer):
    """The named groups' keyed optimisers as one, stepping all of them or one group alone
    (CTNet's prequential pass steps its adapters only). `tables`: the tables' fused optimiser
    and its (lr, warm-up steps), joined as the group `tables` when it warms up; the fused
    kernels apply the lr its param groups hold at each zero_grad and step."""

    def __init__(self, groups: dict[str, tuple[NamedParams, OptimizerConfig]],
                 tables: tuple[KeyedOptimizer, float, int] | None = None) -> None:
        self.groups = {g: keyed_optimizer(named, cfg) for g, (named, cfg) in groups.items()
                       if named}
        if tables is not None and tables[2]:
            fused, lr, steps = tables
            self.groups[TABLES] = warmed_up(fused, lr, steps)
        super().__init__(list(self.groups.items()))

    def step(self, closure: Any = None, only: str | None = None) -> None:
        """Every group's optimiser steps, or the group `only`'s."""
        if only is None:
            super().step(closure)
        else:
            self.groups[only].step(closure)

    def lr(self, group: str) -> float:
        return float(self.groups[group].param_groups[0]["lr"])

    def _named(self) -> list[tuple[str, str, KeyedOptimizer, torch.Tensor]]:
        """(group, state key, optimiser, parameter) of every state this class saves: each
        dense parameter's by its name, each warm-up's by `__warmup/<group>` (the tables'
        own state is DMP's, saved apart)."""
        return [(g, f"{WARMUP}/{g}" if name == WARMUP else name, opt, typing.cast(torch.Tensor, p))
                for g, opt in self.groups.items() for name, p in opt.params.items()
                if g != TABLES or name == WARMUP]

    def state_by_name(self) -> dict[str, dict[str, Any]]:
        return {key: dict(opt.state[p]) for _, key, opt, p in self._named()}

    def load_state_by_name(self, states: dict[str, dict[str, Any]]) -> None:
        """`states` into the live state; a warm-up missing from them starts over."""
        for _, key, opt, p in self._named():
            if key in states:
                opt.state[p].update(states[key])
        for opt in self.groups.values():
            if isinstance(opt, WarmupOptimizer):
                opt.post_load_state_dict()  # the lr of the step it has reached
