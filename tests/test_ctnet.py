from __future__ import annotations

import copy

import pytest
import torch

from ctnet_rec.config import CTNetConfig
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.modules.adapters import GLUAdapter, LinearAdapter
from ctnet_rec.modules.ctnet import CTNet
from ctnet_rec.modules.tower import Tower


@pytest.fixture(scope="module")
def batches(tiny_world, demo_config):
    reader = ParquetBatchReader(tiny_world, "B", [2, 3], demo_config.features, demo_config.data,
                                batch_size=256, seed=1)
    return list(reader)[:3]


def _towers(demo_config, source_hidden=None):
    torch.manual_seed(0)
    source_model = copy.deepcopy(demo_config.model)
    if source_hidden:
        source_model.mlp_hidden = source_hidden
    return Tower(demo_config.features, source_model), Tower(demo_config.features, demo_config.model)


def test_fresh_ctnet_predicts_as_the_target(demo_config, batches):
    source, target = _towers(demo_config)
    target.eval()
    b = batches[0]
    want = torch.sigmoid(target(b.sparse, b.dense).logits)
    net = CTNet(source, target, CTNetConfig()).eval()
    got = torch.sigmoid(net(b.sparse, b.dense).logits)
    assert (got - want).abs().max() < 1e-4
    assert not torch.equal(got, want)  # the adapters are there, just small


@pytest.mark.parametrize(("tap", "first_in"), [("same_layer", 256), ("previous_layer", None)])
def test_adapter_taps(demo_config, tap, first_in):
    source, target = _towers(demo_config)
    net = CTNet(source, target, CTNetConfig(adapter_tap=tap))
    e_dim = source.mlp.linears[0].in_features
    assert net.adapters[0].value.in_features == (first_in or e_dim)
    assert [a.value.out_features for a in net.adapters] == demo_config.model.mlp_hidden
    assert all(isinstance(a, GLUAdapter) for a in net.adapters)


def test_linear_variant_and_deeper_target_refused(demo_config):
    source, target = _towers(demo_config)
    net = CTNet(source, target, CTNetConfig(adapter="linear"))
    assert all(isinstance(a, LinearAdapter) for a in net.adapters)
    shallow, _ = _towers(demo_config, source_hidden=[32])
    with pytest.raises(ValueError, match="source MLP has 1 hidden layers, the target 3"):
        CTNet(shallow, target, CTNetConfig())
    two, _ = _towers(demo_config, source_hidden=[64, 32])
    with pytest.raises(ValueError, match=r"need source states \[1, 2, 3\]"):
        CTNet(two, target, CTNetConfig())
    net = CTNet(two, target, CTNetConfig(adapter_tap="previous_layer"))  # E^S, z^S_1, z^S_2
    assert [a.value.in_features for a in net.adapters][1:] == [64, 32]


def test_source_stays_frozen_while_ctnet_trains(demo_config, batches):
    source, target = _towers(demo_config, source_hidden=[128, 64, 32])
    before = {k: v.clone() for k, v in source.state_dict().items()}
    net = CTNet(source, target, CTNetConfig()).train()
    assert not source.training and all(not p.requires_grad for p in source.parameters())
    opt = torch.optim.Adagrad([p for p in net.parameters() if p.requires_grad], lr=0.05)
    for b in batches:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(b.sparse, b.dense).logits, b.labels)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in source.parameters())
        assert net.adapters[0].value.weight.grad.abs().sum() > 0
        opt.step()
    after = source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not torch.equal(net.adapters[0].value.weight, net.adapters[0].value.weight * 0)


def _local(t):
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") and t.local_shards() \
        else t


