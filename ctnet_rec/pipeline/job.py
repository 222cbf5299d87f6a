"""`ctnet pipeline`: the paper's production loop (section 3.4, Algorithm 1) as one job.

For each period every domain of the pipeline has marked complete (`_SUCCESS`), in order:
1. the source domain's tower trains on it (a bad period is quarantined: not trained on);
2. for each target domain, unless its period is quarantined: its newest model not yet gated
   (the candidate) and the served model both score the period's rows, which neither has
   trained on; the candidate is promoted (exported and published under RUNS/serving/) unless
   it is worse than the served one by more than the margin or badly calibrated;
3. the target's model trains on the period: its own tower before `deploy_period`, then the
   configured model deployed from the towers of the period before it (CTNet trains with the
   newest source checkpoint of an earlier period, as `ctnet transfer run` does).

Each step runs in a fresh process of the experiment's job runner (a pipeline that watches
for months keeps no model's memory from one period to the next). Every step is recorded on
disk before the next starts, and each is idempotent (training
resumes after the newest checkpoint, a gate's decision is a file, publishing is atomic), so
the job killed anywhere and started again with the same command trains nothing twice and
skips nothing. RUNS/status.json and status.html are rewritten after every step.

Layout of RUNS: `source/` (the source tower's run), `<domain>/tower/` (a target's tower),
`<domain>/<model>/` (its deployed model), `pipeline/<domain>/gate/period=<t>.json` and
`pipeline/<domain>/quarantine/period=<t>.json` (the records), `pipeline/stopped.json` (why
the pipeline last stopped on an error), `serving/<domain>/`."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from ctnet_rec.config import Config
from ctnet_rec.data.contract import (
    MIN_TRAINING_ROWS,
    SUCCESS,
    DataError,
    list_domains,
    list_periods,
    period_labels,
    period_marks,
    validate_periods,
)
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.experiment.jobs import IsolatedRunner
from ctnet_rec.files import write_atomic
from ctnet_rec.modules.kinds import CTNET, DUAL_EMBEDDING
from ctnet_rec.pipeline.serving import prune_served, publish, served, serving_dir
from ctnet_rec.pipeline.status import write_status
from ctnet_rec.training.checkpoint import (
    INIT,
    CheckpointError,
    Manifest,
    complete_checkpoints,
    lineage_path,
)
from ctnet_rec.training.loop import trained_periods
from ctnet_rec.training.run_lock import run_lock

log = logging.getLogger(__name__)

SOURCE_RUN = "source"
TOWER_RUN = "tower"
RECORDS = "pipeline"


# a [pipeline] target's model after its deploy period -> the model kind it deploys
KINDS = {"ctnet": CTNET, "dual embedding": DUAL_EMBEDDING}


def run_name(model: str) -> str:
    return model.replace(" ", "-")


class Pipeline:
    """The pipeline over data root `data` and runs folder `runs`, configured by `cfg`."""

    def __init__(self, cfg: Config, data: DataRoot, runs: Path) -> None:
        self.cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train,
                                           keep_checkpoints=cfg.pipeline.keep_checkpoints))
        self.p = cfg.pipeline
        self.data, self.runs = data, runs
        self.domains = [self.p.source_domain, *self.p.targets]

    # -- where things are ------------------------------------------------------------------

    def record(self, domain: str, what: str, period: int) -> Path:
        return self.runs / RECORDS / domain / what / f"period={period}.json"

    def records(self, domain: str, what: str) -> dict[int, dict[str, Any]]:
        folder = self.runs / RECORDS / domain / what
        return {int(p.stem.split("=")[1]): json.loads(p.read_text())
                for p in sorted(folder.glob("period=*.json"))} if folder.is_dir() else {}

    def model_run(self, domain: str, period: int) -> Path:
        """The run that trains `domain`'s model on `period`."""
        model = self.p.targets[domain]
        if model == "base" or period < self.p.deploy_period:
            return self.runs / domain / TOWER_RUN
        return self.runs / domain / run_name(model)

    # -- what is ready ---------------------------------------------------------------------

    def ready(self) -> list[int]:
        """Periods every domain has marked complete, in order."""
        have = set(list_domains(self.data))
        missing = [d for d in self.domains if d not in have]
        if missing:
            raise DataError(f"{self.data}: no folder for domain(s) {missing} (domains: "
                            f"{sorted(have)})")
        common = set.intersection(*(set(list_periods(self.data, d, marked_only=True))
                                    for d in self.domains))
        return sorted(common)

    def done(self) -> int:
        """The newest period fully processed (-1: none): the source's and every target's
        steps for it are on disk."""
        trained: dict[Path, set[int]] = {}  # each run's record read once, not once a period
        quarantined = {d: set(self.records(d, "quarantine")) for d in self.domains}

        def processed(domain: str, period: int) -> bool:
            run = self._run_of(domain, period)
            if run not in trained:
                trained[run] = set(trained_periods(run))
            return period in quarantined[domain] or period in trained[run]

        last = -1
        for t in self.ready():
            if all(processed(d, t) for d in self.domains):
                last = t
            else:
                break
        return last

    def waiting_for(self, done: int) -> str | None:
        """What the period after `done` waits for, for a person: which domains have not
        marked it complete yet (None: a period is ready)."""
        marks = {d: period_marks(self.data, d) for d in self.domains}
        marked = {d: m[0] for d, m in marks.items()}
        unmarked = {d: m[1] for d, m in marks.items()}
        if any(t > done for t in set.intersection(*marked.values())):
            return None
        later = [t for d in self.domains for t in marked[d] | unmarked[d] if t > done]
        period = min(later, default=done + 1)
        unmarked_now = [d for d in self.domains if period in unmarked[d]]
        absent = [d for d in self.domains if period not in marked[d] | unmarked[d]]
        never = [d for d in self.domains if unmarked[d] and not marked[d]]
        why = ([f"no {SUCCESS} in the folder of {', '.join(unmarked_now)}"] if unmarked_now
               else []) + ([f"no folder of {', '.join(absent)}"] if absent else [])
        return f"period {period}: " + "; ".join(why) + (
            f" ({', '.join(never)}: no period folder has {SUCCESS}; a period is taken once its "
            "writer has written it there, last: mark the finished ones)" if never else "")

    def _run_of(self, domain: str, period: int) -> Path:
        """The run that trains `domain` on `period`: the source's, or a target's model's."""
        return self.runs / SOURCE_RUN if domain == self.p.source_domain \
            else self.model_run(domain, period)

    # -- bad periods -----------------------------------------------------------------------

    def check_period(self, domain: str, period: int) -> str | None:
        """Why `period` of `domain` is not fit to train on (None: it is): the contract's
        checks, then its row count and click rate against the domain's recent good periods."""
        try:
            validate_periods(self.data, domain, [period], self.cfg.features)
            labels = period_labels(self.data, domain, period, self.cfg.features)
        except DataError as e:
            return f"bad data: {e}"
        if len(labels) < MIN_TRAINING_ROWS:  # the steps run in one process
            return (f"{len(labels)} row(s): a training step's batch norm needs at least "
                    f"{MIN_TRAINING_ROWS}")
        quarantined = self.records(domain, "quarantine")
        recent = [t for t in sorted(list_periods(self.data, domain))
                  if t < period and t not in quarantined][-self.p.recent_periods:]
        if len(recent) < 2:
            return None
        stats = [period_labels(self.data, domain, t, self.cfg.features) for t in recent]
        rows = statistics.median(len(s) for s in stats)
        ctr = statistics.median(float(s.mean()) for s in stats)
        if not rows / self.p.rows_factor <= len(labels) <= rows * self.p.rows_factor:
            return (f"{len(labels):,} rows, the median of periods {recent} is {rows:,.0f} "
                    f"(rows_factor {self.p.rows_factor})")
        rate = float(labels.mean()) if len(labels) else 0.0
        if not ctr / self.p.ctr_factor <= rate <= ctr * self.p.ctr_factor:
            return (f"click rate {rate:.4f}, the median of periods {recent} is {ctr:.4f} "
                    f"(ctr_factor {self.p.ctr_factor})")
        return None

    def _quarantined(self, domain: str, period: int) -> bool:
        """Whether `period` of `domain` is quarantined: decided once, then recorded."""
        path = self.record(domain, "quarantine", period)
        if path.exists():
            return True
        if period in trained_periods(self._run_of(domain, period)):  # trained: it passed
            return False
        reason = self.check_period(domain, period)
        if reason is None:
            return False
        log.warning("%s period %d quarantined: %s", domain, period, reason)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"period": period, "reason": reason}) + "\n")
        return True

    # -- the steps -------------------------------------------------------------------------

    def train_source(self, period: int) -> None:
        from ctnet_rec.training.loop import train_continual

        if not self._quarantined(self.p.source_domain, period):
            train_continual(self.cfg, self.data, self.p.source_domain, [period],
                            self.runs / SOURCE_RUN, resume=True, evaluate=False)

    def gate(self, domain: str, period: int) -> None:
        """Score the newest model of `domain` not yet gated and the served one on `period`'s
        rows; promote the first if the rule says so. Recorded, so it is done once."""
        from ctnet_rec.pipeline.gate import decide
        from ctnet_rec.serving.export import evaluate_export
        from ctnet_rec.training.inference import evaluate_checkpoint

        candidate = self._candidate(domain, period)
        if candidate is None:
            return
        path = self.record(domain, "gate", period)
        if path.exists():
            decision = json.loads(path.read_text())
        else:
            now = served(self.runs, domain)
            scores = {"candidate": evaluate_checkpoint(candidate, self.data, domain, period)}
            if now is not None:  # the served artifact itself
                scores["serving"] = evaluate_export(
                    serving_dir(self.runs, domain) / f"period={now['period']}", self.data,
                    domain, period)
            promote, reason = decide(scores["candidate"], scores.get("serving"), self.p)
            decision = {"period": period, "candidate": _summary(scores["candidate"]),
                        "serving": _summary(scores["serving"]) if now else None,
                        "serving_period": now["period"] if now else None,
                        "promote": promote, "reason": reason}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(decision, indent=1, sort_keys=True) + "\n")
            log.info("%s: candidate of period %d on period %d's rows: %s (%s)", domain,
                     decision["candidate"]["trained_through"], period,
                     "promoted" if promote else "kept out", reason)
        if decision["promote"]:
            self._publish(domain, candidate, decision)

    def _candidate(self, domain: str, period: int) -> Path | None:
        """The newest checkpoint of `domain`'s model trained before `period`."""
        runs = {self.model_run(domain, t) for t in range(period)}
        found = {t: f for run in runs for t, f in complete_checkpoints(run).items()
                 if t < period}
        return found[max(found)] if found else None

    def _publish(self, domain: str, ckpt: Path, decision: dict[str, Any]) -> None:
        manifest = Manifest.read(ckpt)
        now = served(self.runs, domain)
        if now is not None and now["period"] == manifest.period:
            return  # published before a restart
        source = source_of(ckpt)
        publish(self.runs, domain, manifest.period, ckpt.resolve(), {
            "model": manifest.kind, "source_checkpoint": str(source) if source else None,
            "source_period": Manifest.read(source).period if source else None,
            "gate": decision})
        prune_served(self.runs, domain, self.p.keep_checkpoints)

    def train_target(self, domain: str, period: int) -> None:
        from ctnet_rec.training.deployments import Deployment, deploy, trainer_for
        from ctnet_rec.training.loop import train_continual
        from ctnet_rec.training.transfer import transfer_run

        run = self.model_run(domain, period)
        model = self.p.targets[domain]
        if run.name == TOWER_RUN:
            train_continual(self.cfg, self.data, domain, [period], run, resume=True,
                            evaluate=False)
            return
        if not (run / INIT / "manifest.json").exists():
            deploy(Deployment(KINDS[model]), self.cfg,
                   _newest(self.runs / SOURCE_RUN, self.p.deploy_period),
                   _newest(self.runs / domain / TOWER_RUN, self.p.deploy_period), run)
        if model == "ctnet":
            transfer_run(run, self.data, domain, [period], self.runs / SOURCE_RUN,
                         evaluate=False)
        else:
            deployment = Deployment(KINDS[model])
            train_continual(self.cfg, self.data, domain, [period], run, init=run / INIT,
                            resume=True, evaluate=False,
                            trainer_cls=partial(trainer_for, deployment))

    def target_step(self, domain: str, period: int) -> None:
        """A target's part of a period: quarantine or gate, then train."""
        if self._quarantined(domain, period):
            return
        self.gate(domain, period)
        write_status(self)
        self.train_target(domain, period)

    def step(self, period: int, runner: IsolatedRunner) -> None:
        """Everything for one period: the source first, then the targets (side by side when
        the runner has several workers). Each in a fresh process of `runner`: a pipeline that
        runs for months keeps no model's memory from one period to the next."""
        runner.submit(partial(_source_step, self.cfg, self.data, self.runs, period),
                      "pipeline source").result()
        write_status(self)
        futures = [runner.submit(partial(_target_step, self.cfg, self.data, self.runs, domain,
                                         period), f"pipeline {domain}")
                   for domain in self.p.targets]
        errors = [e for f in futures if (e := f.exception()) is not None]
        write_status(self)
        if errors:
            raise errors[0]

    def run(self, once: bool, until: int | None) -> int:
        """Process the ready periods in order; with `once` stop when none is left, else
        wait for more (until period `until` is done). Returns the newest period done. One
        pipeline per runs folder: a second one started on it is refused, naming the first
        (both would gate, publish and train the same periods)."""
        self.ready()  # a data root it cannot read is refused before anything is written
        with run_lock(self.runs):
            return self._run(once, until)

    def _run(self, once: bool, until: int | None) -> int:
        runner = IsolatedRunner(preload=[__name__],
                                workers=min(self.p.parallel_jobs, len(self.p.targets)))
        self.stopped_record.unlink(missing_ok=True)  # running again
        period: int | None = None  # the one being processed
        told = None  # what the log last said the pipeline waits for
        try:
            while True:
                period = None
                done = self.done()
                todo = [t for t in self.ready() if t > done and (until is None or t <= until)]
                for period in todo:
                    log.info("pipeline: period %d", period)
                    self.step(period, runner)
                waiting = write_status(self)["waiting_for"]
                if waiting is not None and waiting != told:
                    log.info("pipeline: waiting for %s", waiting)
                    told = waiting
                done = self.done()
                if once or (until is not None and done >= until):
                    return done
                time.sleep(self.p.poll_seconds)
        except Exception as e:  # recorded for the status page, then raised as it was
            self._record_stop(e, period)
            raise
        finally:
            runner.close()

    def _record_stop(self, error: Exception, period: int | None) -> None:
        """Write why the pipeline stops, and the status page showing it; a page that cannot
        be rebuilt now (the data root gone, say) is left as it was: the error is what counts."""
        self.stopped_record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.stopped_record, json.dumps({
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "period": period, "error": f"{type(error).__name__}: {error}"}) + "\n")
        try:
            write_status(self)
        except (DataError, OSError) as e:
            log.warning("status page not updated: %s", e)

    @property
    def stopped_record(self) -> Path:
        """Why the pipeline last stopped on an error (absent while it runs, or after a clean
        end): for the status page, whose reader may not see the log."""
        return self.runs / RECORDS / "stopped.json"


