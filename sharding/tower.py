"""Shard a model's embedding collections with DistributedModelParallel, fused optimisers on.

Model code stays unsharded; this is the one place where parallelism is applied."""

from __future__ import annotations

import typing
from typing import Any

import torch
import torch.distributed as dist

# apply_optimizer_in_backward imports this at its first call, and its import compiles the
# functional optimisers with TorchScript (~0.7 s): imported here, it is paid once in a job
# server that preloads this module (the experiment's and the pipeline's jobs), not per job
import torch.distributed.optim  # noqa: F401
import torchrec
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.train_pipeline import (
    PrefetchTrainPipelineSparseDist,
    TrainPipelineSparseDist,
)
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingType
from torchrec.modules.mc_embedding_modules import BaseManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionModule, MCHManagedCollisionModule
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ctnet_rec.config import ConfigError, ShardingConfig
from ctnet_rec.dist_env import DistEnv
from sharding.managed_ids import ManagedBagSharder, ManagedSequenceSharder
from sharding.sequence_lookup import pool_sequence_lookups


def embedding_collections(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)]


class RowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock sharder offers no row_wise on CPU, though it runs there correctly (the
    EmbeddingCollection sharder does offer it; tests/test_launch.py scores row-wise)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else \
            [*types, ShardingType.ROW_WISE.value]


def sharders() -> list[ModuleSharder[nn.Module]]:
    """Plain and managed-collision collections of both kinds (the managed ones row-wise)."""
    return [RowWiseEmbeddingBagCollectionSharder(), EmbeddingCollectionSharder(),
            ManagedBagSharder(ebc_sharder=RowWiseEmbeddingBagCollectionSharder()),
            ManagedSequenceSharder()]


def _lookups(model: nn.Module) -> list[tuple[nn.Module, ModuleSharder[nn.Module], bool]]:
    """(collection, the sharder that shards it, whether its ids are managed) per collection."""
    managed = {id(m._embedding_module) for m in model.modules()
               if isinstance(m, BaseManagedCollisionEmbeddingCollection)}
    plain_bag, plain_seq, managed_bag, managed_seq = sharders()
    out = []
    for ec in embedding_collections(model):
        bag, is_managed = isinstance(ec, EmbeddingBagCollection), id(ec) in managed
        sharder = (managed_bag if bag else managed_seq) if is_managed else \
            (plain_bag if bag else plain_seq)
        out.append((ec, sharder, is_managed))
    return out


def check_sharding_types(model: nn.Module, sharding: ShardingConfig, device: str) -> None:
    """Refuse a sharding type or compute kernel the sharder of a table's collection does not
    offer on this device, naming the table, before the planner fails deep inside."""
    for ec, sharder, managed in _lookups(model):
        offered = sharder.sharding_types(device)
        for table in _table_names(ec):
            kind = sharding.type_of(table, managed)
            if kind not in offered:
                what = "a managed-id table" if managed else type(ec).__name__
                raise ConfigError(f"sharding: table {table!r} cannot be {kind} on {device} "
                                  f"({what} offers {offered})")
            kernels = sharder.compute_kernels(kind, device)
            if sharding.kernel_of(table) not in kernels:
                raise ConfigError(f"sharding: table {table!r} cannot use the "
                                  f"{sharding.kernel_of(table)} kernel on {device} "
                                  f"(offered: {kernels})")


def prepare_for_planning(model: nn.Module, sharding: ShardingConfig, device: str,
                         world_size: int, sparse_lr: float, frozen: nn.Module | None) -> None:
    """What the planner reads off the model before placing its tables (sharding it or not)."""
    check_sharding_types(model, sharding, device)
    bucket_managed_ids(model, world_size)
    attach_table_optimizers(model, sparse_lr, frozen)


def bucket_managed_ids(model: nn.Module, world_size: int) -> None:
    """A managed table's id range splits into one bucket per rank (TorchRec's planner wants a
    multiple of the world size); it only decides placement, so the model leaves it to us."""
    for m in model.modules():
        if isinstance(m, MCHManagedCollisionModule):
            m._buckets = world_size


def _table_names(ec: nn.Module) -> list[str]:
    configs = ec.embedding_bag_configs() if isinstance(ec, EmbeddingBagCollection) \
        else typing.cast(EmbeddingCollection, ec).embedding_configs()
    return [c.name for c in configs]


def attach_table_optimizers(model: nn.Module, sparse_lr: float,
                            frozen: nn.Module | None = None) -> None:
    """Fused row-wise AdaGrad on every table, SGD at lr 0 (no state) on those in `frozen`.
    The planner reads these to size each table's optimiser state."""
    read_only = {id(m) for m in embedding_collections(frozen)} if frozen is not None else set()
    for ec in embedding_collections(model):
        if id(ec) in read_only:  # the hook needs trainable-looking parameters to attach to
            params = list(ec.parameters())
            for p in params:
                p.requires_grad_(True)
            apply_optimizer_in_backward(torchrec.optim.SGD, params, {"lr": 0.0})
            for p in params:
                p.requires_grad_(False)
        else:
            apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ec.parameters(),
                                        {"lr": sparse_lr})


def table_constraints(model: nn.Module, sharding: ShardingConfig,
                      ) -> dict[str, ParameterConstraints]:
    def cache(table: str) -> CacheParams | None:
        if sharding.kernel_of(table) != "fused_uvm_caching":
            return None
        # the train pipeline fills the cache a batch ahead (`pipeline_class`)
        return CacheParams(load_factor=sharding.cache_load_factor, prefetch_pipeline=True)

    return {t: ParameterConstraints(sharding_types=[sharding.type_of(t, managed)],
                                    compute_kernels=[sharding.kernel_of(t)],
                                    cache_params=cache(t))
            for ec, _, managed in _lookups(model) for t in _table_names(ec)}


