"""Continual transfer (the paper's Algorithm 1): deploy CTNet from two single-domain
checkpoints, then per period load the newest source checkpoint into the frozen source tower
and train the target tower and adapters on that period's target data only.

Indexing. A checkpoint `period=<p>` is a model trained on data up to and including period p,
i.e. the paper's h_{p+1}, the model in service during period p + 1. Deploying at t0 uses
both towers' `period=<t0 - 1>` checkpoints (h^S_t0, h_t0). Training on period t then uses the
newest source checkpoint of a period < t (h^S_t: what is in service while t's data arrives),
so the first trained period, t0, uses the source CTNet was deployed with, and CTNet and
transfer-once coincide there, as in the paper's Table 3. `[ctnet] source_lag = 0` uses the
source checkpoint of period t itself (trained on the source's data of the same period: a
schedule where the source finishes first), one period fresher."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from ctnet_rec.config import (
    Config,
    OptimizerConfig,
    ShardingConfig,
)
from ctnet_rec.data.batch import on_device
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.dist_env import DistEnv
from ctnet_rec.files import PathArg, writable_folder
from ctnet_rec.modules.ctnet import CTNet
from ctnet_rec.modules.id_mapping import set_period
from ctnet_rec.modules.kinds import CTNET, ModelSpec
from ctnet_rec.training.checkpoint import (
    INIT,
    MANIFEST,
    CheckpointError,
    Manifest,
    check_tower_checkpoint,
    check_tower_pair,
    complete_checkpoints,
    config_of,
    feature_schema,
    latest_intact_checkpoint,
    lineage_entry,
    lineage_path,
    load_into_submodule,
    read_seen_ids,
)
from ctnet_rec.training.collectives import from_main
from ctnet_rec.training.distributed import init_distributed
from ctnet_rec.training.loop import evaluation_periods, run_periods
from ctnet_rec.training.optim import NamedParams
from ctnet_rec.training.output_fusion import PooledEvidence, best_weight
from ctnet_rec.training.retention import lease, run_of
from ctnet_rec.training.run_lock import run_lock
from ctnet_rec.training.trainer import PeriodTrainer

log = logging.getLogger(__name__)

SOURCE, TARGET, ADAPTERS = "source.", "target.", ("adapters.", "input_adapters.")
FUSION_EVIDENCE = "fusion_evidence"  # a manifest's metrics key: the pooled fits so far


class CTNetTrainer(PeriodTrainer):
    """PeriodTrainer for CTNet: the source tower's tables are read-only (no optimiser state),
    its dense layers frozen. Checkpoints hold target + adapters; the source comes from the
    source checkpoint named in the lineage."""

    kind = CTNET

    def __init__(self, cfg: Config, source_cfg: Config, env: DistEnv) -> None:
        self.source_cfg = source_cfg
        self.source_ckpt: Path | None = None
        self.source_period: int | None = None
        self.source_digest: str | None = None  # of the source's contents, when recorded
        # the output fusion's fits so far, with `output_fusion_evidence = "pooled"`
        self.fusion_evidence = PooledEvidence()
        super().__init__(cfg, env)
        self.hashed_sections = ("features", "model", "ctnet")
        self.config_hash = cfg.section_hash(*self.hashed_sections) + \
            source_cfg.section_hash("features", "model")
        self.schema = {**feature_schema(cfg), "source": feature_schema(source_cfg)}

    def model_spec(self) -> ModelSpec:
        return ModelSpec(CTNET, self.cfg, self.source_cfg)

    def steps_leave_parameters_unused(self) -> bool:
        """With shared long-sequence attention the target tower's own SIM/ETA units are
        never used (it reads the source's outputs)."""
        return self.cfg.ctnet.share_long_sequence_attention

    def parameter_groups(self, dense: NamedParams) -> dict[str, tuple[NamedParams,
                                                                       OptimizerConfig]]:
        """The adapters train with their own optimiser settings (`[ctnet.adapter_optimizer]`),
        the target tower's dense layers with the towers' (`[train.dense]`)."""
        adapters = [(n, p) for n, p in dense if n.startswith(ADAPTERS)]
        return {"dense": ([(n, p) for n, p in dense if not n.startswith(ADAPTERS)],
                          self.cfg.train.dense),
                "adapters": (adapters, self.cfg.ctnet.adapter_optimizer)}

    def manifest(self, period: int, metrics: dict[str, Any],
                 lineage: dict[str, Any]) -> Manifest:
        if self.pools_fusion_evidence:  # in every checkpoint, mid-period ones too
            metrics = {**metrics, FUSION_EVIDENCE: self.fusion_evidence.to_json()}
        m = super().manifest(period, metrics, lineage)
        m.source_config = dataclasses.asdict(self.source_cfg)
        m.lineage = {"source_period": self.source_period, "source_digest": self.source_digest,
                     **lineage}
        return m

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["model"] = {k: v for k, v in state["model"].items() if not k.startswith(SOURCE)}
        return state

    def save(self, folder: Path, period: int, metrics: dict[str, Any],
             lineage: dict[str, Any] | None = None,
             per_rank: dict[str, np.ndarray] | None = None) -> None:
        """As any checkpoint, with the source checkpoint named relative to `folder`."""
        assert self.source_ckpt is not None, "a CTNet is saved with its source loaded"
        source = {"source_checkpoint": lineage_entry(folder, self.source_ckpt)}
        super().save(folder, period, metrics, {**(lineage or {}), **source}, per_rank)

    def load_source(self, folder: Path) -> None:
        """Source tower transfer: the source tower's weights become the checkpoint's; nothing
        else changes (the target, the adapters and every optimiser state stay)."""
        manifest = check_tower_checkpoint(folder, self.source_cfg, "source")
        state = {"model": self.dmp.state_dict()}
        load_into_submodule(folder, state, SOURCE)
        self.dmp.load_state_dict(state["model"])
        self.source_ckpt, self.source_period = folder.resolve(), manifest.period
        self.source_digest = manifest.digest()
        log.info("source tower <- %s (source period %d)", folder, manifest.period)

    def load_target(self, folder: Path) -> Manifest:
        """Every target parameter and its optimiser state from a single-domain checkpoint,
        with the ids it had seen (so cold-start slices stay relative to the target's data)."""
        manifest = check_tower_checkpoint(folder, self.cfg, "target")
        state = self.state()
        load_into_submodule(folder, state, TARGET)
        self.load_state(state)
        self.seen = read_seen_ids(folder)
        return manifest

    def train_period(self, root: DataRoot, domain: str, period: int) -> dict[str, Any]:
        """With `output_fusion`, the metrics record the fused output's weight and offset
        (fitted before the period: `fit_output_fusion`)."""
        metrics = super().train_period(root, domain, period)
        if self.cfg.ctnet.output_fusion:
            net = self.dmp.module
            metrics["fusion_weight"] = round(float(net.fusion_weight), 4)  # a float32 buffer
            metrics["fusion_offset"] = round(float(net.fusion_offset), 6)
        return metrics

    @property
    def pools_fusion_evidence(self) -> bool:
        return self.cfg.ctnet.output_fusion and self.cfg.ctnet.output_fusion_evidence == "pooled"

    def fit_output_fusion(self, root: DataRoot, domain: str, period: int) -> None:
        """w and c of logit = target + w (source - c) from the period's rows, scored by the
        model as it stands, before anything trains on them: c the source logit's mean (the
        click rate stays the target's), w the AUC-best weight kept only beyond chance when
        `output_fusion_min_z` says so (`best_weight`), or with pooled evidence the best on
        every fit so far (`PooledEvidence`). Out of sample
        only if the source held has not seen the period either (see `transfer_run`)."""
        net = self.dmp.module
        parts = self.predict(root, domain, period,
                             outputs=lambda b: net.output_parts(b.sparse, b.dense))
        fit = None
        if parts is not None:  # rank 0
            target, source = parts["p"][:, 0], parts["p"][:, 1]
            offset, min_z = float(source.mean()), self.cfg.ctnet.output_fusion_min_z
            if self.pools_fusion_evidence:
                evidence = self.fusion_evidence.add(parts["labels"], target, source - offset)
                fit = evidence.weight(min_z), offset, evidence
            else:
                fit = best_weight(parts["labels"], target, source - offset, min_z), offset, \
                    self.fusion_evidence
        weight, offset, self.fusion_evidence = from_main(fit)
        net.fusion_weight.fill_(weight)
        net.fusion_offset.fill_(offset)
        log.info("%s period %d: output fusion weight %.1f (source logit offset %.4f), fitted "
                 "on the period's rows before training on them", domain, period, weight, offset)

    def adapter_pass(self, root: DataRoot, domain: str, period: int) -> None:
        """`adapter_prequential_pass`: one pass over the period's rows that trains the
        adapters alone, before the period's training. The target tower is frozen for it: its
        lookups run without gradients (the fused table optimisers never see one), its batch
        norm reads its running statistics without moving them, and only the adapters'
        optimiser steps (the target's dense gradients are dropped)."""
        net = self.dmp.module
        set_period(self.dmp, period)
        self.dmp.train()
        net.target.eval()
        net.target_lookups_frozen = True
        steps = 0
        try:
            reader = self._reader(root, domain, period, train=True)
            for _, batch in on_device(reader, self.env.device):
                loss = F.binary_cross_entropy_with_logits(
                    self.dmp(batch.sparse, batch.dense).logits, batch.labels)
                self.dense_opt.zero_grad()
                loss.backward()
                self.dense_opt.step(only="adapters")
                steps += 1
        finally:
            self.dense_opt.zero_grad()
            net.target_lookups_frozen = False
            self.dmp.train()
        log.info("%s period %d: adapters trained alone on the period's rows first (%d steps)",
                 domain, period, steps)

    def evaluate(self, root: DataRoot, domain: str, period: int,
                 scores: Path | None = None) -> dict[str, Any]:
        """The metrics, and beside them (`without_adapters`) those of the same model with
        its adapters adding nothing: whether the source is used, and whether it helps."""
        metrics = super().evaluate(root, domain, period, scores)
        with adapters_off(self.dmp.module):
            bare = super().evaluate(root, domain, period)
        metrics["without_adapters"] = {k: v for k, v in bare.items() if k != "oracle"}
        return metrics

    def restore(self, folder: Path) -> Manifest:
        manifest = super().restore(folder)
        self.fusion_evidence = PooledEvidence()
        if self.pools_fusion_evidence and FUSION_EVIDENCE in manifest.metrics:
            try:
                self.fusion_evidence = PooledEvidence.from_json(manifest.metrics[FUSION_EVIDENCE])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{folder / MANIFEST}: metrics.{FUSION_EVIDENCE} is not "
                                      f"the output fusion's evidence ({e!r})") from e
        source = lineage_path(folder, manifest.lineage["source_checkpoint"])
        if not source.exists():
            raise CheckpointError(
                f"{folder}: the source checkpoint its lineage names, {source}, is missing "
                "(moved or deleted); put it back there, or move the whole runs folder "
                "together (lineages are relative)")
        self.load_source(source)
        recorded = manifest.lineage.get("source_digest")
        if recorded and self.source_digest and recorded != self.source_digest:
            raise CheckpointError(
                f"{folder}: its source checkpoint {source} holds other contents than the one "
                "it was trained with (retrained or replaced at the same path)")
        return manifest


