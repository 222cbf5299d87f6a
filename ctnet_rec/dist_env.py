"""Where this process runs: its rank, the world size, its device. Below both the training loop
(which creates the process group) and sharding (which places tables by it)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0
