"""A run folder at a URI (`s3://`, `gs://`, `hdfs://`, `file://`, any fsspec scheme): the job
works in a local copy, where the locks, atomic renames and fsyncs keep their guarantees, and
publishes it to the URI after each period.

Object stores have no rename and no exclusive create, so the URI side is kept consistent by
order instead: a checkpoint's files are uploaded before its manifest and a removed checkpoint
loses its manifest first, so a reader of the URI (another machine resuming, `ctnet eval`)
takes a checkpoint whole or not at all (a checkpoint is complete where its manifest is, and
the manifest's digests are verified when it is loaded). One job writes a run URI at a time:
the local lock cannot reach another machine's copy, so that is the scheduler's to ensure.

The same copy-then-publish serves the data commands' `--out` (a synthetic world, imported
events). The local copy of `scheme://host/path` is `CACHE/scheme/host/path` (`_` for no host;
CACHE: $CTNET_RUN_CACHE, default ~/.cache/ctnet-rec/runs): copies keep the layout of their
URIs, so a CTNet checkpoint's lineage (a path relative to it) names its source checkpoint's
copy, and `fetch_checkpoint` follows it back to the URI."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ctnet_rec.data.contract import SUCCESS
from ctnet_rec.data.storage import CACHE_ENV, filesystem, is_uri
from ctnet_rec.files import write_atomic
from ctnet_rec.training.checkpoint import (
    MANIFEST,
    MID_PERIOD,
    CheckpointError,
    Manifest,
    lineage_path,
)
from ctnet_rec.training.retention import LEASES, LINEAGE_KEYS
from ctnet_rec.training.run_lock import LOCK

log = logging.getLogger(__name__)

_NOT_SYNCED = {LOCK, LEASES}
_NO_HOST = "_"  # in a copy's path: a URI without a host (file:///path)

Sig = list[int | None]  # a file's size and modification time (ns; None where not known)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ctnet-rec" / "runs")


def local_copy_of(uri: str) -> Path:
    """Where this machine keeps its copy of the run or checkpoint at `uri`."""
    scheme, _, rest = uri.partition("://")
    host, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise CheckpointError(f"{uri}: not a run or checkpoint URI (a path below a "
                              "bucket or host, without '..')")
    return cache_root().joinpath(scheme, host or _NO_HOST, *parts)


def uri_of(local: Path) -> str | None:
    """The URI a local copy is of (None: a path outside the copies)."""
    try:
        rel = local.resolve().relative_to(cache_root().resolve())
    except ValueError:
        return None
    if len(rel.parts) < 3:
        return None
    scheme, host, *path = rel.parts
    return f"{scheme}://{'' if host == _NO_HOST else host}/{'/'.join(path)}"


def _synced_here(rel: str) -> bool:
    """Whether a run's file (by its path in the run) is copied: not the lock, leases, this
    copy's own records, unfinished checkpoints or a file being written."""
    parts = rel.split("/")
    name = parts[-1]
    if parts[0] in _NOT_SYNCED or (name.startswith(".") and name.endswith(".tmp")):
        return False
    if parts[0] == "checkpoints" and len(parts) > 1:
        folder = parts[1]
        return folder != MID_PERIOD and not folder.endswith((".partial", ".replaced"))
    return True


def _checkpoint_of(rel: str) -> str | None:
    """The checkpoint folder (`checkpoints/period=t`, or `init`) a run's file belongs to."""
    parts = rel.split("/")
    if parts[0] == "checkpoints" and len(parts) > 2:
        return "/".join(parts[:2])
    if parts[0] == "init" and len(parts) > 1:
        return "init"
    return None


