"""Sharded checkpoints with torch.distributed.checkpoint: one folder per period, written to a
temporary folder and renamed when complete, so a crash never leaves one that loads half.

Layout: <run>/checkpoints/period=<t>/ holding the DCP shards, `manifest.json` (model kind,
config hash, feature schema, period, world size, metrics, lineage, and the full config, so a
checkpoint rebuilds its own model) and `seen_ids.npz` (the raw user and item ids of all
training data so far, for cold-start slices).

A CTNet checkpoint holds the target tower, the adapters and their optimiser state, not the
frozen source tower: its lineage names the source checkpoint, which is loaded from there (a
billion-row source is never copied into every period's checkpoint)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ctnet_rec.config import Config, recorded_config
from ctnet_rec.files import file_digest, fsync_dir, write_atomic
from ctnet_rec.modules.kinds import TOWER
from ctnet_rec.training.errors import CheckpointError
from ctnet_rec.training.safe_load import SafeLoadPlanner, SafeReader

__all__ = ["CheckpointError"]  # raised here; defined with the other errors users act on

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SEEN_IDS = "seen_ids.npz"
MID_PERIOD = "mid-period"  # RUN/checkpoints/mid-period: the newest checkpoint inside a period
_DIR_RE = re.compile(r"^period=(\d+)$")


@dataclass
class Manifest:
    kind: str
    config_hash: str
    schema: dict[str, Any]
    period: int
    world_size: int
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source_config: dict[str, Any] | None = None
    # sha256 of every other file of the checkpoint, verified before it is loaded (a manifest
    # without them, from an earlier version or edited, is refused)
    files: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def read(folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.exists():
            raise CheckpointError(f"{folder}: not a complete checkpoint (no {MANIFEST})"
                                  + _newest_inside(folder))
        try:
            return Manifest(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path}: damaged ({e})") from None
        except FileNotFoundError:  # replaced or removed while being read
            raise CheckpointError(f"{folder}: not a complete checkpoint (no {MANIFEST})") \
                from None

    def model_domain(self) -> str | None:
        """The domain its model is trained for: its last period's, or for a deployed model
        that has trained none (RUN/init) its target tower's; None where neither is recorded."""
        return self.metrics.get("domain") or self.lineage.get("target_domain")

    def check_domain(self, domain: str, where: Path, allowed: bool = False) -> None:
        """Refuse a checkpoint trained on another domain than `domain` (a swapped source and
        target, a wrong --domain), unless `allowed` (fine-tuning a source model on purpose).
        Checkpoints that trained no period (a deployed init) name no domain."""
        trained_on = self.metrics.get("domain")
        if trained_on is not None and trained_on != domain and not allowed:
            raise CheckpointError(
                f"{where}: trained on domain {trained_on!r}, here it would be the {domain!r} "
                "model; --allow-domain-change if that is meant")

    def digest(self) -> str:
        """One digest of the checkpoint's contents (of its files' digests), for a lineage
        to say which contents it was built from."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def check_compatible(self, kind: str, config_hash: str, schema: dict[str, Any],
                         where: Path, cfg: Config | None = None,
                         sections: tuple[str, ...] = ("features", "model")) -> None:
        """Refuse a checkpoint of another kind, feature schema or model config, naming what
        differs (the settings of `sections` against `cfg`, when given)."""
        if self.kind != kind:
            raise CheckpointError(f"{where}: holds a {self.kind!r} model, expected {kind!r}")
        if self.schema != schema:
            diff = sorted(k for k in set(self.schema) | set(schema)
                          if self.schema.get(k) != schema.get(k))
            detail = "; ".join(f"{k}: checkpoint {self.schema.get(k)} vs config {schema.get(k)}"
                               for k in diff)
            raise CheckpointError(f"{where}: feature schema differs from the config ({detail})")
        if self.config_hash != config_hash:
            differ = cfg.section_differences(self.config, *sections) if cfg else []
            detail = "; ".join(differ[:5]) + ("; ..." if len(differ) > 5 else "") if differ \
                else f"hash {self.config_hash} vs {config_hash}"
            raise CheckpointError(f"{where}: model config differs ({detail})")


def period_dir(run: Path, period: int) -> Path:
    return run / "checkpoints" / f"period={period}"


def _newest_inside(folder: Path) -> str:
    """For a run folder (or its checkpoints folder) given where a checkpoint is expected: which
    checkpoint to give instead."""
    try:
        found = complete_checkpoints(folder) if folder.is_dir() else {}
    except CheckpointError:
        return ""
    return f"; a run's folder: its newest checkpoint is {found[max(found)]}" if found else ""


def complete_checkpoints(run: Path) -> dict[int, Path]:
    """A run's complete checkpoints by period (partial folders are ignored). `run` is a run
    folder or its `checkpoints` folder. A folder whose name and manifest name different
    periods (renamed by hand) is refused: resuming after it would overwrite the period it
    holds."""
    root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not root.is_dir():
        return {}
    out = {}
    for p in sorted(root.iterdir()):
        if (m := _DIR_RE.match(p.name)) and (p / MANIFEST).exists():
            try:
                recorded = Manifest.read(p).period
            except CheckpointError:  # damaged: refused by name when verified
                recorded = int(m.group(1))
            if recorded != int(m.group(1)):
                raise CheckpointError(
                    f"{p}: named period {m.group(1)}, its manifest records period {recorded} "
                    f"(a renamed folder?); rename it back to period={recorded} or remove it")
            out[int(m.group(1))] = p
    return out


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run."""
    done = complete_checkpoints(run)
    return done[max(done)] if done else None


