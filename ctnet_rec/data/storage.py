"""Where data lives: a local folder, or a URI of remote storage (`s3://bucket/prefix`,
`gs://...`, `hdfs://...`, `file:///...`: pyarrow's filesystems; any other scheme an installed
fsspec implementation registers, e.g. `abfs://` with adlfs, through pyarrow's fsspec handler).
Data is only read from there, file by file and row group by row group, as from a local
folder; runs, checkpoints and scores are written locally (or to a mounted filesystem)."""

# Annotations are evaluated (no `from __future__ import annotations`): the reader, which
# imports this module, travels inside exported artifacts (torch.package).

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

DataRoot = Path | str  # a local folder, or a URI kept as text (a Path would merge its "//")
# the environment variable naming where runs and outputs at URIs are copied to locally
# (`training/run_copy.py`)
CACHE_ENV = "CTNET_RUN_CACHE"


def is_uri(root: DataRoot) -> bool:
    return isinstance(root, str) and "://" in root


def data_root(text: str | Path) -> DataRoot:
    """A data root as the command line gives it: a URI stays text, anything else a Path."""
    return text if isinstance(text, str) and is_uri(text) else Path(text)


def join(root: DataRoot, *parts: str) -> DataRoot:
    if isinstance(root, Path):
        return root.joinpath(*parts)
    return "/".join([root.rstrip("/"), *parts])


def filesystem(root: DataRoot) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `root`, and `root`'s path in it."""
    if not is_uri(root):
        return pafs.LocalFileSystem(), str(Path(root).absolute())
    uri = str(root)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), str(path)


@dataclass(frozen=True)
class DataFile:
    """One file of a data root: read through its filesystem, shown as the root names it."""

    fs: pafs.FileSystem
    path: str  # in `fs`
    shown: str  # in messages: the root as given, then the path below it

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.shown


@dataclass(frozen=True)
class Entry:
    """A folder's entry: its name, whether it is a folder, and it as a file."""

    name: str
    is_dir: bool
    file: DataFile


def entries(root: DataRoot, *parts: str) -> list[Entry] | None:
    """The entries of the folder `root/parts...`, by name; None when there is no such folder."""
    tree = entries_below(root, *parts, depth=1)
    return None if tree is None else tree[""]


def entries_below(root: DataRoot, *parts: str,
                  depth: int) -> dict[str, list[Entry]] | None:
    """Every entry of the folder `root/parts...` down to `depth` levels, by the folder holding
    it (its path below, "" for the folder itself), each folder's by name; None when there is
    no such folder. One listing: on object stores one paginated request, where a folder at a
    time would be a request per folder (a domain of a thousand periods, polled each minute)."""
    fs, base = filesystem(root)
    path = "/".join([base.rstrip("/"), *parts]).rstrip("/")
    shown = str(join(root, *parts)).rstrip("/")
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    tree: dict[str, list[Entry]] = {"": []}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=depth > 1)):
        below = _below(info.path, path)
        folder, _, name = below.rpartition("/")
        if below.count("/") >= depth:
            continue
        is_dir = info.type == pafs.FileType.Directory
        tree.setdefault(folder, []).append(Entry(name, is_dir,
                                                 DataFile(fs, info.path, f"{shown}/{below}")))
        if is_dir:
            tree.setdefault(below, [])
    return {k: sorted(v, key=lambda e: e.name) for k, v in tree.items()}


def _below(listed: str, folder: str) -> str:
    """A listed path relative to the listed `folder`: filesystems spell what they list with
    or without a leading "/", some with their scheme and host (`hdfs://namenode:8020/...`)."""
    bare = listed.split("://", 1)[1].partition("/")[2] if "://" in listed else listed
    prefix = folder.split("://", 1)[-1].strip("/") + "/"
    if not bare.strip("/").startswith(prefix):
        raise ValueError(f"{listed}: listed under {folder}, but not below it")
    return bare.strip("/").removeprefix(prefix)