# the share of each device's memory the planner leaves for everything but the tables (dense
# layers, activations, buffers); TorchRec's default heuristic warns it misjudges meta models
RESERVED_SHARE = 0.15


def planner_for(topology: Topology, constraints: dict[str, ParameterConstraints],
                **kwargs: Any) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=topology, constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(RESERVED_SHARE), **kwargs)


def shard_model(model: nn.Module, env: DistEnv, sparse_lr: float,
                frozen: nn.Module | None = None,
                sharding: ShardingConfig | None = None,
                find_unused_parameters: bool = False) -> DistributedModelParallel:
    """Fused row-wise AdaGrad on every table (TorchRec keeps its state sharded with the
    table), tables placed by the planner with the sharding types of `sharding` (default:
    table-wise). Dense layers are replicated under DMP's data-parallel wrapper (DDP): their
    gradients are averaged across ranks in buckets that overlap the backward pass.

    DDP runs with a dynamic graph, searching for parameters without a gradient after each
    backward only when `find_unused_parameters` (a joint-learning model's step trains one
    domain's task tower and leaves the other's without gradients). (DMP's default,
    a static graph, was measured here on CPU/gloo not to average the dense gradients at all:
    ranks' weights drifted apart from the first step; tests/test_training.py checks that two
    ranks keep one model.) A single process has nothing to average and no wrapper.

    Tables inside `frozen` (CTNet's source tower) are read-only: fused kernels with SGD at
    lr 0, which keeps no optimiser state, and the model runs them under no_grad, so no
    gradient ever reaches them (TorchRec's default fused SGD, at lr 0.01, would move them)."""
    sharding = sharding or ShardingConfig()
    place_dense(model, env.device)
    prepare_for_planning(model, sharding, env.device.type, env.world_size, sparse_lr, frozen)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=env.world_size),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )
    planner = planner_for(topology, table_constraints(model, sharding))
    module_sharders = sharders()
    plan = planner.collective_plan(model, module_sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, device=env.device, plan=plan, sharders=module_sharders,
        init_data_parallel=env.world_size > 1,
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=False, find_unused_parameters=find_unused_parameters))
    check_placement(dmp, env.device)
    if env.device.type == "cpu":
        pool_sequence_lookups(dmp)
    if env.world_size > 1:  # every rank starts from rank 0's dense weights and buffers
        for t in initial_sync_tensors(dmp, env.device):
            dist.broadcast(t.data, src=0)
    return dmp


def initial_sync_tensors(dmp: DistributedModelParallel,
                         device: torch.device) -> list[torch.Tensor]:
    """The dense weights and buffers every rank takes from rank 0: those on the run's device
    (nccl moves device tensors only; what is elsewhere is fbgemm's host-side kernel metadata,
    the same on every rank), less the managed-id maps (each rank's holds its own shard)."""
    id_maps = {id(b) for m in dmp.modules() if isinstance(m, ManagedCollisionModule)
               for b in m.buffers()}
    return [t for t in [*dense_parameters(dmp), *dmp.buffers()]
            if not t.is_meta and t.device == device and id(t) not in id_maps]


def place_dense(model: nn.Module, device: torch.device) -> None:
    """Move every materialised parameter and buffer to `device`. Models are built with their
    tables on the meta device (DMP allocates those on `device`) and their dense layers on the
    CPU; with DMP's data-parallel wrapper off, nothing else would move the dense layers."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.is_meta and p.device != device:
                setattr(module, name, nn.Parameter(p.detach().to(device), p.requires_grad))
        for name, b in module.named_buffers(recurse=False):
            if not b.is_meta and b.device != device:
                setattr(module, name, b.to(device))


class PlacementError(RuntimeError):
    """A parameter or buffer is not on the configured device after sharding."""


def check_placement(model: nn.Module, device: torch.device) -> None:
    """Refuse a model with a parameter or buffer off `device`, naming the first one, before
    it trains (a dense layer left on the CPU of a GPU run is slow or fails mid-step). The
    host-side metadata of fbgemm's kernels is on the CPU by design and is not checked."""
    kernel_buffers = {id(b) for m in model.modules() if type(m).__module__.startswith("fbgemm")
                      for b in m.buffers(recurse=False)}
    named = [*(("parameter", n, p) for n, p in model.named_parameters()),
             *(("buffer", n, b) for n, b in model.named_buffers())]
    for kind, name, t in named:
        if id(t) not in kernel_buffers and t.device != device:
            raise PlacementError(f"{kind} {name!r} is on {t.device}, the run's device is "
                                 f"{device}: move it to the configured device")


def dense_parameters(dmp: DistributedModelParallel) -> list[torch.Tensor]:
    """Parameters not updated by a fused optimiser (the dense layers)."""
    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())
            if p.requires_grad]


def pipeline_class(device: torch.device, sharding: ShardingConfig,
                   tables: list[str]) -> type[TrainPipelineSparseDist]:
    """TorchRec's train pipeline for a model: the prefetch pipeline when a table keeps its
    rows in host memory behind a GPU cache (`fused_uvm_caching`), so that each next batch's
    rows are brought into the cache on their own stream while the current batch trains;
    else the sparse-dist pipeline (copies and input distribution overlapped)."""
    if device.type == "cuda" and any(sharding.kernel_of(t) == "fused_uvm_caching"
                                     for t in tables):
        return PrefetchTrainPipelineSparseDist
    return TrainPipelineSparseDist
