"""Tensors made on the way: on CUDA, a tensor made without `device=` lands on the CPU and
meets the model's CUDA tensors in the next op, which fails (or copies every step). The CPU
suite cannot see that directly, so it makes the default device "meta" while a model trains
and scores: a tensor made without a device is then a meta tensor, and the first op that
meets it with the model's (CPU) tensors fails, as it would on a GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ctnet_rec.config import Config
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.modules.kinds import CTNET, kind_names
from ctnet_rec.training.deployments import Deployment, trainer_for
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.trainer import PeriodTrainer
from ctnet_rec.training.transfer import CTNetTrainer

from .conftest import write_tower_config

# model kinds, and the options whose code runs only when set
CASES = {kind: (kind, "") for kind in kind_names()} | {
    "ctnet, managed ids": (CTNET, "managed"),
    "ctnet, shared long-sequence attention": (CTNET, "shared"),
    "ctnet, the source on its own long-sequence interests": (CTNET, "own"),
    "ctnet, the source on the target's long-sequence interests": (CTNET, "target"),
    "tower, DIN unit": ("tower", "din"),
}


def _config(base: Config, option: str) -> Config:
    cfg = copy.deepcopy(base)
    if option == "managed":
        cfg.features.id_policy = "managed"
    elif option == "shared":
        cfg.ctnet.share_long_sequence_attention = True
        cfg.ctnet.source_long_interest = "own"
    elif option in ("own", "target"):
        cfg.ctnet.source_long_interest = option  # type: ignore[assignment]
    elif option == "din":
        cfg.model.short_sequence = "din"
    return cfg


def _trainer(kind: str, cfg: Config) -> PeriodTrainer:
    env = init_distributed("cpu")
    if kind == CTNET:  # an untrained source of the same config: the code runs the same
        return CTNetTrainer(cfg, cfg, env)
    # the tiny world's smallest domain as a joint model's other task: the code runs the same
    return trainer_for(Deployment(kind, source_domain="C"), cfg, env)


@pytest.fixture(scope="module")
def tower_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return write_tower_config(tmp_path_factory.mktemp("cfg") / "small.toml")


@pytest.mark.parametrize("case", CASES)
def test_training_and_scoring_make_no_tensor_off_the_models_device(
        case: str, tower_config: Config, tiny_world: Path) -> None:
    kind, option = CASES[case]
    trainer = _trainer(kind, _config(tower_config, option))  # optimiser state made up front
    torch.set_default_device("meta")
    try:
        if isinstance(trainer, CTNetTrainer):
            trainer.fit_output_fusion(tiny_world, "B", 1)
            trainer.adapter_pass(tiny_world, "B", 1)
        metrics = trainer.train_period(tiny_world, "B", 1)
        scores = trainer.predict(tiny_world, "B", 2)
        served = _served_scores(trainer, tiny_world)
    finally:
        torch.set_default_device(None)
    assert metrics["train_rows"] > 0
    assert scores is not None and len(scores["p"]) > 0
    assert torch.isfinite(torch.from_numpy(scores["p"])).all()
    assert all(torch.isfinite(p).all() for p in served)


def _served_scores(trainer: PeriodTrainer, root: Path) -> list[torch.Tensor]:
    """What an exported artifact runs (the unsharded model behind `Scorer`, its tables in
    fp32 and in TorchRec's int8 inference modules) on one batch."""
    from torchrec.inference.modules import quantize_inference_model

    with torch.device("cpu"):  # built and quantised as export does, on the host
        scorer = trainer.scorer(trainer.build_module(torch.device("cpu"))).eval()
        int8 = quantize_inference_model(copy.deepcopy(scorer), quantization_dtype=torch.qint8)
    cfg = trainer.cfg
    batch = next(iter(ParquetBatchReader(root, "B", [2], cfg.features, cfg.data,
                                         batch_size=64, seed=0)))
    with torch.inference_mode():
        return [m(batch.sparse, batch.dense) for m in (scorer, int8)]


def test_a_tensor_made_without_a_device_is_caught(tower_config: Config, tiny_world: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails when a model's code makes a tensor without its device."""
    trainer = _trainer("tower", tower_config)
    net = trainer.dmp.module
    forward = type(net).forward

    def careless(self, sparse, dense):  # type: ignore[no-untyped-def]
        return forward(self, sparse, dense + torch.zeros(dense.shape[1]))

    monkeypatch.setattr(type(net), "forward", careless)
    torch.set_default_device("meta")
    try:
        with pytest.raises(RuntimeError, match="meta"):
            trainer.predict(tiny_world, "B", 2)
    finally:
        torch.set_default_device(None)
