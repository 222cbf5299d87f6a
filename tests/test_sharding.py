"""The sharding plan from config: types per table, and refusals before the planner runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ctnet_rec.cli import main
from ctnet_rec.config import ConfigError, ShardingConfig, load_config
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.distributed import init_distributed
from sharding.plan import GiB, PlanDoesNotFit, format_plan, plan_tables
from sharding.tower import shard_model


def _plan_types(dmp) -> dict[str, str]:
    return {table: spec.sharding_type for module_plan in dmp.plan.plan.values()
            for table, spec in module_plan.items()}


def test_sharding_types_come_from_the_config(towers):
    env = init_distributed("cpu")
    sharding = ShardingConfig("row_wise", tables={"seller": "table_wise"})
    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    types = _plan_types(shard_model(model, env, 0.01, sharding=sharding))
    assert types.pop("seller") == "table_wise"
    assert set(types.values()) == {"row_wise"} and len(types) >= 4


def test_a_sharding_type_the_device_cannot_serve_is_refused_naming_the_table(towers):
    env = init_distributed("cpu")
    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    with pytest.raises(ConfigError, match=r"table '\w+' cannot be table_row_wise on cpu"):
        shard_model(model, env, 0.01, sharding=ShardingConfig("table_row_wise"))


BILLION = Path(__file__).resolve().parents[1] / "examples" / "billion.toml"


@pytest.mark.parametrize("world_size", [1, 2])
def test_plan_places_every_table_and_the_frozen_ones_hold_no_optimizer_state(demo_config,
                                                                             world_size):
    plan = plan_tables(demo_config, world_size, "cpu", hbm_gb=0, ddr_gb=8,
                       source_cfg=demo_config)
    tables = {t.name: t for t in demo_config.features.tables}
    assert len(plan.tables) == 2 * (len(tables) + 1)  # + price's bucket table, in both towers
    assert {t.frozen for t in plan.tables if t.module.startswith("source.")} == {True}
    assert {t.frozen for t in plan.tables if t.module.startswith("target.")} == {False}
    assert all(len(t.ranks) == 1 and 0 <= t.ranks[0] < world_size for t in plan.tables)
    trainable_rows = sum(t.rows for t in plan.tables if not t.frozen)
    assert sum(m.optimizer for m in plan.ranks) == 4 * trainable_rows  # one fp32 per row
    assert sum(m.weights for m in plan.ranks) == sum(4 * t.rows * t.dim for t in plan.tables)
    assert len(plan.ranks) == world_size


def test_plan_billion_row_tables_on_64_simulated_gpus():
    cfg = load_config(BILLION)
    plan = plan_tables(cfg, 64, "cuda", hbm_gb=80, ddr_gb=512, source_cfg=cfg)
    big = [t for t in plan.tables if t.rows == 10**9]
    assert len(big) == 4 and all(t.sharding_type == "row_wise" and t.ranks == list(range(64))
                                 for t in big)
    weights = sum(m.weights for m in plan.ranks)
    assert weights == sum(4 * t.rows * t.dim for t in plan.tables)
    assert max(m.total for m in plan.ranks) < 80 * GiB
    # only the target's tables keep optimiser state: one fp32 per row
    assert sum(m.optimizer for m in plan.ranks) == 4 * sum(t.rows for t in plan.tables
                                                           if not t.frozen)
    text = format_plan(plan)
    assert "source.embeddings.pooled.user (frozen)" in text and "(the 8 fullest of 64" in text


def test_a_plan_that_cannot_fit_names_the_tables_and_by_how_much(capsys, caplog):
    cfg = load_config(BILLION)
    with pytest.raises(PlanDoesNotFit, match=r"embeddings\.sequence\.item \(row_wise\): its "
                       r"largest shard needs 240\.3 GiB, a rank has 80\.0 GiB of HBM "
                       r"\(160\.3 GiB over\)"):
        plan_tables(cfg, 2, "cuda", hbm_gb=80, ddr_gb=512)
    assert main(["plan", "--config", str(BILLION), "--world-size", "2", "--hbm-gb", "80"]) == 2
    assert "embeddings.pooled.user (row_wise)" in caplog.text
    assert main(["plan", "--config", str(BILLION), "--world-size", "64", "--ctnet"]) == 0
    assert "target.embeddings.sequence.item" in capsys.readouterr().out


def test_fp16_source_tables_halve_the_planned_source_weights(demo_config):
    import dataclasses

    cfg = dataclasses.replace(demo_config, sharding=ShardingConfig(source_table_dtype="fp16"))
    plan = plan_tables(cfg, 1, "cpu", hbm_gb=0, ddr_gb=8, source_cfg=demo_config)
    want = sum((2 if t.frozen else 4) * t.rows * t.dim for t in plan.tables)
    assert plan.ranks[0].weights == want


def test_uvm_caching_puts_the_big_tables_in_host_memory_with_a_device_cache(tmp_path):
    import dataclasses

    cfg = load_config(BILLION)
    big = {"user": "fused_uvm_caching", "item": "fused_uvm_caching"}
    cfg = dataclasses.replace(cfg, sharding=dataclasses.replace(cfg.sharding, kernels=big,
                                                                cache_load_factor=0.2))
    with pytest.raises(PlanDoesNotFit):  # all in HBM, 8 ranks cannot hold them
        plan_tables(dataclasses.replace(cfg, sharding=load_config(BILLION).sharding), 8,
                    "cuda", hbm_gb=80, ddr_gb=1024, source_cfg=cfg)
    plan = plan_tables(cfg, 8, "cuda", hbm_gb=80, ddr_gb=1024, source_cfg=cfg)
    cached = [t for t in plan.tables if t.compute_kernel == "fused_uvm_caching"]
    assert {t.table for t in cached} == {"user", "item"} and len(cached) == 4
    host = sum(4 * t.rows * t.dim for t in cached) / 8  # per rank, row-wise over 8
    for m in plan.ranks:
        assert m.hbm < 80 * GiB and m.ddr >= host
        assert m.other > 0.2 * host * 0.9  # the device's cache of a fifth of the host rows
    with pytest.raises(ConfigError, match="table 'user' cannot use the fused_uvm_caching "
                                          "kernel on cpu"):
        plan_tables(cfg, 8, "cpu", hbm_gb=0, ddr_gb=1024)


def test_managed_billion_row_tables_plan_row_wise_with_their_id_maps():
    """Managed user and item tables (1e9 rows each, in both CTNet towers) on 64 GPUs: row-wise
    over every rank, and the plan adds their id maps (3 int64 per row: raw id, row, last
    period), which TorchRec's planner does not count."""
    cfg = load_config(BILLION)
    for name in ("user", "item"):
        cfg.features.table(name).id_policy = "managed"
    plan = plan_tables(cfg, 64, "cuda", hbm_gb=80, ddr_gb=512, source_cfg=cfg)
    managed = [t for t in plan.tables if t.table in ("user", "item")]
    assert len(managed) == 4 and all(t.sharding_type == "row_wise" and "managed" in t.module
                                     and t.ranks == list(range(64)) for t in managed)
    assert sum(m.id_maps for m in plan.ranks) == 3 * 8 * sum(t.rows for t in managed)
    assert "id maps" in format_plan(plan)


