"""`ctnet pipeline`: periods landing one by one from a background writer, the job killed twice
and restarted with the same command, a corrupted and an anomalous period injected. Every good
period trained once, the bad ones quarantined, promotions as the gate says, the served
artifact always whole, CTNet's figures those of `ctnet transfer run`, the status page showing
status.json's figures."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ctnet_rec.cli import main
from ctnet_rec.config import PipelineConfig, load_config
from ctnet_rec.data.contract import SUCCESS, list_periods
from ctnet_rec.data.synth import synthesize
from ctnet_rec.pipeline.gate import decide
from ctnet_rec.pipeline.serving import CURRENT, RECORD, prune_served, publish, served
from tests.conftest import (
    DEMO_CONFIG,
    descendants,
    kill_family,
    parent_of,
    tiny_synth,
    valid_table,
    write_period,
)

PERIODS = 6  # 0-5; B's tower warms up on 0-1, its CTNet is deployed at 2; C serves its tower
ANOMALOUS = ("A", 4)  # the source's period 4 arrives with 6x its rows
CORRUPTED = ("C", 5)  # C's period 5 has labels that are not 0/1


def test_a_marking_writer_hides_the_periods_it_is_writing(tmp_path):
    for t in (0, 1):
        write_period(tmp_path, "B", t, [valid_table()])
    (tmp_path / "B" / "period=2").mkdir()  # being written: no files yet
    with pytest.raises(Exception, match="empty period"):
        list_periods(tmp_path, "B")  # no marker anywhere: an empty folder is an error
    assert list_periods(tmp_path, "B", marked_only=True) == {}  # what the pipeline waits for
    (tmp_path / "B" / "period=0" / SUCCESS).touch()
    assert sorted(list_periods(tmp_path, "B")) == [0]  # marking writer: 1 and 2 in progress


def test_the_gate_rule():
    rule = PipelineConfig(auc_margin=0.01, calibration_bounds=[0.8, 1.25])
    ok = {"auc": 0.70, "ctr_pred": 0.1, "ctr_true": 0.1}
    assert decide(ok, None, rule) == (True, "nothing served yet")
    assert decide(ok, {"auc": 0.705}, rule)[0]  # within the margin
    promote, why = decide(ok, {"auc": 0.72}, rule)
    assert not promote and "below the served model's 0.7200 by more than 0.01" in why
    promote, why = decide({**ok, "ctr_pred": 0.2}, {"auc": 0.6}, rule)
    assert not promote and "calibration 2.000 outside [0.8, 1.25]" in why
    no_clicks = {"auc": float("nan"), "ctr_pred": 0.01, "ctr_true": 0.0}  # no AUC to compare
    assert decide(no_clicks, {"auc": float("nan")}, rule) == (
        True, "AUC - vs the served model's - (one class only: no AUC to compare)")


def _world(root: Path) -> Path:
    """The tiny world with 6 periods, the bad periods injected (in a copy the writer feeds
    from)."""
    world = root / "full"
    synthesize(tiny_synth(load_config(DEMO_CONFIG), periods=PERIODS), world, seed=0)
    domain, t = ANOMALOUS
    f = next((world / domain / f"period={t}").glob("*.parquet"))
    table = pq.read_table(f)
    pq.write_table(pa.concat_tables([table] * 6), f)
    domain, t = CORRUPTED
    f = next((world / domain / f"period={t}").glob("*.parquet"))
    table = pq.read_table(f)
    label = table.schema.get_field_index("label")
    pq.write_table(table.set_column(label, "label", pc.add(table["label"], 2)), f)
    return world


def _feed(world: Path, data: Path, pause: float) -> threading.Thread:
    """A writer that lands period after period: files first, `_SUCCESS` last."""
    def run() -> None:
        for t in range(PERIODS):
            for domain in ("A", "B", "C"):
                target = data / domain / f"period={t}"
                shutil.copytree(world / domain / f"period={t}", target)
                (target / SUCCESS).touch()
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# the demo's config with small towers, one target, deployed at period 2 (command-line sets)
SETS = ["model.mlp_hidden=[32, 16]", "data.batch_size=256",
        'pipeline.targets={B = "ctnet", C = "base"}', "pipeline.parallel_jobs=1",
        "pipeline.deploy_period=2", "pipeline.calibration_bounds=[0.2, 5.0]",
        "pipeline.keep_checkpoints=0", "pipeline.poll_seconds=0.3"]


def _start(config: Path, data: Path, runs: Path, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ctnet_rec.cli", "pipeline", str(config), "--data",
             str(data), "--runs", str(runs), "--until", str(PERIODS - 1),
             *(x for kv in SETS for x in ("--set", kv))],
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, "the pipeline ended before it was killed"
        assert time.monotonic() < deadline, f"{ready} never appeared"
        time.sleep(0.05)
    kill_family(proc)


def test_the_pipeline_survives_kills_and_bad_periods(tmp_path):
    world, data, runs = _world(tmp_path), tmp_path / "data", tmp_path / "runs"
    config, log = DEMO_CONFIG, tmp_path / "pipeline.log"
    data.mkdir()
    writer = _feed(world, data, pause=0.3)
    # killed while the source trains period 2, then right after the first artifact is served
    proc = _start(config, data, runs, log)
    _kill_when(proc, runs / "source" / "checkpoints" / "period=1" / "manifest.json")
    proc = _start(config, data, runs, log)
    _kill_when(proc, runs / "serving" / "B" / CURRENT)
    proc = _start(config, data, runs, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    writer.join()
    text = log.read_text()
    assert "[pipeline source]" in text and "[pipeline C]" in text  # fresh processes

    # every good period trained exactly once, the bad ones quarantined and never trained
    status = json.loads((runs / "status.json").read_text())
    assert status["done_through"] == PERIODS - 1 and status["lag_periods"] == 0
    assert status["source"]["trained"] == [0, 1, 2, 3, 5]
    assert list(status["source"]["quarantined"]) == ["4"]
    assert "rows" in status["source"]["quarantined"]["4"]
    b = status["targets"]["B"]
    assert b["trained"] == {"tower": [0, 1], "ctnet": [2, 3, 4, 5]} and not b["quarantined"]
    c = status["targets"]["C"]  # the other target: its own tower
    assert c["trained"] == {"tower": [0, 1, 2, 3, 4]}
    assert list(c["quarantined"]) == ["5"] and "bad data" in c["quarantined"]["5"]
    assert "not in {0,1}" in c["quarantined"]["5"]
    assert [g["period"] for g in c["gates"]] == [1, 2, 3, 4]  # none on its bad period
    # a period's end is logged once per run that trained it (a kill between its checkpoint
    # and the line loses the line; a period trained again would log it twice)
    ends = [int(t) for t in re.findall(r"period (\d+): \d+ rows, ", text)]
    for t in range(PERIODS):
        assert ends.count(t) <= 3 - (t == ANOMALOUS[1]) - (t == CORRUPTED[1]), t
    # CTNet at period 5 trained with source 3: period 4 of the source was quarantined
    assert b["source_in_use"] == 3 and "[4] quarantined" in b["source_note"]

    # promotions as the gate says; the served artifact whole and the last promoted one
    rule = load_config(config, SETS).pipeline
    gates = {int(p.stem.split("=")[1]): json.loads(p.read_text())
             for p in (runs / "pipeline" / "B" / "gate").glob("period=*.json")}
    assert sorted(gates) == [1, 2, 3, 4, 5]
    for g in gates.values():
        assert g["promote"] == decide(g["candidate"], g["serving"], rule)[0]
    promoted = [g["candidate"]["trained_through"] for _, g in sorted(gates.items())
                if g["promote"]]
    now = served(runs, "B")
    assert now is not None and now["period"] == promoted[-1]
    # its record names the source period (CTNet of period t: t - 1, but 3 for period 5, the
    # source's period 4 being quarantined; a tower has none)
    assert now["source_period"] == ({2: 1, 3: 2, 4: 3, 5: 3}[now["period"]]
                                    if now["model"] == "ctnet" else None)
    import hashlib

    current = runs / "serving" / "B" / CURRENT
    assert hashlib.sha256((current / "model.pt").read_bytes()).hexdigest() == now["sha256"]
    assert sorted(p.name for p in (runs / "serving" / "B").iterdir()) == sorted(
        [CURRENT, *(f"period={t}" for t in set(promoted))])

    # CTNet's figures: those of `ctnet transfer run` deployed from the same towers
    ref = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pipeline's processes ran: the same float reductions
    try:
        assert main(["transfer", "init", "--source-ckpt",
                     str(runs / "source" / "checkpoints" / "period=1"), "--target-ckpt",
                     str(runs / "B" / "tower" / "checkpoints" / "period=1"), "--config",
                     str(config), "--run", str(ref), *(x for kv in SETS for x in ("--set", kv))
                     ]) == 0
        assert main(["transfer", "run", "--run", str(ref), "--data", str(data), "--domain",
                     "B", "--periods", "2:5", "--source-ckpts", str(runs / "source")]) == 0
    finally:
        torch.set_num_threads(threads)
    reference = {m["period"]: m["eval"] for m in
                 map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    for t in (2, 3, 4):
        for key in ("auc", "gauc", "logloss"):
            assert gates[t + 1]["candidate"][key] == pytest.approx(reference[t][key], abs=1e-6)

    # the page shows status.json's figures
    page = (runs / "status.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    b_table = page.split('data-domain="B"')[1].split("</table>")[0]
    cells = re.findall(r'<tr data-period="(\d+)">(.*?)</tr>', b_table)
    assert [int(t) for t, _ in cells] == [g["period"] for g in b["gates"]]
    for (_, row), g in zip(cells, b["gates"], strict=True):
        values = re.findall(r'data-value="([^"]*)"', row)
        want = [g["candidate_auc"], g["candidate_gauc"], g["candidate_calibration"],
                g["serving_auc"], g["serving_gauc"]]
        assert [float(v) if v else None for v in values] == want


def test_publishing_replaces_the_served_artifact_in_one_rename(towers, tmp_path, monkeypatch):
    """A reader of serving/<domain>/current sees the old artifact until the new one is
    whole: a publish killed while exporting leaves the served one as it was."""
    publish(tmp_path, "B", 0, towers.target(0), {"note": "first"})
    first = served(tmp_path, "B")
    assert first is not None and first["period"] == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ctnet_rec.serving.export.export_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path, "B", 1, towers.target(1), {})
    assert served(tmp_path, "B") == first
    assert json.loads((tmp_path / "serving" / "B" / CURRENT / RECORD).read_text())["note"] == \
        "first"


def test_served_artifacts_are_pruned_but_never_the_one_served(tmp_path):
    root = tmp_path / "serving" / "B"
    for t in range(5):
        (root / f"period={t}").mkdir(parents=True)
    (root / CURRENT).symlink_to("period=1")
    prune_served(tmp_path, "B", keep=2)
    assert sorted(p.name for p in root.iterdir()) == [CURRENT, "period=1", "period=3",
                                                      "period=4"]


class InProcessRunner:
    """The job runner's interface, running each job in this process, as given (a process
    pool pickles it first: so does this)."""

    def __init__(self, preload: Sequence[str] = (), workers: int = 1) -> None:
        self.labels: list[str] = []

    def submit(self, fn: Callable[[], object], label: str) -> Future[object]:
        pickle.dumps(fn)
        self.labels.append(label)
        future: Future[object] = Future()
        try:
            future.set_result(fn())
        except RuntimeError as e:
            future.set_exception(e)
        return future

    def close(self) -> None:
        pass


def test_each_step_is_a_job_of_the_runner(tmp_path, monkeypatch):
    """The source's and each target's part of a period are jobs of the experiment's runner
    (picklable calls of module-level functions, each run in a fresh process), the source's
    first; a target's failure comes back after every target's job has ended."""
    from ctnet_rec.pipeline.job import Pipeline

    cfg = load_config(DEMO_CONFIG, ['pipeline.targets={B = "ctnet", C = "base"}',
                                    "pipeline.parallel_jobs=2"])
    pipeline = Pipeline(cfg, tmp_path / "data", tmp_path / "runs")
    ran: list[str] = []
    monkeypatch.setattr(Pipeline, "train_source", lambda self, t: ran.append(f"A{t}"))
    monkeypatch.setattr("ctnet_rec.pipeline.job.write_status", lambda p: None)

    def target_step(self, domain, period):
        ran.append(f"{domain}{period}")
        if domain == "B":
            raise RuntimeError("B failed")

    monkeypatch.setattr(Pipeline, "target_step", target_step)

    runner = InProcessRunner()
    with pytest.raises(RuntimeError, match="B failed"):
        pipeline.step(3, runner)
    assert ran == ["A3", "B3", "C3"]
    assert runner.labels == ["pipeline source", "pipeline B", "pipeline C"]


def test_a_step_whose_process_is_killed_stops_the_pipeline_saying_so(tmp_path):
    """The source step's process killed mid-training (as the out-of-memory killer does): the
    pipeline exits with status 2 and a message naming the step, and leaves no process behind."""
    world, data, runs = tmp_path / "world", tmp_path / "data", tmp_path / "runs"
    synthesize(tiny_synth(load_config(DEMO_CONFIG), periods=2), world, seed=0)
    _feed(world, data, pause=0).join()
    log = tmp_path / "pipeline.log"
    proc = _start(DEMO_CONFIG, data, runs, log)
    family: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (runs / "source" / ".lock").exists():  # the source's job trains
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        family = descendants(proc.pid)
        parents = {pid: parent_of(pid) for pid in family}
        # the job: a child of the forkserver, not of the pipeline
        jobs = [pid for pid, parent in parents.items() if parent not in (None, proc.pid)]
        assert len(jobs) == 1, parents
        os.kill(jobs[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 2
        why = "pipeline source: its process ended without a result"
        assert why in log.read_text()
        # the status page says so, with the period
        stopped = json.loads((runs / "status.json").read_text())["stopped"]
        assert stopped["period"] == 0 and why in stopped["error"]
        assert "Stopped</strong>" in (runs / "status.html").read_text()
        deadline = time.monotonic() + 30
        while [p for p in family if parent_of(p) is not None] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if parent_of(p) is not None]
    finally:
        kill_family(proc)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_stop_record_goes_when_the_pipeline_runs_again(tmp_path, monkeypatch):
    from ctnet_rec.pipeline.job import Pipeline

    pipeline = Pipeline(load_config(DEMO_CONFIG), tmp_path / "data", tmp_path / "runs")
    pipeline.stopped_record.parent.mkdir(parents=True)
    pipeline.stopped_record.write_text(json.dumps({"at": "then", "period": 3, "error": "x"}))
    _idle(monkeypatch)
    assert pipeline.run(once=True, until=None) == -1
    assert json.loads((tmp_path / "runs" / "status.json").read_text())["stopped"] is None
    assert "Stopped" not in (tmp_path / "runs" / "status.html").read_text()


def _idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline with nothing to do, whose runner starts no process."""
    from ctnet_rec.pipeline.job import Pipeline

    monkeypatch.setattr("ctnet_rec.pipeline.job.IsolatedRunner", InProcessRunner)
    monkeypatch.setattr(Pipeline, "ready", lambda self: [])
    monkeypatch.setattr(Pipeline, "waiting_for", lambda self, done: None)


