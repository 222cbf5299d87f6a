"""Run folders at URIs: a job works in a local copy and publishes it after each period; a
reader of the URI (another machine resuming, `ctnet eval` of a CTNet checkpoint with its
source tower) takes a checkpoint whole or not at all. URIs here: fsspec's in-memory
filesystem and fsspec's local one (`local://`, which pyarrow does not know: it goes through
the fsspec handler, as `abfs://` or any other fsspec scheme would)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from ctnet_rec.cli import main
from ctnet_rec.training.checkpoint import CheckpointError
from ctnet_rec.training.run_copy import CACHE_ENV, RunCopy, fetch_checkpoint, local_copy_of, uri_of

from .conftest import shared_run_threads


def _machine(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Another machine: its own cache of local copies."""
    monkeypatch.setenv(CACHE_ENV, str(cache))


def _write_run(run: Path, periods: list[int]) -> None:
    for t in periods:
        folder = run / "checkpoints" / f"period={t}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_bytes(bytes([t]) * 100)
        (folder / "manifest.json").write_text(json.dumps({"period": t}))
    (run / "metrics.jsonl").write_text("".join(f'{{"period": {t}}}\n' for t in periods))
    (run / ".lock").write_text("pid 1\n")


def test_a_copy_keeps_the_layout_of_its_uri(monkeypatch, tmp_path):
    _machine(monkeypatch, tmp_path / "cache")
    for uri in ("s3://bucket/runs/B", "file:///abs/runs/B", "local:///abs/runs/B"):
        assert uri_of(local_copy_of(uri)) == uri
    assert local_copy_of("s3://bucket/runs/B").relative_to(tmp_path / "cache").parts == \
        ("s3", "bucket", "runs", "B")
    assert uri_of(tmp_path / "elsewhere") is None
    for bad in ("s3://bucket/../x", "s3://bucket"):
        with pytest.raises(CheckpointError, match="not a run or checkpoint URI"):
            local_copy_of(bad)


def test_publish_then_pull_elsewhere_in_the_order_readers_need(monkeypatch, tmp_path):
    """Files reach the URI with each checkpoint's manifest after its files and metrics.jsonl
    last; the lock does not travel; a removed checkpoint is removed there (its manifest
    first) and from another machine's copy at its next pull; a checkpoint whose manifest
    never arrived (a publish killed halfway) is not taken; a local change not yet published
    survives a pull."""
    uri = "memory://bucket/runs/B"
    _machine(monkeypatch, tmp_path / "m1")
    first = RunCopy(uri)
    _write_run(first.pull(), [0, 1])
    order: list[str] = []
    copy_file = RunCopy._copy

    def recorded(self, src, src_fs, dst, dst_fs):
        order.append(dst.split("/runs/B/")[-1])
        copy_file(self, src, src_fs, dst, dst_fs)

    monkeypatch.setattr(RunCopy, "_copy", recorded)
    first.publish()
    assert order == ["checkpoints/period=0/__0_0.distcp", "checkpoints/period=1/__0_0.distcp",
                     "checkpoints/period=0/manifest.json", "checkpoints/period=1/manifest.json",
                     "metrics.jsonl"]
    order.clear()
    first.publish()
    assert order == []  # nothing changed

    _machine(monkeypatch, tmp_path / "m2")
    second = RunCopy(uri)
    here = second.pull()
    assert sorted(p.relative_to(here).as_posix() for p in here.rglob("*") if p.is_file()) == \
        sorted(order_all := ["checkpoints/period=0/__0_0.distcp",
                             "checkpoints/period=0/manifest.json",
                             "checkpoints/period=1/__0_0.distcp",
                             "checkpoints/period=1/manifest.json", "metrics.jsonl"])
    assert all((here / r).read_bytes() == (first.local / r).read_bytes() for r in order_all)

    # machine 1: retention removed period 0; period 2 is published halfway (killed)
    import shutil

    shutil.rmtree(first.local / "checkpoints" / "period=0")
    order.clear()
    first.publish()
    assert order == []
    memory = fsspec.filesystem("memory")
    assert not memory.exists("/bucket/runs/B/checkpoints/period=0/manifest.json")
    _write_run(first.local, [2])
    monkeypatch.setattr(RunCopy, "_copy", lambda *a: (_ for _ in ()).throw(
        CheckpointError("network down")) if a[3].endswith("manifest.json") else
        copy_file(*a))
    with pytest.raises(CheckpointError, match="network down"):
        first.publish()
    assert memory.exists("/bucket/runs/B/checkpoints/period=2/__0_0.distcp")

    # machine 2 pulls: period 0 gone, the half-published period 2 not taken, its own
    # unpublished change kept
    (here / "notes.txt").write_text("mine")
    assert second.pull() == here
    assert not (here / "checkpoints" / "period=0").exists()
    assert not (here / "checkpoints" / "period=2").exists()
    assert (here / "notes.txt").read_text() == "mine"

    monkeypatch.setattr(RunCopy, "_copy", copy_file)  # the network is back
    _machine(monkeypatch, tmp_path / "m1")
    first.publish()  # finishes what was left
    _machine(monkeypatch, tmp_path / "m2")
    second.pull()
    assert (here / "checkpoints" / "period=2" / "manifest.json").exists()