def _manifests_last(rels: list[str]) -> list[str]:
    """Files in the order a reader may see them arrive: a checkpoint's manifest after its
    other files, run-level files (metrics.jsonl, rebuilt from the manifests) after both; in a
    dataset, the periods' completion markers after every data file."""
    def rank(rel: str) -> tuple[int, str]:
        folder = _checkpoint_of(rel)
        if folder is None:  # a run's file, or one of a checkpoint copied alone
            return (1 if rel == MANIFEST else 3 if rel.endswith(f"/{SUCCESS}") else 2), rel
        return (1 if rel == f"{folder}/{MANIFEST}" else 0), rel
    return sorted(rels, key=rank)


class RunCopy:
    """The local copy of the run at `uri`: `pull` brings it up to date, `publish` gives the
    URI what changed here since."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.local = local_copy_of(self.uri)
        self.fs, base = filesystem(self.uri)
        self.base = base.rstrip("/")

    def __str__(self) -> str:
        return self.uri

    def _beside(self, what: str) -> Path:
        """The copy's own records, beside it (a checkpoint's folder takes no other files)."""
        return self.local.parent / f".{self.local.name}.{what}"

    # -- the URI side ----------------------------------------------------------------------

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def remote_files(self) -> dict[str, Sig]:
        """The run's files at the URI, by path in the run: those of complete checkpoints
        (their manifest is there) and the run-level ones."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True,
                                                            allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise CheckpointError(f"{self.uri}: cannot be listed ({e})") from None
        prefix = self.base.lstrip("/") + "/"
        files = {}
        for info in infos:
            path = info.path.lstrip("/")
            if info.type == pafs.FileType.File and path.startswith(prefix):
                files[path[len(prefix):]] = [info.size, info.mtime_ns]
        complete = {f for f in map(_checkpoint_of, files) if f and f"{f}/{MANIFEST}" in files}
        return {rel: sig for rel, sig in files.items() if _synced_here(rel)
                and ((f := _checkpoint_of(rel)) is None or f in complete)}

    # -- the local side --------------------------------------------------------------------

    def local_files(self) -> dict[str, Sig]:
        if not self.local.is_dir():
            return {}
        out: dict[str, Sig] = {}
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and _synced_here(rel):
                st = path.stat()
                out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def _records(self) -> dict[str, Any]:
        path = self._beside("synced.json")  # what it last took from, or
        try:  # gave to, its URI
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"uri": self.uri, "local": {}, "remote": {}}
        if records.get("uri") != self.uri:
            raise CheckpointError(f"{self.local}: a local copy of {records.get('uri')}, not of "
                                  f"{self.uri}; remove it or set ${CACHE_ENV}")
        return dict(records)

    def _save_records(self, records: dict[str, Any]) -> None:
        write_atomic(self._beside("synced.json"),
                     json.dumps(records, sort_keys=True) + "\n")

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One process of this machine syncs the copy at a time (the ranks of a job all
        pull: the first copies, the others find it done)."""
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self._beside("sync.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # -- syncing ---------------------------------------------------------------------------

    def pull(self) -> Path:
        """Bring the local copy up to the URI: its complete checkpoints and run-level files
        (a checkpoint's manifest last); files removed there and unchanged here are removed.
        A file changed here and not yet published (a crash before `publish`) is kept, to be
        published next. Returns the local copy."""
        with self._exclusive():
            records = self._records()
            remote, here = self.remote_files(), self.local_files()
            for rel in _manifests_last(list(records["remote"]))[::-1]:  # manifests first
                if rel not in remote and here.get(rel) == records["local"].get(rel):
                    (self.local / rel).unlink(missing_ok=True)
                    records["local"].pop(rel, None)
                    records["remote"].pop(rel, None)
                    if (folder := _checkpoint_of(rel)) and \
                            not any((self.local / folder).iterdir()):
                        (self.local / folder).rmdir()
            wanted = [rel for rel in remote if remote[rel] != records["remote"].get(rel)
                      or here.get(rel) is None or here[rel] != records["local"].get(rel)]
            for folder in {_checkpoint_of(rel) for rel in wanted} - {None}:
                (self.local / f"{folder}/{MANIFEST}").unlink(missing_ok=True)  # incomplete
            for rel in _manifests_last(wanted):
                target = self.local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                self._copy(self._remote(rel), self.fs, str(tmp), pafs.LocalFileSystem())
                os.replace(tmp, target)
                st = target.stat()
                records["local"][rel], records["remote"][rel] = [st.st_size, st.st_mtime_ns], \
                    remote[rel]
            self._save_records(records)
        if wanted:
            log.info("%s: %d files brought from the URI", self, len(wanted))
        return self.local

    def publish(self) -> None:
        """Give the URI what changed in the local copy since the last pull or publish: a
        removed checkpoint loses its manifest first, a new one gets it last."""
        with self._exclusive():
            records = self._records()
            here = self.local_files()
            gone = [rel for rel in records["local"] if rel not in here]
            for rel in _manifests_last(gone)[::-1]:
                try:
                    self.fs.delete_file(self._remote(rel))
                except FileNotFoundError:
                    pass
                except (OSError, pa.ArrowException) as e:
                    raise CheckpointError(f"{self.uri}/{rel}: cannot be removed ({e})") from None
                records["local"].pop(rel, None)
                records["remote"].pop(rel, None)
            for folder in {_checkpoint_of(rel) for rel in gone} - {None}:
                if not (self.local / str(folder)).exists():  # no empty folder left (file://)
                    try:
                        self.fs.delete_dir(self._remote(str(folder)))
                    except (OSError, pa.ArrowException):
                        pass  # an object store has no folders
            changed = [rel for rel, sig in here.items() if records["local"].get(rel) != sig]
            for rel in _manifests_last(changed):
                self._copy(str(self.local / rel), pafs.LocalFileSystem(), self._remote(rel),
                           self.fs)
                info = self.fs.get_file_info(self._remote(rel))
                records["local"][rel], records["remote"][rel] = here[rel], \
                    [info.size, info.mtime_ns]
                if rel.endswith(MANIFEST):  # a crash later repeats only what is left
                    self._save_records(records)
            self._save_records(records)
        if changed or gone:
            log.info("%s: published %d files, removed %d", self, len(changed), len(gone))

    def _copy(self, src: str, src_fs: pafs.FileSystem, dst: str,
              dst_fs: pafs.FileSystem) -> None:
        try:
            dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        except (OSError, pa.ArrowException) as e:
            raise CheckpointError(f"{self.uri}: copying {src} to {dst} failed ({e})") from None


def local_folder(arg: str) -> tuple[Path, RunCopy | None]:
    """A `--run` or `--out` argument as the folder a job works in: a local path as it is, a
    URI as its local copy, brought up to date (with the copy, to publish to)."""
    if not is_uri(arg):
        return Path(arg), None
    copy = RunCopy(arg)
    return copy.pull(), copy


def fetch_checkpoint(ckpt: str) -> Path:
    """A checkpoint argument as a local folder: a local path as it is; a URI (a checkpoint
    folder, or a run's RUN/init) copied here with every checkpoint its lineage names (a
    CTNet's source tower), each verified by its manifest's digests when it is loaded."""
    if not is_uri(ckpt):
        return Path(ckpt)
    todo, done = [ckpt.rstrip("/")], set()
    while todo:
        uri = todo.pop()
        if uri in done:
            continue
        done.add(uri)
        folder = RunCopy(uri).pull()
        if not (folder / MANIFEST).exists():
            raise CheckpointError(f"{uri}: not a complete checkpoint (no {MANIFEST})")
        lineage = Manifest.read(folder).lineage
        for key in LINEAGE_KEYS:
            if isinstance(entry := lineage.get(key), str):
                named = lineage_path(folder, entry)
                if (named_uri := uri_of(named)) is not None and not (named / MANIFEST).exists():
                    todo.append(named_uri)
    return local_copy_of(ckpt.rstrip("/"))
