"""`ctnet experiment --quick` end to end: every table written, the report's numbers are the
metrics file's, each compared model is built as it claims, and a re-run resumes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctnet_rec.cli import main
from ctnet_rec.config import ConfigError, load_config
from ctnet_rec.data.contract import DataError
from ctnet_rec.experiment.runner import (
    BASE,
    CTNET_VARIANTS,
    DIN,
    DUAL,
    LATE_FUSION,
    ORACLE,
    PRETRAIN_FINETUNE,
    SOURCE,
    check_synthetic_world,
    quick,
    run_experiment,
)
from ctnet_rec.modules.joint import JOINT_MODELS
from ctnet_rec.training.checkpoint import Manifest, complete_checkpoints, lineage_path
from ctnet_rec.training.inference import evaluate_checkpoint

from .conftest import DEMO_CONFIG, descendants, parent_of
from .job_functions import hold_mb, stamp

KILLED = partial(signal.raise_signal, signal.SIGKILL)  # a job whose process is killed

# one of the six joint rows, to keep the suite's time (the experiment's handling of a joint
# row is the same for all six); tests/test_joint.py covers each of the six as a module, with
# its deployment and two-domain training, and tests/test_export.py exports PLE
JOINT = ["MLP++"]
TARGETS = ["B"]
assert set(JOINT) <= set(JOINT_MODELS)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    """The demo config with the experiment's joint rows limited to `JOINT` and its targets to
    `TARGETS` (the report's layout for several targets is tested on made-up results in
    test_report.py)."""
    text = DEMO_CONFIG.read_text()
    path = tmp_path_factory.mktemp("config") / "demo.toml"
    for key, value in (("joint_baselines", JOINT), ("target_domains", TARGETS)):
        line = next(x for x in text.splitlines() if x.startswith(f"{key} ="))
        text = text.replace(line, f"{key} = {value!r}".replace("'", '"'))
    path.write_text(text)
    assert load_config(path).experiment.joint_baselines == JOINT
    assert load_config(path).experiment.target_domains == TARGETS
    return path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, config_path):
    """The quick experiment with two seeds: OUT/seed=0, OUT/seed=1 and the pooled report."""
    out = tmp_path_factory.mktemp("experiment") / "quick"
    assert main(["experiment", str(config_path), "--quick", "--out", str(out),
                 "--seeds", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def experiment(seeds):
    return seeds / "seed=0"


def _rows(report: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table that follows `header`, by first cell."""
    block = next(b for b in report.split(header, 1)[1].split("\n\n") if b.startswith("|"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_quick_experiment_writes_every_table_from_the_metrics(experiment):
    report = (experiment / "report.md").read_text()
    metrics = json.loads((experiment / "metrics.json").read_text())
    last = str(metrics["settings"]["trained_periods"][-1])
    models = metrics["models"]
    assert list(models) == [SOURCE, BASE, DIN, *JOINT, *PRETRAIN_FINETUNE, DUAL, LATE_FUSION,
                            *CTNET_VARIANTS, ORACLE]
    table2 = _rows(report, "## Table 2")
    assert list(table2) == list(models)
    for name, cells in table2.items():
        for i, d in enumerate(TARGETS):
            m, b = models[name][d][last], models[BASE][d][last]
            assert cells[3 * i: 3 * i + 3] == [f"{m['auc']:.4f}", f"{m['gauc']:.4f}",
                                              f"{m['auc'] - b['auc']:+.4f}"]
    for d in TARGETS:
        table3 = _rows(report, f"## Table 3: continual vs transfer-once, target {d}")
        assert list(table3) == ["2", "3"]
        for t, cells in table3.items():
            assert cells[1] == f"{models[BASE][d][t]['auc']:.4f}"
            assert cells[4] == f"{models['CTNet'][d][t]['auc']:.4f}"
    table5 = _rows(report, "## Table 5")
    gains = [models["CTNet"]["B"][t]["slices"]["new_items"]["auc"]
             - models[BASE]["B"][t]["slices"]["new_items"]["auc"] for t in ("2", "3")]
    assert table5["B"][2] == f"{sum(gains) / 2:+.4f}"
    png = experiment / "gain_over_time.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert "](gain_over_time.png)" in report
    assert all(0.5 < models[ORACLE][d][last]["auc"] < 1 for d in TARGETS)
    # the demo config's two jobs at a time, said where the wall times are
    threads = metrics["settings"]["torch_threads_per_job"]
    assert metrics["settings"]["jobs_at_a_time"] == 2 and threads >= 1
    assert f"Jobs ran 2 at a time, each with {threads} torch thread" in report.split("## Cost")[1]


def test_each_model_is_built_as_it_claims(experiment):
    def manifests(run):
        return [Manifest.read(p) for p in complete_checkpoints(run).values()]

    b = experiment / "B"
    ctnet, once, linear = manifests(b / "ctnet"), manifests(b / "ctnet-transfer-once"), \
        manifests(b / "ctnet-w-o-glu")
    assert [m.lineage["source_period"] for m in ctnet] == [1, 2]  # refreshed every period
    assert [m.lineage["source_period"] for m in once] == [1, 1]  # deployed once, at t0 - 1
    assert all(m.config["ctnet"]["adapter"] == "linear" for m in linear)
    assert all(m.config["ctnet"]["adapter"] == "glu" for m in ctnet + once)
    # ... so on the first trained period they are one model (the paper's Table 3)
    metrics = json.loads((experiment / "metrics.json").read_text())["models"]
    first = {name: metrics[name]["B"]["2"] for name in ("CTNet", "CTNet transfer-once")}
    assert first["CTNet"]["auc"] == pytest.approx(first["CTNet transfer-once"]["auc"], abs=1e-6)
    assert metrics["CTNet"]["B"]["3"]["auc"] != metrics["CTNet transfer-once"]["B"]["3"]["auc"]
    init = Manifest.read(b / "ctnet" / "init")
    assert lineage_path(b / "ctnet" / "init", init.lineage["target_checkpoint"]) == \
        (b / "base" / "checkpoints" / "period=1").resolve()
    # the Source row is A's own tower of the same period scoring B's next period
    metrics = json.loads((experiment / "metrics.json").read_text())
    direct = evaluate_checkpoint(complete_checkpoints(experiment / "A")[3],
                                 experiment / "data", "B", 4)
    assert metrics["models"][SOURCE]["B"]["3"]["auc"] == pytest.approx(direct["auc"], abs=1e-9)


def _weights(ckpt):
    from ctnet_rec.training.inference import open_checkpoint

    trainer, _ = open_checkpoint(ckpt)
    return {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone()
            for k, v in trainer.dmp.state_dict().items()}


@pytest.mark.parametrize(("slug", "from_source"), [
    ("pre-train-fine-tune-id-embeddings", {"user", "item", "category", "seller"}),
    ("pre-train-fine-tune-all-embeddings", "every table"),
    ("pre-train-fine-tune-all-parameters", "everything"),
])
def test_pretrain_finetune_starts_from_the_source_parameters(experiment, slug, from_source):
    init = _weights(experiment / "B" / slug / "init")
    source = _weights(complete_checkpoints(experiment / "A")[1])
    target = _weights(complete_checkpoints(experiment / "B" / "base")[1])
    tables = {k: k.split(".")[-2] for k in init if k.startswith("embeddings.")}
    for key, value in init.items():
        replaced = (from_source == "everything" or key in tables and (
            from_source == "every table" or tables[key] in from_source))
        want = source[key] if replaced else target[key]
        assert torch.equal(value, want), key
        if key.endswith("item.weight") or key == "mlp.linears.0.weight":
            assert not torch.equal(source[key], target[key])  # the check can tell them apart
    manifests = [Manifest.read(p) for p in complete_checkpoints(experiment / "B" / slug).values()]
    assert [m.period for m in manifests] == [2, 3]


def test_finetune_sweep_table(experiment):
    report = (experiment / "report.md").read_text()
    metrics = json.loads((experiment / "metrics.json").read_text())
    sweep = metrics["finetune_sweep"]
    assert {d: list(per) for d, per in sweep.items()} == {"B": ["1", "2", "4"]}
    table4 = _rows(report, "## Table 4")
    ctnet_b = metrics["models"]["CTNet"]["B"]["3"]["auc"]
    row = table4["Pre-train & Fine-tune, last 2 periods"]
    assert row[0] == f"{sweep['B']['2']['auc']:.4f}"
    assert row[1] == f"{sweep['B']['2']['auc'] - ctnet_b:+.4f}"
    assert table4["CTNet"][0] == f"{ctnet_b:.4f}"
    for k, periods in (("1", [3]), ("2", [2, 3]), ("4", [0, 1, 2, 3])):
        run = experiment / "B" / "finetune-sweep" / f"last-{k}"
        assert sorted(complete_checkpoints(run)) == periods  # only the last k periods
        first = Manifest.read(complete_checkpoints(run)[periods[0]])
        assert first.lineage["init"].endswith("A/checkpoints/period=3")  # newest source


def test_dual_embedding_has_two_of_each_id_table(experiment):
    from ctnet_rec.training.inference import open_checkpoint

    init = _weights(experiment / "B" / "dual-embedding" / "init")
    source = _weights(complete_checkpoints(experiment / "A")[1])
    target_ckpt = complete_checkpoints(experiment / "B" / "base")[1]
    target = _weights(target_ckpt)
    for table, kind in (("user", "pooled.embedding_bags"), ("item", "sequence.embeddings"),
                        ("category", "sequence.embeddings"), ("seller", "pooled.embedding_bags")):
        key = f"embeddings.{kind}.{table}.weight"  # footnote 3's four ID tables
        assert torch.equal(init[f"dual.embedding_bags.dual_{table}.weight"], source[key])
        assert torch.equal(init[key], target[key])  # the target's own table stays
    first, old = init["mlp.linears.0.weight"], target["mlp.linears.0.weight"]
    assert first.shape[1] == old.shape[1] + 3 * 16 + 8
    assert torch.equal(first[:, : old.shape[1]], old) and not first[:, old.shape[1]:].any()
    dual, _ = open_checkpoint(experiment / "B" / "dual-embedding" / "init")
    base, _ = open_checkpoint(target_ckpt)
    data = experiment / "data"
    np.testing.assert_allclose(dual.predict(data, "B", 2)["p"], base.predict(data, "B", 2)["p"],
                               atol=1e-6)  # zero new columns: it starts as the target model
    last = Manifest.read(complete_checkpoints(experiment / "B" / "dual-embedding")[3])
    assert last.kind == "dual_embedding"


def test_rerun_resumes_without_training_again(experiment, config_path):
    ckpt = complete_checkpoints(experiment / "B" / "ctnet")[3] / "manifest.json"
    stamp = ckpt.stat().st_mtime_ns
    before = json.loads((experiment / "metrics.json").read_text())["models"]
    # seed 0 of the two-seed run again, now as a one-seed experiment in the same folder
    assert main(["experiment", str(config_path), "--quick", "--out", str(experiment)]) == 0
    assert ckpt.stat().st_mtime_ns == stamp
    assert json.loads((experiment / "metrics.json").read_text())["models"] == before


def test_missing_periods_are_refused_before_training(experiment, tmp_path):
    cfg = quick(load_config(DEMO_CONFIG))
    cfg.experiment.periods = 5
    with pytest.raises(DataError, match=r"needs periods 0\.\.7, missing \[5, 6, 7\]"):
        run_experiment(cfg, experiment / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_retention_is_refused_before_training(experiment, tmp_path):
    """The experiment's later jobs load the source and Base runs' older checkpoints: pruning
    them (keep_checkpoints) would fail those jobs after hours of training."""
    cfg = quick(load_config(DEMO_CONFIG))
    cfg.train.keep_checkpoints = 2
    with pytest.raises(ConfigError, match="keep_checkpoints = 2: the experiment's later jobs"):
        run_experiment(cfg, experiment / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _parquet_rows(data, domain, periods):
    return sum(pq.ParquetFile(f).metadata.num_rows
               for t in periods for f in (data / domain / f"period={t}").glob("*.parquet"))


def test_cost_table_counts_the_samples_each_model_read(experiment):
    report = (experiment / "report.md").read_text()
    costs = json.loads((experiment / "metrics.json").read_text())["costs"]
    data = experiment / "data"
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in report.split("## Cost", 1)[1].splitlines() if line.startswith("| ")][1:]
    # the source tower, then per target domain two warm-ups, 14 compared jobs and the joint
    assert len(rows) == sum(len(per) for per in costs.values()) == \
        1 + len(TARGETS) * (16 + len(JOINT))
    for name, domain, target, source, seconds, peak, above in rows:
        c = costs[name][domain]
        assert [int(target), int(source), int(peak)] == [
            c["target_samples"], c["source_samples"], round(c["peak_rss_mb"])]
        assert int(seconds) == round(c["seconds"]) and 0 <= int(above) < int(peak)
    assert costs["source tower"]["A"]["source_samples"] == _parquet_rows(data, "A", range(4))
    assert costs["source tower"]["A"]["target_samples"] == 0
    for name, per in costs.items():  # every transfer model reads target data only
        if name != "source tower" and name not in JOINT:
            assert all(c["source_samples"] == 0 for c in per.values()), name
    for name in JOINT:  # the joint models read the source's window as well
        for d in TARGETS:
            assert costs[name][d]["source_samples"] == _parquet_rows(data, "A", [2, 3]), name
    for d in TARGETS:
        window = _parquet_rows(data, d, [2, 3])
        assert costs["warm-up"][d]["target_samples"] == _parquet_rows(data, d, [0, 1])
        for name in (BASE, DIN, *JOINT, *PRETRAIN_FINETUNE, DUAL, *CTNET_VARIANTS):
            assert costs[name][d]["target_samples"] == window, (name, d)
        assert costs["DIN warm-up"][d]["target_samples"] == _parquet_rows(data, d, [0, 1])
        assert costs[SOURCE][d]["target_samples"] == 0  # it only scores
        assert costs[LATE_FUSION][d]["target_samples"] == 0  # so does the fusion
        assert costs["Pre-train & Fine-tune sweep (4 periods)"][d]["target_samples"] == \
            _parquet_rows(data, d, range(4))


def test_seeds_report_mean_and_std_of_each_number(seeds):
    runs = [json.loads((seeds / f"seed={s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert [r["settings"]["config"]["train"]["seed"] for r in runs] == [0, 1]
    worlds = [(seeds / f"seed={s}" / "data" / "B" / "period=2").glob("*.parquet") for s in (0, 1)]
    assert len({next(iter(w)).read_bytes() for w in worlds}) == 2  # a world per seed
    table2 = _rows((seeds / "report.md").read_text(), "## Table 2")
    for name in ("CTNet", DUAL):
        gains = [r["models"][name]["B"]["3"]["auc"] - r["models"][BASE]["B"]["3"]["auc"]
                 for r in runs]
        assert table2[name][2] == f"{np.mean(gains):+.4f} ± {np.std(gains, ddof=1):.4f}"
    assert "Seeds 0, 1" in (seeds / "report.md").read_text()
    for s in (0, 1):  # and each seed's own report
        assert "## Table 2" in (seeds / f"seed={s}" / "report.md").read_text()


def test_jobs_refusals_come_back_from_their_process(tmp_path):

    from ctnet_rec.data.contract import list_periods
    from ctnet_rec.experiment.jobs import IsolatedRunner

    runner = IsolatedRunner(preload=["torch", "ctnet_rec.data.contract"])
    try:
        with pytest.raises(DataError, match="domain folder not found"):
            runner.submit(partial(list_periods, tmp_path, "X"), "job").result()
        took = runner.submit(partial(list_periods, tmp_path.parent, tmp_path.name), "job")
        small = took.result()
        # each job's peak memory is its own process's: a job holding 300 MB shows them, the
        # next job (a fresh process) does not
        big = runner.submit(partial(hold_mb, 300), "job").result()
        assert big["peak_rss_mb"] - big["start_rss_mb"] >= 290
        after = runner.submit(partial(list_periods, tmp_path.parent, tmp_path.name),
                              "job").result()
        assert after["peak_rss_mb"] < big["peak_rss_mb"] - 250
        assert abs(after["peak_rss_mb"] - small["peak_rss_mb"]) < 50
    finally:
        runner.close()


def test_jobs_run_side_by_side_once_what_they_need_has_ended(tmp_path):
    """Two at a time: a job starts as soon as a slot is free and the jobs it needs have ended
    (a failed one counts as ended: its failure comes back to the caller); one at a time: in
    the plan's order."""

    from ctnet_rec.data.contract import list_periods
    from ctnet_rec.experiment.jobs import IsolatedRunner, Job, run_in_order

    def events(workers: int, nap: float) -> list[tuple[str, str]]:
        sleep, fail = partial(time.sleep, nap), partial(list_periods, tmp_path, "X")
        jobs = [Job("a", "X", sleep), Job("b", "X", fail), Job("c", "X", sleep, needs=[("b", "X")]),
                Job("d", "X", sleep, needs=[("a", "X")])]
        seen: list[tuple[str, str]] = []
        ended: dict[str, object] = {}
        runner = IsolatedRunner(preload=["torch", "ctnet_rec.data.contract"], workers=workers)
        try:
            run_in_order(jobs, runner, lambda i: seen.append(("start", jobs[i].name)),
                         lambda i, took: (seen.append(("end", jobs[i].name)),
                                          ended.__setitem__(jobs[i].name, took)))
        finally:
            runner.close()
        assert isinstance(ended["b"], DataError) and ended["a"]["seconds"] >= nap
        return seen

    seen = events(2, nap=3.0)
    assert seen[:2] == [("start", "a"), ("start", "b")]  # side by side
    # c needs the failed b: it starts while a still runs; d waits for a
    assert seen.index(("start", "c")) < seen.index(("end", "a")) < seen.index(("start", "d"))
    assert [n for e, n in events(1, nap=0.1) if e == "start"] == ["a", "b", "c", "d"]


# a process that runs a long job after a quick one, then waits
_SUBMITTER = """
import functools, time
from ctnet_rec.experiment.jobs import IsolatedRunner
runner = IsolatedRunner(preload=["torch"], workers=2)
runner.submit(functools.partial(time.sleep, 0), "quick").result()
runner.submit(functools.partial(time.sleep, 600), "long")
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_jobs_end_with_the_process_that_submitted_them(sig):
    """Killing the process that runs the jobs (the pipeline, the experiment) ends its running
    job, and so the forkserver: no job trains on as an orphan, nothing waits forever."""
    proc = subprocess.Popen([sys.executable, "-c", _SUBMITTER], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    family: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 60
        # the forkserver, the running job's process, the resource tracker (the quick job's
        # process has ended)
        while len(family := [p for p in descendants(proc.pid) if parent_of(p) is not None]) != 3 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(family) == 3, family
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := [p for p in family if parent_of(p) is not None]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
    finally:
        for pid in [proc.pid, *family]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_job_fails_alone(tmp_path):
    """A job whose process is killed (the out-of-memory killer) fails with JobKilled; the job
    beside it and the jobs after it run as if nothing happened. Jobs submitted at once run
    at most `workers` at a time."""

    from ctnet_rec.experiment.jobs import IsolatedRunner, JobKilled

    runner = IsolatedRunner(preload=["torch"], workers=2)
    try:
        beside = runner.submit(partial(stamp, tmp_path / "beside", 1.0), "beside")
        killed = runner.submit(KILLED, "killed")
        with pytest.raises(JobKilled, match="killed: its process ended without a result"):
            killed.result()
        assert beside.result()["seconds"] >= 1.0
        # a slot frees when its job ends: the third waits for one of the first two
        after = [runner.submit(partial(stamp, tmp_path / f"after{i}", 0.5), "after")
                 for i in range(3)]
        assert all(f.result()["seconds"] >= 0.5 for f in after)
    finally:
        runner.close()
    spans = sorted(tuple(map(float, (tmp_path / f"after{i}").read_text().split()))
                   for i in range(3))
    assert spans[2][0] >= min(spans[0][1], spans[1][1])


def test_an_experiment_goes_on_past_a_killed_job(tmp_path, caplog):
    """The experiment leaves a killed job's row empty, as any failed job's, and runs the rest,
    the jobs that need it included."""

    from ctnet_rec.experiment.jobs import Job
    from ctnet_rec.experiment.runner import _run_jobs

    nap = partial(time.sleep, 0)
    jobs = [Job("a", "X", nap), Job("b", "X", KILLED), Job("c", "X", nap, needs=[("b", "X")])]
    usage = _run_jobs(jobs, tmp_path, tmp_path, workers=2)
    assert usage["b"]["X"] == {"failed": 1.0}
    assert usage["a"]["X"]["seconds"] >= 0 and usage["c"]["X"]["seconds"] >= 0
    assert "b on X failed, its row is left empty: JobKilled" in caplog.text


def test_a_second_experiment_on_the_same_folder_is_refused(tmp_path):
    from ctnet_rec.experiment.jobs import Job
    from ctnet_rec.experiment.runner import _run_jobs
    from ctnet_rec.training.checkpoint import CheckpointError
    from ctnet_rec.training.run_lock import run_lock

    jobs = [Job("a", "X", partial(time.sleep, 0))]
    with run_lock(tmp_path), pytest.raises(CheckpointError, match="another job is writing"):
        _run_jobs(jobs, tmp_path, tmp_path, workers=1)  # the first still runs
    assert not (tmp_path / "usage.json").exists()
    assert _run_jobs(jobs, tmp_path, tmp_path, workers=1)["a"]["X"]["seconds"] >= 0


def test_jobs_at_a_time_must_be_at_least_one(tmp_path, caplog):
    out = tmp_path / "quick"
    assert main(["experiment", str(DEMO_CONFIG), "--quick", "--jobs", "0", "--out",
                 str(out)]) == 2
    assert "experiment.parallel_jobs" in caplog.text and not out.exists()


def test_every_job_needs_only_earlier_jobs_and_transfers_wait_for_their_towers(tmp_path):
    from ctnet_rec.experiment.runner import SOURCE_TOWER, plan

    jobs = plan(quick(load_config(DEMO_CONFIG)), tmp_path / "data", tmp_path)
    for i, job in enumerate(jobs):
        assert set(job.needs) <= {j.key for j in jobs[:i]}, job.key
        if job.name in [DUAL, *PRETRAIN_FINETUNE, *CTNET_VARIANTS, *JOINT_MODELS]:
            assert set(job.needs) == {(SOURCE_TOWER, "A"), (BASE, job.domain)}, job.key


def test_a_finetune_row_that_would_repeat_another_is_left_out(tmp_path):
    """Where every table is an ID table, Pre-train & Fine-tune (all embeddings) replaces the
    same tables as (ID embeddings): the same model, trained twice, two identical rows."""
    from ctnet_rec.experiment.runner import plan

    def finetunes(sets: list[str]) -> list[str]:
        jobs = plan(quick(load_config(DEMO_CONFIG, sets)), tmp_path / "data", tmp_path)
        return sorted({j.name for j in jobs if j.name in PRETRAIN_FINETUNE})

    assert finetunes([]) == sorted(PRETRAIN_FINETUNE)  # the demo's hour, age, price tables
    every_table = ["user", "item", "category", "seller", "age_group", "hour"]
    assert finetunes(["features.numeric=[]",
                      f"experiment.id_embedding_tables={json.dumps(every_table)}"]) == \
        ["Pre-train & Fine-tune (ID embeddings)", "Pre-train & Fine-tune (all parameters)"]


def test_progress_names_the_job_and_estimates_the_rest(experiment, caplog):
    from ctnet_rec.experiment.jobs import Progress
    from ctnet_rec.experiment.runner import plan

    cfg = quick(load_config(DEMO_CONFIG))
    jobs = plan(cfg, experiment / "data", experiment)
    progress = Progress(jobs, experiment / "data")
    assert progress.sizes[0] == _parquet_rows(experiment / "data", "A", range(4))
    with caplog.at_level("INFO", logger="ctnet_rec.experiment.jobs"):
        progress.starting(0)
        progress.finished(0)
        progress.starting(len(jobs) - 1)
    first, last = caplog.messages
    assert first.startswith(f"[1/{len(jobs)}] source tower on A (periods 0-3)")
    assert first.endswith("ETA unknown")
    assert re.fullmatch(rf"\[{len(jobs)}/{len(jobs)}\] Pre-train & Fine-tune sweep \(4 periods\) "
                        r"on C \(periods 0-3\) \| elapsed \d+:\d\d, ETA \d+:\d\d", last)


def test_the_report_names_every_row_significantly_above_ctnet(seeds):
    """"Where CTNet stands" lists exactly the rows whose gain over CTNet has its whole 95%
    interval above zero, and says whether CTNet's own gain over Base is significant; with one
    seed and with several."""
    from ctnet_rec.experiment.report import gain_interval
    from ctnet_rec.experiment.runner import Results
    from ctnet_rec.experiment.significance import mark

    for folder, runs in ((seeds / "seed=0", [0]), (seeds, [0, 1])):
        results = [Results.from_json(json.loads((seeds / f"seed={s}" / "metrics.json")
                                                .read_text())) for s in runs]
        report = (folder / "report.md").read_text()
        section = report.split("## Where CTNet stands", 1)[1].split("##", 1)[0]
        for d in TARGETS:
            line = next(x for x in section.splitlines() if x.startswith(f"- Target {d}:"))
            vs_base = gain_interval(results, "CTNet", BASE, d)
            assert f"gain over Base is {vs_base['mean']:+.4f}" in line
            above = line.split("Significantly above CTNet:", 1)[1].split(". ")[0] \
                if "Significantly above CTNet:" in line else ""
            for n in results[0].models:
                if n in ("CTNet", ORACLE):
                    continue
                iv = gain_interval(results, n, "CTNet", d)
                assert (f"{n} (" in above) == (mark(iv) == "+"), (n, line)
        table = _rows(report, "## Gains with 95% intervals, target B")
        assert table["CTNet"][4] == "" and table[BASE][3] == ""


def test_din_is_the_tower_with_the_din_unit_and_trains(experiment):
    for d in TARGETS:
        ckpts = complete_checkpoints(experiment / d / "din")
        assert sorted(ckpts) == [0, 1, 2, 3]  # its own warm-up, then the test periods
        manifest = Manifest.read(ckpts[3])
        model = manifest.config["model"]
        assert (model["short_sequence"], model["use_sim"], model["use_eta"]) == ("din", False,
                                                                                 False)
    # it trains on its own: its activation unit moves over the test periods (its AUC is
    # no test of the build: without long-sequence modules it may well score below Base)
    before, after = (_weights(complete_checkpoints(experiment / "B" / "din")[t]) for t in (1, 3))
    assert not torch.equal(before["ta.unit.0.weight"], after["ta.unit.0.weight"])
    from ctnet_rec.training.inference import open_checkpoint

    trainer, _ = open_checkpoint(complete_checkpoints(experiment / "B" / "din")[3])
    names = [n.split(".")[0] for n, _ in trainer.dmp.named_parameters()]
    assert "ta" in names and "mlp" in names  # DIN's activation unit, the tower's MLP
    assert not {"encoder", "sim", "eta"} & set(names)
    assert any(n.startswith("ta.unit.") for n, _ in trainer.dmp.named_parameters())


def test_joint_training_keeps_the_target_task(experiment):
    """Each joint-learning baseline starts on the target model (tests/test_joint.py) and, with
    the source domain's rows interleaved, still scores B's next periods about as Base does:
    mean AUC over 2 x 1,000 test rows within 0.03 of Base's (about 2 standard errors of the
    difference), and its target task moved (it trained)."""
    metrics = json.loads((experiment / "metrics.json").read_text())["models"]
    base = np.mean([metrics[BASE]["B"][t]["auc"] for t in ("2", "3")])
    for name in JOINT:
        auc = np.mean([metrics[name]["B"][t]["auc"] for t in ("2", "3")])
        assert auc > base - 0.03, (name, auc, base)
        assert metrics[name]["B"]["2"]["auc"] != metrics[BASE]["B"]["2"]["auc"], name


def test_late_fusion_is_base_plus_a_weight_chosen_before_the_test(experiment):
    """The late-fusion row: Base's logit + w x the source tower's (the one CTNet reads), w
    1.0 on the first test and then the best weight on the previous test's rows."""
    from ctnet_rec.experiment.late_fusion import fused
    from ctnet_rec.metrics import auc
    from ctnet_rec.training.inference import open_checkpoint
    from ctnet_rec.training.output_fusion import best_weight, logit

    metrics = json.loads((experiment / "metrics.json").read_text())
    lag = metrics["settings"]["config"]["ctnet"]["source_lag"]
    periods = metrics["settings"]["trained_periods"]
    base = complete_checkpoints(experiment / "B" / "base")
    source = complete_checkpoints(experiment / "A")
    previous = None
    for t in periods:
        b = open_checkpoint(base[t])[0].predict(experiment / "data", "B", t + 1)
        s = open_checkpoint(source[t - lag])[0].predict(experiment / "data", "B", t + 1)
        row = metrics["models"][LATE_FUSION]["B"][str(t)]
        want = 1.0 if previous is None else best_weight(*previous)
        assert row["fusion_weight"] == want
        assert row["auc"] == pytest.approx(auc(b["labels"], fused(b["p"], s["p"], want)),
                                           abs=1e-9)
        previous = (b["labels"], logit(b["p"]), logit(s["p"]))


def test_fusion_weights_on_a_known_mixture():
    from ctnet_rec.experiment.late_fusion import fused
    from ctnet_rec.training.output_fusion import best_weight, logit

    rng = np.random.default_rng(0)
    a, c = rng.normal(size=20_000), rng.normal(size=20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-(a + 0.6 * c)))).astype(float)
    base, source = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-c))
    np.testing.assert_allclose(fused(base, source, 0.0), base, rtol=1e-6)
    np.testing.assert_allclose(logit(fused(base, source, 0.5)), a + 0.5 * (c - c.mean()),
                               atol=1e-6)
    assert 0.4 <= best_weight(labels, a, c) <= 0.8
    assert best_weight(labels, a, -c) == 0.0  # a harmful source gets no weight
    assert best_weight(labels, a, rng.normal(size=20_000)) <= 0.1  # nor does noise, nearly
    assert best_weight(np.ones(20_000), a, c) == 0.0  # one class: nothing to choose on
    # the chance guard keeps a real source's weight ...
    assert best_weight(labels, a, c, min_z=1.96) == best_weight(labels, a, c)


