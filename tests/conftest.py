"""Shared fixtures: the demo feature config, a tiny synthetic world, and a valid small table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctnet_rec.config import Config, DomainWorldConfig, SynthConfig, load_config
from ctnet_rec.data.contract import write_parquet
from ctnet_rec.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "examples" / "demo.toml"

# One intra-op thread in every test process and in every process the tests start. Two xdist
# workers with torch's default (a thread per core), beside the ranks and jobs they start,
# oversubscribe the cores, and OpenMP threads waiting for each other cost more than a second
# thread gains: on a 2-core AVX-512 machine the whole suite took 344-424 s this way (five
# runs) against 450-529 s with the default (two); 3 workers instead of 2 gave no gain (368 s).
# It also makes a test's floats the same on any number of cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The golden curves (tests/test_golden.py) were recorded with 2 threads, and a thread count
# splits a kernel's sums its own way: the shared runs they are read from (`towers`,
# `transferred`) train with 2, as does a test that trains them again to compare to 1e-6.
SHARED_RUN_THREADS = 2


@contextlib.contextmanager
def shared_run_threads() -> Iterator[None]:
    """`SHARED_RUN_THREADS` intra-op threads inside, this process's own again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(SHARED_RUN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def temp_files_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every temporary file of the tests and of the processes they start under pytest's own
    temporary folder, which pytest prunes: the tests kill processes on purpose (pipelines,
    torchrun ranks), and a killed process leaves its temporary folders behind (a
    multiprocessing forkserver's socket folder, torchrun's log folder)."""
    folder = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # read again from the environment
    yield
    if before is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def demo_config() -> Config:
    return load_config(DEMO_CONFIG)


def tiny_synth(cfg: Config, **overrides):
    domains = {
        "A": DomainWorldConfig(8000, 1.0, 1.0, 0.10, 0.02, -3.0),
        "B": DomainWorldConfig(600, 0.3, 0.3, 0.05, 0.05, -3.0),
        "C": DomainWorldConfig(400, 0.2, 0.3, 0.40, 0.08, -3.0),
    }
    base = dict(
        periods=4, num_users=600, num_items_initial=800, new_items_per_period=100,
        num_categories=20, num_sellers=100, background_clicks=3.0, burn_in_periods=2,
        short_history_max=20, long_history_max=40, domains=domains,
        # the library's default gap, not the demo's paper regime: on 600 users the domains'
        # own tastes would leave little for these tests' few thousand rows to learn
        domain_gap=SynthConfig().domain_gap,
    )
    return dataclasses.replace(cfg.synth, **(base | overrides))


@pytest.fixture(scope="session")
def tiny_world(demo_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "data"
    synthesize(tiny_synth(demo_config), out, seed=7)
    return out


def valid_table(n: int = 50, seed: int = 0) -> pa.Table:
    """A small table that satisfies the demo config's contract, with extreme raw ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    ids[: min(n, 2)] = [-(2**63) + seed, 2**63 - 1 - seed][: min(n, 2)]

    def lists(mean: int) -> tuple[pa.Array, pa.Array]:
        lens = rng.poisson(mean, n)
        off = pa.array(np.r_[0, np.cumsum(lens)].astype(np.int32))
        vals = rng.integers(-(2**62), 2**62, int(lens.sum()))
        return (pa.ListArray.from_arrays(off, pa.array(vals)),
                pa.ListArray.from_arrays(off, pa.array(vals // 7)))

    hi, hc = lists(5)
    li, lc = lists(40)
    return pa.table({
        "ts": pa.array(1_700_000_000 + np.arange(n, dtype=np.int64)),
        "label": pa.array(rng.integers(0, 2, n).astype(np.int8)),
        "user_id": pa.array(ids),
        "item_id": pa.array(rng.integers(-(2**40), 2**40, n)),
        "category_id": pa.array(rng.integers(0, 50, n)),
        "seller_id": pa.array(rng.integers(0, 10**12, n)),
        "age_group": pa.array(rng.integers(0, 8, n)),
        "hour": pa.array(rng.integers(0, 24, n)),
        "price": pa.array(rng.lognormal(3, 1, n)),
        "hist_item_ids": hi,
        "hist_category_ids": hc,
        "long_hist_item_ids": li,
        "long_hist_category_ids": lc,
    })


def write_period(root: Path, domain: str, period: int, tables: list[pa.Table],
                 row_group_size: int = 16) -> list[Path]:
    paths = []
    for i, t in enumerate(tables):
        path = root / domain / f"period={period}" / f"part-{i}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_tower_config(path: Path) -> Config:
    """The demo config with the tiny world's tower sizes (MLP [32, 16], batch 256), written
    to `path` (for the command line) and loaded."""
    path.write_text(DEMO_CONFIG.read_text()
                    .replace("mlp_hidden = [256, 128, 64]", "mlp_hidden = [32, 16]")
                    .replace("batch_size = 512", "batch_size = 256"))
    cfg = load_config(path)
    assert cfg.model.mlp_hidden == [32, 16] and cfg.data.batch_size == 256
    return cfg


def shuffled_source_world(cfg: Config, root: Path, seed: int = 0) -> Path:
    """A tiny world (8 periods, 3,000 target rows a period) whose source domain's labels are
    shuffled within each period: a source tower trained on it knows nothing about anybody's
    clicks. `seed` 0 is the world of `tests/test_no_harm.py`."""
    world = root / "world"
    synthesize(tiny_synth(cfg, periods=8, domains={
        **tiny_synth(cfg).domains,
        "B": dataclasses.replace(tiny_synth(cfg).domains["B"], impressions_per_period=3000)}),
        world, seed=11 + seed)
    rng = np.random.default_rng(seed)
    for part in sorted((world / "A").glob("period=*/*.parquet")):
        table = pq.read_table(part)
        labels = table.column("label").to_numpy()
        table = table.set_column(table.schema.get_field_index("label"), "label",
                                 [rng.permutation(labels)])
        write_parquet(table, part)
    shutil.rmtree(world / "_oracle")
    return world


@dataclasses.dataclass
class Towers:
    """Single-domain tower runs on the tiny world: source A (periods 0-3), target B (0-1)."""

    cfg: Config
    config_path: Path  # the same config as TOML, for the command line
    source_run: Path
    target_run: Path

    def source(self, period: int) -> Path:
        return self.source_run / "checkpoints" / f"period={period}"

    def target(self, period: int) -> Path:
        return self.target_run / "checkpoints" / f"period={period}"


@pytest.fixture(scope="session")
def towers(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Towers:
    from ctnet_rec.training.loop import train_continual

    root = tmp_path_factory.mktemp("towers")
    path = root / "small.toml"
    cfg = write_tower_config(path)
    with shared_run_threads():
        train_continual(cfg, tiny_world, "A", [0, 1, 2, 3], root / "A")
        train_continual(cfg, tiny_world, "B", [0, 1], root / "B")
    return Towers(cfg, path, root / "A", root / "B")


@pytest.fixture(scope="session")
def deployed(towers: Towers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CTNet deployed from the tiny world's towers of period 1 (`ctnet transfer init`)."""
    from ctnet_rec.cli import main

    run = tmp_path_factory.mktemp("ctnet") / "run"
    rc = main(["transfer", "init", "--source-ckpt", str(towers.source(1)), "--target-ckpt",
               str(towers.target(1)), "--config", str(towers.config_path), "--run", str(run)])
    assert rc == 0
    return run


@pytest.fixture(scope="session")
def transferred(towers: Towers, deployed: Path, tiny_world: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CTNet trained on B periods 2 and 3 with the source refreshed from A's run."""
    import shutil

    from ctnet_rec.cli import main
    from ctnet_rec.training.transfer import INIT

    run = tmp_path_factory.mktemp("ctnet") / "run"
    shutil.copytree(deployed / INIT, run / INIT)
    with shared_run_threads():
        rc = main(["transfer", "run", "--run", str(run), "--data", str(tiny_world), "--domain",
                   "B", "--periods", "2:4", "--source-ckpts", str(towers.source_run)])
    assert rc == 0
    return run


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def parent_of(pid: int) -> int | None:
    """The parent of a running process; None when it is gone or a zombie (dead, not yet
    reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def kill_family(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (torchrun's workers may not share its group),
    and, when it leads a session of its own, its whole process group: a child it starts
    after the descendants were listed (a job server's forkserver) dies with it too."""
    family = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in [proc.pid, *family]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def two_rank_process(*args: str) -> subprocess.Popen:
    """`ctnet ARGS` started under torchrun with 2 gloo ranks on this host, in a session of
    its own; `kill_family` ends it and its ranks."""
    with socket.socket() as s:  # torchrun's --master-port 0 hangs: pick a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "ctnet_rec.cli",
           *args]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def two_rank_cli(*args: str, timeout: int = 300) -> str:
    """`ctnet ARGS` under torchrun with 2 gloo ranks on this host; fails the test unless it
    succeeds, and never leaves ranks behind, even on a hang. Returns its output."""
    proc = two_rank_process(*args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_family(proc)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from this run, printing what changed")
