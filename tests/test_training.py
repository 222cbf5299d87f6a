"""End-to-end single-domain training on the tiny world: learning, checkpoints, refusals,
kill-and-resume, and a 2-process gloo run."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ctnet_rec.config import load_config
from ctnet_rec.data.contract import SUCCESS, DataError
from ctnet_rec.training.checkpoint import (
    CheckpointError,
    Manifest,
    complete_checkpoints,
    file_digests,
    latest_checkpoint,
)
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.loop import train_continual
from ctnet_rec.training.trainer import DivergenceError, PeriodTrainer

from .conftest import DEMO_CONFIG, kill_family, two_rank_cli, two_rank_process

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = """
[model]
mlp_hidden = [64, 32]
sim_top_k = 8
eta_top_k = 8

[train]
eval_batch_size = 1024

[train.tables]
lr = 0.05

[train.dense]
lr = 0.05

[data]
batch_size = 256
shuffle_buffer = 4096
"""


@pytest.fixture(scope="module")
def small_config_path(tmp_path_factory) -> Path:
    text = DEMO_CONFIG.read_text()
    text = text.split("[model]")[0] + text[text.index("[synth]"):]
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(text + SMALL_MODEL)
    return path


@pytest.fixture(scope="module")
def small_config(small_config_path):
    return load_config(small_config_path)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tiny_world, small_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "a"
    train_continual(small_config, tiny_world, "A", [0, 1, 2], run)
    return run


def test_tower_learns_the_world(trained_run):
    m = _metrics(trained_run)
    assert [x["period"] for x in m] == [0, 1, 2]
    last = m[-1]["eval"]
    # measured 0.665 / 0.616 (oracle 0.826): 3 periods of 8000 rows teach the tables little
    assert last["auc"] > 0.62 and last["gauc"] > 0.57
    assert last["oracle"]["auc"] > last["auc"]
    assert set(last["slices"]) >= {"old_users", "old_items", "new_items"}
    assert m[-1]["train_rows"] == 8000


def test_checkpoint_holds_manifest_and_reloads_to_identical_predictions(
        trained_run, tiny_world, small_config):
    ckpt = latest_checkpoint(trained_run)
    assert ckpt is not None and ckpt.name == "period=2"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["kind"] == "tower" and manifest["period"] == 2
    assert manifest["world_size"] == 1 and "tables" in manifest["schema"]
    env = init_distributed("cpu")
    a, b = PeriodTrainer(small_config, env), PeriodTrainer(small_config, env)
    a.restore(ckpt)
    b.restore(ckpt)
    pa_, pb = a.predict(tiny_world, "B", 3), b.predict(tiny_world, "B", 3)
    np.testing.assert_array_equal(pa_["p"], pb["p"])
    fresh = PeriodTrainer(small_config, env).predict(tiny_world, "B", 3)["p"]
    assert not np.allclose(fresh, pa_["p"])
    assert len(a.seen["users"]) > 0


def test_mismatched_checkpoint_is_refused(trained_run, small_config):
    cfg = copy.deepcopy(small_config)
    cfg.features.tables[0].num_embeddings = 123
    env = init_distributed("cpu")
    with pytest.raises(CheckpointError, match=r"feature schema differs.*tables.*123"):
        PeriodTrainer(cfg, env).restore(latest_checkpoint(trained_run))
    cfg = copy.deepcopy(small_config)
    cfg.model.mlp_hidden = [16]
    with pytest.raises(CheckpointError, match=r"model config differs \(model\.mlp_hidden: "
                                              r"checkpoint \[\d+(, \d+)*\] vs config \[16\]\)"):
        PeriodTrainer(cfg, env).restore(latest_checkpoint(trained_run))


def _ctnet(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ctnet"), *args]


@pytest.fixture(scope="module")
def two_rank_config(small_config_path, tmp_path_factory) -> Path:
    """The small config at 2 ranks: half the per-rank batch keeps the global batch size of the
    1-process run."""
    path = tmp_path_factory.mktemp("two") / "two.toml"
    path.write_text(small_config_path.read_text().replace("batch_size = 256",
                                                          "batch_size = 128"))
    assert load_config(path).data.batch_size == 128
    return path


@pytest.fixture(scope="module")
def two_rank_run(two_rank_config, tiny_world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    two_rank_cli("train", "--config", str(two_rank_config), "--data", str(tiny_world),
                 "--domain", "A", "--periods", "0:3", "--run-dir", str(run))
    return run


def test_two_process_gloo_run(trained_run, two_rank_run, two_rank_config, tiny_world):
    """2 ranks, each reading half of every period with half the batch size, so a step's global
    batch has the 1-process size and gradients are averaged the same way. Two things differ,
    both legitimately: which rows share a step (each rank shuffles its own half) and the
    tables' initial values (each rank initialises the tables it holds from its own random
    stream), and in training batch norm normalises each rank's 128 rows rather than 256. So
    the runs are two equally good trainings, not the same one. Their training losses agree
    (period 2, over 8,000 rows: 1 rank 0.4063-0.4075, 2 ranks 0.4045-0.4077 over four
    floating-point orders of the same run: thread counts, kernels); the next period's AUC of
    the 2-rank model does not, on this tiny world: 0.58-0.68 over those four orders (1 rank:
    0.67), its eval-mode calibration moving with them. So the test asks for the same loss
    (within 0.01) and a model that learned (AUC above 0.55), not for the same AUC.

    The 2-rank checkpoint then loads at 1 rank and scores the next period exactly as the
    2-rank job did (same weights, eval mode: to float32's precision, as the halves' batches
    round their last bits differently)."""
    run, cfg_path = two_rank_run, two_rank_config
    got, want = _metrics(run), _metrics(trained_run)
    manifest = json.loads((run / "checkpoints" / "period=2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert got[-1]["train_rows"] == 8000
    assert got[-1]["eval"]["rows"] == want[-1]["eval"]["rows"]
    assert got[-1]["train_loss"] == pytest.approx(want[-1]["train_loss"], abs=0.01)
    assert got[-1]["eval"]["auc"] > 0.55
    trainer = PeriodTrainer(load_config(cfg_path), init_distributed("cpu"))
    trainer.restore(run / "checkpoints" / "period=2")
    again = trainer.evaluate(tiny_world, "A", 3)
    assert again["auc"] == pytest.approx(got[-1]["eval"]["auc"], abs=1e-6)
    assert again["gauc"] == pytest.approx(got[-1]["eval"]["gauc"], abs=1e-6)
    assert got[-1]["eval"]["oracle"]["auc"] == pytest.approx(want[-1]["eval"]["oracle"]["auc"],
                                                             abs=1e-12)


def test_eval_command_reproduces_training_metrics(trained_run, tiny_world, small_config_path,
                                                   tmp_path, capsys):
    from ctnet_rec.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(small_config_path), "--ckpt",
                 str(trained_run / "checkpoints" / "period=2"), "--data", str(tiny_world),
                 "--domain", "A", "--period", "3", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    want = _metrics(trained_run)[-1]["eval"]
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-9)
    assert got["gauc"] == pytest.approx(want["gauc"], abs=1e-9)
    assert got["trained_through_period"] == 2
    assert got["oracle"]["auc"] > got["auc"]
    printed = capsys.readouterr().out
    assert "oracle (true p)" in printed and "old_users" in printed


def test_eval_and_predict_warn_of_scores_that_are_not_what_they_seem(trained_run, tiny_world,
                                                                     tmp_path, caplog):
    """A period the checkpoint trained on (its AUC is in sample) and a domain it did not train
    on (a wrong --domain) give figures that look like any others: each is said."""
    from ctnet_rec.cli import main

    ckpt = str(trained_run / "checkpoints" / "period=2")
    common = ["--ckpt", ckpt, "--data", str(tiny_world)]
    with caplog.at_level(logging.WARNING):
        assert main(["eval", *common, "--domain", "A", "--period", "3",
                     "--out", str(tmp_path / "next.json")]) == 0
        assert "not out of sample" not in caplog.text and "trained on domain" not in caplog.text
        assert json.loads((tmp_path / "next.json").read_text())["trained_on_domain"] == "A"
        assert main(["eval", *common, "--domain", "A", "--period", "2",
                     "--out", str(tmp_path / "seen.json")]) == 0
        assert "trained through period 2, so period 2 is not out of sample" in caplog.text
        caplog.clear()
        assert main(["predict", *common, "--domain", "B", "--period", "3",
                     "--out", str(tmp_path / "b.parquet")]) == 0
    assert "trained on domain 'A'; these are its scores on domain 'B'" in caplog.text


def test_a_run_folder_given_as_a_checkpoint_names_its_newest(trained_run):
    newest = trained_run / "checkpoints" / "period=2"
    for given in (trained_run, trained_run / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"its newest checkpoint is {newest}$"):
            Manifest.read(given)


def test_a_resume_with_other_training_settings_says_which(tiny_world, small_config, tmp_path,
                                                          caplog):
    """Resuming with a learning rate or batch size other than the run's goes on (a deliberate
    change is legitimate), saying what changed: a forgotten --set is otherwise invisible."""
    run = tmp_path / "run"
    train_continual(small_config, tiny_world, "A", [0], run, evaluate=False)
    cfg = copy.deepcopy(small_config)
    cfg.train.dense.lr *= 10
    with caplog.at_level(logging.WARNING):
        train_continual(cfg, tiny_world, "A", [0, 1], run, resume=True, evaluate=False)
    lr = small_config.train.dense.lr
    assert f"resumed with settings other than it trained with: train.dense.lr {lr} -> " \
        f"{cfg.train.dense.lr}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # period 1 trained with these: nothing to say
        train_continual(cfg, tiny_world, "A", [0, 1, 2], run, resume=True, evaluate=False)
    assert "resumed with settings" not in caplog.text


def test_a_diverged_period_stops_training_and_is_not_saved(tiny_world, small_config, tmp_path):
    cfg = copy.deepcopy(small_config)
    cfg.train.dense.lr = 1e30  # finite, accepted by the config, and far too large
    with pytest.raises(DivergenceError, match=r"A period 0: the training loss became"):
        train_continual(cfg, tiny_world, "A", [0, 1], tmp_path / "run")
    assert complete_checkpoints(tmp_path / "run") == {}


def test_a_bad_evaluation_period_is_refused_before_training(tiny_world, small_config,
                                                            tmp_path):
    """Period 1 is scored after period 0 trains: its bad label is found before any step."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    for t in (0, 1):
        shutil.copytree(tiny_world / "A" / f"period={t}", data / "A" / f"period={t}")
    path = data / "A" / "period=1" / "part-0.parquet"
    table = pq.read_table(path)
    bad = pc.if_else(pc.equal(pc.cast(table["ts"], "int64"), table["ts"][0]), 7, table["label"])
    pq.write_table(table.set_column(1, "label", pc.cast(bad, "int8")), path)
    with pytest.raises(DataError, match=r"period=1.*label"):
        train_continual(small_config, data, "A", [0], tmp_path / "run")
    assert complete_checkpoints(tmp_path / "run") == {}