def test_sharded_source_tables_are_read_only(demo_config, batches):
    """Under DistributedModelParallel: the source tables hold no optimiser state and stay
    bit-identical while CTNet trains; the target tables do move."""
    from ctnet_rec.training.distributed import init_distributed
    from sharding.tower import average_dense_gradients, dense_parameters, shard_model

    env = init_distributed("cpu")
    torch.manual_seed(0)
    meta = torch.device("meta")
    source = Tower(demo_config.features, demo_config.model, device=meta)
    target = Tower(demo_config.features, demo_config.model, device=meta)
    net = CTNet(source, target, CTNetConfig())
    dmp = shard_model(net, env, sparse_lr=0.05, frozen=net.source)
    state = dmp.fused_optimizer.state_dict()["state"]
    assert all(state[k] == {} for k in state if k.startswith("source."))  # no optimiser state
    assert any(state[k] for k in state if k.startswith("target."))  # row-wise AdaGrad sums
    snap = {k: _local(v).clone() for k, v in dmp.state_dict().items()}
    dense = dense_parameters(dmp)
    assert all(not n.startswith("source.") for n, p in dmp.named_parameters()
               if any(p is d for d in dense))
    opt = torch.optim.Adagrad(dense, lr=0.05)
    dmp.train()
    for b in batches:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            dmp(b.sparse, b.dense).logits, b.labels)
        opt.zero_grad()
        loss.backward()
        average_dense_gradients(dense, env.world_size)
        opt.step()
    after = dmp.state_dict()
    source_keys = [k for k in snap if k.startswith("source.")]
    assert any("embedding" in k for k in source_keys)
    assert all(torch.equal(snap[k], _local(after[k])) for k in source_keys)
    moved = [k for k in snap if k.startswith("target.") and "embedding" in k
             and not torch.equal(snap[k], _local(after[k]))]
    assert moved


@pytest.fixture(scope="module")
def tower_checkpoints(tiny_world, demo_config, tmp_path_factory):
    from ctnet_rec.training.trainer import train_continual

    cfg = copy.deepcopy(demo_config)
    cfg.model.mlp_hidden = [32, 16]
    cfg.data.batch_size = 256
    root = tmp_path_factory.mktemp("towers")
    train_continual(cfg, tiny_world, "A", [0, 1], root / "A")
    train_continual(cfg, tiny_world, "B", [0, 1], root / "B")
    return cfg, root / "A" / "checkpoints" / "period=1", root / "B" / "checkpoints" / "period=1"


def test_ctnet_deployed_from_checkpoints_predicts_as_the_target(tower_checkpoints, tiny_world):
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.trainer import PeriodTrainer
    from ctnet_rec.training.transfer import build_ctnet

    cfg, source_ckpt, target_ckpt = tower_checkpoints
    env = init_distributed("cpu")
    dmp = build_ctnet(cfg, cfg, env, source_ckpt, target_ckpt).eval()
    base, source = PeriodTrainer(cfg, env), PeriodTrainer(cfg, env)
    base.restore(target_ckpt)
    source.restore(source_ckpt)
    base.dmp.eval()
    source.dmp.eval()
    reader = ParquetBatchReader(tiny_world, "B", [2], cfg.features, cfg.data, batch_size=600,
                                shuffle=False)
    with torch.no_grad():
        for b in reader:
            got = torch.sigmoid(dmp(b.sparse, b.dense).logits)
            want = torch.sigmoid(base.dmp(b.sparse, b.dense).logits)
            assert (got - want).abs().max() < 1e-4
            # the source tower inside CTNet is exactly the A model
            inner = dmp.module.source(b.sparse, b.dense).logits
            torch.testing.assert_close(inner, source.dmp(b.sparse, b.dense).logits,
                                       rtol=0, atol=0)


def test_mismatched_checkpoints_are_refused_naming_the_role(tower_checkpoints):
    from ctnet_rec.training.checkpoint import CheckpointError
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.transfer import build_ctnet

    cfg, source_ckpt, target_ckpt = tower_checkpoints
    other = copy.deepcopy(cfg)
    other.features.tables[1].num_embeddings = 777
    env = init_distributed("cpu")
    with pytest.raises(CheckpointError, match=r"source checkpoint: .*schema differs.*777"):
        build_ctnet(other, cfg, env, source_ckpt, target_ckpt)
    with pytest.raises(CheckpointError, match=r"target checkpoint: .*schema differs.*777"):
        build_ctnet(cfg, other, env, source_ckpt, target_ckpt)
