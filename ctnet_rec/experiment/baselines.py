"""Transfer baselines the paper compares CTNet with, built from the same checkpoints.

Pre-train & Fine-tune: the source model's parameters replace the target model's, then the
target tower trains on target data. Three depths, as in the paper's Table 2:
- "id": the user and item ID embedding tables (the item table is shared with the behaviour
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
from ctnet_rec.training.checkpoint import load_into_submodule
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import PeriodTrainer
from ctnet_rec.training.transfer import INIT, check_tower_checkpoint

Depth = Literal["id", "embeddings", "all"]


def replaced_tables(cfg: Config, depth: Depth) -> set[str] | None:
    """Names of the tables a depth replaces (None: everything)."""
    f = cfg.features
    if depth == "all":
        return None
    if depth == "embeddings":
        return {t.name for t in f.tables} | {f"bucket_{n.name}" for n in f.numeric
                                              if n.bucketized}
    columns = {f.user_column, f.item_column}
    return {x.table for x in f.id_features if x.column in columns}


def _selector(tables: set[str] | None) -> Callable[[str], bool]:
    """State keys of those tables' weights: `embeddings.<collection>.<kind>.<table>.weight`."""
    if tables is None:
        return lambda key: True
    return lambda key: key.startswith("embeddings.") and key.endswith(".weight") and \
        key.split(".")[-2] in tables


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
    target = trainer.restore(target_ckpt)
    state = trainer.state()
    load_into_submodule(source_ckpt, state, "", _selector(replaced_tables(cfg, depth)))
    trainer.load_state(state)
    folder = run / INIT
    trainer.save(folder, target.period, {}, {
        "target_checkpoint": str(target_ckpt.resolve()),
        "source_checkpoint": str(source_ckpt.resolve()), "replaced": depth})
    return folder
