"""Training-step throughput of the demo tower: TorchRec vs the plain-PyTorch peer.

TorchRec path: the production one (`sharding.tower.shard_model`): tables in fused TBE kernels
under DistributedModelParallel with row-wise AdaGrad applied in the backward pass, dense
layers with torch.optim.Adagrad. Peer: the same tower with nn.EmbeddingBag / nn.Embedding
(sparse=True) and torch.optim.Adagrad (which takes sparse gradients) for everything: what a
user would write without TorchRec. Same batches (read once, from the demo world's domain A,
kept in memory: this measures the step, not the reader), same seed, one process.

Each (path, batch size) runs in its own process so that `peak_rss_mb` is its own; with
`--repeats N` the processes run N rounds, interleaved, and each row reports the median
samples/s (a shared machine's slow spells move single runs by 20% or more). The TorchRec row
also holds a profile of its step by kind of work (`profile_ms_per_step`).

`--baseline REV` also times the TorchRec step of another revision of this repository: its
model code (`git archive REV`, first on the workers' path) under this script's harness, on
the same demo world with that revision's demo config, in the same rounds (before each of this
version's runs), so `vs_baseline` is a ratio of runs taken side by side.

    python benchmarks/train_step.py [--steps 12] [--batch-sizes 512 4096] [--repeats 1]
                                    [--baseline REV]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from common import (
    ROOT,
    demo_batches,
    require_demo_world,
    run_workers,
    step_profile,
    time_steps,
    write_result,
)
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig, load_config
from ctnet_rec.modules.embeddings import TowerEmbeddings
from ctnet_rec.modules.tower import Tower

RESULT = ROOT / "benchmarks" / "results" / "train_step.json"


class PlainEmbeddings(TowerEmbeddings):
    """TowerEmbeddings' interface on nn.EmbeddingBag / nn.Embedding with sparse gradients."""

    def __init__(self, features: FeatureConfig) -> None:
        super().__init__(features, device=torch.device("meta"))  # only for the layout
        self.pooled_tables = self._plain(self.pooled.embedding_bag_configs(), bag=True)
        self.sequence_tables = self._plain(self.sequence.embedding_configs(), bag=False)
        del self.pooled, self.sequence

    @staticmethod
    def _plain(configs, bag: bool) -> nn.ModuleDict:
        out = nn.ModuleDict()
        for c in configs:
            cls = nn.EmbeddingBag if bag else nn.Embedding
            kwargs = {"mode": "sum", "include_last_offset": True} if bag else {}
            m = cls(c.num_embeddings, c.embedding_dim, sparse=True, **kwargs)
            nn.init.uniform_(m.weight, -(c.num_embeddings ** -0.5), c.num_embeddings ** -0.5)
            m.feature_names = c.feature_names
            out[c.name] = m
        return out

    def forward(self, kjt: KeyedJaggedTensor):
        d = kjt.to_dict()
        pooled = {f: bag(d[f].values(), d[f].offsets())
                  for bag in self.pooled_tables.values() for f in bag.feature_names}
        seq = {}
        for emb in self.sequence_tables.values():
            for f in emb.feature_names:
                seq[f] = JaggedTensor(values=emb(d[f].values()), lengths=d[f].lengths())
        return pooled, seq


