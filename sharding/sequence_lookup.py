"""Sequence-table lookups on the CPU through fbgemm's pooled kernels, one id per bag.

An EmbeddingCollection's tables (the behaviour sequences) run in fbgemm's table-batched
kernel without pooling; on the CPU (fbgemm-gpu-cpu 1.8.0) that kernel's backward with the
fused row-wise AdaGrad update costs far more than the pooled kernel's on the same ids (the
demo tower's sequence lookup, forward and backward: 12.3 vs 6.6 ms a step at batch 512,
`python benchmarks/sequence_lookup.py`). A bag holding a single id pools to that id's
embedding, and its gradient is that id's gradient, so the pooled kernel computes the same
lookup and the same update. Here each such lookup kernel of a sharded model gets one pooled
kernel per table, over that table's share of the kernel's weights and optimiser state (views
of the same tensors: checkpoints, the fused optimiser and everything else keep reading the
original kernel), and its forward runs through them when gradients are on (scoring, and
CTNet's frozen source, keep the unpooled forward). On CUDA nothing changes.
"""

from __future__ import annotations

import inspect
import itertools
import logging

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

log = logging.getLogger(__name__)

# fbgemm-gpu 1.8 lets a kernel run over tensors it is given (`preallocated_host_buffers`);
# with an older fbgemm the sequence lookups keep TorchRec's own kernel (same results, slower)
SHARES_STATE = "preallocated_host_buffers" in inspect.signature(
    SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters

STATE = {EmbOptimType.EXACT_ROWWISE_ADAGRAD: ("weights", "momentum1"),
         EmbOptimType.EXACT_SGD: ("weights",)}  # the optimisers our tables use


def pool_sequence_lookups(model: nn.Module) -> int:
    """Route every CPU sequence lookup of `model` (sharded) through a pooled kernel; returns
    how many were routed. Lookups this cannot serve as it is (not on the host, another
    optimiser) keep their kernel."""
    routed = 0
    if not SHARES_STATE:
        log.info("fbgemm-gpu %s cannot share a kernel's state: sequence lookups keep "
                 "TorchRec's kernel", _fbgemm_version())
        return routed
    for sharded in model.modules():
        if not isinstance(sharded, ShardedModule):
            continue
        for lookup in getattr(sharded, "_lookups", []):  # a plain list: not in modules()
            for kernel in lookup.modules():
                if isinstance(kernel, BatchedFusedEmbedding) and _servable(kernel.emb_module):
                    kernel.forward = OneIdBags(kernel)
                    routed += 1
    return routed


def _fbgemm_version() -> str:
    import fbgemm_gpu

    return getattr(fbgemm_gpu, "__version__", "?")


def _servable(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> bool:
    tables = tbe.feature_table_map
    return (tbe.pooling_mode == PoolingMode.NONE and tbe.optimizer in STATE
            and all(s[2] == EmbeddingLocation.HOST and s[3] == ComputeDevice.CPU
                    for s in tbe.embedding_specs)
            and tables == sorted(tables))  # each table's features side by side


class OneIdBags:
    """A lookup kernel's forward through pooled kernels, one per table, over that table's
    share of the kernel's weights and optimiser state (views of the same tensors): each
    table's ids (its features' ids, which lie side by side) as bags of one id."""

    def __init__(self, kernel: BatchedFusedEmbedding) -> None:
        self.kernel = kernel
        self._build()

    def _state(self) -> dict[str, torch.Tensor]:
        nobag = self.kernel.emb_module
        return {name: getattr(nobag, f"{name}_host") for name in STATE[nobag.optimizer]}

    def _build(self) -> None:
        nobag = self.kernel.emb_module
        state = self._state()
        self.storage = {name: t.untyped_storage().data_ptr() for name, t in state.items()}
        first = [nobag.feature_table_map.index(t) for t in range(len(nobag.embedding_specs))]
        self.dims = [spec[1] for spec in nobag.embedding_specs]
        self.tables = []
        for t, spec in enumerate(nobag.embedding_specs):
            shares = {}
            for name, tensor in state.items():  # this table's rows: up to the next table's
                offsets = getattr(nobag, f"{name}_offsets")
                begin = int(offsets[first[t]])
                end = int(offsets[first[t + 1]]) if t + 1 < len(first) else tensor.numel()
                shares[name] = tensor.detach()[begin:end]
            self.tables.append(SplitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=[spec], optimizer=nobag.optimizer,
                pooling_mode=PoolingMode.SUM, weights_precision=nobag.weights_precision,
                output_dtype=SparseType.from_int(nobag.output_dtype),
                stochastic_rounding=nobag.stochastic_rounding, device=torch.device("cpu"),
                preallocated_host_buffers=shares))

    def __call__(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # no backward to save: the unpooled forward is as fast
            return type(self.kernel).forward(self.kernel, features)
        nobag = self.kernel.emb_module
        if any(t.untyped_storage().data_ptr() != self.storage[name]
               for name, t in self._state().items()):
            self._build()  # the kernel's state was replaced (not updated in place)
        per_feature = features.lengths().view(len(nobag.feature_table_map), -1).sum(dim=1)
        counts = [int(sum(n for _, n in group)) for _, group in itertools.groupby(
            zip(nobag.feature_table_map, per_feature.tolist(), strict=True), key=lambda x: x[0])]
        out, ids = [], features.values().long().split(counts)
        for table, dim, table_ids in zip(self.tables, self.dims, ids, strict=True):
            if not len(table_ids):
                out.append(torch.zeros(0, dim, device=table_ids.device))
                continue
            table.optimizer_args = nobag.optimizer_args  # the kernel's, as they are now
            table.learning_rate_tensor = nobag.learning_rate_tensor
            out.append(table(indices=table_ids, offsets=torch.arange(len(table_ids) + 1,
                                                                  device=table_ids.device)))
        return out[0] if len(out) == 1 else torch.cat(out)