def test_a_period_of_one_row_past_full_batches_trains(small_config, tmp_path):
    """batch_size + 1 rows used to leave a last batch of one row, which batch norm refuses in
    training: the job stopped there, and again at every resume. A period too small for two
    rows a rank is refused naming it, before any step."""
    from .conftest import valid_table, write_period

    data = tmp_path / "data"
    rows = small_config.data.batch_size + 1
    write_period(data, "B", 0, [valid_table(rows, seed=1)])
    write_period(data, "B", 1, [valid_table(1, seed=2)])
    write_period(data, "B", 2, [valid_table(rows, seed=3)])
    train_continual(small_config, data, "B", [0], tmp_path / "run")
    assert _metrics(tmp_path / "run")[0]["train_rows"] == rows
    with pytest.raises(DataError, match=r"B/period=1: 1 row\(s\) cannot be trained on by 1 "):
        train_continual(small_config, data, "B", [1], tmp_path / "run1")
    assert complete_checkpoints(tmp_path / "run1") == {}


def test_the_period_line_shows_a_metric_the_period_cannot_give_as_missing():
    """Not "AUC nan", which reads like a diverged model: a period whose labels are all one
    class has no AUC, one where no user has both labels no GAUC."""
    from ctnet_rec.training.loop import scored_part

    nan = float("nan")
    assert scored_part(3, None) == ""
    assert scored_part(3, {"auc": 0.51234, "gauc": 0.6, "ctr_true": 0.1}) == \
        ", period 3: AUC 0.5123 GAUC 0.6000"
    assert scored_part(3, {"auc": nan, "gauc": nan, "ctr_true": 0.0}) == \
        ", period 3: AUC - GAUC - (every label is 0)"
    assert scored_part(3, {"auc": 0.5, "gauc": nan, "ctr_true": 0.2}) == \
        ", period 3: AUC 0.5000 GAUC - (no user has both labels)"


