"""Data read from remote storage: a data root given as a URI (pyarrow's filesystems, or any
fsspec one: here fsspec's in-memory filesystem and a `file://` URI) trains, scores and
validates exactly as the same files in a local folder."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from ctnet_rec.cli import main
from ctnet_rec.data.contract import SUCCESS, DataError, list_periods
from ctnet_rec.data.storage import data_root
from ctnet_rec.training.inference import open_checkpoint


@pytest.fixture(scope="module")
def in_memory(tiny_world: Path) -> str:
    """The tiny world's B domain copied into fsspec's in-memory filesystem."""
    memory = fsspec.filesystem("memory")
    for f in sorted((tiny_world / "B").rglob("*.parquet")):
        memory.pipe(f"/world/B/{f.relative_to(tiny_world / 'B')}", f.read_bytes())
    return "memory://world"


def test_a_uri_stays_a_uri_and_a_path_a_path(tmp_path):
    assert data_root("s3://bucket/prefix") == "s3://bucket/prefix"
    assert data_root(str(tmp_path)) == tmp_path


def test_a_remote_root_reads_as_the_local_folder(towers, tiny_world, in_memory, tmp_path):
    """Training a period from the URI ends with the local folder's loss and scores (same
    files, same order), to the last bit; `data validate` reads it too. A file:// URI (pyarrow's
    own filesystem rather than fsspec's) lists and reads the same batches."""
    from ctnet_rec.data.reader import ParquetBatchReader

    local = list_periods(tiny_world, "B")
    for root in (in_memory, f"file://{tiny_world}"):
        remote = list_periods(root, "B")
        assert sorted(remote) == sorted(local)
        assert [f.name for f in remote[2]] == [f.name for f in local[2]]
        assert str(remote[2][0]).startswith(root)
    cfg = towers.cfg
    here, there = (next(iter(ParquetBatchReader(root, "B", [2], cfg.features, cfg.data,
                                                shuffle=False)))
                   for root in (tiny_world, f"file://{tiny_world}"))
    assert torch.equal(here.sparse.values(), there.sparse.values())
    scores = {}
    for name, data in (("local", str(tiny_world)), ("remote", in_memory)):
        run = tmp_path / name
        assert main(["train", "--config", str(towers.config_path), "--data", data,
                     "--domain", "B", "--periods", "2", "--run-dir", str(run),
                     "--init", str(towers.target(1))]) == 0
        trainer, manifest = open_checkpoint(run / "checkpoints" / "period=2")
        scores[name] = (manifest.metrics["train_loss"], trainer.predict(tiny_world, "B", 3)["p"])
    assert scores["remote"][0] == scores["local"][0]
    np.testing.assert_array_equal(scores["remote"][1], scores["local"][1])
    assert main(["data", "validate", in_memory, "--config", str(towers.config_path),
                 "--domain", "B"]) == 0


def test_a_missing_remote_folder_is_named(in_memory):
    with pytest.raises(DataError, match="memory://world/C: domain folder not found"):
        list_periods(in_memory, "C")


def test_periods_are_listed_in_one_request_however_many_there_are(monkeypatch):
    """A pipeline polls its data root every minute for months: a folder listing per period
    (two requests each on an object store) grew with every day it ran. The periods and their
    files come from one recursive listing instead, with the layout's rules as before."""
    memory = fsspec.filesystem("memory")
    for t in range(40):
        memory.pipe(f"/many/B/period={t}/part-0.parquet", b"x")
        memory.pipe(f"/many/B/period={t}/{SUCCESS}", b"")
        memory.pipe(f"/many/B/period={t}/_temporary/0/part-9.parquet", b"x")  # a writer's
    memory.pipe("/many/B/period=40/part-0.parquet", b"x")  # being written: no marker
    memory.pipe("/many/B/.hidden/part-0.parquet", b"x")
    listings: list[str] = []
    find = type(memory).find

    def counted(self, path, *args, **kwargs):
        listings.append(path)
        return find(self, path, *args, **kwargs)

    monkeypatch.setattr(type(memory), "find", counted)
    periods = list_periods("memory://many", "B")
    assert len(listings) == 1
    assert sorted(periods) == list(range(40))
    assert [[f.name for f in files] for files in periods.values()] == [["part-0.parquet"]] * 40
    assert str(periods[3][0]) == "memory://many/B/period=3/part-0.parquet"


def test_a_listed_path_is_placed_however_its_filesystem_spells_it():
    from ctnet_rec.data.storage import _below

    for listed in ("/data/ctr/B/period=3/part-0.parquet",  # local
                   "data/ctr/B/period=3/part-0.parquet",  # object stores, fsspec
                   "hdfs://namenode:8020/data/ctr/B/period=3/part-0.parquet"):
        assert _below(listed, "/data/ctr/B") == "period=3/part-0.parquet"
    with pytest.raises(ValueError, match="not below it"):
        _below("/data/other/B/period=3/part-0.parquet", "/data/ctr/B")
