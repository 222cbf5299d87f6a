"""The GPU suite's dry run (`--device cpu --small`): every section runs and reports figures
that mean something; a section that fails or hangs is reported and the others go on."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("suite") / "gpu_suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"),
                           "--device", "cpu", "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_runs_and_reports(dry_run):
    assert dry_run["failed_sections"] == []
    assert all(name in dry_run and "error" not in dry_run[name] for name in gpu_suite.SECTIONS)
    info = dry_run["info"]
    assert info["torch"] and info["fbgemm_gpu"] and info["torchrec"]
    assert dry_run["forked_job"]["ran"] and dry_run["forked_job"]["device"] == "cpu"


def test_placement_counts_every_element_on_the_device(dry_run):
    for model in ("tower", "ctnet"):
        placed = dry_run["placement"][model]
        assert placed["all_on_device"] and set(placed["elements_by_device"]) == {"cpu"}
    # CTNet holds a second tower and the adapters: more than the tower alone
    assert dry_run["placement"]["ctnet"]["elements_by_device"]["cpu"] > \
        dry_run["placement"]["tower"]["elements_by_device"]["cpu"]


def test_parity_compares_the_same_steps(dry_run):
    """Two CPU runs from the same saved initial weights and the same batches: identical
    (so a GPU run's differences are the device's, not the set-up's)."""
    cpu = dry_run["parity_cpu"]["cpu"]
    again = dry_run["parity_device"]["cpu"]
    assert len(cpu["losses"]) == gpu_suite.PARITY_STEPS
    assert cpu["losses"] == again["losses"] and cpu["auc"] == again["auc"]
    assert dry_run["parity"] == {"auc_diff": 0.0, "max_loss_rel_diff": 0.0, "passed": True}
    assert 0.5 < cpu["auc"] < 1.0


def test_parity_verdict_applies_the_limits():
    losses = [0.5] * gpu_suite.PARITY_STEPS
    ok = gpu_suite.parity_verdict({"auc": 0.70, "losses": losses},
                                  {"auc": 0.7029, "losses": [0.504] * len(losses)})
    assert ok["passed"]
    auc_off = gpu_suite.parity_verdict({"auc": 0.70, "losses": losses},
                                       {"auc": 0.7035, "losses": losses})
    loss_off = gpu_suite.parity_verdict({"auc": 0.70, "losses": losses},
                                        {"auc": 0.70, "losses": [0.5] * 19 + [0.506]})
    assert not auc_off["passed"] and not loss_off["passed"]


def test_throughput_big_table_checkpoint_export_and_cache_figures(dry_run):
    for batch_size in gpu_suite.Scale(small=True).batch_sizes:
        row = dry_run["throughput"][str(batch_size)]
        for key in ("tower", "din", "ctnet", "tower_scoring", "din_scoring", "ctnet_scoring"):
            assert row[key] > 0, (batch_size, key)
        assert row["ctnet_over_tower_step_time"] == round(row["tower"] / row["ctnet"], 3)
    big = dry_run["big_table"]
    assert big["rows"] == 100_000 and big["lookups_per_s"] > 0 and big["weights_finite"]
    ckpt = dry_run["checkpoint"]
    assert ckpt["identical"] and ckpt["save_s"] > 0 and ckpt["load_s"] > 0
    assert set(dry_run["export"]["p50_ms_by_rows"]) == {"1", "64", "512"}
    cache = dry_run["uvm_cache"]
    assert cache["hbm_samples_per_s"] > 0 and cache["uvm_cache_samples_per_s"] > 0
    # the project's trainer: on the CPU its table on the device alone (the cached kernel is
    # CUDA's), under the sparse-dist pipeline
    trainer = cache["trainer"]
    assert trainer["device_samples_per_s"] > 0 and "uvm_cache_samples_per_s" not in trainer
    assert trainer["device_pipeline"] == "TrainPipelineSparseDist"


def _args() -> argparse.Namespace:
    return argparse.Namespace(device="cpu", small=True)


def test_a_failing_or_hanging_section_is_reported_and_the_suite_goes_on(tmp_path,
                                                                         monkeypatch):
    def fails(args, scale, tmp, send):
        send({"first": 1})
        raise ValueError("broken on purpose")

    def hangs(args, scale, tmp, send):
        send({"started": True})
        time.sleep(60)

    monkeypatch.setitem(gpu_suite.SECTIONS, "fails", (fails, 30))
    monkeypatch.setitem(gpu_suite.SECTIONS, "hangs", (hangs, 30))
    results: dict = {}
    writes = []
    gpu_suite.run_section("fails", _args(), tmp_path, 30, lambda: writes.append(1), results)
    gpu_suite.run_section("hangs", _args(), tmp_path, 2, lambda: writes.append(1), results)
    assert results["fails"]["first"] == 1
    assert results["fails"]["error"] == "ValueError: broken on purpose"
    assert "broken on purpose" in results["fails"]["traceback"]
    assert results["hangs"]["started"] is True  # what it sent before the limit is kept
    assert results["hangs"]["error"] == "timed out after 2 s"
    assert results["hangs"]["seconds"] < 30
    assert len(writes) >= 4  # the results file is rewritten as figures come
