"""Deploying CTNet from two single-domain checkpoints (the start of Algorithm 1)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from ctnet_rec.config import Config
from ctnet_rec.modules.ctnet import CTNet
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.checkpoint import Manifest, load_into_submodule
from ctnet_rec.training.distributed import DistEnv
from ctnet_rec.training.trainer import TOWER, feature_schema
from sharding.tower import shard_model


def check_tower_checkpoint(folder: Path, cfg: Config, role: str) -> Manifest:
    """Refuse a checkpoint that does not fit the tower it is meant for, naming the role."""
    manifest = Manifest.read(folder)
    try:
        manifest.check_compatible(TOWER, cfg.section_hash("features", "model"),
                                  feature_schema(cfg), folder)
    except ValueError as e:
        raise type(e)(f"{role} checkpoint: {e}") from None
    return manifest


def build_ctnet(source_cfg: Config, target_cfg: Config, env: DistEnv,
                source_ckpt: Path, target_ckpt: Path) -> DistributedModelParallel:
    """CTNet under DMP with the source tower loaded from `source_ckpt` (read-only tables) and
    every target parameter from `target_ckpt`; only the adapters are new."""
    check_tower_checkpoint(source_ckpt, source_cfg, "source")
    check_tower_checkpoint(target_ckpt, target_cfg, "target")
    torch.manual_seed(target_cfg.train.seed)
    meta = torch.device("meta")
    net = CTNet(Tower(source_cfg.features, source_cfg.model, device=meta),
                Tower(target_cfg.features, target_cfg.model, device=meta), target_cfg.ctnet)
    dmp = shard_model(net, env, target_cfg.train.sparse_lr, frozen=net.source)
    state = dmp.state_dict()
    load_into_submodule(source_ckpt, state, "source.")
    load_into_submodule(target_ckpt, state, "target.")
    dmp.load_state_dict(state)
    return dmp
