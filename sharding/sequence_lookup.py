"""Sequence-table lookups on the CPU through fbgemm's pooled kernels, one id per bag.

An EmbeddingCollection's tables (the behaviour sequences) run in fbgemm's table-batched
kernel without pooling; on the CPU (fbgemm-gpu-cpu 1.8.0) that kernel's backward with the
fused row-wise AdaGrad update costs far more than the pooled kernel's on the same ids (the
demo tower's sequence lookup, forward and backward: 12.8 vs 8.4 ms a step at batch 512,
`python benchmarks/sequence_lookup.py`). A bag holding a single id pools to that id's
embedding, and its gradient is that id's gradient, so the pooled kernel computes the same
lookup and the same update. Here each such lookup module of a sharded model gets a second,
pooled kernel over the same tables, one feature per table, sharing the first one's weights
and optimiser state (the same tensors: checkpoints, the fused optimiser and everything else
keep reading the original kernel), and its forward runs through it. On CUDA nothing changes.
"""

from __future__ import annotations

import itertools

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbedding
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

STATE = {EmbOptimType.EXACT_ROWWISE_ADAGRAD: ("weights", "momentum1"),
         EmbOptimType.EXACT_SGD: ("weights",)}  # the optimisers our tables use


def pool_sequence_lookups(model: nn.Module) -> int:
    """Route every CPU sequence lookup of `model` (sharded) through a pooled kernel; returns
    how many were routed. Lookups this cannot serve as it is (not on the host, another
    optimiser) keep their kernel."""
    routed = 0
    for sharded in model.modules():
        if not isinstance(sharded, ShardedModule):
            continue
        for lookup in getattr(sharded, "_lookups", []):  # a plain list: not in modules()
            for kernel in lookup.modules():
                if isinstance(kernel, BatchedFusedEmbedding) and _servable(kernel.emb_module):
                    kernel.forward = OneIdBags(kernel)  # type: ignore[method-assign]
                    routed += 1
    return routed


def _servable(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> bool:
    tables = tbe.feature_table_map
    return (tbe.pooling_mode == PoolingMode.NONE and tbe.optimizer in STATE
            and all(s[2] == EmbeddingLocation.HOST and s[3] == ComputeDevice.CPU
                    for s in tbe.embedding_specs)
            and tables == sorted(tables))  # each table's features side by side


class OneIdBags:
    """A lookup kernel's forward through a pooled kernel over the same tables: the ids of
    each table (its features' ids, which lie side by side) as bags of one id, every table
    padded with empty bags to as many bags as the largest has ids."""

    def __init__(self, kernel: BatchedFusedEmbedding) -> None:
        self.kernel = kernel
        nobag = kernel.emb_module
        self.pooled = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=nobag.embedding_specs,
            feature_table_map=list(range(len(nobag.embedding_specs))),
            optimizer=nobag.optimizer, pooling_mode=PoolingMode.SUM,
            weights_precision=nobag.weights_precision,
            output_dtype=SparseType.from_int(nobag.output_dtype),
            stochastic_rounding=nobag.stochastic_rounding, device=torch.device("cpu"),
            preallocated_host_buffers={
                name: getattr(nobag, f"{name}_host") for name in STATE[nobag.optimizer]})
        self.dim = nobag.embedding_specs[0][1]

    def __call__(self, features: KeyedJaggedTensor) -> torch.Tensor:
        nobag, pooled = self.kernel.emb_module, self.pooled
        for name in STATE[nobag.optimizer]:  # the original kernel's state, as it is now
            setattr(pooled, f"{name}_host", getattr(nobag, f"{name}_host"))
        pooled.optimizer_args = nobag.optimizer_args
        pooled.learning_rate_tensor = nobag.learning_rate_tensor
        per_feature = features.lengths().view(len(nobag.feature_table_map), -1).sum(dim=1)
        counts = [int(sum(n for _, n in group)) for _, group in itertools.groupby(
            zip(nobag.feature_table_map, per_feature.tolist(), strict=True), key=lambda x: x[0])]
        width = max(counts, default=0)
        starts = torch.tensor([0, *itertools.accumulate(counts)])
        bags = torch.arange(width)
        offsets = torch.cat([*(starts[t] + bags.clamp(max=n) for t, n in enumerate(counts)),
                             starts[-1:]])
        out = pooled(indices=features.values().long(), offsets=offsets)  # (width, T * D)
        d = self.dim
        return torch.cat([out[:n, t * d:(t + 1) * d] for t, n in enumerate(counts)])