@contextmanager
def adapters_off(net: CTNet) -> Iterator[None]:
    """CTNet scoring as its target tower alone, for the block; then as before."""
    before, net.use_adapters = net.use_adapters, False
    try:
        yield
    finally:
        net.use_adapters = before


def transfer_init(cfg: Config, source_ckpt: PathArg, target_ckpt: PathArg, run: PathArg,
                  source_cfg: Config | None = None) -> Path:
    """`ctnet transfer init`: CTNet at t0, saved as RUN/init. The source tower's config is
    the one its checkpoint records unless given."""
    source_ckpt, target_ckpt, run = Path(source_ckpt), Path(target_ckpt), Path(run)
    env = init_distributed(cfg.train.device)
    if source_cfg is None:
        source_cfg = config_of(Manifest.read(source_ckpt), source_ckpt)
    source = check_tower_checkpoint(source_ckpt, source_cfg, "source")  # before building
    target = check_tower_checkpoint(target_ckpt, cfg, "target")
    check_tower_pair(source_ckpt, source, target_ckpt, target)
    trainer = CTNetTrainer(cfg, source_cfg, env)
    trainer.load_source(source_ckpt)
    target = trainer.load_target(target_ckpt)
    folder = trainer.save_init(run, source_ckpt, target_ckpt,
                               target_domain=target.metrics.get("domain"))
    log.info("CTNet deployed in %s: target %s (period %d) + source %s", folder, target_ckpt,
             target.period, source_ckpt)
    return folder


