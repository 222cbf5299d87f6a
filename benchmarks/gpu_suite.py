"""The GPU suite: one prepared command that proves the GPU path in at most 8 minutes.

    python benchmarks/gpu_suite.py                      # on cuda:0, about 8 minutes at most
    python benchmarks/gpu_suite.py --device cpu --small # the same sections, scaled down (tests)

Sections, in order (each in its own forked process with its own time limit, so a crash, a
hang or a timeout in one keeps the others' results; the JSON is rewritten after every
figure, so a suite stopped from outside keeps what it measured):

- info: device, memory, torch / fbgemm / torchrec versions.
- forked_job: a job of the experiment's and the pipeline's job server (forked from a process
  that imported the library) uses the device.
- placement: the demo tower and CTNet trained a few steps on the device; elements of every
  parameter and buffer by device (anything off the device fails the section).
- parity: the quick world trained 2 periods from the same initial weights (saved by the CPU
  run, loaded by the device run), once on the CPU and once on the device: next-period AUC
  within 0.003, each of the first 20 step losses within 1%.
- throughput: training samples/s of the demo tower, the DIN row and CTNet (and CTNet/Base),
  and scoring samples/s, at batch 512 / 4,096 / 16,384 (the pipelined training step of
  `ctnet train`; steps timed as the difference of a short and a long pass, so the
  pipeline's start is not counted).
- big_table: one table of 1,000,000,000 rows (fp16) trained with fbgemm's fused row-wise
  AdaGrad (the kernel TorchRec's fused compute kernel runs) for 100 steps: lookups/s, memory.
- checkpoint: a torch.distributed.checkpoint save and load (through the project's safe
  reader) of a 250,000,000-row table: seconds and GB/s, and the time to digest its files.
- export: a trained tower exported (`ctnet export`) and scored on the device: p50 latency at
  1 / 64 / 512 rows.
- uvm_cache: a table 4x larger than its UVM cache (fbgemm's managed caching) against the same
  table in HBM, with the cache filled one batch ahead on a side stream (what TorchRec's
  prefetch pipeline does): samples/s; and the demo tower trained by the project's trainer with
  its user table behind such a cache (under TorchRec's `PrefetchTrainPipelineSparseDist`)
  against the table on the device.

Results: benchmarks/results/gpu_suite-<device>.json (`--out` to override).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctnet_rec.experiment.jobs import keep_forks_cuda_capable  # noqa: E402

keep_forks_cuda_capable()  # before torch and fbgemm: each section runs in a forked process

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ctnet_rec.cli import EXPERIMENT_JOBS  # noqa: E402
from ctnet_rec.config import Config, load_config  # noqa: E402
from ctnet_rec.data.batch import Batch  # noqa: E402
from ctnet_rec.data.reader import ParquetBatchReader  # noqa: E402
from ctnet_rec.data.synth import synthesize  # noqa: E402
from ctnet_rec.experiment.jobs import IsolatedRunner  # noqa: E402
from ctnet_rec.experiment.runner import din_config, quick  # noqa: E402
from ctnet_rec.training.distributed import init_distributed  # noqa: E402
from ctnet_rec.training.trainer import PeriodTrainer  # noqa: E402
from ctnet_rec.training.transfer import CTNetTrainer  # noqa: E402
from sharding.tower import pipeline_class  # noqa: E402

PARITY_AUC = 0.003  # next-period AUC, CPU vs device
PARITY_LOSS = 0.01  # each of the first PARITY_STEPS step losses, relative
PARITY_STEPS = 20
GB = 1e9


class Scale:
    """Sizes of the full suite and of the dry run (`--small`)."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.batch_sizes = [128] if small else [512, 4096, 16384]
        self.rows_a = 4000 if small else 40_000  # domain A impressions a period
        self.short_steps, self.long_steps = (3, 8) if small else (6, 36)
        self.score_steps = 4 if small else 30
        self.placement_steps = 3 if small else 50
        self.big_rows = 100_000 if small else 1_000_000_000
        self.big_dim, self.big_steps, self.big_batch, self.big_pooling = \
            (16, 10, 512, 4) if small else (32, 100, 16384, 8)
        self.ckpt_rows, self.ckpt_dim = (1_000_000, 16) if small else (250_000_000, 16)
        self.uvm_rows, self.uvm_dim, self.uvm_steps = \
            (50_000, 32, 10) if small else (20_000_000, 128, 100)
        self.latency_calls = 5 if small else 50


