"""How each model kind trains and deploys, in one table: its trainer, and how RUN/init is
made from a source and a target tower checkpoint. The kinds themselves and how each one's
module is built live in `ctnet_rec/modules/kinds.py` (below sharding/, so planning builds
them too)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ctnet_rec.config import Config, ConfigError
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.files import PathArg
from ctnet_rec.modules.dual_embedding import DUAL_PREFIX, dual_features
from ctnet_rec.modules.kinds import CTNET, DUAL_EMBEDDING, JOINT, TOWER, kind_names
from ctnet_rec.modules.tower import FIRST_LAYER
from ctnet_rec.training.checkpoint import (
    CheckpointError,
    Manifest,
    check_tower_checkpoint,
    check_tower_pair,
    dcp_load,
    lineage_path,
    load_into_submodule,
    load_widened,
    read_seen_ids,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.joint import JointTrainer, joint_init
from ctnet_rec.training.trainer import DualEmbeddingTrainer, PeriodTrainer
from ctnet_rec.training.transfer import CTNetTrainer, transfer_init


@dataclass(frozen=True)
class Deployment:
    """A model kind and what it needs besides its config: CTNet's source tower config, a
    joint model's source domain (the manifest of its checkpoints records both)."""

    kind: str  # "tower", "ctnet", "dual_embedding", "joint:<model>"
    source_cfg: Config | None = None
    source_domain: str | None = None

    @property
    def joint_model(self) -> str:
        return self.kind.split(":", 1)[1]


def _table_key(cfg: Config, table: str) -> str:
    """A tower checkpoint's key of a table's weights."""
    if table in cfg.features.sequence_tables():
        return f"embeddings.sequence.embeddings.{table}.weight"
    return f"embeddings.pooled.embedding_bags.{table}.weight"


def dual_embedding_init(cfg: Config, source_ckpt: Path, target_ckpt: Path, run: Path) -> Path:
    """RUN/init of the Dual Embedding baseline (the target model plus the source model's ID
    embeddings as extra, trainable features): every target parameter (and optimiser state)
    from the target checkpoint, the `dual_` tables from the source's ID tables, zeros in the
    first MLP layer's new columns (so it first predicts as the target model does); the dual
    tables' row-wise AdaGrad sums start fresh."""
    target = check_tower_checkpoint(target_ckpt, cfg, "target")
    check_tower_pair(source_ckpt, check_tower_checkpoint(source_ckpt, cfg, "source"),
                     target_ckpt, target)
    trainer = DualEmbeddingTrainer(cfg, init_distributed(cfg.train.device))
    state = trainer.state()
    load_into_submodule(target_ckpt, state, "",
                        lambda k: not k.startswith("dual.") and k != FIRST_LAYER)
    load_widened(target_ckpt, state, FIRST_LAYER, FIRST_LAYER,
                 trainer.dmp.module.new_columns)
    model = state["model"]
    request = {_table_key(cfg, table): model[f"dual.embedding_bags.{DUAL_PREFIX}{table}.weight"]
               for _, table in dual_features(cfg.features, trainer.dual_tables())}
    dcp_load({"model": request}, source_ckpt)
    trainer.load_state(state)
    trainer.seen = read_seen_ids(target_ckpt)
    return trainer.save_init(run, source_ckpt, target_ckpt)


def check_deployed_from(init: Path, source_ckpt: Path, target_ckpt: Path) -> None:
    """Refuse RUN/init deployed from other checkpoints than `source_ckpt` and `target_ckpt`
    (a run reused with other ones: it would go on from its first deployment)."""
    lineage = Manifest.read(init).lineage
    was = [lineage_path(init, lineage.get(f"{role}_checkpoint", "")) for role in ("source",
                                                                                  "target")]
    if was != [source_ckpt.resolve(), target_ckpt.resolve()]:
        raise CheckpointError(f"{init}: deployed from {was[0]} and {was[1]}, not from "
                              f"{source_ckpt} and {target_ckpt}; deploy into a new run")


Trainer = Callable[[Config, DistEnv, Deployment], PeriodTrainer]
Deploy = Callable[[Config, Deployment, Path, Path, Path], Path]

T = TypeVar("T")


def recorded(value: T | None, kind: str) -> T:
    """What a kind's deployment needs besides its config (CTNet's source config, a joint
    model's source domain), which its manifest records."""
    if value is None:
        raise ConfigError(f"a {kind} model needs its source tower's config (CTNet) or source "
                          "domain (a joint model); its manifest records them")
    return value


# kind -> (its trainer, how RUN/init deploys it from a source and a target tower checkpoint)
KINDS: dict[str, tuple[Trainer, Deploy | None]] = {
    TOWER: (lambda cfg, env, d: PeriodTrainer(cfg, env), None),
    CTNET: (lambda cfg, env, d: CTNetTrainer(cfg, recorded(d.source_cfg, d.kind), env),
            lambda cfg, d, source, target, run: transfer_init(cfg, source, target, run,
                                                              d.source_cfg)),
    DUAL_EMBEDDING: (lambda cfg, env, d: DualEmbeddingTrainer(cfg, env),
                     lambda cfg, d, source, target, run: dual_embedding_init(
                         cfg, source, target, run)),
    JOINT: (lambda cfg, env, d: JointTrainer(cfg, env, d.joint_model,
                                             recorded(d.source_domain, d.kind)),
            lambda cfg, d, source, target, run: joint_init(
                cfg, d.joint_model, recorded(d.source_domain, d.kind), source, target, run)),
}


def _entry(kind: str) -> tuple[Trainer, Deploy | None]:
    if kind not in kind_names():
        raise ConfigError(f"unknown model kind {kind!r}; kinds: {kind_names()}")
    return KINDS[kind.split(":", 1)[0]]


def trainer_for(deployment: Deployment, cfg: Config, env: DistEnv) -> PeriodTrainer:
    return _entry(deployment.kind)[0](cfg, env, deployment)


def deploy(deployment: Deployment, cfg: Config, source_ckpt: PathArg, target_ckpt: PathArg,
           run: PathArg) -> Path:
    """RUN/init of `deployment`'s model from the two tower checkpoints."""
    init = _entry(deployment.kind)[1]
    if init is None:
        raise ConfigError(f"a {deployment.kind} is trained, not deployed from two towers")
    return init(cfg, deployment, Path(source_ckpt), Path(target_ckpt), Path(run))
