"""The unit a model consumes: one mini-batch, shaped for TorchRec's train pipelines."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx._symbolic_trace import PHWithMeta
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

MODEL_INPUTS = ("sparse", "dense")  # the fields a model's forward takes, by these names


@dataclass
class Batch(Pipelineable):
    """Ids already mapped into table rows (`sparse`), dense numerics, labels, and the raw user
    and item ids kept for GAUC and cold-start slices.

    A TorchRec `Pipelineable` (`to`, `record_stream`, `pin_memory`) that also tells its
    train pipeline how a model reads it (`to_proxy_tuple`)."""

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        for t in (self.dense, self.labels, self.user_ids, self.item_ids):
            t.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
        )

    def to_proxy_tuple(self, model: nn.Module) -> dict[str, Any]:
        """The arguments TorchRec's train pipeline traces `model` with: a placeholder per
        field the model takes (`sparse`, `dense`), named after the field so that the pipeline
        finds a lookup's input on the batch, and the defaults of its other arguments."""
        params = inspect.signature(model.forward).parameters
        return {name: PHWithMeta(ph_key=name) if name in MODEL_INPUTS else p.default
                for name, p in params.items()}