# -- sections: each runs in a child process and sends dicts to merge into its results --------

Send = Callable[[dict[str, Any]], None]


def demo_config(scale: Scale, device: str) -> Config:
    cfg = quick(load_config(ROOT / "examples" / "demo.toml"))
    cfg.train.device = device
    cfg.synth.domains["A"].impressions_per_period = scale.rows_a
    return cfg


def world(cfg: Config, tmp: Path) -> Path:
    """The synthetic world of `cfg`, made once per size and kept for the later sections."""
    data = tmp / f"world-{cfg.synth.domains['A'].impressions_per_period}"
    if not (data / "world.json").exists():
        synthesize(cfg.synth, data, seed=0)
    return data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def section_info(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    import fbgemm_gpu
    import torchrec

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "fbgemm_gpu": fbgemm_gpu.__version__,
                            "torchrec": torchrec.__version__, "cpus": os.cpu_count()}
    if args.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gb": round(total / GB, 1),
                 "gpu_free_gb": round(free / GB, 1)}
    send(info)


def device_job(device: str) -> None:
    """A job of the experiment's and the pipeline's job server, which forks it from a process
    that imported the library: it must be able to use the device."""
    assert float(torch.ones(4, device=device).sum()) == 4.0


def section_forked_job(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    runner = IsolatedRunner(preload=[EXPERIMENT_JOBS])
    runner.submit(functools.partial(device_job, args.device), "device job").result()
    send({"device": args.device, "ran": True})


def placement_of(trainer: PeriodTrainer) -> dict[str, int]:
    """Elements of every parameter and buffer by device, table shards included."""
    counts: dict[str, int] = {}
    for t in itertools.chain(trainer.dmp.parameters(), trainer.dmp.buffers()):
        counts[str(t.device)] = counts.get(str(t.device), 0) + t.numel()
    return counts


def cycled(reader: ParquetBatchReader, domain: str, batch_size: int) -> Iterator[
        tuple[str, Batch]]:
    """The reader's full batches, in memory, repeated."""
    full = [b for b in reader if len(b) == batch_size]
    if not full:
        raise RuntimeError(f"no full batch of {batch_size} rows in the world")
    return itertools.cycle((domain, b) for b in full)


def section_placement(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    cfg = demo_config(scale, args.device)
    data = world(cfg, tmp)
    env = init_distributed(args.device)
    for name, domain, build in (("tower", "A", lambda: PeriodTrainer(cfg, env)),
                                ("ctnet", "B", lambda: CTNetTrainer(cfg, cfg, env))):
        trainer = build()
        reader = ParquetBatchReader(data, domain, [0, 1, 2], trainer.features_read(), cfg.data,
                                    seed=0)
        steps = itertools.islice(cycled(reader, domain, cfg.data.batch_size),
                                 scale.placement_steps)
        metrics = trainer.train_steps(steps, scale.placement_steps, domain, 0)
        sync(env.device)
        where = placement_of(trainer)
        off = {d: n for d, n in where.items() if d != str(env.device)}
        send({name: {"elements_by_device": where, "train_loss": metrics["train_loss"],
                     "all_on_device": not off}})
        if off:
            raise RuntimeError(f"{name}: {off} elements off {env.device}")


def section_parity_run(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send,
                       device: str) -> None:
    """Two periods of the quick world's domain A and the AUC on the third, from the initial
    weights the CPU run saved (so both runs start from the same model)."""
    cfg = quick(load_config(ROOT / "examples" / "demo.toml"))
    cfg.train.device = device
    data = world(cfg, tmp)
    env = init_distributed(device)
    trainer = PeriodTrainer(cfg, env)
    init = tmp / "parity-init"
    if device == "cpu" and not init.exists():
        trainer.save(init, 0, {})
    else:
        trainer.restore(init)
    losses: list[torch.Tensor] = []
    logits_of = trainer.logits

    def recorded(batch: Batch, domain: str) -> torch.Tensor:
        out = logits_of(batch, domain)
        losses.append(F.binary_cross_entropy_with_logits(out.detach(), batch.labels))
        return out

    trainer.logits = recorded  # type: ignore[method-assign]
    for period in (0, 1):
        trainer.train_period(data, "A", period)
    auc = trainer.evaluate(data, "A", 2)["auc"]
    send({device: {"auc": auc, "losses": [float(x) for x in losses[:PARITY_STEPS]]}})


def parity_verdict(cpu: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu["losses"], dev["losses"],
                                                          strict=True)]
    auc_diff = abs(cpu["auc"] - dev["auc"])
    return {"auc_diff": auc_diff, "max_loss_rel_diff": max(rel),
            "passed": auc_diff <= PARITY_AUC and max(rel) <= PARITY_LOSS
            and len(rel) == PARITY_STEPS}


def samples_per_s(trainer: PeriodTrainer, steps: Iterator[tuple[str, Batch]], domain: str,
                  scale: Scale, batch_size: int) -> float:
    """Training samples/s of the pipelined step, from the moment the pipeline fetches its
    `short_steps`-th batch to the end of the pass (which waits for the device): building the
    pipeline and its first steps are not counted."""
    fetched_at: list[float] = []

    def timed() -> Iterator[tuple[str, Batch]]:
        for item in itertools.islice(steps, scale.long_steps):
            fetched_at.append(time.perf_counter())
            yield item

    trainer.train_steps(timed(), scale.long_steps, domain, 0)
    end = time.perf_counter()
    counted = scale.long_steps - scale.short_steps
    return counted * batch_size / (end - fetched_at[scale.short_steps])


@torch.no_grad()
def scoring_samples_per_s(trainer: PeriodTrainer, steps: Iterator[tuple[str, Batch]],
                          scale: Scale) -> float:
    trainer.dmp.eval()
    batches = [b.to(trainer.env.device) for _, b in itertools.islice(steps, 4)]
    for b in batches[:2]:
        trainer.dmp(b.sparse, b.dense)
    sync(trainer.env.device)
    start = time.perf_counter()
    for i in range(scale.score_steps):
        b = batches[i % len(batches)]
        torch.sigmoid(trainer.dmp(b.sparse, b.dense).logits)
    sync(trainer.env.device)
    return scale.score_steps * len(batches[0]) / (time.perf_counter() - start)


def section_throughput(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    cfg = demo_config(scale, args.device)
    data = world(cfg, tmp)
    env = init_distributed(args.device)
    models: dict[str, Callable[[Config], PeriodTrainer]] = {
        "tower": lambda c: PeriodTrainer(c, env),
        "din": lambda c: PeriodTrainer(din_config(c), env),
        "ctnet": lambda c: CTNetTrainer(c, c, env)}
    for batch_size in scale.batch_sizes:
        row: dict[str, Any] = {}
        for name, build in models.items():
            trainer = build(cfg)
            reader = ParquetBatchReader(data, "A", list(range(cfg.synth.periods)),
                                        trainer.features_read(), cfg.data,
                                        batch_size=batch_size, seed=0)
            steps = cycled(reader, "A", batch_size)
            row[name] = round(samples_per_s(trainer, steps, "A", scale, batch_size))
            row[f"{name}_scoring"] = round(scoring_samples_per_s(trainer, steps, scale))
            del trainer
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            send({str(batch_size): row})
        row["ctnet_over_tower_step_time"] = round(row["tower"] / row["ctnet"], 3)
        send({str(batch_size): row})


def tbe(rows: int, dim: int, device: torch.device, location: str, precision: str,
        **kwargs: Any) -> torch.nn.Module:
    """fbgemm's training table-batched embedding with the fused row-wise AdaGrad."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    where = (getattr(EmbeddingLocation, location),
             ComputeDevice.CUDA if device.type == "cuda" else ComputeDevice.CPU)
    if device.type != "cuda":
        where = (EmbeddingLocation.HOST, ComputeDevice.CPU)
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, *where)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01, weights_precision=getattr(SparseType, precision), device=device,
        **kwargs)


def skewed_ids(rows: int, batch: int, pooling: int, device: torch.device,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `batch` bags of `pooling` ids, skewed towards low ids (a few hot rows, a
    long tail), as (indices, offsets)."""
    u = torch.rand(batch * pooling, generator=gen, device=device)
    ids = (u.pow(4) * rows).long().clamp_(max=rows - 1)
    offsets = torch.arange(0, batch * pooling + 1, pooling, device=device)
    return ids, offsets


def train_tbe(table: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              steps: int, device: torch.device, prefetch: bool = False) -> float:
    """Seconds for `steps` forward + backward (fused update) steps over `batches`; with
    `prefetch`, each next batch's rows are brought into the cache on a side stream while the
    current one trains (as TorchRec's prefetch pipeline does)."""
    side = torch.cuda.Stream() if prefetch else None
    if prefetch:
        table.prefetch(*batches[0])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        ids, offsets = batches[i % len(batches)]
        out = table(ids, offsets)
        if side is not None and i + 1 < steps:  # one prefetch per forward
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                table.prefetch(*batches[(i + 1) % len(batches)], forward_stream=main)
        out.backward(torch.ones_like(out))
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
    sync(device)
    return time.perf_counter() - start


def section_big_table(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    device = torch.device(args.device)
    start = time.perf_counter()
    table = tbe(scale.big_rows, scale.big_dim, device, "DEVICE", "FP16")
    table.init_embedding_weights_uniform(-0.01, 0.01)
    sync(device)
    send({"rows": scale.big_rows, "dim": scale.big_dim, "precision": "fp16",
          "optimizer": "fused row-wise AdaGrad", "build_s": round(time.perf_counter() - start,
                                                                  1)})
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [skewed_ids(scale.big_rows, scale.big_batch, scale.big_pooling, device, gen)
               for _ in range(8)]
    train_tbe(table, batches, 3, device)  # first-call kernels
    seconds = train_tbe(table, batches, scale.big_steps, device)
    lookups = scale.big_steps * scale.big_batch * scale.big_pooling
    out: dict[str, Any] = {"steps": scale.big_steps, "batch": scale.big_batch,
                           "pooling": scale.big_pooling,
                           "lookups_per_s": round(lookups / seconds),
                           "step_ms": round(1000 * seconds / scale.big_steps, 2)}
    if device.type == "cuda":
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 1)
    weights = table.split_embedding_weights()[0]
    out["weights_finite"] = bool(weights[: min(scale.big_rows, 1_000_000)].float()
                                 .isfinite().all())
    send(out)


def section_checkpoint(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    import torch.distributed.checkpoint as dcp

    from ctnet_rec.training.checkpoint import file_digests
    from ctnet_rec.training.safe_load import SafeLoadPlanner, SafeReader

    device = torch.device(args.device)
    table = torch.empty(scale.ckpt_rows, scale.ckpt_dim, dtype=torch.float16,
                        device=device).uniform_(-0.01, 0.01)
    size = table.numel() * table.element_size()
    folder = tmp / "dcp"
    sync(device)
    start = time.perf_counter()
    dcp.save({"table": table}, checkpoint_id=str(folder))
    save_s = time.perf_counter() - start
    send({"rows": scale.ckpt_rows, "dim": scale.ckpt_dim, "gb": round(size / GB, 2),
          "save_s": round(save_s, 2), "save_gb_per_s": round(size / GB / save_s, 2)})
    start = time.perf_counter()
    file_digests(folder)
    send({"digest_s": round(time.perf_counter() - start, 2)})
    loaded = {"table": torch.zeros_like(table)}
    start = time.perf_counter()
    dcp.load(loaded, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner())
    sync(device)
    load_s = time.perf_counter() - start
    send({"load_s": round(load_s, 2), "load_gb_per_s": round(size / GB / load_s, 2),
          "identical": bool(torch.equal(loaded["table"], table))})


def section_export(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    from ctnet_rec.serving.export import ExportedModel, export_checkpoint

    cfg = demo_config(scale, args.device)
    data = world(cfg, tmp)
    env = init_distributed(args.device)
    trainer = PeriodTrainer(cfg, env)
    trainer.train_period(data, "A", 0)
    ckpt = tmp / "export-run" / "checkpoints" / "period=0"
    trainer.save(ckpt, 0, {"domain": "A"})
    start = time.perf_counter()
    export_checkpoint(ckpt, tmp / "artifact")
    send({"export_s": round(time.perf_counter() - start, 2)})
    model = ExportedModel(tmp / "artifact")
    model.scorer.to(env.device)
    latency: dict[str, float] = {}
    for rows in (1, 64, 512):
        reader = ParquetBatchReader(data, "A", [1], cfg.features, cfg.data, batch_size=rows,
                                    shuffle=False)
        batch = next(iter(reader)).to(env.device)
        times = []
        for _ in range(scale.latency_calls + 3):
            sync(env.device)
            t0 = time.perf_counter()
            p = model(batch.sparse, batch.dense)
            sync(env.device)
            times.append(time.perf_counter() - t0)
        if not bool(((p >= 0) & (p <= 1)).all()):
            raise RuntimeError(f"scores outside [0, 1] at {rows} rows")
        latency[str(rows)] = round(1000 * statistics.median(times[3:]), 3)
        send({"p50_ms_by_rows": latency})


def section_uvm_cache(args: argparse.Namespace, scale: Scale, tmp: Path, send: Send) -> None:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [skewed_ids(scale.uvm_rows, scale.big_batch, scale.big_pooling, device, gen)
               for _ in range(16)]
    samples = scale.uvm_steps * scale.big_batch
    send({"rows": scale.uvm_rows, "dim": scale.uvm_dim, "cache_load_factor": 0.25})
    for name, location, prefetch in (("hbm", "DEVICE", False),
                                     ("uvm_cache", "MANAGED_CACHING", False),
                                     ("uvm_cache_prefetched", "MANAGED_CACHING", True)):
        if prefetch and device.type != "cuda":
            continue  # streams: CUDA only
        extra = {"cache_load_factor": 0.25} if location != "DEVICE" else {}
        if prefetch:
            extra["prefetch_pipeline"] = True
        table = tbe(scale.uvm_rows, scale.uvm_dim, device, location, "FP32", **extra)
        train_tbe(table, batches, 3, device, prefetch)
        seconds = train_tbe(table, batches, scale.uvm_steps, device, prefetch)
        send({f"{name}_samples_per_s": round(samples / seconds)})
        del table
        if device.type == "cuda":
            torch.cuda.empty_cache()
    send({"trainer": trainer_behind_cache(args, scale, tmp)})


def trainer_behind_cache(args: argparse.Namespace, scale: Scale, tmp: Path) -> dict[str, Any]:
    """The demo tower trained by the project's own trainer with its user table on the device,
    then (CUDA only: the kernel is CUDA's) in host memory behind a GPU cache
    (`fused_uvm_caching`): samples/s of each and the train pipeline each ran, TorchRec's
    prefetch pipeline for the cached table, a path no CPU run takes."""
    env = init_distributed(args.device)
    batch_size = scale.batch_sizes[min(1, len(scale.batch_sizes) - 1)]
    out: dict[str, Any] = {"table": "user", "batch_size": batch_size}
    kernels = {"device": "fused"} | (
        {"uvm_cache": "fused_uvm_caching"} if env.device.type == "cuda" else {})
    for name, kernel in kernels.items():
        cfg = demo_config(scale, args.device)
        cfg.sharding.kernels = {"user": kernel}
        trainer = PeriodTrainer(cfg, env)
        out[f"{name}_pipeline"] = pipeline_class(
            env.device, cfg.sharding, [t.name for t in cfg.features.tables]).__name__
        reader = ParquetBatchReader(world(cfg, tmp), "A", list(range(cfg.synth.periods)),
                                    trainer.features_read(), cfg.data, batch_size=batch_size,
                                    seed=0)
        out[f"{name}_samples_per_s"] = round(samples_per_s(
            trainer, cycled(reader, "A", batch_size), "A", scale, batch_size))
        del trainer
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


SECTIONS: dict[str, tuple[Callable[..., None], int]] = {  # name: (function, seconds at most)
    "info": (section_info, 60),
    "forked_job": (section_forked_job, 60),
    "placement": (section_placement, 90),
    "parity_cpu": (lambda a, s, t, send: section_parity_run(a, s, t, send, "cpu"), 90),
    "parity_device": (lambda a, s, t, send: section_parity_run(a, s, t, send, a.device), 90),
    "throughput": (section_throughput, 180),
    "big_table": (section_big_table, 120),
    "checkpoint": (section_checkpoint, 120),
    "export": (section_export, 90),
    "uvm_cache": (section_uvm_cache, 120),
}


def _child(name: str, args: argparse.Namespace, tmp: Path, conn: Connection) -> None:
    torch.manual_seed(0)
    try:
        SECTIONS[name][0](args, Scale(args.small), tmp, conn.send)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which goes on
        lines = traceback.format_exception(e)
        conn.send({"error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": "".join(lines)[-4000:]})
    finally:
        conn.close()
        # a process group or CUDA state left by the section dies with the process
        os._exit(0)


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def run_section(name: str, args: argparse.Namespace, tmp: Path, limit: float,
                on_update: Callable[[], None], results: dict[str, Any]) -> None:
    """`name` in a forked process (the parent never initialises CUDA and checks for it
    through NVML: `keep_forks_cuda_capable`), its updates merged into `results[name]` as
    they come; killed at `limit` seconds."""
    out: dict[str, Any] = results.setdefault(name, {})
    parent, child = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_child, args=(name, args, tmp, child))
    start = time.perf_counter()
    proc.start()
    child.close()
    while True:
        left = limit - (time.perf_counter() - start)
        if left <= 0:
            proc.kill()
            out["error"] = f"timed out after {limit:.0f} s"
            break
        if parent.poll(min(left, 1.0)):
            try:
                merge(out, parent.recv())
            except EOFError:
                break
            on_update()
        elif not proc.is_alive() and not parent.poll():
            break
    proc.join(5)
    if proc.exitcode not in (0, None) and "error" not in out:
        out["error"] = f"the section's process died (exit code {proc.exitcode})"
    out["seconds"] = round(time.perf_counter() - start, 1)
    on_update()


def default_out(device: str, small: bool) -> Path:
    tag = device + ("-small" if small else "")
    return ROOT / "benchmarks" / "results" / f"gpu_suite-{tag}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="the scaled-down dry run")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="the whole suite's time; a section gets what is left at most")
    p.add_argument("--sections", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--out", type=Path)
    p.add_argument("--tmp", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    out = args.out or default_out(args.device, args.small)
    results: dict[str, Any] = {
        "benchmark": "gpu_suite", "device": args.device, "small": args.small,
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
        "limits": {"parity_auc": PARITY_AUC, "parity_loss_rel": PARITY_LOSS}}

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(results, indent=1) + "\n")
        tmp_out.replace(out)

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = args.tmp or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.sections:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 10:
                results.setdefault(name, {})["error"] = "not run: the suite's budget was spent"
                continue
            print(f"== {name}", flush=True)
            run_section(name, args, tmp, min(SECTIONS[name][1], left), write, results)
            shown = {k: v for k, v in results[name].items() if k != "traceback"}
            print(f"   {json.dumps(shown)[:1500]}", flush=True)
            if name == "parity_device" and "auc" in results.get("parity_cpu", {}).get(
                    "cpu", {}):
                dev = results[name].get(args.device)
                if dev is not None:
                    results["parity"] = parity_verdict(results["parity_cpu"]["cpu"], dev)
                    print(f"   parity: {results['parity']}", flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    results["failed_sections"] = failed
    write()
    print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: "
          f"{len(failed)} section(s) failed {failed} in {results['seconds']} s", flush=True)
    return 1 if failed or not results.get("parity", {}).get("passed", False) else 0


if __name__ == "__main__":
    sys.exit(main())