def test_one_writer_per_run_and_no_mixing_into_a_trained_run(tiny_world, small_config,
                                                             trained_run, tmp_path):
    """A second job on a run being written is refused naming the holder; a run that holds
    checkpoints is continued (--resume) or replaced (--overwrite), never trained into anew."""
    from ctnet_rec.training.run_lock import run_lock

    run = tmp_path / "run"
    with run_lock(run), pytest.raises(CheckpointError, match=rf"another job .*pid {os.getpid()}"):
        train_continual(small_config, tiny_world, "A", [0], run)
    assert complete_checkpoints(run) == {}
    copy_of = tmp_path / "copy"
    shutil.copytree(trained_run, copy_of)
    with pytest.raises(CheckpointError, match=r"holds checkpoints of periods \[0, 1, 2\]"):
        train_continual(small_config, tiny_world, "A", [0], copy_of)
    train_continual(small_config, tiny_world, "A", [0], copy_of, overwrite=True, evaluate=False)
    assert sorted(complete_checkpoints(copy_of)) == [0]
    assert [m["period"] for m in _metrics(copy_of)] == [0]


def test_tensorboard_holds_the_training_and_evaluation_scalars(trained_run):
    """Read back with TensorBoard's own event reader: training scalars every few steps on
    the rows-trained axis, evaluation scalars (overall, per slice, the oracle's) per period."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_s", "train/lr/tables", "train/lr/dense",
            "period/train_loss", "eval/auc", "eval/gauc", "eval/ne", "eval/logloss",
            "eval/calibration", "eval/old_users/auc", "eval/oracle/auc"} <= tags
    metrics = _metrics(trained_run)
    auc = {e.step: e.value for e in events.Scalars("eval/auc")}
    assert auc == pytest.approx({m["period"]: m["eval"]["auc"] for m in metrics if "eval" in m})
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(steps) and steps[-1] <= sum(m["train_rows"] for m in metrics)
    assert steps[-1] > metrics[0]["train_rows"]  # the axis runs on over the periods


def _command_pickle(module: str, name: str, marker: Path) -> bytes:
    """A protocol-4 pickle calling global `module`/`name` with `["touch", marker]`; protocol 4
    is the one whose stock unpickler resolves a dotted name attribute by attribute."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s.encode())]) + s.encode()
    return (b"\x80\x04" + text(module) + text(name) + b"\x93"
            + b"(](Vtouch\nV" + str(marker).encode() + b"\net" + b"tR.")


