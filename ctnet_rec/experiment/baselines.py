"""Transfer baselines the paper compares CTNet with, built from the same checkpoints.

The "ID embeddings" are the tables `[experiment] id_embedding_tables` names (the paper's
footnote 3: user, item, category and seller ids).

Dual Embedding: the target model plus the source model's ID embeddings as extra, trainable
features (`DualEmbeddingTower`); the new input columns of the first MLP
layer start at zero, so the model first predicts as the target model does. The dual tables'
row-wise AdaGrad sums start fresh (they are new parameters of this model).

Pre-train & Fine-tune: the source model's parameters replace the target model's, then the
target tower trains on target data. Three depths, as in the paper's Table 2:
- "id": the ID embedding tables (the item and category tables are shared with the behaviour
  sequences, so they move too);
- "embeddings": every embedding table;
- "all": every parameter (attention, MLP, batch-norm statistics included).
The replaced parameters bring their optimiser state along (row-wise AdaGrad sums, dense
AdaGrad state), so that each replaced weight keeps the step sizes it was trained with.
Source and target must share the tower config for this (the paper's setting)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ctnet_rec.config import Config, ConfigError
from ctnet_rec.modules.dual_embedding import DUAL_PREFIX, dual_features
from ctnet_rec.modules.tower import FIRST_LAYER
from ctnet_rec.training.checkpoint import (
    check_tower_checkpoint,
    dcp_load,
    load_into_submodule,
    load_widened,
    read_seen_ids,
    save_init,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import DualEmbeddingTrainer, PeriodTrainer

Depth = Literal["id", "embeddings", "all"]


def replaced_tables(cfg: Config, depth: Depth) -> set[str] | None:
    """Names of the tables a depth replaces (None: everything)."""
    f = cfg.features
    if depth == "all":
        return None
    if depth == "embeddings":
        return {t.name for t in f.tables} | {f"bucket_{n.name}" for n in f.numeric
                                              if n.bucketized}
    return set(cfg.experiment.id_tables(f))


def _selector(tables: set[str] | None) -> Callable[[str], bool]:
    """State keys of those tables: their weights (`embeddings.<collection>.<kind>.<table>.
    weight`) and, for a managed table, its id map (`..._managed_collision_modules.<table>.*`),
    without which the rows would belong to other ids."""
    if tables is None:
        return lambda key: True

    def table_of(key: str) -> str | None:
        parts = key.split(".")
        if parts[0] != "embeddings":
            return None
        if MANAGED_IDS in parts:
            return parts[parts.index(MANAGED_IDS) + 1]
        return parts[-2] if parts[-1] == "weight" else None

    return lambda key: table_of(key) in tables


MANAGED_IDS = "_managed_collision_modules"


def pretrain_finetune_init(cfg: Config, depth: Depth, source_ckpt: Path, target_ckpt: Path,
                           run: Path) -> Path:
    """RUN/init: the target checkpoint with the `depth` parameters of the source checkpoint
    (and their optimiser state); `ctnet train --init RUN/init` then fine-tunes it."""
    check_tower_checkpoint(target_ckpt, cfg, "target")
    try:
        check_tower_checkpoint(source_ckpt, cfg, "source")
    except ValueError as e:
        raise ConfigError(f"Pre-train & Fine-tune needs one tower config for both: {e}") \
            from None
    trainer = PeriodTrainer(cfg, init_distributed(cfg.train.device))
    trainer.restore(target_ckpt)
    state = trainer.state()
    load_into_submodule(source_ckpt, state, "", _selector(replaced_tables(cfg, depth)))
    trainer.load_state(state)
    return save_init(trainer, run, source_ckpt, target_ckpt, replaced=depth)


def _table_key(cfg: Config, table: str) -> str:
    """A tower checkpoint's key of a table's weights."""
    if table in cfg.features.sequence_tables():
        return f"embeddings.sequence.embeddings.{table}.weight"
    return f"embeddings.pooled.embedding_bags.{table}.weight"


def dual_embedding_init(cfg: Config, source_ckpt: Path, target_ckpt: Path, run: Path) -> Path:
    """RUN/init of the Dual Embedding baseline: every target parameter (and optimiser state)
    from the target checkpoint, the `dual_` tables from the source's user and item tables,
    zeros in the first MLP layer's new columns."""
    check_tower_checkpoint(target_ckpt, cfg, "target")
    check_tower_checkpoint(source_ckpt, cfg, "source")
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
    return save_init(trainer, run, source_ckpt, target_ckpt)
