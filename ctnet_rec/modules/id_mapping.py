"""The "managed" id policy: every raw id gets a row of its own, through TorchRec's
managed-collision modules (ManagedCollisionCollection of MCHManagedCollisionModule), with the
eviction a continual system needs: an id that has not come back for N periods gives its row up.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.mc_modules import (
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHEvictionPolicyMetadataInfo,
    MCHManagedCollisionModule,
)

from ctnet_rec.data.ids import MANAGED_ID_RANGE

LAST_PERIOD = "last_period"


class PeriodEvictionPolicy(MCHEvictionPolicy):
    """An id keeps its row while it comes back at least once every `periods` periods.

    A new id takes a free row, or else the row of an id not seen for `periods` whole periods
    (the most frequent new ids of a batch first); while every row belongs to an id seen lately,
    new ids share the table's last row (TorchRec's row for ids without one) until a row
    expires. Live ids are never evicted, so a burst of one-off ids cannot push out the ids the
    model has learned. TorchRec's LRU and LFU policies count training iterations, which differ
    between periods and world sizes; a period is what "not seen lately" means to a user.

    Per row it keeps the last period the id was seen in (stored + 1, 0 = empty), a buffer of
    the module (`_mch_last_period`), so checkpoints carry it. `period` is set by the trainer
    (`set_period`) before each period's training."""

    def __init__(self, periods: int) -> None:
        super().__init__(metadata_info=[MCHEvictionPolicyMetadataInfo(
            metadata_name=LAST_PERIOD, is_mch_metadata=True, is_history_metadata=False)])
        self.periods = periods
        self.period = 0

    @property
    def metadata_info(self) -> list[MCHEvictionPolicyMetadataInfo]:
        return self._metadata_info

    def record_history_metadata(self, current_iter: int, incoming_ids: torch.Tensor,
                                history_metadata: dict[str, torch.Tensor]) -> None:
        """Nothing per id and step: every id of the history is seen in the current period."""

    def coalesce_history_metadata(self, current_iter: int,
                                  history_metadata: dict[str, torch.Tensor],
                                  unique_ids_counts: torch.Tensor,
                                  unique_inverse_mapping: torch.Tensor,
                                  additional_ids: torch.Tensor | None = None,
                                  threshold_mask: torch.Tensor | None = None,
                                  ) -> dict[str, torch.Tensor]:
        return {}

    def update_metadata_and_generate_eviction_scores(
        self, current_iter: int, mch_size: int,
        coalesced_history_argsort_mapping: torch.Tensor,
        coalesced_history_sorted_unique_ids_counts: torch.Tensor,
        coalesced_history_mch_matching_elements_mask: torch.Tensor,
        coalesced_history_mch_matching_indices: torch.Tensor,
        mch_metadata: dict[str, torch.Tensor],
        coalesced_history_metadata: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        last = mch_metadata[LAST_PERIOD]
        now = self.period + 1
        last[coalesced_history_mch_matching_indices] = now
        live = (last > 0) & (now - last <= self.periods)
        # higher scores stay: the shared last row, then live ids, then new ids (in frequency
        # order), then expired ids and empty rows
        kept = torch.where(live, 2, 0)
        kept[mch_size - 1] = 3
        new = torch.ones(int((~coalesced_history_mch_matching_elements_mask).sum()),
                         dtype=kept.dtype, device=kept.device)
        evicted, selected = self._compute_selected_eviction_and_replacement_indices(
            mch_size, torch.cat([kept, new]))
        last[evicted] = now
        return evicted, selected


def managed_collisions(tables: list[BaseEmbeddingConfig], evict_after_periods: int,
                       device: torch.device) -> ManagedCollisionCollection:
    """One managed-collision module per table, mapping ids in [0, MANAGED_ID_RANGE) (what the
    reader passes for a managed table) to the table's rows; ids are admitted at every step."""
    policy = PeriodEvictionPolicy(evict_after_periods)
    return ManagedCollisionCollection({
        t.name: MCHManagedCollisionModule(
            zch_size=t.num_embeddings, device=device, eviction_policy=policy,
            eviction_interval=1, input_hash_size=MANAGED_ID_RANGE, name=t.name)
        for t in tables}, tables)


def set_period(model: nn.Module, period: int) -> None:
    """Tell every managed table of `model` (sharded or not) which period it is training on."""
    for m in model.modules():
        if isinstance(m, MCHManagedCollisionModule) and \
                isinstance(m._eviction_policy, PeriodEvictionPolicy):
            m._eviction_policy.period = period
