"""CTNet's cost over Base (the target tower alone) on the demo config.

- train: a training step (forward, loss, backward, fused table updates, dense AdaGrad) of
  Base and of CTNet (source tower frozen: read-only tables, forward only), built in one
  process and timed batch by batch in turn, so that both see the same machine;
  `step_time_ratio` = CTNet step time / Base step time; `step_breakdown`: the frozen
  source's forward alone and the adapters (CTNet's step with and without them) as shares
  of a Base step, the step ratio with `share_long_sequence_attention` (the target reuses the
  source's SIM/ETA outputs) and with the `source_long_interest` the config does not set of
  "own" and "target_for_adapters" (`alternative_long_interest`: the source computing its
  own A_SIM/A_ETA, or the adapters reading its states on the target's).
- infer: CTNet scoring (eval mode, no autograd) as configured and with those two others,
  likewise in turn; `shared_attention_inference_speedup`, and
  `scoring_speed_over_alternative_long_interest` (CTNet's samples/s over the other's).
- memory: Base and CTNet each train alone in a fresh process. `held_mb` counts every tensor
  the model keeps between steps (weights, buffers, optimiser state, gradients; shared
  storage once): CTNet's excess over Base must be the source's weights plus the adapters and
  their optimiser state and gradients, i.e. the source holds no optimiser state and no
  gradient buffers.
  Peak RSS, measured with glibc returning every large block to the system at once
  (MALLOC_MMAP_THRESHOLD_, so it follows live memory instead of the allocator's caching),
  also counts activations: CTNet keeps the source's outputs and its adapters' activations for
  the backward pass, which grow with the batch while the source's weights do not.

Batches come from the demo world's domain A, read once and kept in memory; weights are the
untrained initial ones (a step costs the same). Times are medians over at least 98,304
samples per model.

`--repeats N` runs the timing jobs N rounds (fresh processes each): `step_time_ratio` is
then the median round's, whose rows the other figures come from, with every round's ratio
and a 95% t interval over the rounds (one run's ratio moves by up to 0.1 at 4,096 on a shared
2-core machine).

    python benchmarks/ctnet_step.py [--steps 10] [--batch-sizes 512 4096] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import ROOT, demo_batches, require_demo_world, run_workers, time_steps, write_result
from torchrec.distributed.model_parallel import DistributedModelParallel

from ctnet_rec.config import Config, load_config
from ctnet_rec.data.batch import Batch
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.experiment.significance import paired_interval
from ctnet_rec.modules.ctnet import build_ctnet, frozen_after_lookups
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.distributed import init_distributed
from sharding.tower import dense_parameters, shard_model

RESULT = ROOT / "benchmarks" / "results" / "ctnet_step.json"
MB = 2**20
MIN_SAMPLES = 98_304  # per model (24 steps at 4,096): one run varied by 0.04-0.07 in the
# step ratio with 10 steps at 4,096 on a shared 2-core machine
MEMORY_STEPS = 6
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _mb(params) -> float:
    return round(sum(p.numel() * p.element_size() for p in params) / MB, 1)


def build(model: str, cfg: Config, env: DistEnv) -> tuple[DistributedModelParallel, dict]:
    """"base", "ctnet" (as the config says), "ctnet-shared" (the target reads the source's
    long-sequence interests) or "ctnet-alternative" (`alternative_long_interest`), sharded
    as in training, with the sizes the memory target is judged by."""
    meta = torch.device("meta")
    torch.manual_seed(0)
    if model == "base":
        return shard_model(Tower(cfg.features, cfg.model, device=meta), env,
                           cfg.train.tables.lr), {}
    ctnet_cfg = copy.deepcopy(cfg.ctnet)
    if model == "ctnet-shared":
        ctnet_cfg.share_long_sequence_attention, ctnet_cfg.source_long_interest = True, "own"
    elif model == "ctnet-alternative":
        ctnet_cfg.source_long_interest = alternative_long_interest(cfg)
    net = build_ctnet((cfg.features, cfg.model), (cfg.features, cfg.model), ctnet_cfg, meta)
    sizes = {"source_weights_mb": _mb([*net.source.parameters(), *net.source.buffers()]),
             "adapter_weights_mb": _mb(net.adapters.parameters())}
    return shard_model(net, env, cfg.train.tables.lr, frozen=net.source), sizes


def alternative_long_interest(cfg: Config) -> str:
    """Of the source computing its own long-sequence interests ("own") and the adapters
    reading its states on the target's ("target_for_adapters"), the one `cfg` does not set."""
    return "target_for_adapters" if cfg.ctnet.source_long_interest == "own" else "own"


