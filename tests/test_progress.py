"""Progress on long commands: a log line every LOG_SECONDS where there is no terminal."""

from __future__ import annotations

import logging

import pytest

from ctnet_rec import progress as progress_module
from ctnet_rec.progress import Progress


def test_a_log_line_every_interval_with_rows_speed_figures_and_eta(caplog):
    now = [0.0]
    log = logging.getLogger("test-progress")
    p = Progress(10, "B period 3", log, clock=lambda: now[0])
    assert p.logs and not p.tty  # pytest's stderr is no terminal
    with caplog.at_level(logging.INFO, logger="test-progress"):
        for _ in range(4):
            now[0] += 5.0
            p.update(rows=100)
            if p.due():
                p.show(loss="0.5000")
        p.show(loss="0.5000")  # shown more often (TensorBoard's points): no line before due
        assert caplog.messages == []  # 20 s: nothing owed yet
        for _ in range(2):
            now[0] += 5.0
            p.tick(rows=100)
    # 6 of 10 batches in 30 s, 600 rows: 20 samples/s, 4 batches left at 0.2 a second
    assert caplog.messages == ["B period 3: 6/10 batches, 20 samples/s, ETA 0:00:20"]
    assert not p.due()  # the clock restarts at each line
    p.close()


def test_silent_where_disabled(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    p = Progress(3, "rank 1", logging.getLogger("test-progress"), enabled=False)
    with caplog.at_level(logging.INFO, logger="test-progress"):
        p.tick()
        p.show(loss="1")
    assert caplog.messages == [] and not p.due()


@pytest.mark.parametrize("command", ["train", "scoring"])
def test_training_and_scoring_log_progress_without_a_terminal(command, towers, tiny_world,
                                                             caplog, monkeypatch):
    from ctnet_rec.training.inference import open_checkpoint

    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    trainer, _ = open_checkpoint(towers.target(1))
    with caplog.at_level(logging.INFO, logger="ctnet_rec.training.trainer"):
        if command == "train":
            trainer.train_period(tiny_world, "B", 2)
        else:
            trainer.predict(tiny_world, "B", 2)
    lines = [m for m in caplog.messages if m.startswith("B period 2")]
    assert lines and all("batches" in m and "samples/s" in m and "ETA" in m for m in lines)
    if command == "train":
        assert all("loss 0." in m for m in lines)
