from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ctnet_rec.cli import build_parser, main

from .conftest import DEMO_CONFIG

CTNET = str(Path(sys.executable).parent / "ctnet")


def test_help_lists_subcommands():
    out = subprocess.run([CTNET, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("data", "train", "eval", "predict", "transfer", "experiment"):
        assert cmd in out
    for args in (["data", "--help"], ["data", "validate", "--help"], ["data", "synth", "--help"],
                 ["experiment", "--help"], ["transfer", "run", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0


def test_the_command_line_imports_torch_only_to_run_a_command(tmp_path, monkeypatch):
    """`ctnet --help` answers without importing torch, and `ctnet experiment` and `ctnet
    pipeline` start their job server (which preloads the module that makes their runner)
    before this process imports the library, so that both import it side by side; but not
    for a config they refuse."""
    import importlib
    import inspect

    code = "import sys, ctnet_rec.cli; print(sorted({'torch', 'torchrec'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    parser = build_parser()
    for command in (["experiment"], ["pipeline", "--data", "d", "--runs", "r"]):
        module = parser.parse_args([*command, str(DEMO_CONFIG)]).job_server
        assert "IsolatedRunner(preload=[__name__]" in \
            inspect.getsource(importlib.import_module(module))
    assert parser.parse_args(["train", "--config", str(DEMO_CONFIG), "--data", "d", "--domain",
                              "A", "--periods", "0", "--run", "r"]).job_server is None
    started: list[list[str]] = []
    monkeypatch.setattr("ctnet_rec.cli.start_job_server", started.append)
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO_CONFIG.read_text().replace("[model]", "[model]\nno_such_key = 1"))
    assert main(["pipeline", str(bad), "--data", "d", "--runs", str(tmp_path / "r")]) == 2
    assert main(["experiment", str(DEMO_CONFIG), "--set", "train.seed=-1"]) == 2
    assert started == []


def test_validate_prints_summary_with_oracle(tiny_world, tmp_path, capsys):
    out_json = tmp_path / "summary.json"
    rc = main(["data", "validate", str(tiny_world), "--config", str(DEMO_CONFIG),
               "--domain", "C", "--json", str(out_json)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert "oracle AUC" in lines[0] and len(lines) == 2 + 4
    assert all(line.startswith("C ") for line in lines[2:])
    records = json.loads(out_json.read_text())
    assert [r["period"] for r in records] == [0, 1, 2, 3]
    assert all(0.5 < r["oracle_auc"] < 1 for r in records)


def test_bad_input_exits_2_naming_the_problem(tiny_world, tmp_path, caplog):
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO_CONFIG.read_text().replace("batch_size = 512", "batch_size = -1"))
    assert main(["data", "validate", str(tiny_world), "--config", str(bad)]) == 2
    assert "data.batch_size: must be >= 4" in caplog.text
    assert main(["data", "validate", str(tmp_path / "nowhere"), "--config",
                 str(DEMO_CONFIG)]) == 2
    assert "data root does not exist" in caplog.text


def test_synth_command(demo_config, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(DEMO_CONFIG.read_text().split("[synth]")[0] + """
[synth]
periods = 2
num_users = 300
num_items_initial = 300
new_items_per_period = 20
num_categories = 10
num_sellers = 40
burn_in_periods = 1
[synth.domains.A]
impressions_per_period = 500
[synth.domains.B]
impressions_per_period = 100
""")
    assert main(["data", "synth", "--config", str(cfg), "--out", str(tmp_path / "w"),
                 "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["A", "B", "_oracle",
                                                                   "world.json"]
    assert main(["data", "validate", str(tmp_path / "w"), "--config", str(cfg)]) == 0


def test_sharding_flags_change_only_the_fields_they_name():
    """`--source-table-dtype fp16` keeps the config's per-table types, kernels and cache
    factor (it used to reset the whole [sharding] section to defaults)."""
    import dataclasses

    from ctnet_rec.cli import _sharding, build_parser
    from ctnet_rec.config import load_config

    billion = load_config(DEMO_CONFIG.parent / "billion.toml")
    base = dataclasses.replace(billion.sharding, compute_kernel="fused_uvm_caching",
                               kernels={"item": "fused_uvm"}, cache_load_factor=0.5)
    args = build_parser().parse_args(["predict", "--ckpt", "c", "--data", "d", "--domain", "B",
                                      "--period", "1", "--out", "o",
                                      "--source-table-dtype", "fp16"])
    got = _sharding(args, lambda: base)
    assert got == dataclasses.replace(base, source_table_dtype="fp16")
    assert got.tables == {"user": "row_wise", "item": "row_wise", "seller": "row_wise"}
    args = build_parser().parse_args(["predict", "--ckpt", "c", "--data", "d", "--domain", "B",
                                      "--period", "1", "--out", "o", "--sharding", "row_wise"])
    assert _sharding(args, lambda: base) == dataclasses.replace(base, sharding_type="row_wise")
    args = build_parser().parse_args(["predict", "--ckpt", "c", "--data", "d", "--domain", "B",
                                      "--period", "1", "--out", "o"])
    assert _sharding(args, lambda: base) is None


def test_a_command_that_succeeded_leaves_its_process_group_at_exit(tiny_world, tmp_path):
    """A process that exits still holding its gloo group can abort in the group's teardown
    after its work is done (its launcher then reports a failed run): a successful command
    destroys the group at exit, a failed one (whose peers may still wait on it) does not."""
    script = """
import atexit, sys
import torch.distributed as dist
from ctnet_rec.cli import main
from ctnet_rec.training.distributed import init_distributed
atexit.register(lambda: print("joined at exit:", dist.is_initialized()))  # runs last
init_distributed("cpu")
print("exit code:", main(sys.argv[1:]))
"""
    ok = [str(tiny_world), "--config", str(DEMO_CONFIG)]
    bad = [str(tmp_path / "missing"), "--config", str(DEMO_CONFIG)]
    for args, code, joined in ((ok, 0, False), (bad, 2, True)):
        out = subprocess.run([sys.executable, "-c", script, "data", "validate", *args],
                             capture_output=True, text=True, check=True).stdout
        assert f"exit code: {code}" in out and f"joined at exit: {joined}" in out, out


def test_messages_not_tracebacks_before_any_work(towers, tiny_world, tmp_path, caplog, capsys):
    """Each refused before work is done (no evaluation, no training), with a message naming
    the option or file, exit 2."""
    ckpt = str(towers.source(1))
    train = ["train", "--config", str(towers.config_path), "--data", str(tiny_world),
             "--domain", "A"]
    assert main([*train, "--periods", "0:100000000000", "--run-dir",
                 str(tmp_path / "r")]) == 2
    assert "--periods '0:100000000000': 100000000000 periods; at most 100,000" in caplog.text
    assert main(["eval", "--ckpt", ckpt, "--data", str(tiny_world), "--domain", "A",
                 "--period", "2", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: a folder" in caplog.text
    for args in (["predict", "--ckpt", ckpt, "--data", str(tiny_world), "--domain", "A",
                  "--period", "2", "--out", str(tmp_path / "p.parquet"), "--batch-size", "-5"],
                 ["plan", "--config", str(towers.config_path), "--world-size", "0"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert "must be at least 1" in capsys.readouterr().err
    latin = tmp_path / "latin.toml"
    latin.write_bytes(towers.config_path.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    assert main([*train[:1], "--config", str(latin), *train[3:], "--periods", "0",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "latin.toml: not UTF-8 text" in caplog.text
    run = tmp_path / "blocked"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    assert main([*train, "--periods", "0", "--run-dir", str(run)]) == 2
    assert "run folder" in caplog.text and "cannot write there" in caplog.text
    assert not (tmp_path / "r").exists() and not list(run.glob("*.jsonl"))
    assert "Traceback" not in caplog.text


def test_a_failed_checkpoint_write_names_its_cause(towers, tmp_path, monkeypatch):
    """A full disk inside torch.distributed.checkpoint: the cause, not every rank's
    traceback."""
    import traceback

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ctnet_rec.training.checkpoint import CheckpointError
    from ctnet_rec.training.inference import open_checkpoint

    trainer, _ = open_checkpoint(towers.source(1))

    def full(*args, **kwargs):
        raise CheckpointException("write", {0: (OSError(28, "No space left on device"),
                                                traceback.StackSummary())})

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(CheckpointError, match=r"could not be written \(rank 0: OSError: "
                                              r"\[Errno 28\] No space left on device\)"):
        trainer.save(tmp_path / "period=1", 1, {})


def test_a_refused_job_leaves_no_run_folder(towers, tiny_world, tmp_path):
    """Refused before it wrote anything (a period missing from the data): no empty run."""
    run = tmp_path / "runs" / "r"
    assert main(["train", "--config", str(towers.config_path), "--data", str(tiny_world),
                 "--domain", "A", "--periods", "40", "--run-dir", str(run)]) == 2
    assert not run.exists()


def test_one_version_and_a_clear_error_without_torchrec():
    import importlib.metadata

    import ctnet_rec

    assert importlib.metadata.version("ctnet-rec") == ctnet_rec.__version__
    assert 'dynamic = ["version"]' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torchrec'] = None; "
                          "import ctnet_rec"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "ctnet-rec needs torchrec, not installed" in out.stderr
    assert "pip install --no-deps torchrec==" in out.stderr


def test_torchs_notices_about_its_internals_are_not_shown(towers, tiny_world, tmp_path):
    """torch warns at every checkpoint save and load that ShardedTensor (where TorchRec keeps
    its table shards) is deprecated, and at every artifact export and load that torch.package
    uses TypedStorage: notices to TorchRec's and torch's maintainers that a user can do nothing
    about (`make demo` printed them 96 times, each job's process anew)."""
    common = ["--data", str(tiny_world), "--domain", "B", "--period", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--ckpt", str(towers.target(1)), *common,
                     "--out", str(tmp_path / "m.json")]) == 0
        assert main(["export", "--ckpt", str(towers.target(1)), "--out",
                     str(tmp_path / "x")]) == 0
        assert main(["predict", "--export", str(tmp_path / "x"), *common,
                     "--out", str(tmp_path / "p.parquet")]) == 0
    shown = [f"{w.category.__name__} {w.filename}: {w.message}" for w in caught]
    assert not [w for w in shown if "ShardedTensor" in w or "TypedStorage" in w], shown