def test_the_chance_guard_gives_a_source_of_noise_no_weight():
    """On 1,000 rows the AUC-best weight of a source that is pure noise is often above 0;
    with `min_z` = 1.96 it is 0 but where the noise's gain reaches 2 standard errors."""
    from ctnet_rec.training.output_fusion import best_weight

    rng = np.random.default_rng(1)
    plain, guarded = [], []
    for _ in range(40):
        a = rng.normal(size=1000)
        labels = (rng.random(1000) < 1 / (1 + np.exp(-a))).astype(float)
        noise = rng.normal(size=1000)
        plain.append(best_weight(labels, a, noise))
        guarded.append(best_weight(labels, a, noise, min_z=1.96))
    assert sum(w > 0 for w in plain) >= 10, plain
    assert sum(w > 0 for w in guarded) <= 2, guarded
    assert all(g in (0.0, p) for g, p in zip(guarded, plain, strict=True))


def test_pooled_evidence_finds_a_weak_source_and_never_noise():
    """A weak real source's gain on 1,000 rows is under 2 standard errors in most periods;
    summed over the periods (`PooledEvidence`) it passes the guard within a few, while a
    source of pure noise is kept at 0 through all 12 (noise lowers the AUC at every w > 0 in
    expectation: its sums fall below 0)."""
    from ctnet_rec.training.output_fusion import PooledEvidence, best_weight

    rng = np.random.default_rng(2)
    weak, noise = PooledEvidence(), PooledEvidence()
    per_period, pooled, pooled_noise = [], [], []
    for _ in range(12):
        a, c = rng.normal(size=1000), rng.normal(size=1000)
        labels = (rng.random(1000) < 1 / (1 + np.exp(-(a + 0.3 * c)))).astype(float)
        per_period.append(best_weight(labels, a, c, min_z=1.96))
        weak = weak.add(labels, a, c)
        noise = noise.add(labels, a, rng.normal(size=1000))
        pooled.append(weak.weight(min_z=1.96))
        pooled_noise.append(noise.weight(min_z=1.96))
    assert sum(w > 0 for w in per_period) <= 8, per_period
    assert all(w > 0 for w in pooled[4:]) and 0.1 <= pooled[-1] <= 0.6, pooled
    assert pooled_noise == [0.0] * 12, pooled_noise
    assert weak.fits == 12 and weak.gain[0] == 0.0 and weak.variance[0] == 0.0
    # a period with one class adds nothing; the evidence survives a manifest's JSON
    assert weak.add(np.ones(1000), a, c) == weak
    assert PooledEvidence.from_json(json.loads(json.dumps(weak.to_json()))) == weak
    assert PooledEvidence().weight() == 0.0  # no fit yet: the target alone
    with pytest.raises(ValueError, match="over 3 weights"):
        PooledEvidence.from_json({"gain": [0.0] * 3, "variance": [0.0] * 3, "fits": 1})


