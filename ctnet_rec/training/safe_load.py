"""Reading torch.distributed.checkpoint folders without running code from them.

DCP pickles its `.metadata` and loads non-tensor entries with `torch.load(weights_only=
False)`: a crafted checkpoint folder would run a command when opened. Here the metadata is
unpickled with only the types DCP writes there (its metadata classes, torch sizes, dtypes and
layouts, paths) and every entry is loaded with `weights_only=True`; anything else is refused,
naming the file and the global it asked for."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ctnet_rec.training.errors import CheckpointError

# Every global a checkpoint's metadata may name: (module, name), each defined in that module
# (its `__module__`), never a dotted path that pickle would walk attribute by attribute.
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata",
        "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global, looked up without importing or calling anything else; refused
        before the pickle can use it otherwise."""
        found = None
        if "." not in name:
            if (module, name) in _ALLOWED:
                found = getattr(sys.modules.get(module), name, None)
                if getattr(found, "__module__", None) != module:
                    found = None
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                found = getattr(torch, name)
        if found is None:
            raise CheckpointError(f"{self.path}: refers to {module}.{name}, which a checkpoint's "
                                  "metadata never holds; not loaded (it could run code)")
        return found


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata is unpickled with the types DCP writes only. Given
    the checkpoint's file `digests`, each file is verified before it is read: a rank checks
    the files its shards are in, not every file of the checkpoint."""

    def __init__(self, path: str, digests: dict[str, str] | None = None) -> None:
        super().__init__(path)
        self.digests = digests

    def _verify(self, path: Path) -> None:
        if self.digests is not None:
            from ctnet_rec.training.checkpoint import verify_file

            verify_file(path, self.digests.get(path.name, ""))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        if kwargs.get("rank") is not None:  # a per-rank metadata file: DCP names it
            path = Path(self._get_metadata_path(kwargs["rank"]))
        if not path.exists():
            raise CheckpointError(f"{path.parent}: no checkpoint metadata ({path.name})")
        self._verify(path)  # before it is unpickled
        with path.open("rb") as fh:
            metadata = _MetadataUnpickler(fh, path).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a checkpoint's metadata")
        meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        meta.load_id = self.load_id
        metadata.storage_meta = meta
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for name in sorted({self.storage_data[item.storage_index].relative_path
                            for item in plan.items}):
            self._verify(Path(self.path) / name)
        return super().read_data(plan, planner)


class SafeLoadPlanner(DefaultLoadPlanner):
    """The default planner (sharded tensors kept whole), with non-tensor entries loaded by
    `torch.load(weights_only=True)`."""

    def __init__(self) -> None:
        super().__init__(flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        entry = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], entry)
        else:
            self.state_dict[read_item.dest_index.fqn] = entry
