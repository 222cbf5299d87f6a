"""The serving handoff: each target's promoted artifact under RUNS/serving/<domain>/.

`period=<t>/` holds an export (`model.pt`, `metadata.json`) and `serving.json` (period,
source period, gate figures, the artifact's digest); `current` is a symbolic link to the one
being served. A new artifact is written to a hidden folder, fsynced and renamed into place,
then `current` is replaced by a new link in one rename: a reader that opens
`serving/<domain>/current/model.pt` gets the old artifact or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ctnet_rec.files import fsync_dir, write_atomic

SERVING = "serving"
CURRENT = "current"
RECORD = "serving.json"


def serving_dir(runs: Path, domain: str) -> Path:
    return runs / SERVING / domain


def served(runs: Path, domain: str) -> dict[str, Any] | None:
    """The record of the artifact being served for `domain` (None: nothing promoted yet)."""
    record = serving_dir(runs, domain) / CURRENT / RECORD
    return json.loads(record.read_text()) if record.exists() else None


def publish(runs: Path, domain: str, period: int, ckpt: Path, record: dict[str, Any],
            table_dtype: str = "fp32") -> Path:
    """Export checkpoint `ckpt` (trained through `period`) and make it the served artifact
    of `domain`, atomically; `record` (gate figures, source period) goes into serving.json
    with the artifact's digest. Publishing a period again replaces its folder whole."""
    from ctnet_rec.serving.export import ARTIFACT, export_checkpoint

    root = serving_dir(runs, domain)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"period={period}"
    staging = root / f".period={period}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    export_checkpoint(ckpt, staging, table_dtype)  # type: ignore[arg-type]
    digest = hashlib.sha256((staging / ARTIFACT).read_bytes()).hexdigest()
    write_atomic(staging / RECORD, json.dumps(
        {"period": period, "checkpoint": str(ckpt), "sha256": digest, **record},
        indent=2, sort_keys=True) + "\n")
    for path in staging.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(staging)
    if final.exists():
        aside = root / f".period={period}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        staging.rename(final)
        shutil.rmtree(aside)
    else:
        staging.rename(final)
    link = root / f".{CURRENT}.{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, root / CURRENT)
    fsync_dir(root)
    return final


def prune_served(runs: Path, domain: str, keep: int) -> None:
    """Remove all but the newest `keep` artifacts of `domain` (0: keep all), never the one
    being served."""
    root = serving_dir(runs, domain)
    if keep <= 0 or not root.is_dir():
        return
    current = (root / CURRENT).resolve() if (root / CURRENT).exists() else None
    folders = sorted((p for p in root.glob("period=*") if p.is_dir()),
                     key=lambda p: int(p.name.split("=")[1]))
    for folder in folders[:-keep]:
        if folder.resolve() != current:
            shutil.rmtree(folder)