def test_dense_layers_follow_the_configured_device(towers):
    """Models are built with tables on meta and dense layers on the CPU: `place_dense` moves
    every materialised tensor, so a CUDA run gets its dense layers on the GPU. (Shown with the
    meta device as target, the one other device every machine has.)"""
    from sharding.tower import place_dense

    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    assert any(p.device.type == "cpu" for p in model.parameters())
    place_dense(model, torch.device("meta"))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_a_misplaced_buffer_is_refused_naming_it(towers):
    from sharding.tower import PlacementError, check_placement

    env = init_distributed("cpu")
    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    dmp = shard_model(model, env, 0.01)  # shard_model checks: everything is on the CPU
    check_placement(dmp, env.device)
    dmp.module.mlp.norms[1].register_buffer("stray", torch.zeros(3, device="meta"))
    with pytest.raises(PlacementError, match=r"buffer 'mlp.norms.1.stray' is on meta, .* cpu"):
        check_placement(dmp, env.device)
    dmp.module.mlp.out.weight = torch.nn.Parameter(dmp.module.mlp.out.weight.to("meta"))
    with pytest.raises(PlacementError, match=r"parameter 'mlp.out.weight' is on meta"):
        check_placement(dmp, env.device)


def test_sharding_imports_nothing_above_it():
    """Layers: modules and the process's placement (DistEnv) below sharding/, the training
    loop, the experiment and the command line above it: no import runs back up."""
    import ast
    from pathlib import Path

    above = ("ctnet_rec.training", "ctnet_rec.experiment", "ctnet_rec.cli", "ctnet_rec.serving",
             "launch")
    for path in (Path(__file__).resolve().parents[1] / "sharding").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith(above), f"{path.name} imports {name}"