@pytest.mark.parametrize("files", ["attacker's digests", "no digests"])
@pytest.mark.parametrize("module,name", [
    ("posix", "system"),  # the naive one (with a string argument it would fail; refused first)
    ("subprocess", "Popen"),
    # a dotted name walked from an allowed module to subprocess.Popen
    ("torch.distributed.checkpoint.metadata", "torch.ctypes.util.subprocess.Popen"),
    # an allowed module's import of another module's class
    ("torch.distributed.checkpoint.metadata", "Enum"),
])
def test_a_crafted_checkpoint_runs_nothing_and_is_refused(trained_run, tmp_path, module, name,
                                                          files):
    """torch.distributed.checkpoint pickles its metadata: a folder whose `.metadata` asks for
    any global but the few DCP writes is refused before the global is used, by name, whether
    the manifest's digests were updated by the attacker or removed (a manifest without digests
    is never loaded unverified); the command never runs (eval, resume, predict and export all
    read checkpoints this way)."""
    from ctnet_rec.training.inference import open_checkpoint

    marker = tmp_path / "ran"
    bad = tmp_path / "period=2"
    shutil.copytree(latest_checkpoint(trained_run), bad)
    (bad / ".metadata").write_bytes(_command_pickle(module, name, marker))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = file_digests(bad) if files == "attacker's digests" else {}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    expected = (rf"\.metadata: refers to {re.escape(module)}\.{re.escape(name)}"
                if manifest["files"] else "records no file digests")
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(bad)
    assert not marker.exists()


def test_a_file_the_manifest_does_not_record_is_refused(trained_run, tmp_path):
    """Every file of a checkpoint folder is covered by its manifest's digests."""
    from ctnet_rec.training.inference import open_checkpoint

    bad = tmp_path / "period=2"
    shutil.copytree(latest_checkpoint(trained_run), bad)
    (bad / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"extra\.distcp: not recorded"):
        open_checkpoint(bad)