def test_a_second_pipeline_on_the_same_runs_is_refused(tmp_path, monkeypatch):
    from ctnet_rec.pipeline.job import Pipeline
    from ctnet_rec.training.checkpoint import CheckpointError
    from ctnet_rec.training.run_lock import run_lock

    runs = tmp_path / "runs"
    pipeline = Pipeline(load_config(DEMO_CONFIG), tmp_path / "data", runs)
    _idle(monkeypatch)
    with run_lock(runs):  # the first pipeline
        with pytest.raises(CheckpointError, match="another job is writing this run"):
            pipeline.run(once=True, until=None)
        assert not (runs / "status.json").exists()  # the refused one wrote nothing
    assert pipeline.run(once=True, until=None) == -1  # once the first has ended


def test_a_data_root_it_cannot_read_is_refused_before_anything_is_written(tmp_path):
    runs = tmp_path / "runs"
    assert main(["pipeline", str(DEMO_CONFIG), "--data", str(tmp_path), "--runs", str(runs),
                 "--once"]) == 2  # no domain folders
    assert not runs.exists()


def test_a_pipeline_says_what_the_next_period_waits_for(tmp_path, monkeypatch, caplog):
    """A period is taken once every domain has marked it complete. Until then the log (once
    per change) and the status page say which domains it waits for, and why when a domain
    has never marked a period: its data's writer writes no `_SUCCESS`, and the pipeline
    would otherwise wait in silence ("processed through period -1")."""
    from ctnet_rec.pipeline.job import Pipeline

    data, runs = tmp_path / "data", tmp_path / "runs"
    for domain in ("A", "B", "C"):
        write_period(data, domain, 0, [valid_table()])
    pipeline = Pipeline(load_config(DEMO_CONFIG), data, runs)
    never = "no period folder has _SUCCESS; a period is taken once its writer has written it"
    assert pipeline.waiting_for(-1).startswith(
        f"period 0: no _SUCCESS in the folder of A, B, C (A, B, C: {never}")
    for domain in ("A", "B"):
        (data / domain / "period=0" / SUCCESS).touch()
    assert pipeline.waiting_for(-1).startswith(
        f"period 0: no _SUCCESS in the folder of C (C: {never}")
    (data / "C" / "period=0" / SUCCESS).touch()
    assert pipeline.waiting_for(-1) is None  # period 0 is ready
    write_period(data, "A", 1, [valid_table()])
    write_period(data, "B", 1, [valid_table()])
    (data / "A" / "period=1" / SUCCESS).touch()
    assert pipeline.waiting_for(0) == ("period 1: no _SUCCESS in the folder of B; "
                                       "no folder of C")

    monkeypatch.setattr("ctnet_rec.pipeline.job.IsolatedRunner", InProcessRunner)
    monkeypatch.setattr(Pipeline, "done", lambda self: 0)  # period 0 processed
    with caplog.at_level(logging.INFO, logger="ctnet_rec.pipeline.job"):
        assert pipeline.run(once=True, until=None) == 0
    waiting = "period 1: no _SUCCESS in the folder of B; no folder of C"
    assert f"pipeline: waiting for {waiting}" in caplog.text
    assert json.loads((runs / "status.json").read_text())["waiting_for"] == waiting
    assert f"Waiting for {waiting}." in (runs / "status.html").read_text()


