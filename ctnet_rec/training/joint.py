"""Training the joint-learning baselines: each period, the target domain's and the source
domain's data of that period, batches of the two interleaved in a seeded random order (the same
on every rank), each batch scored by its own task's head.

They start, where the architecture allows, from the warm-up checkpoints (the paper: "reuse as
many parameters as possible"): a task's own tables and tower from its domain's single-domain
tower, the shared tables and PLE's bottom from the target's; the rest (PLE's experts, gates
and task towers, DDTCDR's mapping) starts fresh."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel

from ctnet_rec.config import Config
from ctnet_rec.modules.joint import JOINT_MODELS, SOURCE, TARGET
from ctnet_rec.modules.joint.common import SUFFIXES
from ctnet_rec.training.checkpoint import Manifest, load_mapped, read_seen_ids
from ctnet_rec.training.distributed import DistEnv, init_distributed
from ctnet_rec.training.trainer import PeriodTrainer
from ctnet_rec.training.transfer import check_tower_checkpoint, save_init
from sharding.tower import shard_model

log = logging.getLogger(__name__)

JOINT = "joint"


class JointTrainer(PeriodTrainer):
    """PeriodTrainer for a model of `JOINT_MODELS`, reading `source_domain` alongside."""

    def __init__(self, cfg: Config, env: DistEnv, model: str, source_domain: str) -> None:
        self.model_name, self.source_domain = model, source_domain
        self.kind = f"{JOINT}:{model}"
        super().__init__(cfg, env)

    def build_model(self) -> DistributedModelParallel:
        net = JOINT_MODELS[self.model_name](self.cfg.features, self.cfg.model,
                                            torch.device("meta"))
        return shard_model(net, self.env, self.cfg.train.tables.lr, sharding=self.cfg.sharding)

    def logits(self, batch: Any, domain: str) -> torch.Tensor:
        task = SOURCE if domain == self.source_domain else TARGET
        return self.dmp(batch.sparse, batch.dense, task).logits

    def manifest(self, period: int, metrics: dict[str, Any],
                 lineage: dict[str, Any]) -> Manifest:
        m = super().manifest(period, metrics, lineage)
        m.lineage = {"source_domain": self.source_domain, **m.lineage}
        return m

    def domains_read(self, domain: str) -> list[str]:
        return [domain, self.source_domain]

    def train_period(self, root: Path, domain: str, period: int) -> dict[str, Any]:
        readers = {d: self._reader(root, d, period, train=True)
                   for d in (domain, self.source_domain)}
        order = [d for d, r in readers.items() for _ in range(len(r))]
        np.random.default_rng([self.cfg.train.seed, period]).shuffle(order)
        batches = {d: iter(r) for d, r in readers.items()}
        return self.train_steps(((d, next(batches[d])) for d in order), len(order), domain,
                                period)


def _tower_key(key: str) -> tuple[int, str] | None:
    """(task, the single-domain tower's key) a joint model's state key starts from, if any:
    `towers.<task>.*` and a task's own tables from that task's tower, the shared tables and
    PLE's `bottom.*` from the target's."""
    parts = key.split(".")
    if parts[0] == "towers":
        return int(parts[1]), ".".join(parts[2:])
    if parts[0] == "bottom":
        return TARGET, ".".join(parts[1:])
    if parts[:2] != ["embeddings", "lookup"]:
        return None
    task = TARGET
    for i, p in enumerate(parts):
        for t, sfx in enumerate(SUFFIXES):
            if p.endswith(sfx):
                task, parts[i] = t, p[: -len(sfx)]
    return task, ".".join(["embeddings", *parts[2:]])


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
    check_tower_checkpoint(source_ckpt, cfg, "source")
    check_tower_checkpoint(target_ckpt, cfg, "target")
    trainer = JointTrainer(cfg, init_distributed(cfg.train.device), model, source_domain)
    state = trainer.state()
    loaded = 0
    for task, ckpt in ((SOURCE, source_ckpt), (TARGET, target_ckpt)):
        saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata

        def key_of(key: str, task: int = task, saved: dict = saved) -> str | None:
            """The tower's key, where it has this entry in the same shape."""
            found = _tower_key(key)
            if found is None or found[0] != task:
                return None
            entry = saved.get(f"model.{found[1]}")
            shape = getattr(entry, "size", None)
            return found[1] if shape is not None and \
                tuple(shape) == tuple(state["model"][key].size()) else None

        loaded += load_mapped(ckpt, state, key_of, _table_entry)
    trainer.load_state(state)
    log.info("%s: %d of %d state entries from the warm-up towers", model, loaded,
             len(state["model"]))
    trainer.seen = read_seen_ids(target_ckpt)
    return save_init(trainer, run, source_ckpt, target_ckpt)