def test_a_damaged_checkpoint_is_refused_and_resume_falls_back(trained_run, tiny_world,
                                                              small_config, tmp_path, caplog):
    """Flipped bytes in a shard: loading names the file; --resume skips that checkpoint with
    a warning and trains its period again from the one before."""
    from ctnet_rec.training.inference import open_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "period=2"
    shard = next(p for p in sorted(last.iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[100:2100] = bytes(b ^ 0xFF for b in data[100:2100])
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: damaged"):
        open_checkpoint(last)
    with caplog.at_level(logging.INFO, logger="ctnet_rec.training.loop"):
        metrics = train_continual(small_config, tiny_world, "A", [0, 1, 2], run, resume=True)
    assert len(metrics) == 1 and "period 2 skipped" in caplog.text  # period 2 again
    assert re.search(r"period 2: \d+ rows, \d+ samples/s, loss \d\.\d{4}, period 3: "
                     r"AUC \d\.\d{4} GAUC \d\.\d{4}\n", caplog.text)  # figures for the eye
    open_checkpoint(last)  # written again, intact


def test_settings_and_folders_that_cannot_work_are_refused_with_a_message(
        tiny_world, small_config, trained_run, tmp_path, monkeypatch):
    """A seed numpy cannot take, a GPU this torch does not see, a run folder that cannot be
    written, a disk without room for the next checkpoint: each a message, not a traceback."""
    from dataclasses import asdict

    import ctnet_rec.training.run_lock as run_lock
    from ctnet_rec.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"train\.seed: must be in \[0, 2\^32\)"):
        config_from_dict({**asdict(small_config), "train": {"seed": -1}})
    cuda = copy.deepcopy(small_config)
    cuda.train.device = "cuda"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="device = 'cuda', but this torch sees no GPU"):
        train_continual(cuda, tiny_world, "A", [0], tmp_path / "gpu")
    # more processes on a node than GPUs: refused before the process group starts
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="local rank 1 and sees 1 GPU"):
        train_continual(cuda, tiny_world, "A", [0], tmp_path / "gpu")
    monkeypatch.delenv("LOCAL_RANK")
    not_a_folder = tmp_path / "a-file"  # unwritable even for root, unlike a read-only mode
    not_a_folder.write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write the run here \(Not a directory"):
        train_continual(small_config, tiny_world, "A", [0], not_a_folder / "run")
    full = tmp_path / "full"
    shutil.copytree(trained_run, full)
    monkeypatch.setattr(run_lock.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(CheckpointError, match="no space left on the device"):
        train_continual(small_config, tiny_world, "A", [0, 1, 2, 3], full, resume=True)


def test_weights_gone_non_finite_at_the_end_of_a_period_are_not_saved(
        tiny_world, small_config, tmp_path, monkeypatch):
    """A non-finite gradient in the period's last step spoils the weights before any loss
    shows it: the weights are checked too."""
    def poisoned(self):  # runs right after the period's last step
        with torch.no_grad():
            self.dense[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(PeriodTrainer, "_average_batchnorm_statistics", poisoned)
    with pytest.raises(DivergenceError, match="dense weights"):
        train_continual(small_config, tiny_world, "A", [0], tmp_path / "run")
    assert complete_checkpoints(tmp_path / "run") == {}


def test_evaluation_at_two_ranks_equals_one_rank(towers, tiny_world, tmp_path):
    """Each rank scores its share and sends it to rank 0 alone, which computes the metrics:
    the same numbers as one process scoring everything."""
    from ctnet_rec.training.inference import evaluate_checkpoint

    ckpt = towers.target(1)
    out = tmp_path / "eval.json"
    two_rank_cli("eval", "--ckpt", str(ckpt), "--data", str(tiny_world), "--domain", "B",
                 "--period", "2", "--out", str(out))
    two = json.loads(out.read_text())
    one = evaluate_checkpoint(ckpt, tiny_world, "B", 2)
    assert two["rows"] == one["rows"] > 0
    for key in ("auc", "gauc", "logloss", "ne"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    for name, sliced in one["slices"].items():
        assert two["slices"][name]["rows"] == sliced["rows"], name


def _gather_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from ctnet_rec.training.collectives import from_main, gather_to_main

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = {"p": np.arange(3 + rank, dtype=np.float64) + 10 * rank,
                "ids": np.full(1 + 2 * rank, rank, dtype=np.int64)}
        got = gather_to_main(mine, torch.device("cpu"))
        seen_by = from_main(None if got is None else {k: v.tolist() for k, v in got.items()})
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"got": None if got is None else {k: v.tolist() for k, v in got.items()},
             "broadcast": seen_by}))
    finally:
        dist.destroy_process_group()


def test_ranks_send_their_rows_to_rank_zero_only(tmp_path):
    """What evaluation gathers (scores, labels, ids; seen ids) reaches rank 0 alone, each
    rank's rows in rank order whatever their count; the metrics come back to every rank."""
    torch.multiprocessing.spawn(_gather_rank, args=(str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    want = {"p": [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0], "ids": [0, 1, 1, 1]}
    assert zero["got"] == want
    assert one["got"] is None  # rank 1 never holds rank 0's rows
    assert zero["broadcast"] == one["broadcast"] == want


@pytest.fixture(scope="module")
def two_ranks(towers, tiny_world, tmp_path_factory) -> dict[str, Any]:
    """One 2-process gloo spawn for the tests of what two ranks compute (`_two_rank_work`):
    each rank's results, and the folder of the rows the one-process equivalence test reads."""
    root = tmp_path_factory.mktemp("two-ranks")
    split, joined = _same_rows_two_ways(tiny_world, root)
    torch.multiprocessing.spawn(_two_rank_work, nprocs=2, join=True, args=(
        str(root / "store"), str(tiny_world), str(towers.config_path), str(split),
        str(towers.target(1)), str(root)))
    zero, one = (torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return {"zero": zero, "one": one, "joined": joined}


def test_two_ranks_train_one_model(two_ranks):
    """Dense layers are data-parallel (DDP under DMP): two ranks stepping on different rows
    keep identical dense weights, which move; also for a joint model, whose step of one domain
    leaves the other task's tower without gradients."""
    zero, one = two_ranks["zero"], two_ranks["one"]
    for name in ("tower", "joint"):
        assert torch.equal(zero[name]["after"], one[name]["after"]), name
        assert not torch.equal(zero[name]["before"], zero[name]["after"]), name


def _two_rank_work(rank: int, store: str, world: str, config: str, split: str, start: str,
                   out: str) -> None:
    import functools

    import torch.distributed as dist

    from ctnet_rec.data.reader import ParquetBatchReader
    from ctnet_rec.training.joint import JointTrainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cfg, env = load_config(config), init_distributed("cpu")
        got = {}
        for name, build, domains in (
                ("tower", PeriodTrainer, "BBB"),
                ("joint", functools.partial(JointTrainer, model="Share Bottom",
                                            source_domain="A"), "BAB")):
            trainer = build(cfg, env)
            before = torch.cat([p.detach().flatten() for p in trainer.dense]).clone()
            steps = [(domain, next(iter(ParquetBatchReader(
                Path(world), domain, [1], cfg.features, cfg.data, rank=rank, world_size=2,
                seed=len(got))))) for domain in domains]
            trainer.train_steps(iter(steps), len(steps), "B", 1)  # the pipeline, at 2 ranks
            got[name] = {"before": before,
                         "after": torch.cat([p.detach().flatten() for p in trainer.dense])}
        got["halves"] = _steps(Path(split), config, start, rank, 2)
        torch.save(got, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


STEPS, HALF = 3, 64  # the equivalence test's steps, and each rank's share of a step's batch


class _BatchNormFrozen(PeriodTrainer):
    """A trainer whose batch norms read their running statistics while training: batch
    statistics of half a batch differ from the whole batch's, the rest of a step does not."""

    def logits(self, batch, domain):
        for m in self.dmp.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return super().logits(batch, domain)


def _same_rows_two_ways(world: Path, root: Path) -> tuple[Path, Path]:
    """B's period 1 cut to 2 x STEPS x HALF rows, written twice: in its order ("split": rank r
    of 2 reads half r, HALF rows a step) and with step k's halves side by side ("joined":
    one process, 2 x HALF rows a step, reads in step k what the two ranks read together);
    period 2 as it is, to score."""
    import pyarrow.parquet as pq

    from ctnet_rec.data.contract import write_parquet

    rows = pq.read_table(next((world / "B" / "period=1").glob("*.parquet")))
    n = STEPS * HALF
    rows = rows.slice(0, 2 * n)
    joined = np.concatenate([np.r_[k * HALF:(k + 1) * HALF, n + k * HALF:n + (k + 1) * HALF]
                             for k in range(STEPS)])
    out = []
    for name, table in (("split", rows), ("joined", rows.take(joined))):
        (root / name / "B" / "period=1").mkdir(parents=True)
        write_parquet(table, root / name / "B" / "period=1" / "part-0.parquet")
        shutil.copytree(world / "B" / "period=2", root / name / "B" / "period=2",
                        ignore=shutil.ignore_patterns(SUCCESS))  # as period 1: unmarked
        out.append(root / name)
    return out[0], out[1]


def _steps(data: Path, config: str, start: str, rank: int, world_size: int
           ) -> dict[str, object]:
    """From checkpoint `start`, STEPS steps on `data`'s period 1 at this rank (no
    shuffling), then its scores of period 2 (on rank 0), its dense weights and its loss."""
    from ctnet_rec.data.reader import ParquetBatchReader

    cfg, env = load_config(config), init_distributed("cpu")
    trainer = _BatchNormFrozen(cfg, env)
    trainer.restore(Path(start))
    reader = ParquetBatchReader(data, "B", [1], cfg.features, cfg.data,
                                batch_size=2 * HALF // world_size, shuffle=False, rank=rank,
                                world_size=world_size)
    assert len(reader) == STEPS
    metrics = trainer.train_steps((("B", b) for b in reader), STEPS, "B", 1)
    pred = trainer.predict(data, "B", 2)
    return {"loss": metrics["train_loss"], "rows": metrics["train_rows"],
            "dense": {n: p.detach().clone() for n, p in trainer._named_dense()},
            "p": None if pred is None else pred["p"]}


def test_two_ranks_on_halves_train_as_one_process_on_the_whole(towers, two_ranks):
    """Where the math allows it, two ranks are one model: each rank a half of every step's
    batch, against one process on the whole batch, from one checkpoint, the same rows and
    steps (batch norm on
    running statistics, the one thing that reads a rank's half alone). Dense gradients are
    averaged (DDP), table gradients divided by the world size (TorchRec), so the losses, the
    dense weights and every score after 3 steps agree to float rounding (1e-6). Catches a
    rank's lookups or gradients lost, doubled or mixed up (e.g. the table gradients summed)."""
    zero, one = two_ranks["zero"]["halves"], two_ranks["one"]["halves"]
    whole = _steps(two_ranks["joined"], str(towers.config_path), str(towers.target(1)), 0, 1)
    assert zero["rows"] == one["rows"] == whole["rows"] == 2 * STEPS * HALF
    assert zero["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    for name, weight in whole["dense"].items():
        assert torch.equal(zero["dense"][name], one["dense"][name]), name
        got, want = zero["dense"][name], weight
        if name.endswith("in_proj_bias"):  # attention's key bias: its exact gradient is 0
            # (softmax ignores what is added to all a query's logits), its float noise is
            # not, and AdaGrad scales noise up; the query and value biases are compared
            width = len(weight) // 3
            assert (got[width:2 * width] - want[width:2 * width]).abs().max() < 1e-4
            got, want = torch.cat([got[:width], got[2 * width:]]), \
                torch.cat([want[:width], want[2 * width:]])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
    np.testing.assert_allclose(zero["p"], whole["p"], atol=1e-6, rtol=0)
    assert one["p"] is None


def _inside_period(run: Path, period: int) -> bool:
    """Whether the run's mid-period checkpoint is of `period` (False while it is being
    replaced: the old folder renamed aside, the new one not yet in its place)."""
    manifest = run / "checkpoints" / "mid-period" / "manifest.json"
    try:
        return json.loads(manifest.read_text())["period"] == period
    except (FileNotFoundError, ValueError):
        return False


def _every_rows(config: Path, tmp_path: Path, rows: int) -> Path:
    path = tmp_path / f"every-{rows}-{config.name}"
    path.write_text(config.read_text().replace("[train]\n",
                                               f"[train]\ncheckpoint_every_rows = {rows}\n"))
    assert load_config(path).train.checkpoint_every_rows == rows
    return path


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["period"] for m in got] == [m["period"] for m in want]
    for g, w in zip(got, want, strict=True):
        assert g["train_rows"] == w["train_rows"]
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert g["eval"]["auc"] == pytest.approx(w["eval"]["auc"], abs=1e-6)
        assert g["eval"]["gauc"] == pytest.approx(w["eval"]["gauc"], abs=1e-6)


def test_a_run_killed_inside_a_period_resumes_there(trained_run, tiny_world,
                                                     small_config_path, tmp_path, caplog):
    """SIGKILL a real training process inside period 1, after period 0's checkpoint and a
    mid-period one (`checkpoint_every_rows`), and resume: the run restores period 0's
    checkpoint, then continues inside period 1 (the reader moved past the trained batches),
    and ends with the uninterrupted run's metrics, to 1e-6 (same seed, CPU)."""
    from ctnet_rec.cli import main

    run = tmp_path / "killed"
    args = ["train", "--config", str(_every_rows(small_config_path, tmp_path, 1500)),
            "--data", str(tiny_world), "--domain", "A", "--periods", "0:3", "--run", str(run)]
    proc = subprocess.Popen(_ctnet(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _inside_period(run, 1):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(complete_checkpoints(run)) == [0]
    with caplog.at_level(logging.INFO, logger="ctnet_rec.training.trainer"):
        assert main([*args, "--resume"]) == 0
    assert "resuming inside period 1" in caplog.text
    assert not (run / "checkpoints" / "mid-period").exists()  # gone once the period ends
    _assert_same_metrics(_metrics(run), _metrics(trained_run))


def test_two_ranks_killed_inside_a_period_resume_there(two_rank_run, two_rank_config,
                                                       tiny_world, tmp_path):
    run = tmp_path / "killed"
    args = ["train", "--config", str(_every_rows(two_rank_config, tmp_path, 1500)),
            "--data", str(tiny_world), "--domain", "A", "--periods", "0:3",
            "--run-dir", str(run)]
    proc = two_rank_process(*args)
    try:
        deadline = time.time() + 180
        while not _inside_period(run, 1):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    finally:
        kill_family(proc)
    assert sorted(complete_checkpoints(run)) == [0]
    out = two_rank_cli(*args, "--resume")
    assert "resuming inside period 1" in out
    _assert_same_metrics(_metrics(run), _metrics(two_rank_run))


@pytest.mark.parametrize("kind", ["tower", "ctnet", "joint"])
def test_the_train_pipeline_trains_as_a_plain_loop_with_every_lookup_ahead(towers, tiny_world,
                                                                          kind):
    """`train_steps` runs TorchRec's train pipeline: the same weights and loss as a plain
    zero_grad / forward / backward / step loop over the same batches, and for the tower and
    CTNet (both towers: the source through its view of the batch) every table lookup's input
    distribution runs ahead of the step (TrainPipelineSparseDist found them all). Afterwards
    the lookups are themselves again: the model scores outside the pipeline."""
    import torch.nn.functional as F
    from torchrec.distributed.types import ShardedModule

    from ctnet_rec.data.reader import ParquetBatchReader
    from ctnet_rec.training.joint import JointTrainer
    from ctnet_rec.training.transfer import CTNetTrainer

    cfg, env = towers.cfg, init_distributed("cpu")
    build = {"tower": lambda: PeriodTrainer(cfg, env),
             "ctnet": lambda: CTNetTrainer(cfg, cfg, env),
             "joint": lambda: JointTrainer(cfg, env, model="Share Bottom", source_domain="A")}
    plain, piped = build[kind](), build[kind]()
    domains = "BAB" if kind == "joint" else "BBB"
    steps = [(d, b) for d, b in zip(domains, ParquetBatchReader(
        tiny_world, "B", [1], plain.features_read(), cfg.data, seed=0), strict=False)]
    steps = [(d, b if d == "B" else next(iter(ParquetBatchReader(
        tiny_world, "A", [1], plain.features_read(), cfg.data, seed=1)))) for d, b in steps]
    losses, rows = [], 0
    plain.dmp.train()
    for d, b in steps:
        loss = F.binary_cross_entropy_with_logits(plain.logits(b, d), b.labels)
        plain.dense_opt.zero_grad()
        loss.backward()
        plain.dense_opt.step()
        if d == "B":
            losses.append(float(loss) * len(b))
            rows += len(b)

    made = []
    make = piped.train_pipeline
    piped.train_pipeline = lambda loss_of: made.append(make(loss_of)) or made[-1]
    metrics = piped.train_steps(iter(steps), len(steps), "B", 1)

    assert metrics["train_rows"] == rows
    assert metrics["train_loss"] == pytest.approx(sum(losses) / rows, abs=1e-6)
    for a, b in zip(plain.dense, piped.dense, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    sharded = [m for m in piped.dmp.modules() if isinstance(m, ShardedModule)]
    pipelined = getattr(made[0], "_pipelined_modules", [])
    if kind == "joint":  # its KJT of routed ids is its own: the base pipeline
        assert pipelined == []
    else:
        assert len(sharded) == (4 if kind == "ctnet" else 2)
        assert {id(m) for m in pipelined} == {id(m) for m in sharded}
    b = steps[0][1]
    with torch.no_grad():
        plain.dmp.eval(), piped.dmp.eval()
        assert torch.allclose(plain.logits(b, "B"), piped.logits(b, "B"), atol=1e-5)


def test_a_renamed_checkpoint_folder_is_refused(trained_run, tiny_world, small_config,
                                                tmp_path):
    """period=1 renamed to period=2 (the real period=2 removed): resuming would overwrite
    the only period-1 checkpoint; refused, naming the folder, and nothing is changed."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "period=2")
    (run / "checkpoints" / "period=1").rename(run / "checkpoints" / "period=2")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"period=2: named period 2, its manifest records "
                                              r"period 1"):
        train_continual(small_config, tiny_world, "A", [0, 1, 2, 3], run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_torn_metrics_line_does_not_stop_a_resume(trained_run, tiny_world, small_config,
                                                    tmp_path, caplog):
    """metrics.jsonl torn in its last line (a crash mid-write of an older version): resume
    warns, goes on, and rewrites the file whole from the checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "period=2")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    with caplog.at_level(logging.WARNING):
        train_continual(small_config, tiny_world, "A", [2], run, resume=True, evaluate=False)
    assert any("last line is torn" in r.getMessage() for r in caplog.records)
    periods = [json.loads(x)["period"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert periods == [0, 1, 2]
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob("*.replaced"))


def test_a_gpu_trained_checkpoint_is_scored_on_a_cpu_host(trained_run, tiny_world, tmp_path,
                                                          caplog):
    """A checkpoint whose config records device "cuda" (here: a CPU-trained one, so
    recorded): eval, predict and export run on a host without a GPU, on the CPU with a
    warning or with --device cpu; --device cuda there is refused with a message."""
    from ctnet_rec.cli import main
    from ctnet_rec.training.inference import evaluate_checkpoint

    ckpt = tmp_path / "period=2"
    shutil.copytree(latest_checkpoint(trained_run), ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["config"]["train"]["device"] = "cuda"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    want = evaluate_checkpoint(latest_checkpoint(trained_run), tiny_world, "A", 3)["auc"]
    with caplog.at_level(logging.WARNING):
        assert evaluate_checkpoint(ckpt, tiny_world, "A", 3)["auc"] == want
    assert "trained on cuda; this host has no GPU" in caplog.text
    common = ["--data", str(tiny_world), "--domain", "A", "--period", "3"]
    assert main(["eval", "--ckpt", str(ckpt), *common, "--device", "cpu",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["auc"] == want
    assert main(["predict", "--ckpt", str(ckpt), *common, "--out",
                 str(tmp_path / "p.parquet")]) == 0
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    assert main(["predict", "--export", str(tmp_path / "x"), *common, "--out",
                 str(tmp_path / "q.parquet"), "--device", "cpu"]) == 0
    if not torch.cuda.is_available():
        assert main(["eval", "--ckpt", str(ckpt), *common, "--device", "cuda",
                     "--out", str(tmp_path / "f.json")]) == 2
        assert "--device cuda, but this torch sees no GPU" in caplog.text
        assert main(["predict", "--export", str(tmp_path / "x"), *common, "--out",
                     str(tmp_path / "r.parquet"), "--device", "cuda"]) == 2
        assert caplog.text.count("--device cuda, but this torch sees no GPU") == 2


def test_only_steps_that_leave_parameters_unused_make_ddp_search_for_them(small_config):
    """DDP's unused-parameter search (a graph traversal after every backward) only for the
    models whose steps can leave parameters without a gradient: joint models (a step trains
    one task) and CTNet with shared long-sequence attention (the target's own SIM/ETA)."""
    from ctnet_rec.training.joint import JointTrainer
    from ctnet_rec.training.transfer import CTNetTrainer

    env = init_distributed("cpu")
    shared = copy.deepcopy(small_config)
    shared.ctnet.share_long_sequence_attention = True
    shared.ctnet.source_long_interest = "own"
    assert not PeriodTrainer(small_config, env).steps_leave_parameters_unused()
    assert not CTNetTrainer(small_config, small_config, env).steps_leave_parameters_unused()
    assert CTNetTrainer(shared, shared, env).steps_leave_parameters_unused()
    assert JointTrainer(small_config, env, "Share Bottom", "A").steps_leave_parameters_unused()


def test_a_checkpoint_file_is_hashed_once_per_process(trained_run, tmp_path, monkeypatch):
    """Files are verified as they are read, each hashed once per process while unchanged
    (a CTNet source loaded again at a later refresh is not hashed again); a file changed
    since is hashed again and refused."""
    import ctnet_rec.training.checkpoint as ck
    from ctnet_rec.training.inference import open_checkpoint

    folder = tmp_path / "period=2"
    shutil.copytree(latest_checkpoint(trained_run), folder)
    hashed = []
    real = ck.file_digest
    monkeypatch.setattr(ck, "file_digest", lambda p: hashed.append(p.name) or real(p))
    open_checkpoint(folder)
    assert hashed and len(hashed) == len(set(hashed))
    assert set(hashed) <= set(ck.Manifest.read(folder).files)
    before = len(hashed)
    open_checkpoint(folder)
    assert len(hashed) == before
    shard = next(p for p in sorted(folder.iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: damaged"):
        open_checkpoint(folder)


def test_a_cpu_job_on_a_host_with_gpus_says_they_stay_idle(monkeypatch, caplog):
    """GPUs requested from the scheduler (torchx's --gpu) with a config that says "cpu": the
    job says it runs on the CPU, instead of holding the GPUs idle in silence."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    with caplog.at_level(logging.WARNING, logger="ctnet_rec.training.distributed"):
        env = init_distributed("cpu")
    assert env.device == torch.device("cpu")
    assert "this process sees 8 GPU(s): it runs on the CPU; device = 'cuda' uses them" in \
        caplog.text
