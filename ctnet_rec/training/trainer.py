"""The period trainer: a model under DistributedModelParallel with its optimisers, one pass
over a period at a time (TorchRec's train pipeline), scoring, checkpoints of its state, and
the position inside a period where a mid-period checkpoint resumes. `loop.py` drives it."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipeline, TrainPipelineSparseDist

from ctnet_rec.config import Config, ConfigError, FeatureConfig, OptimizerConfig
from ctnet_rec.data.batch import Batch, on_device
from ctnet_rec.data.contract import MIN_TRAINING_ROWS, ORACLE_COLUMN, DataError, oracle_path
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.storage import DataRoot, is_uri, join
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.modules.id_mapping import set_period
from ctnet_rec.modules.kinds import (
    DUAL_EMBEDDING,
    TOWER,
    ModelSpec,
    build_module,
    frozen_part,
)
from ctnet_rec.modules.scorer import Scorer
from ctnet_rec.progress import Progress
from ctnet_rec.training.checkpoint import (
    INIT,
    MID_PERIOD,
    CheckpointError,
    Manifest,
    complete_checkpoints,
    feature_schema,
    lineage_entry,
    load_checkpoint,
    save_checkpoint,
    saved_entries,
    verify_file,
)
from ctnet_rec.training.collectives import from_main, gather_to_main
from ctnet_rec.training.errors import DivergenceError
from ctnet_rec.training.evaluate import evaluate_predictions
from ctnet_rec.training.metric_sink import TensorBoardSink
from ctnet_rec.training.optim import WARMUP, GroupOptimizer, NamedParams
from ctnet_rec.training.pass_state import PassTally, Position
from sharding.tower import dense_parameters, pipeline_class, shard_model

log = logging.getLogger(__name__)

LOG_EVERY_STEPS = 50  # steps between progress updates (loss, speed): each reads the loss back


class _NoStreamWarning(logging.Filter):
    """TorchRec warns, each pass, that a pipelined input transform (CTNet's source view)
    without a data-dist stream may race: true of CUDA, where there is one; the CPU has no
    streams and runs every stage in order."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dist stream" not in record.getMessage()


logging.getLogger("torchrec.distributed.train_pipeline.postproc").addFilter(_NoStreamWarning())


class PeriodTrainer:
    """A model under DistributedModelParallel with its optimisers, trained period by period.
    This one trains a single-domain tower; `CTNetTrainer` overrides what differs."""

    kind = TOWER
    hashed_sections: tuple[str, ...] = ("features", "model")  # the config hash's sections

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        torch.manual_seed(cfg.train.seed)
        self.dmp = self.build_model()
        self.dense = dense_parameters(self.dmp)
        tables = cfg.train.tables
        self.dense_opt = GroupOptimizer(self.parameter_groups(self._named_dense()), (
            self.dmp.fused_optimizer, tables.lr, tables.warmup_steps))
        self.seen: dict[str, np.ndarray] = {"users": np.zeros(0, np.int64),
                                            "items": np.zeros(0, np.int64)}
        self.config_hash = cfg.section_hash("features", "model")
        self.schema = feature_schema(cfg)
        self.sink: TensorBoardSink | None = None  # set by run_periods on rank 0
        self.rows_trained = 0  # in the run so far: TensorBoard's training axis
        self.run: Path | None = None  # set by run_periods: where mid-period checkpoints go
        self.position: Position | None = None  # where a resumed period's pass continues

    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.kind, self.cfg)

    def build_module(self, device: torch.device) -> torch.nn.Module:
        """The model, unsharded, its parameters on `device` ("meta": to be sharded)."""
        try:
            return build_module(self.model_spec(), device)
        except ValueError as e:  # e.g. a CTNet's two towers' configs do not fit together
            raise ConfigError(f"{self.kind}: {e}") from None

    def build_model(self) -> DistributedModelParallel:
        net = self.build_module(torch.device("meta"))
        return shard_model(net, self.env, self.cfg.train.tables.lr, frozen=frozen_part(net),
                           sharding=self.cfg.sharding,
                           find_unused_parameters=self.steps_leave_parameters_unused())

    def steps_leave_parameters_unused(self) -> bool:
        """Whether a training step can leave some dense parameters without a gradient (then
        DDP must search for them after every backward, which costs a graph traversal a
        step). A tower's step uses all of them."""
        return False

    def scorer(self, module: torch.nn.Module) -> Scorer:
        """`module` (this trainer's, unsharded) as it scores this trainer's domain."""
        return Scorer(module)

    def _named_dense(self) -> NamedParams:
        dense = {id(p) for p in self.dense}
        return [(n, p) for n, p in self.dmp.named_parameters() if id(p) in dense]

    def parameter_groups(self, dense: NamedParams) -> dict[str, tuple[NamedParams,
                                                                       OptimizerConfig]]:
        """The dense parameters by optimiser group (a tower has one)."""
        return {"dense": (dense, self.cfg.train.dense)}

    # -- state ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: model, fused (table) optimiser state, dense optimiser
        state keyed by parameter name (so it reloads at any world size)."""
        return {"model": self.dmp.state_dict(), "optim": self.dmp.fused_optimizer.state_dict(),
                "dense_optim": self.dense_opt.state_by_name()}

    def manifest(self, period: int, metrics: dict[str, Any],
                 lineage: dict[str, Any]) -> Manifest:
        return Manifest(kind=self.kind, config_hash=self.config_hash, schema=self.schema,
                        period=period, world_size=self.env.world_size, metrics=metrics,
                        lineage=lineage, config=dataclasses.asdict(self.cfg))

    def save(self, folder: Path, period: int, metrics: dict[str, Any],
             lineage: dict[str, Any] | None = None,
             per_rank: dict[str, np.ndarray] | None = None) -> None:
        save_checkpoint(folder, self.state(), self.manifest(period, metrics, lineage or {}),
                        self.seen, per_rank)

    def save_init(self, run: Path, source_ckpt: Path, target_ckpt: Path,
                  **lineage: Any) -> Path:
        """RUN/init of a model built from a source and a target tower checkpoint: saved as of
        the target's period, with both checkpoints in its lineage."""
        trained = sorted(complete_checkpoints(run))
        if trained:  # the trained periods would go on from them, not from this deployment
            raise CheckpointError(f"{run}: holds checkpoints of periods {trained}, trained "
                                  "from its deployment; deploy into a new run")
        folder = run / INIT
        self.save(folder, Manifest.read(target_ckpt).period, {}, {
            "target_checkpoint": lineage_entry(folder, target_ckpt),
            "source_checkpoint": lineage_entry(folder, source_ckpt), **lineage})
        return folder

    def restore(self, folder: Path) -> Manifest:
        manifest = Manifest.read(folder)
        manifest.check_compatible(self.kind, self.config_hash, self.schema, folder, self.cfg,
                                  self.hashed_sections)
        state = self.state()
        warmups = [n for n in state["dense_optim"] if n.startswith(WARMUP)]
        saved = saved_entries(folder) if warmups else {}
        for name in warmups:
            if f"dense_optim.{name}.warmup" not in saved:  # saved without: it starts over
                del state["dense_optim"][name]
        self.seen = load_checkpoint(folder, state)
        self.load_state(state)
        log.info("restored %s (period %d, trained at world size %d)", folder, manifest.period,
                 manifest.world_size)
        return manifest

    def load_state(self, state: dict[str, Any]) -> None:
        """Make `state` (this trainer's `state()`, filled in place by a load) the live state."""
        model = self.dmp.state_dict()
        model.update(state["model"])
        self.dmp.load_state_dict(model)
        self.dmp.fused_optimizer.load_state_dict(state["optim"])
        self.dense_opt.load_state_by_name(state["dense_optim"])

    # -- work -----------------------------------------------------------------------------

    def _reader(self, root: DataRoot, domain: str, period: int, train: bool,
                batch_size: int | None = None) -> ParquetBatchReader:
        """The period's batches for this rank. Training refuses, on every rank alike, a
        period too small to give each rank two rows (a step's batch norm needs two); given
        that, no training batch holds fewer (`batch_sizes`)."""
        reader = ParquetBatchReader(
            root, domain, [period], self.features_read(), self.cfg.data,
            batch_size=None if train else batch_size or self.cfg.train.eval_batch_size,
            rank=self.env.rank, world_size=self.env.world_size, shuffle=train,
            seed=self.cfg.train.seed * 1_000_003 + period,
            pin_memory=self.env.device.type == "cuda",
        )
        world = self.env.world_size
        if train and reader.total_rows < MIN_TRAINING_ROWS * world:
            raise DataError(
                f"{join(root, domain)}/period={period}: {reader.total_rows} row(s) cannot be "
                f"trained on by {world} rank(s): a training step's batch norm needs at least "
                f"{MIN_TRAINING_ROWS} rows on each rank")
        return reader

    def features_read(self) -> FeatureConfig:
        """What the reader decodes: a tower's features less the sequences it never reads;
        other models (several towers, or lookups of their own) read them all."""
        return self.cfg.features.for_model(self.cfg.model) if self.kind == TOWER \
            else self.cfg.features

    def domains_read(self, domain: str) -> list[str]:
        """The domains whose data training on `domain` reads."""
        return [domain]

    def train_period(self, root: DataRoot, domain: str, period: int) -> dict[str, Any]:
        reader = self._reader(root, domain, period, train=True)
        return self.train_steps(((domain, b) for b in reader), len(reader), domain, period)

    def train_pipeline(self, loss_of: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
                       ) -> TrainPipeline:
        """TorchRec's train pipeline over this trainer's model, for one pass: each step's
        batch is copied to the device and its lookups' input distribution started while
        the steps before it train (`loss_of(batch)`: the loss and what the step returns)."""
        tables = [t.name for t in self.cfg.features.tables]
        pipeline = pipeline_class(self.env.device, self.cfg.sharding, tables)
        return pipeline(self.dmp, self.dense_opt, self.env.device, custom_model_fwd=loss_of,
                        pipeline_postproc=True)

    def logits(self, batch: Batch, domain: str) -> torch.Tensor:
        """The model's logits for a batch of `domain` (a single-domain model ignores it)."""
        return self.dmp(batch.sparse, batch.dense).logits

    def train_steps(self, steps: Iterable[tuple[str, Batch]], total: int, domain: str,
                    period: int) -> dict[str, Any]:
        """One pass over `steps` (a batch of one domain each) of `domain`'s `period`: the
        metrics are `domain`'s, whose ids are recorded as seen; with batches of other domains
        (joint learning), each domain's rows and loss too."""
        self.dmp.train()
        set_period(self.dmp, period)
        resumed, self.position = (self.position, None) if self.resumes_inside(period) \
            else (None, self.position)
        if resumed is not None:  # a mid-period checkpoint's pass so far
            self.rows_trained = resumed.rows_trained
        tally = PassTally(domain, self.env.device, resumed)
        start = time.perf_counter()
        self._pass(steps, total, period, tally, start)
        self._average_batchnorm_statistics()
        # the ids seen, kept by rank 0 (which scores evaluations and writes checkpoints)
        seen = gather_to_main(tally.seen(), self.env.device)
        if seen is not None:
            self.seen = {k: np.union1d(self.seen[k], v) for k, v in seen.items()}
        elapsed = time.perf_counter() - start
        by_domain = tally.reduced()
        self.rows_trained += sum(n for _, n in by_domain.values())
        self._refuse_divergence(by_domain, domain, period)
        metrics: dict[str, Any] = {"train_loss": by_domain[domain][0],
                                   "train_rows": by_domain[domain][1],
                                   "train_seconds": round(elapsed, 3)}
        if len(by_domain) > 1:
            metrics["train_rows_by_domain"] = {d: n for d, (_, n) in by_domain.items()}
            metrics["train_loss_by_domain"] = {d: x for d, (x, _) in by_domain.items()}
        return metrics

    def _pass(self, steps: Iterable[tuple[str, Batch]], total: int, period: int,
              tally: PassTally, start: float) -> None:
        """The steps themselves, through TorchRec's train pipeline, from where `tally`
        stands: each step's loss into the tally, progress shown, mid-period checkpoints."""
        skip, every = tally.steps, self.mid_period_steps()  # steps trained before a checkpoint
        # (domain, host batch) of the batches the pipeline has fetched and not yet trained:
        # it trains them in the order it fetches them, a few steps behind
        pending: deque[tuple[str, Batch]] = deque()

        def fetch() -> Iterator[Batch]:
            for step_domain, host_batch in itertools.islice(steps, skip, None):
                pending.append((step_domain, host_batch))
                yield host_batch

        def loss_of(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            loss = F.binary_cross_entropy_with_logits(self.logits(batch, pending[0][0]),
                                                      batch.labels)
            return loss, loss.detach()

        progress = Progress(total, f"{tally.domain} period {period}", log, initial=skip,
                            enabled=self.env.is_main)
        pipeline = self.train_pipeline(loss_of)
        batches = fetch()
        try:
            while True:
                try:
                    loss = pipeline.progress(batches)
                except StopIteration:
                    break
                step_domain, host_batch = pending.popleft()
                progress.update(len(host_batch))
                tally.add(step_domain, host_batch, loss)
                if ((tally.steps - 1) % LOG_EVERY_STEPS == 0 and (self.sink or progress.tty)) \
                        or progress.due():
                    self._log_progress(progress, tally, start)
                if every and tally.steps % every == 0 and tally.steps < total:
                    self._save_position(period, tally)
        finally:
            if isinstance(pipeline, TrainPipelineSparseDist):
                pipeline.detach()  # the lookups' own forwards back, for evaluation
            progress.close()

    def _refuse_divergence(self, by_domain: dict[str, tuple[float, int]], domain: str,
                           period: int) -> None:
        """A non-finite loss (or dense weight) stops every rank before anything is saved."""
        diverged: dict[str, Any] = {d: x for d, (x, _) in by_domain.items()
                                    if not math.isfinite(x)}
        # a non-finite gradient in the last steps shows in the weights before the loss (dense
        # weights are the same on every rank: their gradients are averaged)
        if not bool(torch.stack([p.isfinite().all() for p in self.dense]).all()):
            diverged["dense weights"] = "not finite"
        if diverged:  # the same on every rank (reduced above): all stop, none saves
            raise DivergenceError(
                f"{domain} period {period}: the training loss became {diverged} (domain: mean "
                "loss); this period is not saved. Lower the learning rates ([train.tables] lr, "
                "[train.dense] lr) or check the data.")

    def resumes_inside(self, period: int) -> bool:
        """Whether the next pass over `period` continues a mid-period checkpoint's."""
        return self.position is not None and self.position.period == period

    def mid_period_steps(self) -> int:
        """Steps between mid-period checkpoints (0: none): `checkpoint_every_rows` over the
        rows a step trains on all ranks, when run_periods drives the training."""
        rows = self.cfg.train.checkpoint_every_rows
        if not rows or self.run is None:
            return 0
        return max(1, math.ceil(rows / (self.cfg.data.batch_size * self.env.world_size)))

    def _save_position(self, period: int, tally: PassTally) -> None:
        """A checkpoint inside `period` (collective), with each rank's pass so far: its loss
        sums and rows per domain, the ids it has seen."""
        assert self.run is not None
        # each rank's own batch-norm statistics too (averaged only at the period's end; the
        # checkpoint's model holds rank 0's)
        bn = {f"bn/{k}": v.cpu().numpy() for k, v in self._batchnorm_statistics().items()}
        self.save(self.run / "checkpoints" / MID_PERIOD, period, {"steps": tally.steps},
                  per_rank={**tally.arrays(), "rows_trained": np.array(self.rows_trained), **bn})

    def _batchnorm_statistics(self) -> dict[str, torch.Tensor]:
        """The running statistics of the batch norms that train (a frozen part's, CTNet's
        source tower, never move: averaging them across ranks would still move their last
        bits)."""
        frozen = frozen_part(self.dmp.module)
        fixed = {id(m) for m in frozen.modules()} if frozen is not None else set()
        return {f"{name}.{b}": buf for name, m in self.dmp.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                and id(m) not in fixed
                for b, buf in m.named_buffers(recurse=False)}

    def resume_inside(self, run: Path, period: int) -> None:
        """Continue `period` from its mid-period checkpoint in `run`, where there is one of
        this period at this world size (each rank has its own pass so far); otherwise the
        period starts over."""
        folder = run / "checkpoints" / MID_PERIOD
        if not (folder / "manifest.json").exists():
            return
        manifest = Manifest.read(folder)
        if manifest.period != period or manifest.world_size != self.env.world_size:
            log.warning("%s: inside period %d at world size %d; training period %d at %d: the "
                        "period starts over", folder, manifest.period, manifest.world_size,
                        period, self.env.world_size)
            return
        self.restore(folder)
        mine = folder / f"rank{self.env.rank}.npz"
        verify_file(mine, Manifest.read(folder).files.get(mine.name, ""))
        with np.load(mine) as z:
            self.position = Position.from_arrays(period, z)
            with torch.no_grad():
                for key, buf in self._batchnorm_statistics().items():
                    buf.copy_(torch.from_numpy(z[f"bn/{key}"]))
        log.info("resuming inside period %d after %d of its steps", period, self.position.steps)

    def _log_progress(self, progress: Progress, tally: PassTally, start: float) -> None:
        """The period's running loss (of the trained domain) and speed, to the progress bar
        or log line and to TensorBoard."""
        loss, speed = tally.running_loss(), tally.rows / (time.perf_counter() - start)
        progress.show(loss=f"{loss:.4f}")
        if self.sink is not None:
            lrs = {"tables": self.cfg.train.tables.lr,
                   **{g: self.dense_opt.lr(g) for g in self.dense_opt.groups}}
            # every rank reads as many rows: the run's rows so far, all ranks together
            self.sink.training(self.rows_trained + tally.rows * self.env.world_size, loss,
                               speed * self.env.world_size, lrs)

    @torch.no_grad()
    def _average_batchnorm_statistics(self) -> None:
        """DMP's data-parallel wrapper does not broadcast buffers, so each rank's batch-norm
        running statistics follow its own batches. Averaging them after a period makes every
        rank score with the same model, and the checkpoint hold that model."""
        if self.env.world_size == 1:
            return
        for key, buf in self._batchnorm_statistics().items():
            if key.endswith(("running_mean", "running_var")):
                dist.all_reduce(buf)
                buf /= self.env.world_size

    @torch.no_grad()
    def predict(self, root: DataRoot, domain: str, period: int, batch_size: int | None = None,
                outputs: Callable[[Batch], torch.Tensor] | None = None,
                ) -> dict[str, np.ndarray] | None:
        """Scores of a period's rows in file order, in eval mode: each rank scores a
        contiguous share, gathered on rank 0 (None on the other ranks). "p" holds the click
        probabilities, or what `outputs(device batch)` returns per row.

        no_grad, not inference_mode: on CPU, fbgemm's fused table lookup is registered only
        behind the autograd dispatch key, and inference_mode skips that key."""
        self.dmp.eval()
        scores: list[torch.Tensor] = []  # on the device, brought back once at the end
        parts: dict[str, list[torch.Tensor]] = {"labels": [], "users": [], "items": []}
        reader = self._reader(root, domain, period, train=False, batch_size=batch_size)
        progress = Progress(len(reader), f"{domain} period {period}: scoring", log,
                            enabled=self.env.is_main)
        for host, batch in on_device(reader, self.env.device):
            progress.tick(len(host))
            scores.append(torch.sigmoid(self.dmp(batch.sparse, batch.dense).logits)
                          if outputs is None else outputs(batch))
            parts["labels"].append(host.labels)  # ids and labels from the host copy
            parts["users"].append(host.user_ids)
            parts["items"].append(host.item_ids)
        progress.close()
        pred = {"p": torch.cat(scores).double().cpu().numpy(),
                "labels": torch.cat(parts["labels"]).double().numpy(),
                "users": torch.cat(parts["users"]).numpy(),
                "items": torch.cat(parts["items"]).numpy()}
        return gather_to_main(pred, self.env.device)

    def evaluate(self, root: DataRoot, domain: str, period: int,
                 scores: Path | None = None) -> dict[str, Any]:
        """The period's metrics, computed on rank 0 and returned on every rank; the scores
        (file order) written to `scores` (.npy) when given."""
        pred = self.predict(root, domain, period)
        metrics = None
        if pred is not None:
            if scores is not None:
                scores.parent.mkdir(parents=True, exist_ok=True)
                np.save(scores, pred["p"])
            oracle = None  # a synthetic world's, kept locally
            opath = None if is_uri(root) else oracle_path(Path(root), domain, period)
            # ranks read contiguous shares in file order: the oracle's rows line up
            if opath is not None and opath.exists():
                oracle = pq.read_table(opath, columns=[ORACLE_COLUMN])[ORACLE_COLUMN].to_numpy()
            metrics = evaluate_predictions(pred["labels"], pred["p"], pred["users"],
                                           pred["items"], self.seen, oracle)
        return from_main(metrics)


class DualEmbeddingTrainer(PeriodTrainer):
    """PeriodTrainer for the Dual Embedding baseline (`DualEmbeddingTower`), with a second
    embedding of the experiment's ID embedding tables (part of its config hash)."""

    kind = DUAL_EMBEDDING

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self.config_hash += ":" + ",".join(self.dual_tables())

    def dual_tables(self) -> list[str]:
        return self.cfg.experiment.id_tables(self.cfg.features)