def _local(t: torch.Tensor) -> list[torch.Tensor]:
    return [s.tensor for s in t.local_shards()] if hasattr(t, "local_shards") else [t]


def held_mb(dmp: DistributedModelParallel, opt: torch.optim.Optimizer) -> float:
    """Bytes of every tensor kept between steps, each storage counted once."""
    tensors = [*dmp.state_dict().values(),
               *(t for d in dmp.fused_optimizer.state_dict()["state"].values()
                 for t in d.values()),
               *(t for d in opt.state.values() for t in d.values()),
               *(p.grad for p in dmp.parameters() if p.grad is not None)]
    storages = {}
    for t in tensors:
        for x in _local(t) if isinstance(t, torch.Tensor) else []:
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return round(sum(storages.values()) / MB, 1)


def train_step(dmp: DistributedModelParallel,
               cfg: Config) -> tuple[Callable[[Batch], None], torch.optim.Optimizer]:
    dmp.train()
    dense = dense_parameters(dmp)
    opt = torch.optim.Adagrad(dense, lr=cfg.train.dense.lr)

    def step(b: Batch) -> None:
        loss = F.binary_cross_entropy_with_logits(dmp(b.sparse, b.dense).logits, b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, opt


def source_forward(dmp: DistributedModelParallel) -> Callable[[Batch], None]:
    """The frozen source tower's part of a CTNet step alone: its view of the batch and its
    forward under no_grad, as `CTNet.forward` runs it (with the ids' positions it shares with
    the target, when it does; where it reads the target's long-sequence interests, zeros in
    their place: the same work)."""
    net = dmp.module
    src = net.source
    reads_target = net.long_interest != "own"
    width = 2 * src.layout.token_dim

    def step(b: Batch) -> None:
        (sparse, dense), looked_up, positions = net.source_lookups(b.sparse, b.dense)
        given = [dense.new_zeros(len(dense), width) for m in (src.sim, src.eta)
                 if m is not None] if reads_target else None
        frozen_after_lookups(src, sparse, dense, looked_up, positions, given)

    return step


def infer_step(dmp: DistributedModelParallel) -> Callable[[Batch], None]:
    dmp.eval()

    @torch.no_grad()
    def step(b: Batch) -> None:
        torch.sigmoid(dmp(b.sparse, b.dense).logits)

    return step


def run_worker(job: str, batch_size: int, steps: int, config: str) -> list[dict]:
    """"train" (Base and CTNet in turn), "infer" (CTNet unshared and shared in turn), or
    "memory-base" / "memory-ctnet" (one model alone, for its peak RSS)."""
    cfg = load_config(config)
    env = init_distributed("cpu")
    if job.startswith("memory-"):
        model = job.removeprefix("memory-")
        dmp, sizes = build(model, cfg, env)
        batches = demo_batches(cfg, batch_size, MEMORY_STEPS)
        step, opt = train_step(dmp, cfg)
        row = time_steps({model: step}, batches)[model]
        return [{"job": job, **row, "held_mb": held_mb(dmp, opt), **sizes}]
    batches = demo_batches(cfg, batch_size, max(steps, MIN_SAMPLES // batch_size))
    # timed model -> the model it builds
    models = {"base": "base", "ctnet": "ctnet", "ctnet-shared": "ctnet-shared",
              "ctnet-alternative": "ctnet-alternative", "ctnet-no-adapters": "ctnet",
              "source-forward": "ctnet"} if job == "train" else \
        {"ctnet": "ctnet", "ctnet-shared": "ctnet-shared",
         "ctnet-alternative": "ctnet-alternative"}
    timed = {}
    for m, built in models.items():
        dmp, _ = build(built, cfg, env)
        if m == "ctnet-no-adapters":
            dmp.module.use_adapters = False
        timed[m] = source_forward(dmp) if m == "source-forward" else \
            train_step(dmp, cfg)[0] if job == "train" else infer_step(dmp)
    rows = time_steps(timed, batches)
    return [{"job": f"{job}-{m}", **{k: v for k, v in rows[m].items() if k != "peak_rss_mb"}}
            for m in models]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (at least)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--repeats", type=int, default=1, help="rounds of the timing jobs")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker[0], int(args.worker[1]), args.steps,
                                    args.config)))
        return
    require_demo_world()
    cfg = load_config(args.config)
    common = ["--steps", str(args.steps), "--config", args.config]
    rounds = [run_workers(__file__, [[job, str(bs)] for bs in args.batch_sizes
                                     for job in ("train", "infer")], common)
              for _ in range(args.repeats)]

    def round_ratio(timed: list[dict], bs: int) -> float:
        by = {r["job"]: r["step_ms"] for r in timed if r["batch_size"] == bs}
        return by["train-ctnet"] / by["train-base"]

    rows, ratio_rounds, ratio_interval = [], {}, {}
    for bs in args.batch_sizes:  # the median round's rows
        ranked = sorted(rounds, key=lambda timed: round_ratio(timed, bs))
        rows += [r for r in ranked[(len(ranked) - 1) // 2] if r["batch_size"] == bs]
        ratio_rounds[str(bs)] = [round(round_ratio(timed, bs), 3) for timed in rounds]
        if args.repeats > 1:
            ratio_interval[str(bs)] = {k: round(v, 3) for k, v in
                                       paired_interval(ratio_rounds[str(bs)]).items()}
    rows += run_workers(__file__, [[job, str(bs)] for bs in args.batch_sizes
                                   for job in ("memory-base", "memory-ctnet")], common,
                        MEMORY_ENV)
    by = {(r["job"], r["batch_size"]): r for r in rows}
    ratio, shared_speedup, alternative_speed, memory, breakdown = {}, {}, {}, {}, {}
    for bs in args.batch_sizes:
        base_ms = by["train-base", bs]["step_ms"]
        ratio[str(bs)] = round(by["train-ctnet", bs]["step_ms"] / base_ms, 3)
        # where CTNet's extra time goes, as shares of a Base step
        breakdown[str(bs)] = {
            "source_forward": round(by["train-source-forward", bs]["step_ms"] / base_ms, 3),
            "adapters": round((by["train-ctnet", bs]["step_ms"]
                               - by["train-ctnet-no-adapters", bs]["step_ms"]) / base_ms, 3),
            "shared_attention_step_time_ratio": round(
                by["train-ctnet-shared", bs]["step_ms"] / base_ms, 3),
            "alternative_long_interest_step_time_ratio": round(
                by["train-ctnet-alternative", bs]["step_ms"] / base_ms, 3)}
        shared_speedup[str(bs)] = round(by["infer-ctnet", bs]["step_ms"]
                                        / by["infer-ctnet-shared", bs]["step_ms"], 3)
        alternative_speed[str(bs)] = round(by["infer-ctnet-alternative", bs]["step_ms"]
                                           / by["infer-ctnet", bs]["step_ms"], 3)
        base, ctnet = by["memory-base", bs], by["memory-ctnet", bs]
        # the source's weights; the adapters' weights, AdaGrad sums and gradients
        allowed = ctnet["source_weights_mb"] + 3 * ctnet["adapter_weights_mb"]
        memory[str(bs)] = {
            "base_held_mb": base["held_mb"], "ctnet_held_mb": ctnet["held_mb"],
            "ctnet_held_above_base_mb": round(ctnet["held_mb"] - base["held_mb"], 1),
            "source_weights_mb": ctnet["source_weights_mb"],
            "adapter_weights_mb": ctnet["adapter_weights_mb"],
            "held_within_source_and_adapters": ctnet["held_mb"] - base["held_mb"]
            <= allowed + 0.1,
            "base_peak_rss_mb": base["peak_rss_mb"], "ctnet_peak_rss_mb": ctnet["peak_rss_mb"],
            "ctnet_peak_above_base_mb": round(ctnet["peak_rss_mb"] - base["peak_rss_mb"], 1),
        }
    print(f"{'job':<20}{'batch':>7}{'samples/s':>12}{'step ms':>10}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['job']:<20}{r['batch_size']:>7}{r['samples_per_s']:>12,.0f}"
              f"{r['step_ms']:>10}{r.get('peak_rss_mb', ''):>13}")
    print("step_time_ratio (CTNet / Base):", ratio, "rounds:", ratio_rounds,
          "95% interval over the rounds:", ratio_interval or "one round")
    print("CTNet's extra time as shares of a Base step:", breakdown)
    print("inference speed-up from shared long-sequence attention:", shared_speedup)
    print(f"CTNet's scoring speed over {alternative_long_interest(cfg)!r}'s:",
          alternative_speed)
    print("memory:", json.dumps(memory, indent=1))
    write_result(RESULT, "ctnet_step", __file__, args.config, runs=rows,
                 step_time_ratio=ratio, step_time_ratio_rounds=ratio_rounds,
                 step_time_ratio_interval=ratio_interval, step_breakdown=breakdown,
                 shared_attention_inference_speedup=shared_speedup,
                 alternative_long_interest=alternative_long_interest(cfg),
                 scoring_speed_over_alternative_long_interest=alternative_speed,
                 memory=memory)


if __name__ == "__main__":
    main()