def run_worker(path: str, batch_size: int, steps: int, config: str) -> dict:
    import torch.nn.functional as F

    from ctnet_rec.training.distributed import init_distributed
    from sharding.tower import dense_parameters, shard_model

    cfg = load_config(config)
    torch.manual_seed(0)
    batches = demo_batches(cfg, batch_size, steps)
    if path == "torchrec":
        env = init_distributed("cpu")
        model = shard_model(Tower(cfg.features, cfg.model, device=torch.device("meta")), env,
                            cfg.train.tables.lr)
        dense = dense_parameters(model)
        opt = torch.optim.Adagrad(dense, lr=cfg.train.dense.lr)
    else:
        model = Tower(cfg.features, cfg.model, lookups=False)
        model.embeddings = PlainEmbeddings(cfg.features)
        dense = []
        opt = torch.optim.Adagrad(model.parameters(), lr=cfg.train.dense.lr)
    model.train()

    def step(b) -> None:
        out = model(b.sparse, b.dense)
        loss = F.binary_cross_entropy_with_logits(out.logits, b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    row = {"path": path, **time_steps({path: step}, batches)[path]}
    if path == "torchrec":  # where the production step's time goes
        row["profile_ms_per_step"] = step_profile(step, batches[:12])
    return row


def median_row(runs: list[dict]) -> dict:
    """The run with the median samples/s (its step time, memory and profile with it), and
    every run's samples/s."""
    row = sorted(runs, key=lambda r: r["samples_per_s"])[(len(runs) - 1) // 2]
    return {**row, "samples_per_s_runs": [r["samples_per_s"] for r in runs]}


def revision_tree(rev: str, into: Path) -> str:
    """The files of revision `rev` of this repository under `into`, with this checkout's
    `runs/` (the demo world) linked in; returns the revision's full hash."""
    def git(*cmd: str) -> bytes:
        done = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True)
        if done.returncode:
            sys.exit(f"--baseline {rev}: git {cmd[0]} failed in {ROOT}: "
                     f"{done.stderr.decode().strip()}")
        return done.stdout

    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", commit))) as tar:
        tar.extractall(into, filter="data")
    (into / "runs").symlink_to(ROOT / "runs", target_is_directory=True)
    return commit


def one_round(args: argparse.Namespace, baseline: Path | None) -> list[dict]:
    """Every job once, per batch size: the baseline's TorchRec step (if any), then this
    version's TorchRec and peer steps."""
    rows: list[dict] = []
    for bs in args.batch_sizes:
        if baseline is not None:
            config = baseline / Path(args.config).resolve().relative_to(ROOT)
            rows += [{**r, "path": "baseline"} for r in run_workers(
                __file__, [["torchrec", str(bs)]], ["--steps", str(args.steps), "--config",
                                                     str(config)],
                env={"PYTHONPATH": str(baseline)})]
        rows += run_workers(__file__, [[path, str(bs)] for path in ("torchrec", "peer")],
                            ["--steps", str(args.steps), "--config", args.config])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--baseline", metavar="REV",
                   help="also time this git revision's TorchRec step, side by side")
    p.add_argument("--worker", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps([run_worker(args.worker[0], int(args.worker[1]), args.steps,
                                     args.config)]))
        return
    require_demo_world()
    with tempfile.TemporaryDirectory(prefix="train-step-baseline-") as tmp:
        baseline = Path(tmp) if args.baseline else None
        commit = revision_tree(args.baseline, baseline) if baseline else None
        rounds = [one_round(args, baseline) for _ in range(args.repeats)]
    rows = [median_row([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    by = {(r["path"], r["batch_size"]): r for r in rows}

    def ratio(path: str, bs: int) -> float:
        return round(by["torchrec", bs]["samples_per_s"] / by[path, bs]["samples_per_s"], 3)

    ratios = {str(bs): ratio("peer", bs) for bs in args.batch_sizes}
    print(f"{'path':<10}{'batch':>7}{'samples/s':>12}{'step ms':>10}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['path']:<10}{r['batch_size']:>7}{r['samples_per_s']:>12,.0f}"
              f"{r['step_ms']:>10}{r['peak_rss_mb']:>13}")
    print("torchrec_vs_peer_ratio:", ratios)
    extra = {}
    if commit:
        extra["vs_baseline"] = {"revision": commit,
                                "ratio": {str(bs): ratio("baseline", bs)
                                          for bs in args.batch_sizes}}
        print(f"vs_baseline ({commit[:10]}):", extra["vs_baseline"]["ratio"])
    write_result(RESULT, "train_step", __file__, args.config, runs=rows,
                 torchrec_vs_peer_ratio=ratios, **extra)


if __name__ == "__main__":
    main()
