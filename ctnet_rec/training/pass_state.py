"""A period's pass so far, on one rank: what it has trained (per domain its loss sum and
rows, the ids of the trained domain it has seen), and the position a mid-period checkpoint
records of it, from which a resumed pass continues as if it had never stopped."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ctnet_rec.data.batch import Batch


@dataclasses.dataclass
class Position:
    """How far a period's pass had got at its mid-period checkpoint, on this rank."""

    period: int
    steps: int  # steps taken (every rank takes as many)
    rows_trained: int  # the run's rows before the period (TensorBoard's axis)
    sums: dict[str, tuple[float, int]]  # per domain: loss sum, rows
    users: np.ndarray  # the ids seen so far in the period
    items: np.ndarray

    @classmethod
    def from_arrays(cls, period: int, z: Mapping[str, np.ndarray]) -> Position:
        """Back from the arrays `PassTally.arrays` wrote (a rank's file of the checkpoint)."""
        return cls(period, int(z["steps"]), int(z["rows_trained"]),
                   {str(d): (float(x), int(n))
                    for d, x, n in zip(z["domains"], z["loss"], z["rows"], strict=True)},
                   z["users"], z["items"])


class PassTally:
    """The running sums of one pass over a period of `domain` (and, in joint learning, the
    batches of other domains it interleaves). Losses are summed on the device, so a step
    never waits for the host; they are read back only to log, to checkpoint, or at the end."""

    def __init__(self, domain: str, device: torch.device, resumed: Position | None) -> None:
        self.domain, self.device = domain, device
        # per domain: [loss sum (a float64 device tensor), rows]
        self.sums: dict[str, list[Any]] = {}
        self.users: list[np.ndarray] = []
        self.items: list[np.ndarray] = []
        self.steps, self.last = 0, domain
        if resumed is not None:
            self.steps = resumed.steps
            self.users, self.items = [resumed.users], [resumed.items]
            self.sums = {d: [torch.tensor(loss, dtype=torch.float64, device=device), n]
                         for d, (loss, n) in resumed.sums.items()}

    def add(self, domain: str, host_batch: Batch, loss: torch.Tensor) -> None:
        """One step's batch (its host copy: the raw ids are read there) and its mean loss."""
        acc = self.sums.setdefault(domain, [torch.zeros((), dtype=torch.float64,
                                                        device=self.device), 0])
        acc[0] += loss.double() * len(host_batch)
        acc[1] += len(host_batch)
        if domain == self.domain:
            self.users.append(host_batch.user_ids.numpy())
            self.items.append(host_batch.item_ids.numpy())
        self.steps += 1
        self.last = domain

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.sums.values())

    def running_loss(self) -> float:
        """The mean loss so far of the trained domain (of the last step's before it has
        one); reads the device."""
        loss, rows = self.sums.get(self.domain, self.sums[self.last])
        return float(loss) / rows

    def seen(self) -> dict[str, np.ndarray]:
        """The trained domain's distinct user and item ids of the pass."""
        return {"users": np.unique(np.concatenate(self.users)),
                "items": np.unique(np.concatenate(self.items))}

    def arrays(self) -> dict[str, np.ndarray]:
        """This rank's pass so far, for its file in a mid-period checkpoint (`Position`)."""
        names = sorted(self.sums)
        empty = np.zeros(0, np.int64)
        return {"steps": np.array(self.steps), "domains": np.array(names),
                "loss": np.array([float(self.sums[d][0]) for d in names]),
                "rows": np.array([self.sums[d][1] for d in names], dtype=np.int64),
                "users": np.concatenate(self.users) if self.users else empty,
                "items": np.concatenate(self.items) if self.items else empty}

    def reduced(self) -> dict[str, tuple[float, int]]:
        """Per domain, the mean loss and the rows over all ranks (collective: every rank
        holds every domain, as every rank reads every domain's batches)."""
        domains = sorted(self.sums)
        stats = torch.stack([torch.stack([self.sums[d][0], self.sums[d][0].new_tensor(
            self.sums[d][1])]) for d in domains])  # on the device: nccl reduces those only
        dist.all_reduce(stats)
        return {d: (float(loss / n), int(n)) for d, (loss, n) in zip(domains, stats, strict=True)}
