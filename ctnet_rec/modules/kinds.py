"""The model kinds a checkpoint can hold, by the name its manifest records, with how each
one's unsharded module is built: the one table training, planning and export build from."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ctnet_rec.config import Config
from ctnet_rec.modules.ctnet import CTNet, build_ctnet
from ctnet_rec.modules.dual_embedding import DualEmbeddingTower
from ctnet_rec.modules.joint import JOINT_MODELS
from ctnet_rec.modules.tower import Tower

TOWER, CTNET, DUAL_EMBEDDING, JOINT = "tower", "ctnet", "dual_embedding", "joint"


@dataclass(frozen=True)
class ModelSpec:
    """A model as a manifest records it: its kind ("joint:<model>" for a joint-learning
    baseline), its config and, for CTNet, the source tower's config."""

    kind: str
    cfg: Config
    source_cfg: Config | None = None

    @property
    def family(self) -> str:
        return self.kind.split(":", 1)[0]


def _ctnet(spec: ModelSpec, device: torch.device) -> nn.Module:
    if spec.source_cfg is None:
        raise ValueError("a CTNet needs its source tower's config")
    s, t = spec.source_cfg, spec.cfg
    return build_ctnet((s.features, s.model), (t.features, t.model), t.ctnet, device,
                       t.sharding.source_table_dtype)


def _joint(spec: ModelSpec, device: torch.device) -> nn.Module:
    name = spec.kind.split(":", 1)[1] if ":" in spec.kind else ""
    if name not in JOINT_MODELS:
        raise ValueError(f"model kind {spec.kind!r}: joint models are "
                         f"{[f'{JOINT}:{m}' for m in JOINT_MODELS]}")
    return JOINT_MODELS[name](spec.cfg.features, spec.cfg.model, device)


BUILDERS: dict[str, Callable[[ModelSpec, torch.device], nn.Module]] = {
    TOWER: lambda spec, device: Tower(spec.cfg.features, spec.cfg.model, device=device),
    CTNET: _ctnet,
    DUAL_EMBEDDING: lambda spec, device: DualEmbeddingTower(
        spec.cfg.features, spec.cfg.model, spec.cfg.experiment.id_tables(spec.cfg.features),
        device=device),
    JOINT: _joint,
}


def kind_names() -> list[str]:
    """Every kind a model can be built as."""
    return [TOWER, CTNET, DUAL_EMBEDDING, *(f"{JOINT}:{m}" for m in JOINT_MODELS)]


def build_module(spec: ModelSpec, device: torch.device) -> nn.Module:
    """`spec`'s model, unsharded, its parameters on `device` ("meta": to be sharded or
    planned). ValueError for an unknown kind or configs that do not fit together."""
    if spec.family not in BUILDERS:
        raise ValueError(f"unknown model kind {spec.kind!r}; kinds: {kind_names()}")
    return BUILDERS[spec.family](spec, device)


def frozen_part(module: nn.Module) -> nn.Module | None:
    """The part of a model whose tables are read-only (CTNet's source tower), if any."""
    return module.source if isinstance(module, CTNet) else None
