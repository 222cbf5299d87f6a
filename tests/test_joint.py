"""The joint-learning baselines as modules: what each task shares with the other, by the
identity of the parameters a task's loss reaches; the warm-up initialisation; a 2-rank run."""

from __future__ import annotations

import functools
import json
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctnet_rec.cli import main
from ctnet_rec.config import JointBaseline
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.modules.joint import JOINT_MODELS, SOURCE, TARGET
from ctnet_rec.modules.joint.common import OwnOrOther, joint_features
from ctnet_rec.training.checkpoint import complete_checkpoints
from ctnet_rec.training.inference import open_checkpoint
from ctnet_rec.training.joint import JointTrainer, joint_init
from ctnet_rec.training.loop import train_continual

from .conftest import two_rank_cli

TABLES = {"user", "item", "category", "seller", "age_group", "hour"}


@pytest.fixture(scope="module")
def batch(tiny_world, demo_config):
    reader = ParquetBatchReader(tiny_world, "B", [0], demo_config.features, demo_config.data,
                                batch_size=64, seed=0)
    return next(iter(reader))


def _reached(model: torch.nn.Module, batch, task: int) -> set[str]:
    """Names of the parameters the task's loss gives a nonzero gradient."""
    model.zero_grad()
    out = model(batch.sparse, batch.dense, task)
    F.binary_cross_entropy_with_logits(out.logits, batch.labels).backward()
    return {n for n, p in model.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def _tables(names: set[str]) -> set[str]:
    """The tables among parameter names (`...embeddings.<table>.weight`)."""
    return {n.split(".")[-2] for n in names if n.startswith("embeddings.lookup.")}


def test_the_config_names_every_joint_model():
    assert list(JOINT_MODELS) == list(typing.get_args(JointBaseline))


# what the two tasks' losses both reach: tables by name, other parameters by prefix
SHARED = {
    "MLP++": ({"user"}, set()),  # the user embeddings only
    "Share Bottom": (TABLES, set()),  # every id table; towers apart
    "MiNet": (TABLES, set()),
    "PLE": (TABLES, {"bottom", "levels.0.shared_experts", "levels.0.task_experts",
                     "levels.0.shared_gate", "levels.1.shared_experts"}),
    # both domains' user tables (each task reads the other's through the map) and the map
    "DDTCDR": ({"user__s", "user__t"}, {"mapping", "mix"}),
    "DASL": ({f"{t}__{s}" for t in ("user", "item", "category") for s in "st"},
             {"maps", "mix"}),
}


@pytest.mark.parametrize("name", list(JOINT_MODELS))
def test_what_the_two_tasks_share_is_what_the_model_claims(name, demo_config, batch):
    torch.manual_seed(0)
    model = JOINT_MODELS[name](demo_config.features, demo_config.model).train()
    for m in model.modules():  # the other domain's weight, as after some training (it starts
        if isinstance(m, OwnOrOther):  # at 0, where the other's tables get no gradient)
            torch.nn.init.constant_(m.weight, 0.5)
    source, target = _reached(model, batch, SOURCE), _reached(model, batch, TARGET)
    both = source & target
    tables, prefixes = SHARED[name]
    assert _tables(both) == tables
    others = {n for n in both if not n.startswith("embeddings.")}
    assert {p for p in prefixes if any(n.startswith(p + ".") for n in others)} == prefixes
    assert all(any(n.startswith(p + ".") for p in prefixes) for n in others), \
        sorted(others)
    # each task has id tables of its own exactly when not every id table is shared (the
    # bucketised numerics' tables are every task's own)
    own = [{t for t in _tables(a - b) if not t.startswith("bucket_")}
           for a, b in ((target, source), (source, target))]
    assert bool(own[0]) == bool(own[1]) == (tables != TABLES), own


def test_share_bottom_uses_one_table_per_feature_and_mlp_plus_plus_copies_all_but_users(
        demo_config):
    users = joint_features(demo_config.features, {"user"})
    names = {t.name for t in users.tables}
    assert "user" in names and not {"user__s", "user__t"} & names
    assert {"item__s", "item__t", "seller__s", "seller__t"} <= names
    every = joint_features(demo_config.features, TABLES)
    assert {t.name for t in every.tables} == TABLES




@pytest.fixture(scope="module")
def base_scores(towers, tiny_world):
    base, _ = open_checkpoint(towers.target(1))
    return base.predict(tiny_world, "B", 2)["p"]


@pytest.mark.parametrize("name", list(JOINT_MODELS))
def test_joint_model_starts_where_the_target_model_is(name, towers, tiny_world, tmp_path,
                                                      base_scores):
    """Before any joint training, the target task scores B's rows as the target tower does
    (within 1e-4, every row), so a row's later gain or loss is the joint training's, not a
    bad start."""
    init = joint_init(towers.cfg, name, "A", towers.source(1), towers.target(1), tmp_path)
    joint, _ = open_checkpoint(init)
    gap = np.abs(joint.predict(tiny_world, "B", 2)["p"] - base_scores)
    print(f"{name}: |score - Base| at deployment: max {gap.max():.2e}, mean {gap.mean():.2e}")
    assert gap.max() < 1e-4


def test_joint_training_reads_both_domains_and_counts_them(towers, tiny_world, tmp_path):
    init = joint_init(towers.cfg, "Share Bottom", "A", towers.source(1), towers.target(1),
                      tmp_path)
    metrics = train_continual(towers.cfg, tiny_world, "B", [2], tmp_path, init=init,
                              trainer_cls=functools.partial(JointTrainer, model="Share Bottom",
                                                            source_domain="A"))
    rows = metrics[-1]["train_rows_by_domain"]
    assert rows == {"A": 8000, "B": 600} and metrics[-1]["train_rows"] == 600
    assert set(metrics[-1]["train_loss_by_domain"]) == {"A", "B"}
    assert sorted(complete_checkpoints(tmp_path)) == [2]
    # its own domain as the source: refused before the run is touched (it trained the source
    # task on B's rows, the target task not at all)
    for init_from in ([], ["--init-from", str(towers.source(1)), str(towers.target(1))]):
        assert main(["train", "--joint", "PLE", "--source-domain", "B", "--config",
                     str(towers.config_path), "--data", str(tiny_world), "--domain", "B",
                     "--periods", "2", "--run", str(tmp_path / "same"), *init_from]) == 2
        assert not (tmp_path / "same").exists()


def test_a_run_deployed_from_other_towers_is_not_reused_in_silence(towers, tiny_world, tmp_path,
                                                                     caplog):
    """`--init-from` into a run deployed by an earlier call: it goes on from that deployment,
    so other towers than its own are refused (they were ignored)."""
    common = ["train", "--joint", "Share Bottom", "--source-domain", "A", "--config",
              str(towers.config_path), "--data", str(tiny_world), "--domain", "B",
              "--run", str(tmp_path / "run")]
    assert main([*common, "--periods", "2", "--init-from", str(towers.source(1)),
                 str(towers.target(1))]) == 0
    assert main([*common, "--periods", "2:4", "--resume", "--init-from", str(towers.source(1)),
                 str(towers.target(1))]) == 0  # the same towers: goes on
    assert main([*common, "--periods", "2:4", "--resume", "--init-from",
                 str(towers.source(0)), str(towers.target(1))]) == 2
    assert f"not from {towers.source(0)} and {towers.target(1)}; deploy into a new run" in \
        caplog.text


def test_towers_that_cannot_be_a_source_and_a_target_are_refused(towers, tmp_path):
    """Either checkpoint given twice, the two swapped, a source of a later period than the
    target (it has seen the periods scored next): refused before anything is written, for
    the joint models and Dual Embedding as for CTNet."""
    from ctnet_rec.training.checkpoint import CheckpointError
    from ctnet_rec.training.deployments import dual_embedding_init

    a1, a2, b1 = towers.source(1), towers.source(2), towers.target(1)
    cases = [((a1, a1), "both trained on domain 'A'"), ((b1, b1), "both trained on domain 'B'"),
             ((b1, a1), "trained on domain 'A', the source domain"),
             ((a2, b1), "through period 2, after the target's 1")]
    for (source, target), message in cases:
        with pytest.raises(CheckpointError, match=message):
            joint_init(towers.cfg, "PLE", "A", source, target, tmp_path / "ple")
        if "the source domain" not in message:  # Dual Embedding has no source domain
            with pytest.raises(CheckpointError, match=message):
                dual_embedding_init(towers.cfg, source, target, tmp_path / "dual")
    with pytest.raises(CheckpointError, match="trained on domain 'A', not the source domain 'C'"):
        joint_init(towers.cfg, "PLE", "C", a1, b1, tmp_path / "ple")
    assert not (tmp_path / "ple").exists() and not (tmp_path / "dual").exists()


def test_two_rank_joint_training_from_the_command_line(towers, tiny_world, tmp_path):
    """`ctnet train --joint` under torchrun with 2 gloo ranks: both domains' rows are read once
    over the ranks, and the checkpoint reloads at 1 rank (`open_checkpoint`, as `ctnet eval`
    does) to the 2-rank job's scores."""
    run = tmp_path / "joint"
    two_rank_cli("train", "--joint", "Share Bottom", "--source-domain", "A", "--init-from",
                 str(towers.source(1)), str(towers.target(1)), "--config",
                 str(towers.config_path), "--data", str(tiny_world), "--domain", "B",
                 "--periods", "2:4", "--run-dir", str(run))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_rows_by_domain"] for r in records] == [{"A": 8000, "B": 600}] * 2
    trainer, manifest = open_checkpoint(run / "checkpoints" / "period=2")
    assert manifest.kind == "joint:Share Bottom" and manifest.world_size == 2
    again = trainer.evaluate(tiny_world, "B", 3)
    assert again["auc"] == pytest.approx(records[0]["eval"]["auc"], abs=1e-9)


def test_ple_gates_start_routed_and_stay_trainable():
    """The source task's gates start on its own experts, the shared gates away from the
    source task's experts; the target task's start even (all its experts are the target's
    layer); every gate is a trainable parameter."""
    import torch

    from ctnet_rec.config import load_config
    from ctnet_rec.modules.joint.common import SOURCE, TARGET
    from ctnet_rec.modules.joint.ple import PLE

    from .conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    ple = PLE(cfg.features, cfg.model, torch.device("meta"))
    for level in ple.levels:
        src = torch.softmax(level.task_gates[SOURCE].bias, 0)
        assert src[0] > 1 - 1e-4  # its own expert
        tgt = torch.softmax(level.task_gates[TARGET].bias, 0)
        assert torch.allclose(tgt, torch.full_like(tgt, 1 / len(tgt)))
        if level.shared_gate is not None:
            shared = torch.softmax(level.shared_gate.bias, 0)
            assert shared[0] < 1e-5  # the source task's expert
        assert all(p.requires_grad for g in (*level.task_gates, level.shared_gate)
                   if g is not None for p in g.parameters())


def test_the_orthogonal_map_is_orthogonal_and_its_inverse_maps_back():
    """DDTCDR's and DASL's map: the identity at deployment; once trained (any skew part),
    still orthogonal, so distances are kept and X^T undoes X."""
    from ctnet_rec.modules.joint.orthogonal import OrthogonalMap

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    m = OrthogonalMap(16)
    torch.testing.assert_close(m(x), x)
    with torch.no_grad():
        m.skew.normal_(0, 0.5)
    y = m(x)
    assert (y - x).abs().max() > 0.1  # it moves the embeddings
    eye = torch.eye(16)
    torch.testing.assert_close(m(eye).T @ m(eye), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m(y, inverse=True), x, atol=1e-5, rtol=0)


def test_own_or_other_starts_at_own_and_mixes_by_its_learned_weight():
    own, other = torch.randn(8, 4), torch.randn(8, 4)
    mix = OwnOrOther(["user", "item"])
    assert torch.equal(mix("user", own, other), own)
    with torch.no_grad():
        mix.weight.copy_(torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(mix("user", own, other), 0.75 * own + 0.25 * other)
    assert torch.equal(mix("item", own, other), own)  # a weight per table


def test_ple_gates_start_routed_mix_by_softmax_and_stay_trainable():
    """PLE's level: the source task's gate starts on its own expert, the shared gate away
    from it (e^-12 of the mix elsewhere), the target's even; each output is the softmax-
    weighted sum of its experts; and the routing is a bias, so gradients reach it."""
    from ctnet_rec.modules.joint.ple import ExtractionLayer

    torch.manual_seed(0)
    layer = ExtractionLayer(in_dim=6, width=4, shared=2, per_task=1, top=False, slope=0.1)
    layer.eval()
    xs = [torch.randn(5, 6) for _ in range(3)]  # source task's, target task's, shared
    experts = {name: [e(xs[i]) for e in group] for name, i, group in
               [("source", SOURCE, layer.task_experts[SOURCE]),
                ("target", TARGET, layer.task_experts[TARGET]),
                ("shared", 2, layer.shared_experts)]}
    out = layer(xs, SOURCE)
    torch.testing.assert_close(out[SOURCE], experts["source"][0], atol=1e-4, rtol=0)
    want_shared = (experts["target"][0] + experts["shared"][0] + experts["shared"][1]) / 3
    torch.testing.assert_close(out[2], want_shared, atol=1e-4, rtol=0)
    want_target = sum([experts["target"][0], *experts["shared"]]) / 3
    torch.testing.assert_close(out[TARGET], want_target, atol=1e-6, rtol=0)
    # a gate that has learnt to prefer an expert mixes by the softmax of its logits
    with torch.no_grad():
        layer.task_gates[TARGET].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    w = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    got = layer(xs, TARGET)[TARGET]
    torch.testing.assert_close(got, w[0] * experts["target"][0] + w[1] * experts["shared"][0]
                               + w[2] * experts["shared"][1], atol=1e-6, rtol=0)
    layer.train()
    layer.reset_gates()
    layer(xs, SOURCE)[2].sum().backward()
    assert layer.shared_gate.bias.grad.abs().sum() > 0


def test_minet_weighs_each_interest_by_exp_of_its_score(demo_config, batch, monkeypatch):
    """MiNet's interest-level attention: the long-term (user), target short-term and recent
    cross-domain interests reach the tower scaled by exp(g_i), each its own; the tower's
    other interests (SIM, ETA) unscaled. With g's last layer at zero weight and bias log k,
    each weight is exactly k."""
    import math

    from ctnet_rec.modules.joint.minet import MiNetTower
    from ctnet_rec.modules.tower import Tower

    torch.manual_seed(0)
    model = JOINT_MODELS["MiNet"](demo_config.features, demo_config.model).eval()
    tower = model.towers[TARGET]
    assert isinstance(tower, MiNetTower)
    seen: list[tuple[dict, list]] = []
    combine = Tower.combine

    def spy(self, pooled, emb, target, interests):
        seen.append(({k: v.clone() for k, v in pooled.items()}, [x.clone() for x in interests]))
        return combine(self, pooled, emb, target, interests)

    monkeypatch.setattr(Tower, "combine", spy)
    with torch.no_grad():
        model(batch.sparse, batch.dense, TARGET)  # every weight exp(0) = 1
        for g, k in zip(tower.scores, (2.0, 3.0, 0.5), strict=True):
            g[-1].bias.fill_(math.log(k))
        model(batch.sparse, batch.dense, TARGET)
    (pooled1, interests1), (pooled2, interests2) = seen
    user = tower.user_key
    torch.testing.assert_close(pooled2[user], 2.0 * pooled1[user])
    assert all(torch.equal(pooled1[k], pooled2[k]) for k in pooled1 if k != user)
    torch.testing.assert_close(interests2[0], 3.0 * interests1[0])  # target short-term
    torch.testing.assert_close(interests2[-1], 0.5 * interests1[-1])  # recent, both domains
    assert len(interests1) >= 3  # SIM and ETA between them, as they were
    assert all(torch.equal(a, b) for a, b in zip(interests1[1:-1], interests2[1:-1],
                                                  strict=True))


def test_shared_tables_start_from_the_towers_rows_the_config_names(towers, tmp_path):
    """`[experiment] shared_table_rows = "source"`: the tables both tasks share start as the
    source tower's rows, every row (the default, the target's, is what makes every joint
    model start as the target tower, tested above); a task's own tables as its own tower's."""
    rows_from = "source"
    import copy

    from ctnet_rec.serving.export import unsharded_state

    cfg = copy.deepcopy(towers.cfg)
    cfg.experiment.shared_table_rows = rows_from
    joint, _ = open_checkpoint(joint_init(cfg, "Share Bottom", "A", towers.source(1),
                                          towers.target(1), tmp_path))
    state, net = unsharded_state(joint.state()["model"], "joint"), joint.dmp.module
    tower = {task: unsharded_state(open_checkpoint(ckpt)[0].state()["model"], str(ckpt))
             for task, ckpt in ((SOURCE, towers.source(1)), (TARGET, towers.target(1)))}
    chosen = SOURCE if rows_from == "source" else TARGET
    shared = 0
    for key in (k for k in state if k.startswith("embeddings.lookup") and
                k.endswith(".weight")):
        as_target, as_source = net.warm_start_key(key, TARGET), net.warm_start_key(key, SOURCE)
        assert as_target is not None and as_source is not None
        if as_target[0] != as_source[0]:  # shared: from whichever tower the config names
            shared += 1
            want, other = tower[chosen][as_target[1]], tower[1 - chosen][as_target[1]]
            assert torch.equal(state[key], want), key
            assert not torch.equal(state[key], other), key
        else:  # a task's own table
            assert torch.equal(state[key], tower[as_target[0]][as_target[1]]), key
    assert shared > 0


def test_joint_training_resumes_inside_a_period_as_if_never_stopped(towers, tiny_world,
                                                                     tmp_path, monkeypatch):
    """Stopped right after a mid-period checkpoint, a joint model (batches of two domains
    interleaved) resumes inside the period and ends with the uninterrupted run's metrics, per
    domain, to 1e-6."""
    import copy

    cfg = copy.deepcopy(towers.cfg)
    cfg.train.checkpoint_every_rows = 2048
    trainer = functools.partial(JointTrainer, model="Share Bottom", source_domain="A")
    init = joint_init(cfg, "Share Bottom", "A", towers.source(1), towers.target(1),
                      tmp_path / "init")
    whole = train_continual(cfg, tiny_world, "B", [2], tmp_path / "whole", init=init,
                            trainer_cls=trainer)
    save = JointTrainer._save_position

    def stop(self, period, *args):
        save(self, period, *args)
        raise KeyboardInterrupt  # as a kill right after the checkpoint

    monkeypatch.setattr(JointTrainer, "_save_position", stop)
    with pytest.raises(KeyboardInterrupt):
        train_continual(cfg, tiny_world, "B", [2], tmp_path / "stopped", init=init,
                        trainer_cls=trainer)
    monkeypatch.undo()
    assert not complete_checkpoints(tmp_path / "stopped")
    from ctnet_rec.training.checkpoint import Manifest

    assert Manifest.read(tmp_path / "stopped" / "checkpoints" / "mid-period").period == 2
    resumed = train_continual(cfg, tiny_world, "B", [2], tmp_path / "stopped", init=init,
                              resume=True, trainer_cls=trainer)
    got, want = resumed[-1], whole[-1]
    assert got["train_rows_by_domain"] == want["train_rows_by_domain"] == {"A": 8000, "B": 600}
    for domain, loss in want["train_loss_by_domain"].items():
        assert got["train_loss_by_domain"][domain] == pytest.approx(loss, abs=1e-6)
    assert got["eval"]["auc"] == pytest.approx(want["eval"]["auc"], abs=1e-6)
