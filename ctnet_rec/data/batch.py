"""The unit a model consumes: one mini-batch, shaped for TorchRec's train pipelines."""

# Annotations are evaluated (no `from __future__ import annotations`): this module travels
# inside exported artifacts (torch.package), where dataclasses cannot read string annotations.

import inspect
from collections.abc import Iterable, Iterator
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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
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

    def pin_memory(self) -> "Batch":
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


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[tuple[Batch, Batch]]:
    """Each host batch with its copy on `device`, the next batch's copy issued as the current
    one is handed out: on CUDA on a side stream (from pinned memory, non-blocking), so that
    it overlaps the current batch's compute; nothing but the copies (no host sync). For the
    loops that score without a train pipeline (evaluation, predict)."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(b: Batch | None) -> Batch | None:
        if b is None or stream is None:
            return None if b is None else b.to(device)
        with torch.cuda.stream(stream):
            return b.to(device, non_blocking=True)

    it = iter(batches)
    host = next(it, None)
    dev = copy(host)
    while host is not None and dev is not None:
        if stream is not None:  # this batch's copy is done before its compute starts
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            dev.record_stream(current)
        nxt = next(it, None)
        nxt_dev = copy(nxt)
        yield host, dev
        host, dev = nxt, nxt_dev
