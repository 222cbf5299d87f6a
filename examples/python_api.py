"""ctnet-rec's modules in a training loop of your own, on one process without sharding.

Builds a source and a target tower from a config, trains each a few steps on its domain's
periods, deploys CTNet from them (it scores as the target does), trains CTNet's target tower
and adapters on the next target period and evaluates every model on the period after. For
tables sharded across ranks with fused optimisers, checkpoints and the continual loop, use
the `ctnet` command or `ctnet_rec.training` (docs/training.md).

    python examples/python_api.py [--config examples/demo.toml] [--data ROOT] [--steps 20]

Without --data it writes the small world of `ctnet experiment --quick` to a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctnet_rec.config import Config, load_config
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.synth import synthesize
from ctnet_rec.experiment.runner import quick
from ctnet_rec.metrics import auc
from ctnet_rec.modules.ctnet import CTNet, build_ctnet
from ctnet_rec.modules.tower import Tower

ROOT = Path(__file__).resolve().parents[1]


def batches(cfg: Config, data: Path, domain: str, periods: list[int], shuffle: bool):
    """A domain's periods as `Batch`es: a KeyedJaggedTensor of table rows, dense numerics,
    labels and raw user / item ids."""
    return ParquetBatchReader(data, domain, periods, cfg.features, cfg.data, shuffle=shuffle,
                              seed=cfg.train.seed)


def train(model: torch.nn.Module, params: list[torch.Tensor], reader, steps: int) -> float:
    """`steps` AdaGrad steps of the click loss; returns the last batch's loss."""
    opt = torch.optim.Adagrad(params, lr=0.05)
    model.train()
    loss = torch.zeros(())
    for batch in itertools.islice(reader, steps):
        loss = F.binary_cross_entropy_with_logits(model(batch.sparse, batch.dense).logits,
                                                  batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, reader) -> float:
    model.eval()
    labels, scores = [], []
    for batch in reader:
        scores.append(torch.sigmoid(model(batch.sparse, batch.dense).logits).double().numpy())
        labels.append(batch.labels.double().numpy())
    return auc(np.concatenate(labels), np.concatenate(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--data", help="a dataset in the data contract (default: a small world)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = quick(load_config(args.config))  # the quick experiment's small sizes
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "world"
        if not args.data:
            synthesize(cfg.synth, data, seed=cfg.train.seed)
        source, target = (Tower(cfg.features, cfg.model) for _ in range(2))
        print("source tower, last loss:", train(source, list(source.parameters()),
                                               batches(cfg, data, "A", [0, 1], True),
                                               args.steps))
        print("target tower, last loss:", train(target, list(target.parameters()),
                                               batches(cfg, data, "B", [0, 1], True),
                                               args.steps))

        # deploy: the towers' weights in CTNet, new adapters near zero
        net: CTNet = build_ctnet((cfg.features, cfg.model), (cfg.features, cfg.model),
                                 cfg.ctnet)
        net.source.load_state_dict(source.state_dict())
        net.target.load_state_dict(target.state_dict())
        test = [3]
        base_auc = evaluate(target, batches(cfg, data, "B", test, False))
        print(f"next-period AUC: target {base_auc:.4f}, CTNet as deployed "
              f"{evaluate(net, batches(cfg, data, 'B', test, False)):.4f}")

        # the source stays frozen: only the target tower and the adapters train
        trainable = [q for q in net.parameters() if q.requires_grad]
        train(net, trainable, batches(cfg, data, "B", [2], True), args.steps)
        train(target, list(target.parameters()), batches(cfg, data, "B", [2], True), args.steps)
        print(f"after period 2: target {evaluate(target, batches(cfg, data, 'B', test, False)):.4f}"
              f", CTNet {evaluate(net, batches(cfg, data, 'B', test, False)):.4f}")


if __name__ == "__main__":
    main()
