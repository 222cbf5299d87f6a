"""Pre-train & Fine-tune, the transfer baseline the paper compares CTNet with that reuses a
tower checkpoint as another domain's (Dual Embedding is a model kind of its own:
`ctnet_rec/training/deployments.py`).

The "ID embeddings" are the tables `[experiment] id_embedding_tables` names (the paper's
footnote 3: user, item, category and seller ids).

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
from ctnet_rec.training.checkpoint import (
    check_tower_checkpoint,
    load_into_submodule,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import PeriodTrainer

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
    return trainer.save_init(run, source_ckpt, target_ckpt, replaced=depth)


