"""Sharders for the managed-id collections (TorchRec's MC-EBC and MC-EC) that also run on CPU.

When a managed table gives a row to a new id, TorchRec resets the row: weights back to the
table's initialiser, AdaGrad state to zero, through fbgemm's `reset_weight_momentum`, which has
CUDA kernels only (on CPU it raises NotImplementedError). The sharded modules here do the same
reset on CPU through the kernel's host-side views; on CUDA they are TorchRec's own."""

from __future__ import annotations

from typing import Any

import torch
from torchrec.distributed.mc_embedding import (
    ManagedCollisionEmbeddingCollectionSharder,
    ShardedManagedCollisionEmbeddingCollection,
)
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)


class _ResetsRowsOnCPU:
    """The `_evict` of TorchRec's sharded MC collections, for tables held in host memory."""

    _device: torch.device

    def _evict(self, evictions_per_table: dict[str, torch.Tensor | None]) -> None:
        if self._device.type != "cpu":
            super()._evict(evictions_per_table)  # type: ignore[misc]
            return
        module: Any = self._embedding_module  # type: ignore[attr-defined]
        lookup = module.embedding_bags if self.bagged else module.embeddings  # type: ignore
        with torch.no_grad():
            for table, rows in evictions_per_table.items():
                if rows is None:
                    continue
                rows = rows.long()
                tbe, index = self._table_to_tbe_and_index[table]  # type: ignore[attr-defined]
                states = tbe.split_optimizer_states()  # per table: its states
                if states:  # row-wise AdaGrad: one sum per row (a frozen SGD table has none)
                    states[int(index)][0][rows] = 0
                weight = lookup.get_parameter(f"{table}.weight")
                weight[rows] = module._table_name_to_config[table].init_fn(weight[rows])


class _ShardedMCBag(_ResetsRowsOnCPU, ShardedManagedCollisionEmbeddingBagCollection):
    pass


class _ShardedMC(_ResetsRowsOnCPU, ShardedManagedCollisionEmbeddingCollection):
    pass


class ManagedBagSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    def shard(self, module: Any, params: Any, env: Any, device: torch.device | None = None,
              module_fqn: str | None = None) -> _ShardedMCBag:
        return _ShardedMCBag(module, params, ebc_sharder=self._e_sharder,
                             mc_sharder=self._mc_sharder, env=env,
                             device=device or torch.device("cuda"))


class ManagedSequenceSharder(ManagedCollisionEmbeddingCollectionSharder):
    def shard(self, module: Any, params: Any, env: Any, device: torch.device | None = None,
              module_fqn: str | None = None) -> _ShardedMC:
        return _ShardedMC(module, params, ec_sharder=self._e_sharder,
                          mc_sharder=self._mc_sharder, env=env,
                          device=device or torch.device("cuda"))