def test_plan_covers_every_model_kind(demo_config, caplog):
    """`ctnet plan --kind`: every kind's tables from the one table of model kinds: Dual
    Embedding's second id tables, a joint model's per-task tables, CTNet's read-only source."""
    from ctnet_rec.modules.kinds import kind_names

    def tables(kind: str) -> set[str]:
        plan = plan_tables(demo_config, 4, "cuda", 80, 512, kind=kind,
                           source_cfg=demo_config if kind == "ctnet" else None)
        return {f"{p.module}.{p.table}" for p in plan.tables}

    tower = tables("tower")
    assert len(tower) == 7
    assert {"dual.dual_user", "dual.dual_item"} <= tables("dual_embedding")
    assert len(tables("ctnet")) == 2 * len(tower)
    assert len(tables("joint:DDTCDR")) == 2 * len(tower)  # a table per task
    assert {"embeddings.lookup.sequence.item"} <= tables("joint:PLE")  # shared by the tasks
    assert set(kind_names()) >= {"tower", "ctnet", "dual_embedding", "joint:PLE"}
    config = Path(__file__).resolve().parents[1] / "examples" / "demo.toml"
    assert main(["plan", "--config", str(config), "--world-size", "4", "--kind", "towr"]) == 2
    assert "unknown model kind 'towr'" in caplog.text
    assert main(["plan", "--config", str(config), "--world-size", "4", "--kind",
                 "joint:MiNet"]) == 0


def _local(t):
    shards = t.local_shards() if hasattr(t, "local_shards") else None
    return shards[0].tensor if shards else t


def _shares_state() -> bool:
    from sharding.sequence_lookup import SHARES_STATE

    return SHARES_STATE


@pytest.mark.skipif(not _shares_state(), reason="fbgemm-gpu < 1.8: the pooled shortcut is off "
                    "(test_without_shared_kernel_state_the_lookups_keep_their_kernel)")
@pytest.mark.parametrize("frozen", [False, True])
def test_cpu_sequence_lookups_run_pooled_kernels_and_train_as_the_unpooled(
        towers, tiny_world, monkeypatch, frozen):
    """On the CPU the sequence tables' lookups go through fbgemm's pooled kernel, one id per
    bag (`sharding/sequence_lookup.py`): the same embeddings, and after a training step the
    same tables and optimiser state as the unpooled kernel's, for trained tables (row-wise
    AdaGrad) and read-only ones (SGD at lr 0, as CTNet's source); at row-wise sharding too."""
    import torch.nn.functional as F
    from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbedding

    import sharding.tower
    from ctnet_rec.data.reader import ParquetBatchReader
    from sharding.sequence_lookup import OneIdBags, pool_sequence_lookups

    cfg, env = towers.cfg, init_distributed("cpu")
    batch = next(iter(ParquetBatchReader(tiny_world, "B", [1], cfg.features, cfg.data, seed=0)))

    def build(pooled: bool, kind: str):
        monkeypatch.setattr(sharding.tower, "pool_sequence_lookups",
                            pool_sequence_lookups if pooled else lambda model: 0)
        torch.manual_seed(0)
        tower = Tower(cfg.features, cfg.model, device=torch.device("meta"))
        return shard_model(tower, env, 0.05, frozen=tower if frozen else None,
                           sharding=ShardingConfig(kind))

    for kind in ("table_wise", "row_wise"):
        models = {pooled: build(pooled, kind) for pooled in (True, False)}
        kernels = [k for m in models[True].modules() for lookup in getattr(m, "_lookups", [])
                   for k in lookup.modules() if isinstance(k, BatchedFusedEmbedding)]
        assert kernels and all(isinstance(k.forward, OneIdBags) for k in kernels)
        logits = {}
        for pooled, model in models.items():
            model.train()
            out = model(batch.sparse, batch.dense)
            logits[pooled] = out.logits.detach()
            if not frozen:
                F.binary_cross_entropy_with_logits(out.logits, batch.labels).backward()
        torch.testing.assert_close(logits[True], logits[False], atol=1e-6, rtol=0)
        states = {p: m.state_dict() for p, m in models.items()}
        tables = [k for k in states[True] if ".embeddings." in k]
        assert tables
        for key in tables:
            torch.testing.assert_close(_local(states[True][key]), _local(states[False][key]),
                                       atol=1e-6, rtol=0)
        optim = {p: m.fused_optimizer.state_dict()["state"] for p, m in models.items()}
        for param, entries in optim[True].items():
            for name, value in entries.items():
                torch.testing.assert_close(_local(value), _local(optim[False][param][name]),
                                           atol=1e-6, rtol=0)