def test_rows_are_paired_with_base_and_ctnet_on_the_same_rows(experiment):
    """Every evaluation keeps its scores; each row's gain over Base (and CTNet) carries the
    standard error of DeLong's paired test on the same rows; the source row, scored by
    `ctnet eval`, has none (its interval falls back to Hanley & McNeil)."""
    metrics = json.loads((experiment / "metrics.json").read_text())
    models = metrics["models"]
    for d in TARGETS:
        for t in map(str, metrics["settings"]["trained_periods"]):
            assert (experiment / d / "ctnet" / "scores" / f"period={int(t) + 1}.npy").exists()
            for name in ("CTNet", DUAL, LATE_FUSION, DIN):
                paired = models[name][d][t]["paired"][BASE]
                assert paired["gain"] == pytest.approx(  # the report's AUCs: float32 sums
                    models[name][d][t]["auc"] - models[BASE][d][t]["auc"], abs=1e-6)
                # zero only for the same scores (a fusion weight of 0 is Base itself)
                assert 0 < paired["se"] < 0.05 or paired["se"] == paired["gain"] == 0
            assert "CTNet" in models[DUAL][d][t]["paired"]
            assert "paired" not in models[SOURCE][d][t]


def test_an_experiment_its_synthetic_world_cannot_hold_is_refused_before_it_is_made(tmp_path,
                                                                                    caplog):
    """A domain [synth] does not make, or more periods than it has: refused at once (the world
    used to be generated first, then the experiment refused)."""
    for setting, message in (('experiment.source_domain="Z"', "domain(s) ['Z']: not among"),
                             ("experiment.periods=20", "need periods 0..26; the synthetic "
                                                       "world has [synth] periods 16")):
        out = tmp_path / "x"
        assert main(["experiment", str(DEMO_CONFIG), "--set", setting, "--out", str(out)]) == 2
        assert message in caplog.text and not out.exists()
    with pytest.raises(ConfigError, match=r"\[experiment\] domain\(s\) \['Z'\]"):
        check_synthetic_world(load_config(DEMO_CONFIG, ['experiment.source_domain="Z"']))


