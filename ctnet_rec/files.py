"""Crash-safe files: a run's records are replaced whole or not at all, and a torn last line
(a crash in the middle of an append, or a file from an older version) does not stop a resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`path` holds its old contents or `text`, whatever happens: a temporary file beside it,
    fsynced, renamed over it, the folder fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """One line appended and fsynced (a crash leaves at most a torn last line, which
    `read_jsonl` drops)."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line is dropped with a warning, a damaged
    line before it is refused naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: its last line is torn (a crash while it was written); "
                            "ignored", path)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return out
