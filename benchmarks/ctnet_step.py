"""CTNet's cost over Base (the target tower alone) on the demo config, one process each.

- train: a training step (forward, loss, backward, fused table updates, dense AdaGrad) of
  Base and of CTNet (source tower frozen: read-only tables, forward only) at each batch size;
  `step_time_ratio` = CTNet step time / Base step time (target: <= 1.5).
- memory: CTNet's peak RSS above Base's, next to what the frozen source may cost at most:
  its tables' and dense weights' own size (no optimiser state, no gradient buffers). Adapters
  (new trainable weights) are reported apart.
- infer: CTNet scoring (eval mode, no autograd) with and without
  `share_long_sequence_attention` (the target reuses the source's SIM/ETA outputs).

Batches come from the demo world's domain A, read once and kept in memory; weights are the
untrained initial ones (a step costs the same). Each run times at least 40,960 samples and
reports its median step; each job runs `--repeats` times, round-robin, and keeps its median
run.

Peak RSS also counts activations: CTNet keeps the source's outputs and its adapters'
activations for the backward pass, which grow with the batch (tens of MB at 4096 on the demo
config) while the source's weights are fixed; `memory` reports both.

    python benchmarks/ctnet_step.py [--steps 10] [--batch-sizes 512 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from common import ROOT, demo_batches, require_demo_world, run_workers, time_steps, write_result

from ctnet_rec.config import load_config
from ctnet_rec.modules.ctnet import CTNet
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.distributed import init_distributed
from sharding.tower import average_dense_gradients, dense_parameters, shard_model

RESULT = ROOT / "benchmarks" / "results" / "ctnet_step.json"
MB = 2**20
MIN_SAMPLES = 40_960  # per measurement: small batches run more steps, so timings settle


def _mb(params) -> float:
    return round(sum(p.numel() * p.element_size() for p in params) / MB, 1)


def run_worker(job: str, batch_size: int, steps: int, config: str) -> dict:
    cfg = load_config(config)
    cfg.ctnet.share_long_sequence_attention = job == "infer-shared"
    torch.manual_seed(0)
    batches = demo_batches(cfg, batch_size, max(steps, MIN_SAMPLES // batch_size))
    env = init_distributed("cpu")
    meta = torch.device("meta")
    extra = {}
    if job == "base":
        model = shard_model(Tower(cfg.features, cfg.model, device=meta), env,
                            cfg.train.sparse_lr)
    else:
        net = CTNet(Tower(cfg.features, cfg.model, device=meta),
                    Tower(cfg.features, cfg.model, device=meta), cfg.ctnet)
        extra = {"source_weights_mb": _mb(net.source.parameters()),
                 "adapter_weights_mb": _mb(net.adapters.parameters())}
        model = shard_model(net, env, cfg.train.sparse_lr, frozen=net.source)
    if job.startswith("infer"):
        model.eval()

        @torch.no_grad()
        def step(b) -> None:
            torch.sigmoid(model(b.sparse, b.dense).logits)
    else:
        model.train()
        dense = dense_parameters(model)
        opt = torch.optim.Adagrad(dense, lr=cfg.train.dense_lr)

        def step(b) -> None:
            loss = F.binary_cross_entropy_with_logits(model(b.sparse, b.dense).logits,
                                                      b.labels)
            opt.zero_grad()
            loss.backward()
            average_dense_gradients(dense, 1)
            opt.step()

    return {"job": job, **time_steps(step, batches), **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps (at least)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--repeats", type=int, default=3, help="runs per job, round-robin")
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--worker", nargs=2, metavar=("JOB", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker[0], int(args.worker[1]), args.steps,
                                    args.config)))
        return
    require_demo_world()
    jobs = [[job, str(bs)] for bs in args.batch_sizes
            for job in ("base", "ctnet", "infer", "infer-shared")]
    rows = run_workers(__file__, jobs, ["--steps", str(args.steps), "--config", args.config],
                       args.repeats)
    by = {(r["job"], r["batch_size"]): r for r in rows}
    ratio, shared_speedup, memory = {}, {}, {}
    for bs in args.batch_sizes:
        base, ctnet = by["base", bs], by["ctnet", bs]
        ratio[str(bs)] = round(ctnet["step_ms"] / base["step_ms"], 3)
        shared_speedup[str(bs)] = round(by["infer", bs]["step_ms"]
                                        / by["infer-shared", bs]["step_ms"], 3)
        above = round(ctnet["peak_rss_mb"] - base["peak_rss_mb"], 1)
        memory[str(bs)] = {
            "base_peak_rss_mb": base["peak_rss_mb"], "ctnet_peak_rss_mb": ctnet["peak_rss_mb"],
            "ctnet_above_base_mb": above, "source_weights_mb": ctnet["source_weights_mb"],
            "adapter_weights_mb": ctnet["adapter_weights_mb"],
            "within_source_size": above <= ctnet["source_weights_mb"]
            + ctnet["adapter_weights_mb"],
        }
    print(f"{'job':<14}{'batch':>7}{'samples/s':>12}{'step ms':>10}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['job']:<14}{r['batch_size']:>7}{r['samples_per_s']:>12,.0f}"
              f"{r['step_ms']:>10}{r['peak_rss_mb']:>13}")
    print("step_time_ratio (CTNet / Base, target <= 1.5):", ratio)
    print("inference speed-up from shared long-sequence attention:", shared_speedup)
    print("memory:", json.dumps(memory, indent=1))
    write_result(RESULT, "ctnet_step", __file__, args.config, runs=rows,
                 step_time_ratio=ratio, shared_attention_inference_speedup=shared_speedup,
                 memory=memory)


if __name__ == "__main__":
    main()