def test_a_setting_that_quick_replaces_is_refused_not_dropped(tmp_path, caplog):
    """`--quick --set experiment.periods=3` trained 2 periods after deployment, saying nothing
    of the 3 asked for; now refused before anything is made, naming both values. A setting
    --quick leaves alone, or one equal to what --quick sets, goes on."""
    out = tmp_path / "x"
    assert main(["experiment", str(DEMO_CONFIG), "--quick", "--set", "experiment.periods=3",
                 "--out", str(out)]) == 2
    assert "--set experiment.periods=3: --quick sets experiment.periods to 2 itself" in \
        caplog.text and not out.exists()
    # `data synth` writes a world: only [synth]'s settings are its concern
    synth = ["data", "synth", "--config", str(DEMO_CONFIG), "--quick", "--out", str(out)]
    assert main([*synth, "--set", "synth.periods=8"]) == 2
    assert "--quick sets synth.periods to 5 itself" in caplog.text and not out.exists()
    assert main([*synth, "--set", "experiment.periods=3"]) == 0
    assert sorted(p.name for p in (out / "B").iterdir()) == [f"period={t}" for t in range(5)]
    sets = ["synth.domains.B.impressions_per_period=50", "data.batch_size=256", "train.seed=4"]
    with pytest.raises(ConfigError, match="synth.domains.B.impressions_per_period to 1000"):
        quick(load_config(DEMO_CONFIG, sets), sets)
    table = ["experiment={deploy_period = 6, periods = 4, parallel_jobs = 2}"]  # a whole table
    with pytest.raises(ConfigError, match="sets experiment.deploy_period to 2 itself"):
        quick(load_config(DEMO_CONFIG, table), table)
    sets = sets[1:]
    assert quick(load_config(DEMO_CONFIG, sets), sets).train.seed == 4


def test_an_experiment_goes_on_only_with_the_settings_its_models_trained_with(experiment,
                                                                             config_path,
                                                                             caplog):
    """Finished models are reused, not trained again: with another adapter learning rate the
    report gave the old models' figures under the new setting (OUT/metrics.json said so too).
    Only the number of jobs at a time may change."""
    again = ["experiment", str(config_path), "--quick", "--out", str(experiment)]
    assert json.loads((experiment / "config.json").read_text())["ctnet"]["adapter_optimizer"]
    assert main([*again, "--set", "ctnet.adapter_optimizer.lr=1.0"]) == 2
    assert "its models trained with other settings (ctnet.adapter_optimizer.lr 0.1 -> 1.0)" \
        in caplog.text
    assert main([*again, "--jobs", "1"]) == 0  # nothing to train: the same models
