"""Files a run can rely on: records replaced whole or not at all, a torn last line (a crash in
the middle of an append, or a file from an older version) that does not stop a resume, a
folder's writability checked before any work, and file digests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PathArg = str | os.PathLike[str]  # a local path as the Python API takes it: a str or a Path


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotWritableError(OSError):
    """A folder that cannot take new files, found before any work was done."""


def writable_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, a `folder` (or, while it does not exist, its nearest existing
    ancestor) that cannot take a new file: tried with a real file, so a read-only mount or
    a file in the folder's place is caught whoever runs the job."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a folder", str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
            pass
    except OSError as e:
        raise NotWritableError(f"{what} {folder}: cannot write there ({probe}: "
                               f"{e.strerror or e})") from None


def write_atomic(path: Path, text: str) -> None:
    """`path` holds its old contents or `text`, whatever happens: a temporary file beside it
    (one per process: ranks writing the same file do not share it), fsynced, renamed over
    it, the folder fsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