def test_a_period_too_small_to_train_on_is_quarantined_not_a_stop(tmp_path):
    """With no recent periods to compare its rows with (the first ones), a one-row period
    passed the checks and its training job refused it, which stopped the pipeline."""
    from ctnet_rec.pipeline.job import Pipeline

    data = tmp_path / "data"
    write_period(data, "B", 0, [valid_table(1)])
    write_period(data, "B", 1, [valid_table(2)])
    pipeline = Pipeline(load_config(DEMO_CONFIG), data, tmp_path / "runs")
    assert pipeline.check_period("B", 0) == \
        "1 row(s): a training step's batch norm needs at least 2"
    assert pipeline.check_period("B", 1) is None


def test_a_pass_reads_each_runs_record_once_however_many_periods(tmp_path, monkeypatch):
    """A pipeline polls for months: working out what is done read every run's whole record
    once per period (quadratic: 37 s a pass at 2,000 periods, hourly periods reach that in
    12 weeks). Each run's record is read once a pass."""
    from ctnet_rec.pipeline import job
    from ctnet_rec.pipeline.job import Pipeline

    periods, deploy = 30, load_config(DEMO_CONFIG).pipeline.deploy_period
    data, runs = tmp_path / "data", tmp_path / "runs"
    for domain in ("A", "B", "C"):
        for t in range(periods):
            (data / domain / f"period={t}").mkdir(parents=True)
            (data / domain / f"period={t}" / "part-0.parquet").write_bytes(b"")
            (data / domain / f"period={t}" / SUCCESS).touch()
    trained = {"source": range(periods), "B/tower": range(deploy), "C/tower": range(deploy),
               "B/ctnet": range(deploy, periods), "C/ctnet": range(deploy, periods)}
    for run, done in trained.items():
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"period": t}) + "\n" for t in done))
    reads: list[Path] = []
    trained_periods = job.trained_periods
    monkeypatch.setattr(job, "trained_periods", lambda run: reads.append(run) or
                        trained_periods(run))
    assert Pipeline(load_config(DEMO_CONFIG), data, runs).done() == periods - 1
    assert sorted(map(str, reads)) == sorted(str(runs / r) for r in trained)