def test_a_pooled_sequence_lookup_follows_its_kernel_state_when_replaced(towers, tiny_world):
    """The pooled kernels read views of the original kernel's weights; when something gives
    that kernel new tensors instead of updating them in place, the next lookup reads those.
    Without gradients the lookup is the unpooled kernel's own."""
    from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbedding

    from ctnet_rec.data.reader import ParquetBatchReader

    cfg, env = towers.cfg, init_distributed("cpu")
    batch = next(iter(ParquetBatchReader(tiny_world, "B", [1], cfg.features, cfg.data, seed=0)))
    model = shard_model(Tower(cfg.features, cfg.model, device=torch.device("meta")), env, 0.05)
    kernel = next(k for m in model.modules() for lookup in getattr(m, "_lookups", [])
                  for k in lookup.modules() if isinstance(k, BatchedFusedEmbedding))
    seen = []
    kernel.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(batch.sparse, batch.dense)
    tbe = kernel.emb_module
    tbe.weights_host = torch.nn.Parameter(tbe.weights_host.detach() + 1.0)
    got, want = kernel(seen[0]), BatchedFusedEmbedding.forward(kernel, seen[0])  # with grad
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-6, rtol=0)
    assert got.abs().min() > 0.5  # the new weights (old ones are near zero)
    with torch.no_grad():
        tbe.weights_host.data.add_(1.0)  # in place: the pooled kernels' views see it too
        torch.testing.assert_close(kernel(seen[0]), want.detach() + 1.0, atol=1e-5, rtol=0)
    pooled, unpooled = kernel(seen[0]), BatchedFusedEmbedding.forward(kernel, seen[0])
    assert torch.equal(pooled.detach(), unpooled.detach())  # after the in-place update too


def test_without_shared_kernel_state_the_lookups_keep_their_kernel(towers, monkeypatch):
    """An fbgemm whose kernels cannot run over given tensors (before 1.8): nothing is routed,
    and the model keeps TorchRec's kernels."""
    from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbedding

    import sharding.sequence_lookup
    from sharding.sequence_lookup import OneIdBags

    monkeypatch.setattr(sharding.sequence_lookup, "SHARES_STATE", False)
    tower = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    model = shard_model(tower, init_distributed("cpu"), 0.05)
    assert sharding.sequence_lookup.pool_sequence_lookups(model) == 0
    kernels = [k for m in model.modules() for lookup in getattr(m, "_lookups", [])
               for k in lookup.modules() if isinstance(k, BatchedFusedEmbedding)]
    assert kernels and not any(isinstance(k.forward, OneIdBags) for k in kernels)


def test_only_tensors_on_the_run_device_are_broadcast(towers):
    """Ranks start from rank 0's dense weights and buffers: nccl takes device tensors only,
    so fbgemm's host-side buffers (on the CPU in a GPU run) are never in the broadcast."""
    from sharding.tower import dense_parameters, initial_sync_tensors

    tower = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    dmp = shard_model(tower, init_distributed("cpu"), 0.05)
    on_cpu = initial_sync_tensors(dmp, torch.device("cpu"))
    dense = {id(p) for p in dense_parameters(dmp)}
    assert dense and dense <= {id(t) for t in on_cpu}
    assert initial_sync_tensors(dmp, torch.device("cuda")) == []


