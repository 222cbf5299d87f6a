"""`[train] keep_checkpoints`: a run keeps its newest K checkpoints, never one a lineage in the
same runs root names, and keeps every period's metrics."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from ctnet_rec.config import ConfigError, load_config
from ctnet_rec.training.checkpoint import complete_checkpoints
from ctnet_rec.training.inference import evaluate_checkpoint
from ctnet_rec.training.loop import train_continual
from ctnet_rec.training.transfer import INIT, transfer_init

from .conftest import DEMO_CONFIG


def test_retention_keeps_the_newest_and_every_checkpoint_a_lineage_names(
        towers, tiny_world, tmp_path, caplog):
    root = tmp_path / "runs"
    train_continual(towers.cfg, tiny_world, "A", [0, 1], root / "A")
    # a CTNet deployed from A's period 1: its checkpoints load their source from there
    transfer_init(towers.cfg, root / "A" / "checkpoints" / "period=1", towers.target(1),
                  root / "B-ctnet")
    keep_one = dataclasses.replace(towers.cfg, train=dataclasses.replace(towers.cfg.train,
                                                                         keep_checkpoints=1))
    with caplog.at_level(logging.INFO, logger="ctnet_rec.training.retention"):
        train_continual(keep_one, tiny_world, "A", [2, 3], root / "A", resume=True)
    assert sorted(complete_checkpoints(root / "A")) == [1, 3]
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 2 and "period=0" in removed[0] and "period=2" in removed[1]
    assert any("period=1 stays" in r.getMessage() for r in caplog.records)
    metrics = [json.loads(x) for x in (root / "A" / "metrics.jsonl").read_text().splitlines()]
    assert [m["period"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["train_rows"] > 0 for m in metrics)
    # the deployed CTNet still finds its source, and scores as the target it was deployed on
    ctnet = evaluate_checkpoint(root / "B-ctnet" / INIT, tiny_world, "B", 2)
    target = evaluate_checkpoint(towers.target(1), tiny_world, "B", 2)
    assert ctnet["auc"] == pytest.approx(target["auc"], abs=1e-3)
    assert ctnet["rows"] == target["rows"] > 0


def test_keep_checkpoints_is_validated(tmp_path):
    path = tmp_path / "c.toml"
    text = DEMO_CONFIG.read_text()
    path.write_text(text.replace("eval_batch_size = 4096",
                                 "eval_batch_size = 4096\nkeep_checkpoints = -1"))
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        load_config(path)


def _fake_run(root, periods):
    for t in periods:
        folder = root / "checkpoints" / f"period={t}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"period": t,
                                                          "metrics": {"train_rows": t + 1}}))
    return root


def test_retention_never_deletes_what_a_running_job_holds(tmp_path, caplog):
    """A CTNet job holds the source checkpoints it chose at start (a lease in the source run)
    until it ends; a lease left by a process that no longer runs holds nothing."""
    import subprocess
    import sys

    from ctnet_rec.training.retention import LEASES, lease, prune_checkpoints

    run = _fake_run(tmp_path / "A", [0, 1, 2])
    with lease(run, [run / "checkpoints" / "period=0"]):
        with caplog.at_level(logging.INFO, logger="ctnet_rec.training.retention"):
            removed = prune_checkpoints(run, 1)
        assert [p.name for p in removed] == ["period=1"]
        assert any("period=0 stays, a running job holds it" in r.getMessage()
                   for r in caplog.records)
    assert not list((run / LEASES).iterdir())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = run / LEASES / "stale.json"
    import socket
    stale.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                 "checkpoints": [str((run / "checkpoints" / "period=0")
                                                     .resolve())]}))
    assert [p.name for p in prune_checkpoints(run, 1)] == ["period=0"]
    assert not stale.exists()
    pruned = [json.loads(x) for x in (run / "pruned_metrics.jsonl").read_text().splitlines()]
    assert [m["period"] for m in pruned] == [1, 0]