def test_the_page_shows_the_newest_gates_and_says_where_the_rest_are():
    """A pipeline of hourly periods gates 8,760 times a year: the page keeps the newest 100
    (table and plots), status.json every one."""
    from ctnet_rec.pipeline.status import GATES_SHOWN, render

    gates = [{"period": t, "candidate_through": t - 1, "candidate_auc": 0.7,
              "candidate_gauc": 0.6, "candidate_calibration": 1.0, "serving_through": t - 2,
              "serving_auc": 0.69, "serving_gauc": 0.6, "promoted": True, "reason": "ok"}
             for t in range(1, 151)]
    page = render({
        "stopped": None, "updated": "now", "newest_ready_period": 150, "done_through": 150,
        "lag_periods": 0, "waiting_for": None,
        "source": {"domain": "A", "trained": list(range(151)), "quarantined": {}},
        "targets": {"B": {"model": "ctnet", "serving": None, "source_in_use": 149,
                          "source_note": None, "gates": gates, "quarantined": {}}}})
    shown = [int(t) for t in re.findall(r'<tr data-period="(\d+)">', page)]
    assert shown == list(range(151 - GATES_SHOWN, 151))
    assert f"The newest {GATES_SHOWN} of 150 gates; every one is in status.json." in page
    assert page.count("<circle") == 2 * 2 * GATES_SHOWN  # AUC and GAUC, both series


def test_a_target_served_by_dual_embedding_is_deployed_and_trained(towers, tiny_world,
                                                                   tmp_path):
    """`targets = {B = "dual embedding"}` is a config value the pipeline offers: at its deploy
    period it asked for a model kind named 'dual embedding', which no kind is, and stopped."""
    import dataclasses

    from ctnet_rec.pipeline.job import Pipeline
    from ctnet_rec.training.checkpoint import Manifest, complete_checkpoints

    cfg = dataclasses.replace(towers.cfg, pipeline=dataclasses.replace(
        towers.cfg.pipeline, source_domain="A", targets={"B": "dual embedding"},
        deploy_period=2))
    runs = tmp_path / "runs"
    shutil.copytree(towers.source_run, runs / "source")
    shutil.copytree(towers.target_run, runs / "B" / "tower")
    pipeline = Pipeline(cfg, tiny_world, runs)
    pipeline.train_target("B", 2)
    run = pipeline.model_run("B", 2)
    assert run.name == "dual-embedding" and sorted(complete_checkpoints(run)) == [2]
    assert Manifest.read(complete_checkpoints(run)[2]).kind == "dual_embedding"