def test_a_gpu_cached_table_trains_under_the_prefetch_pipeline():
    """fused_uvm_caching on CUDA: TorchRec's prefetch pipeline, with the cache told so
    (`prefetch_pipeline`); otherwise, and on the CPU, the sparse-dist pipeline."""
    from torchrec.distributed.train_pipeline import (
        PrefetchTrainPipelineSparseDist,
        TrainPipelineSparseDist,
    )

    from sharding.tower import pipeline_class

    cached = ShardingConfig(kernels={"item": "fused_uvm_caching"})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pipeline_class(cuda, cached, ["user", "item"]) is PrefetchTrainPipelineSparseDist
    assert pipeline_class(cuda, ShardingConfig(), ["user", "item"]) is TrainPipelineSparseDist
    assert pipeline_class(cpu, cached, ["user", "item"]) is TrainPipelineSparseDist
    assert pipeline_class(cuda, cached, ["user"]) is TrainPipelineSparseDist


def test_cached_tables_are_planned_for_prefetching(demo_config):
    from sharding.tower import table_constraints

    cached = ShardingConfig(kernels={"item": "fused_uvm_caching"})
    tower = Tower(demo_config.features, demo_config.model, device=torch.device("meta"))
    constraints = table_constraints(tower, cached)
    assert constraints["item"].cache_params.prefetch_pipeline is True
    assert constraints["item"].cache_params.load_factor == cached.cache_load_factor
    assert constraints["user"].cache_params is None


def test_column_wise_tables_train_as_table_wise_and_reload_under_another_plan(
        towers, tiny_world, tmp_path):
    """At one rank a column-wise table is one shard of all its columns, so a period trains
    exactly as table-wise (the same row-wise AdaGrad over the same columns); its checkpoint
    then scores the same under a table-wise plan (torch.distributed.checkpoint reshards)."""
    import dataclasses

    import numpy as np

    from ctnet_rec.training.inference import open_checkpoint
    from ctnet_rec.training.loop import train_continual
    from ctnet_rec.training.trainer import PeriodTrainer

    runs = {}
    for plan in ("table_wise", "column_wise"):
        cfg = dataclasses.replace(towers.cfg, sharding=ShardingConfig(plan))
        runs[plan] = train_continual(cfg, tiny_world, "B", [0], tmp_path / plan)[-1]
    tw, cw = runs["table_wise"], runs["column_wise"]
    assert cw["train_loss"] == pytest.approx(tw["train_loss"], abs=1e-6)
    assert cw["eval"]["auc"] == pytest.approx(tw["eval"]["auc"], abs=1e-6)
    cfg = dataclasses.replace(towers.cfg, sharding=ShardingConfig("column_wise"))
    trainer = PeriodTrainer(cfg, init_distributed("cpu"))
    assert set(_plan_types(trainer.dmp).values()) == {"column_wise"}
    ckpt = tmp_path / "column_wise" / "checkpoints" / "period=0"
    scored = open_checkpoint(ckpt, sharding=ShardingConfig("table_wise"))[0]
    assert set(_plan_types(scored.dmp).values()) == {"table_wise"}
    reference = open_checkpoint(tmp_path / "table_wise" / "checkpoints" / "period=0")[0]
    np.testing.assert_allclose(scored.predict(tiny_world, "B", 1)["p"],
                               reference.predict(tiny_world, "B", 1)["p"], atol=1e-6)


def test_a_small_plan_shows_its_sizes_in_units_that_read(demo_config, caplog):
    """The demo's tables are a few MiB: in GiB with one or two decimals every figure read 0.0
    ("needs 0.0 GiB, a rank has 0.0 GiB"), which no one can act on."""
    with pytest.raises(PlanDoesNotFit, match=r"embeddings\.pooled\.user \(table_wise\): its "
                       r"largest shard needs 2\.7 MiB, a rank has 1\.0 MiB of DDR "
                       r"\(1\.7 MiB over\)"):
        plan_tables(demo_config, 2, "cpu", hbm_gb=0, ddr_gb=1 / 1024)
    text = format_plan(plan_tables(demo_config, 2, "cpu", hbm_gb=0, ddr_gb=1))
    assert "per rank, MiB (1.0 GiB of DDR each" in text
    rank0 = text.split("per rank")[1].splitlines()[2].split()
    assert rank0[0] == "0" and float(rank0[1]) > 1  # rank 0's weights, in MiB
    assert re.search(r"all ranks: \d+\.\d MiB", text)
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(["plan", "--config", str(BILLION), "--world-size", "2", "--hbm-gb", bad])