def source_schedule(source_ckpts: Path, periods: list[int], cfg: Config, domain: str,
                    lag: int = 1) -> dict[int, Path]:
    """For each period t, the newest complete source checkpoint of a period <= t - `lag`
    (lag 1: Algorithm 1's h^S_t, see the module's docstring); refused before any training
    when one is missing, does not fit the source tower or was trained on the target
    `domain` (the target's own run given as the source)."""
    if not source_ckpts.is_dir():
        raise CheckpointError(f"{source_ckpts}: no such folder (--source-ckpts names the "
                              "source domain's run)")
    available = complete_checkpoints(source_ckpts)
    schedule = {}
    for t in periods:
        older = [p for p in available if p <= t - lag]
        if not older:
            raise CheckpointError(
                f"{source_ckpts}: no source checkpoint of a period <= {t - lag} (have "
                f"{sorted(available) or 'none'})")
        schedule[t] = available[max(older)]
    for folder in sorted(set(schedule.values())):
        trained_on = check_tower_checkpoint(folder, cfg, "source").metrics.get("domain")
        if trained_on == domain:
            raise CheckpointError(f"{folder}: trained on domain {domain!r}, the target's own; "
                                  "--source-ckpts names the source domain's run")
    return schedule


def transfer_run(run: PathArg, data: DataRoot, domain: str, periods: Iterable[int],
                 source_ckpts: PathArg | None, sharding: ShardingConfig | None = None,
                 allow_domain_change: bool = False,
                 publish: Callable[[], None] | None = None,
                 evaluate: bool = True) -> list[dict[str, Any]]:
    """`ctnet transfer run`: continues from the newest CTNet checkpoint of RUN (RUN/init at
    first), so a re-run after a crash resumes; periods already trained are skipped. The
    tables are placed as RUN/init's config says, or by `sharding`. `publish` (rank 0, after
    each period) gives a run at a URI its new period; without `evaluate` no period after a
    trained one is scored."""
    from ctnet_rec.data.contract import validate_periods

    run, source_ckpts = Path(run), None if source_ckpts is None else Path(source_ckpts)
    start = latest_intact_checkpoint(run) or run / INIT
    if not (start / MANIFEST).exists():
        raise CheckpointError(f"{run}: no CTNet here yet; deploy one with `ctnet transfer init`")
    manifest = Manifest.read(start)
    trained_on = manifest.model_domain()
    if trained_on is not None and trained_on != domain and not allow_domain_change:
        raise CheckpointError(f"{start}: its target tower is domain {trained_on!r}'s model, "
                              f"--domain is {domain!r}; --allow-domain-change if that is meant")
    cfg, source_cfg = config_of(manifest, start), config_of(manifest, start, source=True)
    if sharding is not None:
        cfg = dataclasses.replace(cfg, sharding=sharding)
    env = init_distributed(cfg.train.device)
    periods = [t for t in periods if t > manifest.period]
    if len(periods) == 0:
        log.info("%s: already trained through period %d", run, manifest.period)
        return []
    validate_periods(data, domain, periods + (evaluation_periods(data, domain, periods)
                                              if evaluate else []), cfg.features)
    refresh = cfg.ctnet.source_refresh == "every_period"
    if refresh and source_ckpts is None:
        raise CheckpointError("source_refresh = 'every_period' needs --source-ckpts")
    schedule = source_schedule(source_ckpts, periods, source_cfg, domain,
                               cfg.ctnet.source_lag) if refresh and source_ckpts else {}
    if env.is_main:  # before any training: not after the first period
        writable_folder(run / "checkpoints", "run folder")
    trainer = CTNetTrainer(cfg, source_cfg, env)
    trainer.restore(start)
    log.info("CTNet from %s (period %d); source refresh: %s", start, manifest.period,
             cfg.ctnet.source_refresh)

    def before_period(t: int) -> dict[str, Any]:
        # the output fusion's weight is fitted on t's rows with the source of period t - 1,
        # the newest that has not trained on period t: with source_lag 0 the one held until
        # now (t's own has seen the same users' clicks of the same period in its domain, and
        # would look more useful on t's rows than it is on t + 1's), with lag 1 the next
        fit = cfg.ctnet.output_fusion and not trainer.resumes_inside(t)
        if fit and cfg.ctnet.source_lag == 0:
            trainer.fit_output_fusion(data, domain, t)
        if refresh and schedule[t].resolve() != trainer.source_ckpt:
            trainer.load_source(schedule[t])
        if fit and cfg.ctnet.source_lag == 1:
            trainer.fit_output_fusion(data, domain, t)
        # after the fusion's fit: that one scores rows nothing has trained on
        if cfg.ctnet.adapter_prequential_pass and not trainer.resumes_inside(t):
            trainer.adapter_pass(data, domain, t)
        return {"resumed_from": str(start)}

    held = lease(run_of(source_ckpts), schedule.values()) \
        if schedule and source_ckpts and env.is_main \
        else nullcontext()
    with run_lock(run, held=env.is_main), held:
        return run_periods(trainer, data, domain, periods, run, before_period, evaluate,
                           publish)
