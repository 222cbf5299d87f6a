"""Imported first in a process, it makes this CPU build's `torch.cuda.is_available` answer as
a CUDA build's does on a host whose NVML sees no GPU, and records each time it asks the CUDA
runtime (torch's default check, `cudaGetDeviceCount`): after that call torch refuses CUDA to
every process forked from this one ("Cannot re-initialize CUDA in forked subprocess"). A job
server that preloads it before the library hands the record to its jobs, which can then say
whether the server asked."""

from __future__ import annotations

import traceback

import torch

ASKED: list[str] = []


def _is_available() -> bool:
    if not torch.cuda._nvml_based_avail():  # the runtime's check: it poisons fork
        ASKED.append("".join(traceback.format_stack(limit=12)[:-1]))
    return False  # NVML's, or the runtime's, count: no GPU


torch.cuda.is_available = _is_available


def assert_the_cuda_runtime_was_not_asked() -> None:
    assert not ASKED, "asked the CUDA runtime, so no fork can use CUDA:\n" + "\n".join(ASKED)