def save_checkpoint(folder: Path, state: dict[str, Any], manifest: Manifest,
                    seen: dict[str, np.ndarray],
                    per_rank: dict[str, np.ndarray] | None = None) -> None:
    """Collective: every rank writes its shards (and `per_rank`, its own arrays, as
    `rank<r>.npz`); rank 0 completes, fsyncs and renames: a folder being replaced is renamed
    aside before the new one takes its name and deleted after, so a crash at any point
    leaves the old checkpoint or the new one complete."""
    tmp = folder.with_name(folder.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    if per_rank is not None:
        np.savez(tmp / f"rank{rank}.npz", **typing.cast(dict[str, Any], per_rank))
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except CheckpointException as e:
        raise CheckpointError(f"{tmp}: the checkpoint could not be written ({_causes(e)})") \
            from None
    dist.barrier()
    # each rank digests the files it wrote (its shards, its arrays), side by side
    mine = [p for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")
            or p.name == f"rank{rank}.npz"]
    written: dict[str, str] = {}
    for path in mine:
        with path.open("rb") as fh:  # DCP fsyncs its own files; the arrays written beside
            os.fsync(fh.fileno())
        written[path.name] = file_digest(path)
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, written)
    if rank == 0:
        np.savez(tmp / SEEN_IDS, **typing.cast(dict[str, Any], seen))
        digests = {name: d for part in everyone if part for name, d in part.items()}
        for path in sorted(tmp.iterdir()):  # what no rank digested: the metadata, seen ids
            if path.name not in digests and path.name != MANIFEST:
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
                digests[path.name] = file_digest(path)
        manifest.files = dict(sorted(digests.items()))
        write_atomic(tmp / MANIFEST, json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
        aside = folder.with_name(folder.name + ".replaced")
        if folder.exists():
            if aside.exists():
                shutil.rmtree(aside)
            folder.rename(aside)
        tmp.rename(folder)
        fsync_dir(folder.parent)
        shutil.rmtree(aside, ignore_errors=True)
    dist.barrier()


def _causes(e: CheckpointException) -> str:
    """What failed on each rank (DCP's own text is every rank's traceback)."""
    return "; ".join(f"rank {r}: {type(x[0]).__name__}: {x[0]}"
                     for r, x in sorted(e.failures.items()))


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder but its manifest, by name."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST}


@functools.cache
def _digest_once(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def verify_file(path: Path, digest: str) -> None:
    """Refuse `path` unless it has `digest`; a file is hashed once per process while it is
    unchanged (a CTNet source loaded again at a later refresh is not read twice for it)."""
    st = path.stat()
    if _digest_once(path.resolve(), st.st_size, st.st_mtime_ns) != digest:
        raise CheckpointError(f"{path}: damaged (its contents differ from those the "
                              "checkpoint was written with)")


def check_files(folder: Path) -> Manifest:
    """The manifest, once it records a digest for every file of the folder and every file
    it records is there (contents are checked as files are read: `verify_file`)."""
    manifest = Manifest.read(folder)
    if not manifest.files:
        raise CheckpointError(f"{folder}: its manifest records no file digests (written by an "
                              "earlier version, or edited); not loaded unverified")
    have = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    for name in sorted(have - set(manifest.files)):
        raise CheckpointError(f"{folder / name}: not recorded in the checkpoint's manifest; "
                              "not loaded")
    for name in sorted(set(manifest.files) - have):
        raise CheckpointError(f"{folder / name}: missing from the checkpoint")
    return manifest


def verify_checkpoint(folder: Path) -> Manifest:
    """The manifest, once every file it records is there with the contents it was written
    with (all of them read); a missing or damaged file is refused by name."""
    manifest = check_files(folder)
    for name, digest in manifest.files.items():
        verify_file(folder / name, digest)
    return manifest


def latest_intact_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run whose files are intact; a damaged newer one
    is skipped with a warning (resume then repeats its period). Collective where a process
    group of several ranks exists: rank 0 reads the files, the others take its answer."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    found: list[Path | None] = [None]
    if not several or dist.get_rank() == 0:
        for period, folder in sorted(complete_checkpoints(run).items(), reverse=True):
            try:
                verify_checkpoint(folder)
                found = [folder]
                break
            except CheckpointError as e:
                log.warning("period %d skipped: %s", period, e)
    if several:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def load_checkpoint(folder: Path, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Load in place into `state` (built from the live, possibly resharded, model); returns
    the seen ids. Works at another world size or sharding plan."""
    dcp_load(state, folder)
    return read_seen_ids(folder)


def dcp_load(state: dict[str, Any], folder: Path) -> None:
    """torch.distributed.checkpoint.load of `folder` into `state` in place (resharding as
    needed), reading nothing that could run code (`safe_load`)."""
    manifest = check_files(folder)
    reader = SafeReader(str(folder), manifest.files)  # verifies each file it reads
    reader.read_metadata()  # refused here with its own message, not wrapped by DCP's
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:  # a file refused as it was read: its own message
        refused = [x[0] for _, x in sorted(e.failures.items())
                   if isinstance(x[0], CheckpointError)]
        if refused:
            raise refused[0] from None
        raise CheckpointError(f"{folder}: could not be read ({_causes(e)})") from None


def saved_entries(folder: Path) -> dict[str, Any]:
    """The checkpoint's entries (key -> its metadata: a tensor's size and dtype), read
    safely, once the files are those the manifest records and the metadata's digest holds."""
    manifest = check_files(folder)
    return SafeReader(str(folder), manifest.files).read_metadata().state_dict_metadata


def lineage_entry(folder: Path, path: Path) -> str:
    """How checkpoint `folder`'s lineage records another checkpoint: relative to `folder`, so
    that moving or copying the whole runs folder keeps the two together."""
    return os.path.relpath(path.resolve(), folder.resolve())


def lineage_path(folder: Path, recorded: str) -> Path:
    """The checkpoint a lineage entry of `folder` names (relative to it, or absolute as
    earlier versions recorded it)."""
    path = Path(recorded)
    return path if path.is_absolute() else (folder / path).resolve()


def read_seen_ids(folder: Path) -> dict[str, np.ndarray]:
    """The ids a checkpoint had seen, once its file has the digest the manifest records (the
    folder's files were listed against the manifest when it was loaded: `dcp_load`)."""
    verify_file(folder / SEEN_IDS, Manifest.read(folder).files.get(SEEN_IDS, ""))
    try:
        with np.load(folder / SEEN_IDS) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:  # missing, truncated, not an npz
        raise CheckpointError(f"{folder / SEEN_IDS}: unreadable ({e})") from None


def load_into_submodule(folder: Path, state: dict[str, Any], prefix: str,
                        only: Callable[[str], bool] | None = None) -> None:
    """Load a checkpoint into the `prefix` submodule of a bigger model (e.g. a tower checkpoint
    into CTNet's `target.`), in place and resharding as needed: the bigger model's keys with
    the prefix stripped (and, given `only`, those it accepts) are the checkpoint's keys."""

    def key_of(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        inner = key[len(prefix):]
        return inner if only is None or only(inner) else None

    if not load_mapped(folder, state, key_of):
        raise CheckpointError(f"{folder}: the model has no {prefix!r} submodule to load into")


def load_mapped(folder: Path, state: dict[str, Any], key_of: Callable[[str], str | None],
                table_key_of: Callable[[str], str] | None = None) -> int:
    """Load the checkpoint's entries into `state` in place (resharding as needed), the state's
    key k taking the checkpoint's key `key_of(k)` (None: left as is), in one dcp.load. `state`
    holds "model" and optionally "optim" (a fused optimiser's state dict, whose entries are
    keyed by table, e.g. `user.momentum1`: `table_key_of` renames those) and "dense_optim"
    (keyed by parameter name). Several state keys may take one checkpoint key (PLE's shared
    experts and a task's own expert all start as one tower layer): the first is loaded, the
    others copy it. Returns how many model entries were loaded."""

    def mapped(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """The request (one state entry per checkpoint key) and, per checkpoint key, every
        state key taking it, the requested one first."""
        takers: dict[str, list[str]] = {}
        for k in d:
            if (saved := key_of(k)) is not None:
                takers.setdefault(saved, []).append(k)
        return {saved: d[keys[0]] for saved, keys in takers.items()}, takers

    request: dict[str, Any] = {}
    request["model"], takers = mapped(state["model"])
    if not request["model"]:
        return 0
    copies = [(state["model"], takers)]
    if "optim" in state:
        rename = table_key_of or (lambda k: k)
        entries, _ = mapped(state["optim"]["state"])
        request["optim"] = {"state": {k: {rename(i): t for i, t in v.items()}
                                      for k, v in entries.items()}}
    if "dense_optim" in state:
        request["dense_optim"], dense_takers = mapped(state["dense_optim"])
        copies.append((state["dense_optim"], dense_takers))
    dcp_load(request, folder)
    for d, by_saved in copies:
        for keys in by_saved.values():
            for k in keys[1:]:
                d[k] = _copy_of(d[keys[0]], d[k])
    return sum(len(keys) for keys in takers.values())


def _copy_of(loaded: Any, into: Any) -> Any:
    """`into` (a tensor, or a dict of them) with `loaded`'s values."""
    if isinstance(into, dict):
        return {k: _copy_of(loaded[k], v) for k, v in into.items()}
    if isinstance(into, torch.Tensor):
        return into.copy_(loaded)
    return loaded


def load_widened(folder: Path, state: dict[str, Any], key: str, saved_key: str,
                 new_columns: slice) -> None:
    """`state`'s weight `key`, a linear layer with more input columns than the checkpoint's
    `saved_key`: the saved columns around `new_columns`, zeros in them (so the layer computes
    what the saved one did); likewise its dense optimiser state of the weight's shape
    (AdaGrad's sums, Adam's moments)."""
    weight = state["model"][key]
    optim = {k: v for k, v in state["dense_optim"].get(key, {}).items()
             if v.shape == weight.shape}
    start, stop = new_columns.start, new_columns.stop
    saved_shape = (weight.shape[0], weight.shape[1] - (stop - start))
    request: dict[str, Any] = {"model": {saved_key: torch.empty(saved_shape)},
               "dense_optim": {saved_key: {k: torch.empty(saved_shape) for k in optim}}}
    dcp_load(request, folder)
    pairs = [(weight, request["model"][saved_key]),
             *((v, request["dense_optim"][saved_key][k]) for k, v in optim.items())]
    with torch.no_grad():
        for new, saved in pairs:
            new.zero_()
            new[:, :start] = saved[:, :start]
            new[:, stop:] = saved[:, start:]


# -- compatibility: what a checkpoint must match to be loaded as a given model ----------------

INIT = "init"  # RUN/init: a model deployed from two tower checkpoints, before training


def feature_schema(cfg: Config) -> dict[str, Any]:
    """What a checkpoint's tables and inputs must match: keys, tables and their sizes."""
    f = cfg.features
    return {
        "sparse_keys": f.sparse_keys(),
        "dense": f.dense_names(),
        "tables": {t.name: [t.num_embeddings, t.embedding_dim] for t in f.tables},
        "id_policy": {t.name: f.policy_of(t.name) for t in f.tables},
        "max_len": {s.name: s.max_len for s in f.sequences},
    }


def check_tower_checkpoint(folder: Path, cfg: Config, role: str) -> Manifest:
    """Refuse a checkpoint that does not fit the tower it is meant for, naming the role."""
    try:
        manifest = Manifest.read(folder)
        manifest.check_compatible(TOWER, cfg.section_hash("features", "model"),
                                  feature_schema(cfg), folder, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{role} checkpoint: {e}") from None
    return manifest


def check_tower_pair(source_ckpt: Path, source: Manifest, target_ckpt: Path, target: Manifest,
                     source_domain: str | None = None) -> None:
    """Refuse two tower checkpoints that cannot be deployed together as a source and a
    target: both of one domain (an argument given twice or swapped), a source of a later
    period than the target (it has seen the periods the deployed model is evaluated on
    next), and with `source_domain` (a joint model's) a source of another domain or a
    target of that one."""
    domains = source.metrics.get("domain"), target.metrics.get("domain")
    if domains[0] is not None and domains[0] == domains[1]:
        raise CheckpointError(f"{source_ckpt} and {target_ckpt}: both trained on domain "
                              f"{domains[0]!r}; the source tower is another domain's model")
    if source_domain is not None and domains[1] == source_domain:
        raise CheckpointError(f"{target_ckpt}: trained on domain {source_domain!r}, the source "
                              "domain; the target tower is the target domain's model")
    if source_domain is not None and domains[0] not in (None, source_domain):
        raise CheckpointError(f"{source_ckpt}: trained on domain {domains[0]!r}, not the source "
                              f"domain {source_domain!r}")
    if source.period > target.period:
        raise CheckpointError(
            f"{source_ckpt}: trained through period {source.period}, after the target's "
            f"{target.period} ({target_ckpt}); it has seen the periods the deployed model is "
            "evaluated on next. Deploy with a source checkpoint of a period <= the target's")


def config_of(manifest: Manifest, folder: Path, source: bool = False) -> Config:
    raw = manifest.source_config if source else manifest.config
    if not raw:
        raise CheckpointError(f"{folder}: the manifest records no config; pass one explicitly")
    return recorded_config(raw)
