"""What the joint-learning baselines share: both domains' tables in one lookup, and two tasks.

Each baseline is one network with two tasks, the source domain's CTR and the target's, trained
on both domains' data of the same window (its documented cost: source samples are read every
period). Both domains share one feature schema (the experiment's). A table is either shared by
the two tasks or copied per task (`<table>__s`, `<table>__t`); all of them live in one
TowerEmbeddings, so `sharding/` shards them like any tower's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig, IdFeatureConfig, TowerConfig
from ctnet_rec.modules.embeddings import LookedUp, TowerEmbeddings
from ctnet_rec.modules.tower import Tower, TowerOutput

SOURCE, TARGET = 0, 1
SUFFIXES = ("__s", "__t")  # a task's copy of a table, and its keys


def joint_features(features: FeatureConfig, shared: set[str]) -> FeatureConfig:
    """Both tasks' features in one schema: keys renamed per task; tables in `shared` serve both
    tasks, every other table (and bucket table) has one copy per task."""

    def table(name: str, task: int) -> str:
        return name if name in shared else name + SUFFIXES[task]

    tasks = list(enumerate(SUFFIXES))
    return dataclasses.replace(
        features,
        tables=[t for t in features.tables if t.name in shared] + [
            dataclasses.replace(t, name=t.name + sfx) for _, sfx in tasks
            for t in features.tables if t.name not in shared],
        id_features=[IdFeatureConfig(name=f.name + sfx, table=table(f.table, task),
                                     column=f.column)
                     for task, sfx in tasks for f in features.id_features],
        sequences=[dataclasses.replace(
            s, name=s.name + sfx, item_column=s.item_column + sfx,
            category_column=s.category_column + sfx, item_table=table(s.item_table, task),
            category_table=table(s.category_table, task))
            for task, sfx in tasks for s in features.sequences],
        numeric=[dataclasses.replace(n, name=n.name + sfx) for _, sfx in tasks
                 for n in features.numeric if n.bucketized])


class JointEmbeddings(nn.Module):
    """One lookup of a row's ids in one task's tables (shared or its own), by the row's keys.

    `cross` keys are also looked up in the other task's tables (DDTCDR and DASL map one
    domain's representation of an id into the other's)."""

    def __init__(self, features: FeatureConfig, shared: set[str],
                 device: torch.device | None = None, cross: Iterable[str] = ()) -> None:
        super().__init__()
        self.lookup = TowerEmbeddings(joint_features(features, shared), device)
        self.routes = [(k, k[:-3], SUFFIXES.index(k[-3:]))
                       for k in self.lookup.pooled_keys + self.lookup.sequence_keys]
        self.cross = set(cross)

    def forward(self, kjt: KeyedJaggedTensor, task: int) -> tuple[LookedUp, LookedUp]:
        """`task`'s embeddings of the row's ids, and the other task's of the `cross` keys."""
        jts = kjt.to_dict()
        empty = JaggedTensor(values=kjt.values()[:0], lengths=torch.zeros(
            kjt.stride(), dtype=kjt.lengths().dtype, device=kjt.lengths().device))
        wanted = {k: task == t or key in self.cross for k, key, t in self.routes}
        pooled, seq = self.lookup(KeyedJaggedTensor.from_jt_dict(
            {k: jts[key] if wanted[k] else empty for k, key, _ in self.routes}))
        out: tuple[LookedUp, LookedUp] = (({}, {}), ({}, {}))
        for k, key, t in self.routes:
            if wanted[k]:
                mine = out[0 if t == task else 1]
                if k in pooled:
                    mine[0][key] = pooled[k]
                else:
                    mine[1][key] = seq[k]
        return out


class JointModel(nn.Module):
    """A two-task network: `forward(sparse, dense, task)` scores rows of the task's domain
    (by default the target's, so evaluation and prediction score the target).

    It starts from the two single-domain towers where its architecture allows (the paper:
    "reuse as many parameters as possible"): `warm_start_key` names, for a state key, the
    task whose tower it starts from and that tower's key."""

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                task: int = TARGET) -> TowerOutput:
        raise NotImplementedError

    def warm_start_key(self, key: str, shared_from: int = TARGET) -> tuple[int, str] | None:
        """(task, the single-domain tower's key) that state `key` starts from, None when it
        starts fresh: `towers.<task>.*` from that task's tower, a task's own tables from its
        tower, the tables both tasks share from `shared_from`'s."""
        parts = key.split(".")
        if parts[0] == "towers":
            return int(parts[1]), ".".join(parts[2:])
        if parts[:2] != ["embeddings", "lookup"]:
            return None
        task = shared_from
        for i, p in enumerate(parts):
            for t, sfx in enumerate(SUFFIXES):
                if p.endswith(sfx):
                    task, parts[i] = t, p[: -len(sfx)]
        return task, ".".join(["embeddings", *parts[2:]])

    def widened_inputs(self, task: int) -> slice | None:
        """The input columns of `task`'s first MLP layer that its tower lacks (they start at
        zero, the others from the tower), or None when the shapes agree."""
        return None


HEAD = partial(Tower, lookups=False)  # a tower fed by the joint lookup


class OwnOrOther(nn.Module):
    """e = (1 - w) own + w other, with a learned weight w per table that starts at 0: the
    two domains' tables were trained apart, so the other's embedding (even carried over by a
    map) is noise to a tower until the map and the weight have learned it."""

    def __init__(self, tables: list[str], device: torch.device | None = None) -> None:
        super().__init__()
        self.index = {t: i for i, t in enumerate(tables)}
        # one parameter of this module's own: DistributedModelParallel materialises a meta
        # module by its reset_parameters, which only reaches the parameters it holds directly
        self.weight = nn.Parameter(torch.zeros(len(tables), device=device))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, table: str, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        w = self.weight[self.index[table]]
        return (1 - w) * own + w * other


class TaskTowers(JointModel):
    """A tower per task (attention units and MLP, the towers' sizes), with the tables in
    `shared` serving both tasks and the others one task each."""

    def __init__(self, features: FeatureConfig, model: TowerConfig, shared: set[str],
                 device: torch.device | None = None, cross: Iterable[str] = (),
                 tower: Callable[..., Tower] = HEAD) -> None:
        super().__init__()
        self.embeddings = JointEmbeddings(features, shared, device, cross)
        self.towers = nn.ModuleList(tower(features, model, device) for _ in SUFFIXES)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                task: int = TARGET) -> TowerOutput:
        mine, _ = self.embeddings(sparse, task)
        return self.towers[task](sparse, dense, looked_up=mine)


def user_tables(features: FeatureConfig) -> set[str]:
    return {f.table for f in features.id_features if f.column == features.user_column}
