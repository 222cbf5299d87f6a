"""The process group: from torchrun/torchx environment variables when launched by them,
otherwise a single local process. Rendezvous defaults to loopback."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> DistEnv:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU."""
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:  # launched by torchrun / torchx
            dist.init_process_group(backend=backend)
        else:  # one local process; the environment is left untouched for child processes
            dist.init_process_group(backend=backend, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistEnv(rank=rank, world_size=dist.get_world_size(), device=dev)
