"""Optimiser settings per parameter group: what each optimiser's first step does, warm-up,
state that checkpoints can hold, and the config's refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ctnet_rec.config import ConfigError, OptimizerConfig, config_from_dict
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.optim import GroupOptimizer
from sharding.tower import shard_model

DIM, LR = 8, 0.01


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(num_embeddings=10, embedding_dim=DIM, name="t",
                                       feature_names=["f"])], device=torch.device("meta"))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt)["f"]


def _row_step(scale: float) -> torch.Tensor:
    """The change of row 3 of a fresh table after one fused row-wise AdaGrad step on the
    loss scale * <embedding, v>."""
    env = init_distributed("cpu")
    torch.manual_seed(0)
    dmp = shard_model(_Bag(), env, LR)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3]), torch.tensor([1]))
    weight = next(p for n, p in dmp.named_parameters() if n.endswith("t.weight"))
    before = weight.detach().clone()
    v = torch.linspace(-1, 1, DIM)
    (scale * (dmp(kjt) * v).sum()).backward()
    return (weight.detach() - before)[3]


def test_fused_table_adagrad_first_step_has_length_lr_sqrt_dim_whatever_the_gradient():
    """fbgemm's row-wise AdaGrad keeps one sum of squared gradients per row, from 0: the first
    update of a row is lr * g / rms(g), of length lr * sqrt(dim), for a gradient of any size.
    (What docs/training.md, "Deploying without harm", says of the tables.)"""
    small, large = _row_step(1e-2), _row_step(1e2)
    for step in (small, large):
        assert step.norm().item() == pytest.approx(LR * math.sqrt(DIM), rel=1e-3)
    torch.testing.assert_close(small, large, rtol=1e-3, atol=1e-7)


def test_a_table_warm_up_scales_the_fused_steps_and_is_saved():
    """`[train.tables] warmup_steps`: TorchRec's WarmupOptimizer around DMP's fused optimiser;
    the kernels apply the ramped lr (a fresh row's first step is lr / 4 * sqrt(dim) with 4
    warm-up steps), and only the warm-up's count joins the saved state (the tables' own is
    DMP's)."""
    env = init_distributed("cpu")
    torch.manual_seed(0)
    dmp = shard_model(_Bag(), env, LR)
    opt = GroupOptimizer({}, (dmp.fused_optimizer, LR, 4))
    weight = next(p for n, p in dmp.named_parameters() if n.endswith("t.weight"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([3]), torch.tensor([1]))
    lengths = []
    for _ in range(2):
        opt.zero_grad()
        before = weight.detach().clone()
        dmp(kjt).sum().backward()
        lengths.append((weight.detach() - before)[3].norm().item())
        opt.step()
    assert lengths[0] == pytest.approx(LR / 4 * math.sqrt(DIM), rel=1e-3)
    # the same gradient again: the lr of step 2 of the ramp, over AdaGrad's doubled sum
    assert lengths[1] == pytest.approx(LR * (0.25 + 0.75 / 4) * math.sqrt(DIM / 2), rel=1e-3)
    state = opt.state_by_name()
    assert list(state) == ["__warmup/tables"] and state["__warmup/tables"]["warmup"].tolist() \
        == [2, 0]
    again = GroupOptimizer({}, (dmp.fused_optimizer, LR, 4))
    again.load_state_by_name(state)
    assert again.lr("tables") == pytest.approx(opt.lr("tables"))


def _linear_step(cfg: OptimizerConfig, grad: float) -> float:
    torch.manual_seed(0)
    layer = nn.Linear(4, 1, bias=False)
    opt = GroupOptimizer({"g": ([("w", layer.weight)], cfg)})
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.full_like(layer.weight, grad)
    opt.step()
    return (layer.weight.detach() - before).abs().max().item()


def test_adagrad_initial_accumulator_makes_the_first_step_proportional_to_the_gradient():
    zero = OptimizerConfig("adagrad", lr=LR, initial_accumulator=0.0)
    tf_like = OptimizerConfig("adagrad", lr=LR, initial_accumulator=0.1)
    # from 0: a step of lr for a gradient of 1e-4 as for one of 1
    assert _linear_step(zero, 1e-4) == pytest.approx(LR, rel=1e-3)
    assert _linear_step(zero, 1.0) == pytest.approx(LR, rel=1e-3)
    # from 0.1: lr * g / sqrt(0.1 + g^2)
    assert _linear_step(tf_like, 1e-4) == pytest.approx(LR * 1e-4 / math.sqrt(0.1), rel=1e-3)


@pytest.mark.parametrize("name", ["adagrad", "sgd"])
def test_warm_up_ramps_the_lr_and_a_resumed_run_goes_on_with_it(name):
    """TorchRec's linear warm-up: lr / warmup_steps at the first step, lr from step
    `warmup_steps` on. Its step count is saved with the state, so a new optimiser given the
    state goes on where the old one was, also for SGD, which keeps no state of its own."""
    layer = nn.Linear(4, 1)
    cfg = OptimizerConfig(name, lr=0.1, warmup_steps=4)
    opt = GroupOptimizer({"g": (list(layer.named_parameters()), cfg)})
    lrs = []
    for _ in range(6):
        lrs.append(opt.lr("g"))  # the lr this step uses
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert lrs == pytest.approx([0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1])
    half = GroupOptimizer({"g": (list(layer.named_parameters()), cfg)})
    for _ in range(2):
        half.step()
    again = GroupOptimizer({"g": (list(layer.named_parameters()), cfg)})
    assert again.lr("g") == pytest.approx(0.025)
    again.load_state_by_name(half.state_by_name())
    assert again.lr("g") == pytest.approx(0.0625)  # the third step's, not the first's
    assert set(again.state_by_name()) == {"weight", "bias", "__warmup/g"}


def test_one_group_steps_alone_and_the_groups_are_torchrecs():
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    opt = GroupOptimizer({"a": (list(a.named_parameters()), OptimizerConfig("sgd", lr=1.0)),
                          "b": (list(b.named_parameters()), OptimizerConfig("sgd", lr=1.0))})
    assert isinstance(opt, CombinedOptimizer) and \
        all(isinstance(g, KeyedOptimizer) for g in opt.groups.values())
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    for p in (*a.parameters(), *b.parameters()):
        p.grad = torch.ones_like(p)
    opt.step(only="b")
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(x, y) for x, y in zip(before[:2], after[:2], strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(before[2:], after[2:], strict=True))


def test_every_optimiser_holds_its_state_before_the_first_step():
    """Checkpoints are loaded into the state of a fresh trainer: it must have every entry."""
    layer = nn.Linear(4, 2)
    named = list(layer.named_parameters())
    for name, keys in (("adagrad", {"step", "sum"}), ("adam", {"step", "exp_avg",
                                                                "exp_avg_sq"}), ("sgd", set())):
        state = GroupOptimizer({"g": (named, OptimizerConfig(name, lr=0.01))}).state_by_name()
        assert set(state) == {"weight", "bias"} and set(state["weight"]) == keys, name


def test_config_refuses_old_keys_and_impossible_settings(demo_config):
    import dataclasses

    raw = dataclasses.asdict(demo_config)
    with pytest.raises(ConfigError, match=r"train.dense_lr: renamed: set train.dense.lr"):
        config_from_dict({**raw, "train": {**raw["train"], "dense_lr": 0.01}})
    for bad, match in (({"lr": float("inf")}, "lr: must be a finite number"),
                       ({"optimizer": "adam", "initial_accumulator": 0.1},
                        "initial_accumulator: is AdaGrad's"),
                       ({"warmup_steps": -1}, "warmup_steps: must be >= 0")):
        ctnet = {**raw["ctnet"], "adapter_optimizer": {**raw["ctnet"]["adapter_optimizer"],
                                                       **bad}}
        with pytest.raises(ConfigError, match=f"ctnet.adapter_optimizer.{match}"):
            config_from_dict({**raw, "ctnet": ctnet})


def test_the_adapters_optimiser_is_not_part_of_the_model(demo_config):
    """A CTNet checkpoint reloads under other adapter settings (its config hash ignores them),
    but not under another adapter."""
    import copy

    other = copy.deepcopy(demo_config)
    other.ctnet.adapter_optimizer.lr = 0.5
    assert other.section_hash("ctnet") == demo_config.section_hash("ctnet")
    other.ctnet.adapter = "linear"
    assert other.section_hash("ctnet") != demo_config.section_hash("ctnet")


def test_a_config_recorded_before_the_optimiser_groups_still_loads(demo_config):
    """A checkpoint written with `sparse_lr` / `dense_lr` reopens (eval, predict, resume) with
    the same settings: the dense lr also trained the adapters, from accumulator 0."""
    import dataclasses

    from ctnet_rec.config import recorded_config

    raw = dataclasses.asdict(demo_config)
    train = {k: v for k, v in raw["train"].items() if k not in ("tables", "dense")}
    old = {**raw, "train": {**train, "sparse_lr": 0.05, "dense_lr": 0.02},
           "ctnet": {k: v for k, v in raw["ctnet"].items() if k != "adapter_optimizer"},
           "synth": {**raw["synth"], "domains": {  # the world's knob before domain_gap
               n: {**d, "specific_weight": 0.5} for n, d in raw["synth"]["domains"].items()}}}
    cfg = recorded_config(old)
    assert cfg.train.tables.lr == 0.05 and cfg.train.dense.lr == 0.02
    assert cfg.ctnet.adapter_optimizer == OptimizerConfig("adagrad", lr=0.02,
                                                          initial_accumulator=0.0)
    assert cfg.section_hash("features", "model", "ctnet") == \
        demo_config.section_hash("features", "model", "ctnet")
    assert recorded_config(raw) == demo_config  # a current config passes unchanged


def test_a_checkpoint_carries_the_warm_up_and_one_saved_without_it_still_loads(
        towers, tiny_world, tmp_path):
    """A trainer's dense and table warm-ups are saved with its checkpoint and go on after a
    restore; a checkpoint saved without them (the towers trained without warm-up) loads under
    a config with them, whose warm-ups then start from their first step."""
    import copy

    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.trainer import PeriodTrainer

    cfg = copy.deepcopy(towers.cfg)
    cfg.train.dense.warmup_steps = cfg.train.tables.warmup_steps = 50
    trainer = PeriodTrainer(cfg, init_distributed("cpu"))
    trainer.restore(towers.target(1))
    first = {"dense": cfg.train.dense.lr / 50, "tables": cfg.train.tables.lr / 50}
    for group, lr in first.items():
        assert trainer.dense_opt.lr(group) == pytest.approx(lr)
    trainer.train_period(tiny_world, "B", 2)  # 3 steps
    trainer.save(tmp_path / "ckpt", 2, {})
    again = PeriodTrainer(cfg, init_distributed("cpu"))
    again.restore(tmp_path / "ckpt")
    for group, lr in first.items():
        assert trainer.dense_opt.lr(group) > lr
        assert again.dense_opt.lr(group) == pytest.approx(trainer.dense_opt.lr(group))


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_checkpoint_of_version_0_1_loads_scores_as_it_did_and_trains_on(tiny_world):
    """`fixtures/checkpoint-0.1.0`: a small tower trained by ctnet-rec 0.1.0 (its own
    optimisers, no warm-up state saved although its config has a dense warm-up) on the tiny
    world, with the scores that version gave B's period 2. This version loads it, scores
    the same rows to 1e-6, and trains on from it (its warm-up from the first step)."""
    from ctnet_rec.config import load_config
    from ctnet_rec.training.trainer import PeriodTrainer

    old = FIXTURES / "checkpoint-0.1.0"
    cfg = load_config(old / "config.toml")
    trainer = PeriodTrainer(cfg, init_distributed("cpu"))
    assert trainer.restore(old / "period=1").period == 1
    np.testing.assert_allclose(trainer.predict(tiny_world, "B", 2)["p"],
                               np.load(old / "scores_B_period2.npy"), rtol=0, atol=1e-6)
    assert trainer.dense_opt.lr("dense") == pytest.approx(cfg.train.dense.lr / 4)
    metrics = trainer.train_period(tiny_world, "B", 2)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_rows"] == 600
