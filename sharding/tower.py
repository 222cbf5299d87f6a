"""Shard a model's embedding collections with DistributedModelParallel, fused optimisers on.

Model code stays unsharded; this is the one place where parallelism is applied."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchrec
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ctnet_rec.training.distributed import DistEnv


def embedding_collections(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)]


def shard_model(model: nn.Module, env: DistEnv, sparse_lr: float) -> DistributedModelParallel:
    """Fused row-wise AdaGrad on every table (TorchRec keeps its state sharded with the
    table), tables placed table-wise by the planner, dense layers data-parallel."""
    tables = []
    for ec in embedding_collections(model):
        apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ec.parameters(),
                                    {"lr": sparse_lr})
        tables += [c.name for c in ec.embedding_bag_configs()] if isinstance(
            ec, EmbeddingBagCollection) else [c.name for c in ec.embedding_configs()]
    constraints = {
        t: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
        for t in tables
    }
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=env.device, plan=plan, sharders=sharders)


def dense_parameters(dmp: DistributedModelParallel) -> list[torch.Tensor]:
    """Parameters not updated by a fused optimiser (the dense layers)."""
    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())
            if p.requires_grad]
