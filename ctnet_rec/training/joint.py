"""Training the joint-learning baselines: each period, the target domain's and the source
domain's data of that period, batches of the two interleaved in a seeded random order (the same
on every rank), each batch scored by its own task's head.

They start, where the architecture allows, from the warm-up checkpoints (the paper: "reuse as
many parameters as possible"), as each model's `warm_start_key` says: a task's own tables and
tower from its domain's single-domain tower, a first MLP layer with extra inputs from the
tower's with zeros in the new columns, the tables both tasks share from the target's tower
(`[experiment] shared_table_rows`; "source" takes the source tower's rows instead); what has
no counterpart (gates, mappings, mixing weights) starts where it adds nothing. Each model's
docstring says how close to its domain's tower each task starts; tests/test_joint.py checks
it on the target's rows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipeline, TrainPipelineBase

from ctnet_rec.config import Config, ConfigError
from ctnet_rec.data.batch import Batch
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.modules.joint import SOURCE, TARGET
from ctnet_rec.modules.joint.common import SUFFIXES
from ctnet_rec.modules.kinds import JOINT
from ctnet_rec.modules.scorer import Scorer
from ctnet_rec.modules.tower import FIRST_LAYER
from ctnet_rec.training.checkpoint import (
    Manifest,
    check_tower_checkpoint,
    check_tower_pair,
    load_mapped,
    load_widened,
    read_seen_ids,
    saved_entries,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import PeriodTrainer

log = logging.getLogger(__name__)


class StepLoss(torch.nn.Module):
    """`loss_of(batch)` as the model TorchRec's base pipeline calls: its `custom_model_fwd`
    argument is accepted and not used (torchrec 1.9.2)."""

    def __init__(self, loss_of: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
                 training: bool) -> None:
        super().__init__()
        self.loss_of = loss_of
        self.train(training)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_of(batch)


def check_source_domain(domain: str, source_domain: str) -> None:
    """Refuse a joint model whose source domain is the one it is trained for: its source task
    would learn the target's rows, and its target task nothing."""
    if domain == source_domain:
        raise ConfigError(f"source domain {domain!r} is the domain being trained: a joint "
                          "model learns from another domain's rows beside its own "
                          "(--source-domain)")


class JointTrainer(PeriodTrainer):
    """PeriodTrainer for a model of `JOINT_MODELS`, reading `source_domain` alongside."""

    def __init__(self, cfg: Config, env: DistEnv, model: str, source_domain: str) -> None:
        self.model_name, self.source_domain = model, source_domain
        self.kind = f"{JOINT}:{model}"
        super().__init__(cfg, env)

    def scorer(self, module: torch.nn.Module) -> Scorer:
        return Scorer(module, task=TARGET)  # a joint model's run is its target domain's

    def steps_leave_parameters_unused(self) -> bool:
        return True  # a step trains one domain's task; the other task's tower has no gradient

    def train_pipeline(self, loss_of: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
                       ) -> TrainPipeline:
        """TorchRec's base pipeline (the next batch's copy to the device overlaps the step):
        a joint model routes each task's ids to its tables through a KJT of its own, so no
        lookup reads the batch directly for the sparse-dist pipeline to start early."""
        return TrainPipelineBase(StepLoss(loss_of, self.dmp.training), self.dense_opt,
                                 self.env.device)

    def logits(self, batch: Any, domain: str) -> torch.Tensor:
        task = SOURCE if domain == self.source_domain else TARGET
        return self.dmp(batch.sparse, batch.dense, task).logits

    def manifest(self, period: int, metrics: dict[str, Any],
                 lineage: dict[str, Any]) -> Manifest:
        m = super().manifest(period, metrics, lineage)
        m.lineage = {"source_domain": self.source_domain, **m.lineage}
        return m

    def domains_read(self, domain: str) -> list[str]:
        check_source_domain(domain, self.source_domain)
        return [domain, self.source_domain]

    def train_period(self, root: DataRoot, domain: str, period: int) -> dict[str, Any]:
        readers = {d: self._reader(root, d, period, train=True)
                   for d in (domain, self.source_domain)}
        order = [d for d, r in readers.items() for _ in range(len(r))]
        np.random.default_rng([self.cfg.train.seed, period]).shuffle(order)
        batches = {d: iter(r) for d, r in readers.items()}
        return self.train_steps(((d, next(batches[d])) for d in order), len(order), domain,
                                period)


def _table_entry(key: str) -> str:
    """A fused optimiser entry's key (`<table>.momentum1`) as the tower names it."""
    table, _, rest = key.partition(".")
    for sfx in SUFFIXES:
        table = table.removesuffix(sfx)
    return f"{table}.{rest}"


def joint_init(cfg: Config, model: str, source_domain: str, source_ckpt: Path,
               target_ckpt: Path, run: Path) -> Path:
    """RUN/init: the joint model started from the two single-domain towers' checkpoints
    (parameters and their optimiser state), with the target's seen ids."""
    check_tower_pair(source_ckpt, check_tower_checkpoint(source_ckpt, cfg, "source"),
                     target_ckpt, check_tower_checkpoint(target_ckpt, cfg, "target"),
                     source_domain)
    trainer = JointTrainer(cfg, init_distributed(cfg.train.device), model, source_domain)
    net, state = trainer.dmp.module, trainer.state()
    shared_from = SOURCE if cfg.experiment.shared_table_rows == "source" else TARGET
    loaded = 0
    for task, ckpt in ((SOURCE, source_ckpt), (TARGET, target_ckpt)):
        saved = saved_entries(ckpt)
        widened = net.widened_inputs(task)

        def key_of(key: str, task: int = task, saved: dict[str, Any] = saved) -> str | None:
            """The tower's key, where it has this entry in the same shape."""
            found = net.warm_start_key(key, shared_from)
            if found is None or found[0] != task:
                return None
            entry = saved.get(f"model.{found[1]}")
            shape = getattr(entry, "size", None)
            return found[1] if shape is not None and \
                tuple(shape) == tuple(state["model"][key].size()) else None

        loaded += load_mapped(ckpt, state, key_of, _table_entry)
        if widened is not None:
            key = f"towers.{task}.{FIRST_LAYER}"
            load_widened(ckpt, state, key, FIRST_LAYER, widened)
            loaded += 1
    trainer.load_state(state)
    log.info("%s: %d of %d state entries from the warm-up towers", model, loaded,
             len(state["model"]))
    trainer.seen = read_seen_ids(target_ckpt)
    return trainer.save_init(run, source_ckpt, target_ckpt)

