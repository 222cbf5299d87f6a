"""Raw int64 ids -> embedding-table rows (the config's `id_policy`)."""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on 64-bit words that scrambles every bit."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return z


# "managed" ids go to the model as splitmix64(x) mod (2^63 - 1): non-negative, never the
# int64 maximum TorchRec's managed-collision modules use as their empty-slot marker, and
# spread evenly over the id range, which row-wise sharding splits between the ranks
MANAGED_ID_RANGE = 2**63 - 1


def map_ids_(values: np.ndarray, num_embeddings: int, policy: str) -> np.ndarray:
    """In place: raw int64 ids -> rows in [0, num_embeddings), negative and extreme ids included,
    or, for "managed", -> ids in [0, MANAGED_ID_RANGE) that the model maps to rows itself.

    "modulo" is floor modulo (x mod n >= 0, as Python's %), done by torch's in-place remainder:
    one pass, no temporaries (numpy's np.mod is three times slower on large batches)."""
    if policy == "modulo":
        torch.from_numpy(values).remainder_(num_embeddings)
        return values
    if policy == "hash":
        values[:] = (splitmix64(values) % np.uint64(num_embeddings)).astype(np.int64)
        return values
    if policy == "managed":
        values[:] = (splitmix64(values) % np.uint64(MANAGED_ID_RANGE)).astype(np.int64)
        return values
    raise ValueError(f"unknown id_policy {policy!r} (expected 'modulo', 'hash' or 'managed')")


def map_ids(raw: np.ndarray, num_embeddings: int, policy: str) -> np.ndarray:
    """Rows in [0, num_embeddings) for any int64 ids (a mapped copy)."""
    return map_ids_(np.array(raw, dtype=np.int64), num_embeddings, policy)
