"""The two collectives the trainers use beyond TorchRec's: rows gathered on rank 0, and rank
0's small result on every rank. Both are no-ops in a single process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def gather_to_main(arrays: dict[str, np.ndarray],
                   device: torch.device) -> dict[str, np.ndarray] | None:
    """Every rank's arrays, each concatenated in rank order, on rank 0; None on the others.
    Each rank sends its rows once, as tensors (nothing pickled), and only rank 0 ever holds
    them all: evaluation's memory grows with the period on rank 0 alone."""
    world = dist.get_world_size()
    if world == 1:
        return arrays
    main = dist.get_rank() == 0
    out = {}
    for key, array in arrays.items():
        local = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local)], device=device))
        counts = [int(s) for s in sizes]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(world)] if main else None
        dist.gather(padded, parts, dst=0)
        if parts is not None:
            out[key] = np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts,
                                                                           strict=True)])
    return out if main else None


def from_main(value: Any) -> Any:
    """Rank 0's `value` (a small object: metrics, a count) on every rank."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
