"""Checkpoint retention: a run keeps its newest K period checkpoints, never one that a lineage
in the same runs root still names (a CTNet checkpoint loads its source tower from there) nor
one a running job holds (a lease: a CTNet job chooses its source checkpoints when it starts
and loads them period by period)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ctnet_rec.files import append_line, write_atomic
from ctnet_rec.training.checkpoint import MANIFEST, complete_checkpoints, lineage_path

log = logging.getLogger(__name__)

LINEAGE_KEYS = ("source_checkpoint", "target_checkpoint", "init")  # checkpoints a lineage names
PRUNED_METRICS = "pruned_metrics.jsonl"  # the metrics lines of a run's pruned periods
LEASES = "leases"  # RUN/leases/<host>-<pid>-<id>.json: checkpoints of RUN a running job holds


def run_of(checkpoints: Path) -> Path:
    """The run folder of a run or of its `checkpoints` folder."""
    return checkpoints.parent if checkpoints.name == "checkpoints" else checkpoints


@contextmanager
def lease(run: Path, folders: Iterable[Path]) -> Iterator[None]:
    """Hold `folders` (checkpoints of `run`) against its retention while the block runs."""
    held = sorted({str(f.resolve()) for f in folders})
    leases = run / LEASES
    leases.mkdir(parents=True, exist_ok=True)
    path = leases / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    write_atomic(path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "checkpoints": held}) + "\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (signal 0: checks only; another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def leased_checkpoints(run: Path) -> set[Path]:
    """The checkpoints of `run` that running jobs hold. A lease of a process of this host
    that no longer runs is stale and removed; another host's stays until its job removes it."""
    out: set[Path] = set()
    for path in sorted((run / LEASES).glob("*.json")):
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):  # being written, or torn: hold nothing by it
            continue
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
            path.unlink(missing_ok=True)
            continue
        out |= {Path(p) for p in held.get("checkpoints", [])}
    return out


def referenced_checkpoints(root: Path) -> set[Path]:
    """Every checkpoint folder a manifest under `root` names in its lineage."""
    out = set()
    for manifest in root.rglob(MANIFEST):
        try:
            lineage = json.loads(manifest.read_text()).get("lineage") or {}
        except (OSError, ValueError):  # a manifest being written: its checkpoint is not done
            continue
        out |= {lineage_path(manifest.parent, v).resolve() for k in LINEAGE_KEYS
                if isinstance(v := lineage.get(k), str)}
    return out


def prune_checkpoints(run: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete period checkpoints of `run`, except those a
    lineage under the runs root (the folder holding `run`) names or a running job holds
    (`lease`); each deletion is logged and
    its period's metrics line kept in RUN/pruned_metrics.jsonl first. Returns the deleted."""
    done = complete_checkpoints(run)
    old = sorted(done)[:-keep] if keep > 0 else []
    if not old:
        return []
    named = referenced_checkpoints(run.resolve().parent)
    held = leased_checkpoints(run)
    removed = []
    for period in old:
        folder = done[period]
        if folder.resolve() in named:
            log.info("retention: %s stays, a lineage names it", folder)
            continue
        if folder.resolve() in held:
            log.info("retention: %s stays, a running job holds it", folder)
            continue
        metrics = json.loads((folder / MANIFEST).read_text()).get("metrics", {})
        append_line(run / PRUNED_METRICS, json.dumps({"period": period, **metrics},
                                                      sort_keys=True))
        shutil.rmtree(folder)
        removed.append(folder)
        log.info("retention: removed %s (keep_checkpoints = %d)", folder, keep)
    return removed
