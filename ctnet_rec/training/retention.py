"""Checkpoint retention: a run keeps its newest K period checkpoints, never one that a lineage
in the same runs root still names (a CTNet checkpoint loads its source tower from there)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ctnet_rec.training.checkpoint import MANIFEST, complete_checkpoints, lineage_path

log = logging.getLogger(__name__)

LINEAGE_KEYS = ("source_checkpoint", "target_checkpoint", "init")  # checkpoints a lineage names
PRUNED_METRICS = "pruned_metrics.jsonl"  # the metrics lines of a run's pruned periods


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
    lineage under the runs root (the folder holding `run`) names; each deletion is logged and
    its period's metrics line kept in RUN/pruned_metrics.jsonl first. Returns the deleted."""
    done = complete_checkpoints(run)
    old = sorted(done)[:-keep] if keep > 0 else []
    if not old:
        return []
    named = referenced_checkpoints(run.resolve().parent)
    removed = []
    for period in old:
        folder = done[period]
        if folder.resolve() in named:
            log.info("retention: %s stays, a lineage names it", folder)
            continue
        metrics = json.loads((folder / MANIFEST).read_text()).get("metrics", {})
        with open(run / PRUNED_METRICS, "a") as f:
            f.write(json.dumps({"period": period, **metrics}, sort_keys=True) + "\n")
        shutil.rmtree(folder)
        removed.append(folder)
        log.info("retention: removed %s (keep_checkpoints = %d)", folder, keep)
    return removed
