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


def _different_towers(demo_config):
    """A source and a target tower of other seeds and other MLP widths, in eval mode."""
    torch.manual_seed(1)
    src_model = copy.deepcopy(demo_config.model)
    src_model.mlp_hidden = [48, 40, 24]
    source = Tower(demo_config.features, src_model).eval()
    torch.manual_seed(2)
    return source, Tower(demo_config.features, demo_config.model).eval()


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


@pytest.mark.parametrize(("tap", "adapter", "long_interest"), [
    ("same_layer", "glu", "own"), ("previous_layer", "glu", "own"),
    ("same_layer", "linear", "own"), ("same_layer", "glu", "target_for_adapters"),
    ("previous_layer", "glu", "target_for_adapters")])
def test_eq4_and_eq5_by_hand_with_different_towers(demo_config, batches, tap, adapter,
                                                   long_interest):
    """z_l = psi(BN(W_l z_{l-1}) + g_l(z^S_tap)), g(x) = (U1 x) * sigmoid(U2 x) (or U1 x),
    computed step by step from the two towers' own outputs (with "target_for_adapters", the
    source's states on the target's A_SIM/A_ETA). The towers differ (other seeds, other
    widths), so an adapter wired to the target's states, to another layer, or with the gate
    on the wrong branch gives other logits."""
    source, target = _different_towers(demo_config)
    net = CTNet(source, target, CTNetConfig(adapter=adapter, adapter_tap=tap,
                                            source_long_interest=long_interest)).eval()
    torch.manual_seed(3)
    for p in net.adapters.parameters():  # far from the near-zero start: every term counts
        torch.nn.init.normal_(p, std=0.3)
    b = batches[0]
    with torch.no_grad():
        z, interest = target.embed(b.sparse, b.dense)
        if long_interest == "own":
            src = source(b.sparse, b.dense)
            states = [src.inputs, *src.hidden]
        else:
            e, _ = source.embed(b.sparse, b.dense, long_interest=interest)
            states = [e, *source.mlp(e)[1]]
        taps = [1, 2, 3] if tap == "same_layer" else [0, 1, 2]
        mlp = target.mlp
        for layer, (lin, bn) in enumerate(zip(mlp.linears, mlp.norms, strict=True)):
            a, x = net.adapters[layer], states[taps[layer]]
            g = a.value(x) * torch.sigmoid(a.gate(x)) if adapter == "glu" else a.value(x)
            z = mlp.act(bn(lin(z)) + g)
        want = mlp.out(z).squeeze(-1)
        got = net(b.sparse, b.dense).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - target(b.sparse, b.dense).logits).abs().mean() > 0.01  # adapters matter
        net.use_adapters = False  # what `ctnet eval --zero-adapters` scores: the target alone
        torch.testing.assert_close(net(b.sparse, b.dense).logits,
                                   target(b.sparse, b.dense).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("long_interest", ["own", "target_for_adapters"])
def test_the_towers_share_the_ids_positions_only_where_they_make_the_same(
        demo_config, batches, monkeypatch, long_interest):
    """CTNet makes a batch's behaviour positions (length groups, SIM's selection) once for
    both towers when they read the same ids with the same sequence settings: one call a
    step, and the same scores, bit for bit, in training and in eval, as when each tower makes
    its own. Towers with other sequence settings make their own."""
    source, target = _different_towers(demo_config)
    net = CTNet(source, target, CTNetConfig(source_long_interest=long_interest))
    # the tower that runs first makes its own first
    apart = [source, target] if long_interest == "own" else [target, source]
    assert net.share_positions
    made = []
    make = Tower.behaviour_positions
    monkeypatch.setattr(Tower, "behaviour_positions",
                        lambda tower, sparse: made.append(tower) or make(tower, sparse))
    b = batches[0]
    for mode in (True, False):
        net.train(mode)
        net.share_positions = True
        shared = net(b.sparse, b.dense).logits
        assert made == [target]
        net.share_positions = False
        own = net(b.sparse, b.dense).logits
        assert made == [target, *apart]
        assert torch.equal(shared, own)
        made.clear()
    other = copy.deepcopy(demo_config.model)
    other.sim_top_k = 8
    assert not CTNet(Tower(demo_config.features, other), target, CTNetConfig()).share_positions


def test_the_frozen_source_runs_after_its_lookups_in_inference_mode(demo_config, batches):
    """No autograd records for the frozen source's dense part (its time as scoring spends
    it), and the adapters still train on its states."""
    source, target = _towers(demo_config)
    net = CTNet(source, target, CTNetConfig()).train()
    modes: list[bool] = []
    source.mlp.register_forward_pre_hook(
        lambda *_: modes.append(torch.is_inference_mode_enabled()))
    b = batches[0]
    torch.nn.functional.binary_cross_entropy_with_logits(
        net(b.sparse, b.dense).logits, b.labels).backward()
    assert modes == [True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.adapters.parameters())


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
    adapter_before = net.adapters[0].value.weight.detach().clone()
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
    moved = (net.adapters[0].value.weight.detach() - adapter_before).abs().max()
    assert moved > 100 * adapter_before.abs().max()  # trained far beyond its 1e-5 start


def _local(t):
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") and t.local_shards() \
        else t


def test_sharded_source_tables_are_read_only(demo_config, batches):
    """Under DistributedModelParallel: the source tables hold no optimiser state and stay
    bit-identical while CTNet trains; the target tables do move."""
    from ctnet_rec.training.distributed import init_distributed
    from sharding.tower import dense_parameters, shard_model

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
        opt.step()
    after = dmp.state_dict()
    source_keys = [k for k in snap if k.startswith("source.")]
    assert any("embedding" in k for k in source_keys)
    assert all(torch.equal(snap[k], _local(after[k])) for k in source_keys)
    moved = [k for k in snap if k.startswith("target.") and "embedding" in k
             and not torch.equal(snap[k], _local(after[k]))]
    assert moved


def test_shared_long_sequence_attention_equals_computing_it_twice(demo_config, batches):
    """With identical long-sequence modules in both towers, reusing the source's A_SIM/A_ETA
    gives the outputs of computing them again, and the target's own modules never run."""
    source, target = _towers(demo_config)
    target.load_state_dict(source.state_dict())  # same tables and attention weights
    torch.manual_seed(3)
    twice = CTNet(source, target, CTNetConfig(source_long_interest="own")).eval()
    once = CTNet(copy.deepcopy(source), copy.deepcopy(target),
                 CTNetConfig(share_long_sequence_attention=True,
                             source_long_interest="own")).eval()
    once.adapters.load_state_dict(twice.adapters.state_dict())
    calls = []
    for m in (once.target.sim, once.target.eta):
        m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(once(b.sparse, b.dense).logits,
                                       twice(b.sparse, b.dense).logits, rtol=0, atol=1e-6)
    assert calls == []
    assert once.source.sim is not None and once.target.sim is not None


def test_shared_attention_refused_when_towers_differ(demo_config):
    source, target = _towers(demo_config)
    no_eta = copy.deepcopy(demo_config.model)
    no_eta.use_eta = False
    source = Tower(demo_config.features, no_eta)
    with pytest.raises(ValueError, match="same long-sequence modules"):
        CTNet(source, target, CTNetConfig(share_long_sequence_attention=True,
                                          source_long_interest="own"))


@pytest.mark.parametrize("source_top_k", [None, 8])
def test_a_source_reusing_the_target_long_sequence_keeps_the_target(demo_config, batches,
                                                                      source_top_k):
    """`source_long_interest = "target"`: a fresh CTNet still predicts as the target; the
    source's long-sequence units never run and its long-sequence ids are never looked up; the
    target's units get their gradients, through the target alone. `source_top_k`: the
    source's own SIM depth (its ids' positions then made apart from the target's)."""
    source, target = _towers(demo_config)
    if source_top_k:
        source.model_cfg = copy.deepcopy(source.model_cfg)
        source.model_cfg.sim_top_k = source_top_k
    net = CTNet(source, target, CTNetConfig(source_long_interest="target"))
    assert net.share_positions == (source_top_k is None)
    calls = []
    for m in (net.source.sim, net.source.eta):
        m.register_forward_hook(lambda *a: calls.append(1))
    target.eval()
    net.eval()
    long = demo_config.features.sequences[1]
    short = demo_config.features.sequences[0].item_column
    with torch.no_grad():
        for b in batches:
            viewed = net.view(b.sparse, b.dense)[0]
            assert viewed[long.item_column].lengths().sum() == 0
            assert viewed[long.category_column].lengths().sum() == 0
            assert torch.equal(viewed[short].values(), b.sparse[short].values())
            want = torch.sigmoid(target(b.sparse, b.dense).logits)
            assert (torch.sigmoid(net(b.sparse, b.dense).logits) - want).abs().max() < 1e-4
    assert calls == []
    net.train()
    net(batches[0].sparse, batches[0].dense).logits.sum().backward()
    assert all(p.grad is not None for m in (net.target.sim, net.target.eta)
               for p in m.parameters())
    assert all(p.grad is None for p in net.source.parameters())


def test_a_source_reusing_the_target_long_sequence_reads_the_target_interests(demo_config,
                                                                              batches):
    """With towers of the same weights, the source's outputs and CTNet's (adapters made
    large, so that the source's states move the logits) are those of each tower computing
    its own long-sequence interests."""
    source, target = _towers(demo_config)
    target.load_state_dict(source.state_dict())
    torch.manual_seed(3)
    twice = CTNet(source, target, CTNetConfig(source_long_interest="own")).eval()
    for p in twice.adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    once = CTNet(copy.deepcopy(source), copy.deepcopy(target),
                 CTNetConfig(source_long_interest="target")).eval()
    once.adapters.load_state_dict(twice.adapters.state_dict())
    with torch.no_grad():
        for b in batches:
            parts = [net.output_parts(b.sparse, b.dense) for net in (once, twice)]
            torch.testing.assert_close(*parts, rtol=0, atol=1e-5)
            assert (parts[1][:, 0] - target(b.sparse, b.dense).logits).abs().max() > 1e-2


def test_the_adapters_source_states_on_the_target_interests(demo_config, batches):
    """`source_long_interest = "target_for_adapters"`: in training, what "target" computes
    (no long-sequence work in the source, its long ids unread); in scoring, the same adapter
    outputs (the states of the source on the target's interests) with the source's own logit
    ("own"'s), its long ids read; a fresh CTNet scores as the target."""
    torch.manual_seed(5)
    source, target = _different_towers(demo_config)
    nets = {}
    for mode in ("own", "target", "target_for_adapters"):
        torch.manual_seed(3)
        nets[mode] = CTNet(copy.deepcopy(source), copy.deepcopy(target),
                           CTNetConfig(source_long_interest=mode))
    for p in nets["own"].adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for net in nets.values():
        net.adapters.load_state_dict(nets["own"].adapters.state_dict())
    hybrid = nets["target_for_adapters"]
    calls = []
    for m in (hybrid.source.sim, hybrid.source.eta):
        m.register_forward_hook(lambda *a: calls.append(1))
    long = demo_config.features.sequences[1].item_column
    b = batches[0]
    with torch.no_grad():
        hybrid.train()
        nets["target"].train()
        assert hybrid.view(b.sparse, b.dense)[0][long].lengths().sum() == 0
        torch.testing.assert_close(hybrid(b.sparse, b.dense).logits,
                                   nets["target"](b.sparse, b.dense).logits, rtol=0, atol=0)
        assert calls == []
        for net in nets.values():
            net.eval()
        assert torch.equal(hybrid.view(b.sparse, b.dense)[0][long].values(),
                           b.sparse[long].values())
        parts = {mode: net.output_parts(b.sparse, b.dense) for mode, net in nets.items()}
        assert calls == [1, 1]
    torch.testing.assert_close(parts["target_for_adapters"][:, 0], parts["target"][:, 0],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(parts["target_for_adapters"][:, 1], parts["own"][:, 1],
                               rtol=0, atol=1e-6)
    assert (parts["own"][:, 0] - parts["target"][:, 0]).abs().max() > 1e-3
    assert (parts["own"][:, 1] - parts["target"][:, 1]).abs().max() > 1e-4
    fresh = CTNet(source, target, CTNetConfig(source_long_interest="target_for_adapters",
                                              output_fusion=True)).eval()
    fresh.fusion_weight.fill_(0.0)
    with torch.no_grad():
        want = torch.sigmoid(target(b.sparse, b.dense).logits)
        assert (torch.sigmoid(fresh(b.sparse, b.dense).logits) - want).abs().max() < 1e-4
    # without the output fusion nothing reads the source's logit: no long-sequence work
    unfused = CTNet(source, target, CTNetConfig(source_long_interest="target_for_adapters",
                                                output_fusion=False)).eval()
    calls.clear()
    for m in (unfused.source.sim, unfused.source.eta):
        m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert unfused.view(b.sparse, b.dense)[0][long].lengths().sum() == 0
        unfused(b.sparse, b.dense)
    assert calls == []


def test_each_tower_reading_the_other_long_sequence_is_refused(demo_config):
    source, target = _towers(demo_config)
    with pytest.raises(ValueError, match="choose one"):
        CTNet(source, target, CTNetConfig(share_long_sequence_attention=True,
                                          source_long_interest="target"))
    no_long = copy.deepcopy(demo_config.model)
    no_long.use_sim = no_long.use_eta = False
    with pytest.raises(ValueError, match="source_long_interest = 'target' needs the same"):
        CTNet(source, Tower(demo_config.features, no_long),
              CTNetConfig(source_long_interest="target"))
    # towers without SIM and ETA: nothing to read, the source's own (none) is used
    net = CTNet(Tower(demo_config.features, no_long), Tower(demo_config.features, no_long),
                CTNetConfig(source_long_interest="target_for_adapters"))
    assert net.long_interest == "own" and not net.view.unread


def _source_schema(demo_config):
    """The demo features plus a `shop_id` only the source has, without `seller_id`."""
    from ctnet_rec.config import IdFeatureConfig, TableConfig

    f = copy.deepcopy(demo_config.features)
    f.tables.append(TableConfig("shop", 50, 8))
    f.id_features = [x for x in f.id_features if x.name != "seller_id"]
    f.id_features.append(IdFeatureConfig("shop_id", "shop"))
    return f


def test_source_only_features_are_empty_and_target_only_ignored(demo_config, batches):
    features = _source_schema(demo_config)
    source = Tower(features, demo_config.model)
    target = Tower(demo_config.features, demo_config.model)
    net = CTNet(source, target, CTNetConfig()).eval()
    b = batches[0]
    kjt, dense = net.view(b.sparse, b.dense)
    assert kjt.keys() == features.sparse_keys()
    assert "seller_id" not in kjt.keys()
    assert kjt["shop_id"].lengths().sum() == 0 and len(kjt["shop_id"].lengths()) == len(b)
    torch.testing.assert_close(kjt["item_id"].values(), b.sparse["item_id"].values())
    assert dense.shape == b.dense.shape
    with torch.no_grad():
        assert torch.isfinite(net(b.sparse, b.dense).logits).all()


def test_shared_feature_mapped_differently_is_refused(demo_config):
    features = copy.deepcopy(demo_config.features)
    features.table("item").num_embeddings = 1_200_000
    with pytest.raises(ValueError, match=r"feature '\w*item\w*'.*1200000.*100000"):
        CTNet(Tower(features, demo_config.model, device=torch.device("meta")),
              Tower(demo_config.features, demo_config.model, device=torch.device("meta")),
              CTNetConfig())


def test_a_bucketised_numeric_with_other_boundaries_is_refused(demo_config):
    """Same bucket count, other boundaries: the source would read the wrong buckets."""
    features = copy.deepcopy(demo_config.features)
    price = next(n for n in features.numeric if n.name == "price")
    price.boundaries = [b * 2 for b in price.boundaries]
    with pytest.raises(ValueError, match=r"feature 'price'.*bucket.*10\.0, 20\.0.*5\.0, 10\.0"):
        CTNet(Tower(features, demo_config.model, device=torch.device("meta")),
              Tower(demo_config.features, demo_config.model, device=torch.device("meta")),
              CTNetConfig())


def test_the_source_view_maps_dense_columns_by_name(demo_config, batches):
    """The source reads the target's dense columns by name: a column only the target has is
    dropped, one only the source has arrives as zeros, shared ones in the source's order."""
    from ctnet_rec.config import NumericFeatureConfig
    from ctnet_rec.modules.ctnet import SourceView

    source, target = copy.deepcopy(demo_config.features), copy.deepcopy(demo_config.features)
    source.numeric += [NumericFeatureConfig(name="age"), NumericFeatureConfig(name="income")]
    target.numeric += [NumericFeatureConfig(name="income"), NumericFeatureConfig(name="clicks"),
                       NumericFeatureConfig(name="age")]
    view = SourceView(source, target)
    assert not view.same_schema and view.dense_index == [2, 0]
    b = batches[0]
    dense = torch.arange(len(b) * 3, dtype=torch.float32).reshape(len(b), 3)  # income, clicks, age
    kjt, got = view(b.sparse, dense)
    torch.testing.assert_close(got, torch.stack([dense[:, 2], dense[:, 0]], 1))
    assert kjt.keys() == source.sparse_keys()
    only_source = copy.deepcopy(source)
    only_source.numeric += [NumericFeatureConfig(name="tenure")]
    _, got = SourceView(only_source, target)(b.sparse, dense)
    assert got.shape == (len(b), 3) and torch.equal(got[:, 2], torch.zeros(len(b)))


def test_both_taps_gates_and_normalised_states_by_hand(demo_config, batches):
    """`adapter_tap = "both"`: layer l adds g_l(z^S_l) + h_l(z^S_{l-1}); `adapter_input_norm`
    layer-normalises each state first; `adapter_gate` scales each adapter by its own learned
    scalar. Fresh, it predicts as the target; by hand with every weight far from its start."""
    source, target = _different_towers(demo_config)
    cfg = CTNetConfig(adapter_tap="both", adapter_gate=True, adapter_input_norm=True,
                      source_long_interest="own")
    net = CTNet(source, target, cfg).eval()
    b = batches[0]
    with torch.no_grad():
        fresh = net(b.sparse, b.dense).logits
        assert (torch.sigmoid(fresh) - torch.sigmoid(target(b.sparse, b.dense).logits)
                ).abs().max() < 1e-4
    names = {n for n, _ in net.named_parameters() if not n.startswith(("source.", "target."))}
    assert {"adapters.0.scale", "input_adapters.2.scale", "input_adapters.0.value.weight"} <= names
    assert [a.value.in_features for a in net.input_adapters][1:] == [48, 40]
    torch.manual_seed(3)
    for p in [*net.adapters.parameters(), *net.input_adapters.parameters()]:
        torch.nn.init.normal_(p, std=0.3)

    def g(a, x):
        x = torch.nn.functional.layer_norm(x, x.shape[-1:])
        return a.scale * a.value(x) * torch.sigmoid(a.gate(x))

    with torch.no_grad():
        src = source(b.sparse, b.dense)
        states = [src.inputs, *src.hidden]
        z, _ = target.embed(b.sparse, b.dense)
        mlp = target.mlp
        for layer, (lin, bn) in enumerate(zip(mlp.linears, mlp.norms, strict=True)):
            add = g(net.adapters[layer], states[layer + 1]) + \
                g(net.input_adapters[layer], states[layer])
            z = mlp.act(bn(lin(z)) + add)
        torch.testing.assert_close(net(b.sparse, b.dense).logits, mlp.out(z).squeeze(-1),
                                   rtol=0, atol=1e-5)


def test_the_default_adapters_keep_their_parameter_names(demo_config):
    """Checkpoints of CTNets made before the gate and the second tap existed load as they
    are: the default model has exactly the adapter parameters it always had."""
    source, target = _towers(demo_config)
    net = CTNet(source, target, CTNetConfig())
    names = [n for n, _ in net.named_parameters() if not n.startswith(("source.", "target."))]
    layers = len(demo_config.model.mlp_hidden)
    assert names == [f"adapters.{i}.{lin}.{p}" for i in range(layers)
                     for lin in ("value", "gate") for p in ("weight", "bias")]
    assert net.input_adapters is None