def test_a_copy_of_another_uri_is_refused(monkeypatch, tmp_path):
    _machine(monkeypatch, tmp_path / "cache")
    RunCopy("memory://one/run").pull()
    records = tmp_path / "cache" / "memory" / "one" / ".run.synced.json"
    records.write_text(json.dumps({"uri": "memory://two/run", "local": {}, "remote": {}}))
    with pytest.raises(CheckpointError, match="a local copy of memory://two/run"):
        RunCopy("memory://one/run").pull()


def test_runs_at_uris_continue_and_score_on_other_machines(towers, tiny_world, monkeypatch,
                                                          tmp_path):
    """Machine 1 trains the source run A and deploys CTNet from URIs; machine 2 continues
    both (A resumes, CTNet trains a period with A's newest source); machine 3 scores the
    CTNet checkpoint from its URI (its source tower comes with it, through the lineage):
    the same AUC the training job measured, and A's metrics equal a local run's."""
    store = f"local://{tmp_path}/store"
    cfg = ["--config", str(towers.config_path), "--data", str(tiny_world)]
    _machine(monkeypatch, tmp_path / "m1")
    with shared_run_threads():  # as `towers` trained: A's metrics are compared to 1e-6 below
        assert main(["train", *cfg, "--domain", "A", "--periods", "0:2",
                     "--run-dir", f"{store}/A"]) == 0
        assert main(["transfer", "init", "--source-ckpt", f"{store}/A/checkpoints/period=1",
                     "--target-ckpt", str(towers.target(1)), "--config",
                     str(towers.config_path), "--run", f"{store}/ctnet"]) == 0
        _machine(monkeypatch, tmp_path / "m2")
        assert main(["train", *cfg, "--domain", "A", "--periods", "0:3", "--resume",
                     "--run-dir", f"{store}/A"]) == 0
        assert main(["transfer", "run", "--run", f"{store}/ctnet", "--source-ckpts",
                     f"{store}/A", "--data", str(tiny_world), "--domain", "B", "--periods",
                     "2:4"]) == 0
    published = [json.loads(line) for line in
                 (tmp_path / "store" / "A" / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in
             (towers.source_run / "metrics.jsonl").read_text().splitlines()][:3]
    assert [m["period"] for m in published] == [0, 1, 2]
    for m, ref in zip(published, local, strict=True):
        assert m["eval"]["auc"] == pytest.approx(ref["eval"]["auc"], abs=1e-6)
    trained = json.loads((tmp_path / "store" / "ctnet" / "checkpoints" / "period=3" /
                          "manifest.json").read_text())
    assert trained["lineage"]["source_checkpoint"].endswith("A/checkpoints/period=2")

    _machine(monkeypatch, tmp_path / "m3")
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", f"{store}/ctnet/checkpoints/period=2", "--data",
                 str(tiny_world), "--domain", "B", "--period", "3", "--out", str(out)]) == 0
    ctnet2 = json.loads((tmp_path / "store" / "ctnet" / "checkpoints" / "period=2" /
                         "manifest.json").read_text())
    assert json.loads(out.read_text())["auc"] == pytest.approx(ctnet2["metrics"]["eval"]["auc"],
                                                                abs=1e-6)
    assert fetch_checkpoint(f"{store}/A/checkpoints/period=1").is_dir()