def _source_step(cfg: Config, data: DataRoot, runs: Path, period: int) -> None:
    """The source's part of a period, in a process of its own."""
    Pipeline(cfg, data, runs).train_source(period)


def _target_step(cfg: Config, data: DataRoot, runs: Path, domain: str, period: int) -> None:
    """A target's part of a period, in a process of its own."""
    Pipeline(cfg, data, runs).target_step(domain, period)


def source_of(ckpt: Path) -> Path | None:
    """The source checkpoint a CTNet checkpoint's lineage names (None: another kind)."""
    entry = Manifest.read(ckpt).lineage.get("source_checkpoint")
    return lineage_path(ckpt, entry) if isinstance(entry, str) else None


def _newest(run: Path, before: int) -> Path:
    """The newest checkpoint of `run` of a period before `before`."""
    found = {t: f for t, f in complete_checkpoints(run).items() if t < before}
    if not found:
        raise CheckpointError(f"{run}: no checkpoint of a period before {before} to deploy "
                              "from (every period before deploy_period quarantined?)")
    return found[max(found)]


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a gate keeps of a model's metrics."""
    keep = ("auc", "gauc", "logloss", "ctr_pred", "ctr_true", "rows", "model",
            "trained_through_period", "nonfinite_scores")
    out = {k: metrics[k] for k in keep if k in metrics}
    if "trained_through_period" in out:
        out["trained_through"] = out.pop("trained_through_period")
    return out
