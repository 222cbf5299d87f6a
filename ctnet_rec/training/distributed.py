"""The process group: from torchrun/torchx environment variables when launched by them,
otherwise a single local process. Rendezvous defaults to loopback."""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ctnet_rec.config import ConfigError
from ctnet_rec.dist_env import DistEnv

log = logging.getLogger(__name__)

LOOPBACK = "lo"
GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


@contextmanager
def _loopback_gloo() -> Iterator[None]:
    """GLOO_SOCKET_IFNAME=lo while gloo creates its device (it reads it then), unless set."""
    before = os.environ.get(GLOO_IFNAME)
    os.environ.setdefault(GLOO_IFNAME, LOOPBACK)
    try:
        yield
    finally:
        if before is None:
            del os.environ[GLOO_IFNAME]


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still whole:
    a process that exits holding a gloo group can abort in the group's teardown (`terminate
    called without an active exception`) after its work is done, and its launcher then
    reports the run as failed. Only after work that succeeded: a rank that failed may leave
    its peers inside a collective, and destroying the group could then wait on them."""
    atexit.unregister(_leave_process_group)
    atexit.register(_leave_process_group)


def require_device(device: str, asked: str) -> None:
    """Refuse "cuda" where torch sees no GPU, naming the setting or flag that `asked` for it;
    and a process whose local rank has no GPU of its own (one process per GPU)."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{asked}, but this torch sees no GPU (a CPU build, no driver, or "
                          "none given to this process: torchx's --gpu, CUDA_VISIBLE_DEVICES); "
                          "on a GPU machine `make setup DEVICE=cuda`, else the CPU")
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ConfigError(f"{asked}, but this process is local rank {local} and sees {count} "
                          "GPU(s): run one process per GPU (torchx --nproc equal to --gpu, "
                          "torchrun --nproc-per-node at most the GPUs)")


def init_distributed(device: str) -> DistEnv:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU.

    Nothing listens on a network interface other than loopback unless configured: a single
    process uses an in-memory store (no file, no socket: a job forked by a server, which
    exits without running atexit, leaves nothing behind) and binds gloo to loopback whatever
    the host name resolves to; when every rank runs on this machine gloo's sockets are bound to
    loopback (`GLOO_SOCKET_IFNAME=lo`) unless the environment names an interface. torchrun's
    own rendezvous store listens on all interfaces (torch's TCPStore has no bind address)."""
    require_device(device, "[train] device = 'cuda'")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:  # launched by torchrun / torchx
            if os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
                os.environ.setdefault(GLOO_IFNAME, LOOPBACK)
            dist.init_process_group(backend=backend)
        else:  # one local process; the environment is left untouched for child processes
            with _loopback_gloo():
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                        world_size=1)
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        if torch.cuda.is_available():  # e.g. GPUs requested from the scheduler, left idle
            log.warning("device 'cpu' ([train] device, or --device), but this process sees "
                        "%d GPU(s): it runs on the CPU; device = 'cuda' uses them",
                        torch.cuda.device_count())
    return DistEnv(rank=rank, world_size=dist.get_world_size(), device=dev)
