"""`ctnet experiment`: the paper's comparison, run end to end on one dataset.

Every model is deployed and trained with the library's own jobs (the table of model kinds'
`deploy`, `train_continual`, `transfer_run`, `evaluate_checkpoint`) into its own run folder
under OUT, so an interrupted experiment resumes where it stopped and each model's
checkpoints stay inspectable.

    OUT/<source>/                  source tower, continual on periods 0 .. last
    OUT/<target>/base/             target tower: warm-up 0 .. t0-1, then Base t0 .. last
    OUT/<target>/<ctnet variant>/  deployed from both towers' period t0-1 checkpoints
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ctnet_rec.config import Config, ConfigError, dotted_values
from ctnet_rec.data.contract import DataError, list_periods, period_labels
from ctnet_rec.data.storage import DataRoot, join
from ctnet_rec.experiment.baselines import Depth, pretrain_finetune_init, replaced_tables
from ctnet_rec.experiment.jobs import IsolatedRunner, Job, Progress, run_in_order, torch_threads
from ctnet_rec.experiment.late_fusion import run_late_fusion
from ctnet_rec.experiment.significance import delong_difference
from ctnet_rec.files import read_jsonl, write_atomic
from ctnet_rec.modules.dual_embedding import dual_features
from ctnet_rec.modules.kinds import CTNET, DUAL_EMBEDDING, JOINT
from ctnet_rec.training.checkpoint import INIT, complete_checkpoints, period_dir
from ctnet_rec.training.deployments import Deployment, deploy, trainer_for
from ctnet_rec.training.inference import evaluate_checkpoint
from ctnet_rec.training.loop import SCORES, train_continual
from ctnet_rec.training.run_lock import run_lock
from ctnet_rec.training.transfer import transfer_run

log = logging.getLogger(__name__)

BASE, SOURCE, ORACLE = "Base", "Source domain model", "Oracle (true p)"
FINETUNE_SWEEP = "Pre-train & Fine-tune sweep"
DUAL = "Dual Embedding"
PRETRAIN_FINETUNE: dict[str, Depth] = {
    "Pre-train & Fine-tune (ID embeddings)": "id",
    "Pre-train & Fine-tune (all embeddings)": "embeddings",
    "Pre-train & Fine-tune (all parameters)": "all",
}
FINETUNE_PERIODS = (1, 2, 4)  # Table 4: periods of fine-tuning data, plus "all of them"
CTNET_ROW = "CTNet"
CTNET_VARIANTS: dict[str, dict[str, Any]] = {
    "CTNet transfer-once": {"source_refresh": "once"},
    "CTNet w/o GLU": {"adapter": "linear"},
    "CTNet": {},
}


WARM_UP, SOURCE_TOWER = "warm-up", "source tower"
FOUNDATIONS = (SOURCE_TOWER, WARM_UP, "Base")  # jobs whose failure ends the experiment
DIN, DIN_WARM_UP = "DIN", "DIN warm-up"
# Base's logit + w x the source tower's, w chosen on the previous test (`late_fusion`)
LATE_FUSION, LATE_FUSION_DIR = "Late fusion (Base + w x Source)", "late-fusion"


def din_config(cfg: Config) -> Config:
    """The DIN row: the target tower's features, tables and MLP, with DIN's activation unit on
    the short behaviour sequence in place of the Transformer + target attention, and without
    the long-sequence modules (DIN has none)."""
    din = copy.deepcopy(cfg)
    din.model = dataclasses.replace(din.model, short_sequence="din", use_sim=False,
                                    use_eta=False)
    return din


@dataclass
class Results:
    """Per model, per target domain, per trained period t: the metrics on period t + 1."""

    settings: dict[str, Any]
    models: dict[str, dict[str, dict[int, dict[str, Any]]]]
    # per job (model, domain): seconds, peak_rss_mb, target_samples, source_samples
    costs: dict[str, dict[str, dict[str, float]]]
    # Table 4: per target domain, per number of fine-tuning periods, the metrics on last + 1
    finetune_sweep: dict[str, dict[int, dict[str, Any]]]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Results:
        """Back from OUT/metrics.json (periods are keys there, hence strings)."""
        return cls(raw["settings"], {m: {d: {int(t): v for t, v in per.items()}
                                         for d, per in doms.items()}
                                     for m, doms in raw["models"].items()},
                   raw["costs"], {d: {int(k): v for k, v in per.items()}
                                  for d, per in raw["finetune_sweep"].items()})

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "costs": self.costs,
                "models": {m: {d: {str(t): v for t, v in per.items()}
                               for d, per in doms.items()}
                           for m, doms in self.models.items()},
                "finetune_sweep": {d: {str(k): v for k, v in per.items()}
                                   for d, per in self.finetune_sweep.items()}}


QUICK_ROWS = {"A": 4000, "B": 1000, "C": 600}  # impressions per period in --quick


def quick(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """The same experiment on a small world (600 users, 5 periods) with 2 periods after
    deployment: a first look in minutes, and what the test suite runs. Only sizes change;
    the world's dynamics (drift, shares, rates) stay those of `cfg`. An override of `cfg`
    (`--set`) that this would replace is refused, naming both values."""
    q = _quick(cfg)
    given, small = dotted_values(cfg), dotted_values(q)
    for item in overrides:
        key = item.partition("=")[0].strip()  # a setting, or a table of them
        replaced = [k for k in given if (k == key or k.startswith(f"{key}."))
                    and given[k] != small[k]]
        if replaced:
            raise ConfigError(f"--set {item}: --quick sets {replaced[0]} to "
                              f"{small[replaced[0]]!r} itself; drop one of them")
    return q


def _quick(cfg: Config) -> Config:
    q = copy.deepcopy(cfg)
    q.synth = dataclasses.replace(
        q.synth, periods=5, num_users=600, num_items_initial=800, new_items_per_period=100,
        num_categories=20, num_sellers=100, burn_in_periods=2, short_history_max=20,
        long_history_max=40,
        domains={name: dataclasses.replace(d, impressions_per_period=QUICK_ROWS.get(
            name, d.impressions_per_period)) for name, d in q.synth.domains.items()})
    q.experiment = dataclasses.replace(q.experiment, deploy_period=2, periods=2)
    q.data = dataclasses.replace(q.data, batch_size=256)
    return q


def metrics_by_period(run: Path) -> dict[int, dict[str, Any]]:
    """Per trained period, the metrics on the next one; empty for a run that never trained."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    return {m["period"]: m["eval"] for m in read_jsonl(path) if "eval" in m}


def check_periods(cfg: Config, data: DataRoot) -> None:
    """Refuse an experiment whose periods the dataset does not have, before any training."""
    e = cfg.experiment
    need = list(range(e.last_period() + 2))
    for domain in [e.source_domain, *e.target_domains]:
        have = set(list_periods(data, domain))
        missing = [t for t in need if t not in have]
        if missing:
            raise DataError(
                f"{join(data, domain)}: the experiment (deploy_period {e.deploy_period}, periods "
                f"{e.periods}) needs periods 0..{e.last_period() + 1}, missing {missing}")


EXPERIMENT_CONFIG = "config.json"  # OUT/config.json: the settings its models trained with
# what an experiment's results depend on: every section but the pipeline's, and of the
# experiment's own settings all but how many jobs run at a time
RESULT_SECTIONS = ("features", "model", "ctnet", "train", "sharding", "data", "synth",
                   "experiment")


def check_same_settings(cfg: Config, out: Path) -> None:
    """Refuse to go on in OUT with settings other than those its models trained with: finished
    models are reused, not trained again, so the report would give their figures under the new
    settings. OUT records them the first time (an OUT of an earlier version: its metrics.json's)."""
    record = out / EXPERIMENT_CONFIG
    recorded = json.loads(record.read_text()) if record.exists() else \
        json.loads((out / "metrics.json").read_text())["settings"]["config"] \
        if (out / "metrics.json").exists() else None
    changes = [] if recorded is None else [
        c for c in cfg.setting_changes(recorded, *RESULT_SECTIONS)
        if not c.startswith("experiment.parallel_jobs ")]
    if changes:
        raise ConfigError(f"{out}: its models trained with other settings ({'; '.join(changes)}), "
                          "and finished models are reused, not trained again: give another --out")
    if not record.exists():
        write_atomic(record, json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")


def check_synthetic_world(cfg: Config) -> None:
    """Refuse an experiment that the config's synthetic world cannot hold (a domain [synth]
    does not make, more periods than it has) before the world is generated."""
    e, synth = cfg.experiment, cfg.synth
    unknown = [d for d in [e.source_domain, *e.target_domains] if d not in synth.domains]
    if unknown:
        raise ConfigError(f"[experiment] domain(s) {unknown}: not among the synthetic world's "
                          f"[synth.domains] {sorted(synth.domains)} (or give --data)")
    if e.last_period() + 2 > synth.periods:
        raise ConfigError(
            f"[experiment] deploy_period {e.deploy_period} and periods {e.periods} need periods "
            f"0..{e.last_period() + 1}; the synthetic world has [synth] periods {synth.periods}")


def transfer_baselines(cfg: Config) -> list[str]:
    """The transfer baselines this config allows: Pre-train & Fine-tune (all embeddings) is
    left out when every table is an ID table (it would be the (ID embeddings) row again);
    Dual Embedding copies the source's user and item rows into plain tables, so it is left
    out when those tables have managed ids."""
    finetunes = [name for name, depth in PRETRAIN_FINETUNE.items()
                 if depth != "embeddings"
                 or replaced_tables(cfg, "embeddings") != replaced_tables(cfg, "id")]
    ids = cfg.experiment.id_tables(cfg.features)
    if {t for _, t in dual_features(cfg.features, ids)} & cfg.features.managed_tables():
        return finetunes
    return [*finetunes, DUAL]


def plan(cfg: Config, data: DataRoot, out: Path, rows: Collection[str] | None = None,
         variants: dict[str, dict[str, Any]] = CTNET_VARIANTS) -> list[Job]:
    """Every job of the experiment, in the order they start: the source tower, then per target
    domain its warm-up and each compared model; each names the jobs it needs (all earlier).
    `rows`: only those compared rows (with the jobs they need); `variants`: the CTNet rows,
    name -> changes to `[ctnet]`."""
    jobs = _every_job(cfg, data, out, variants)
    if rows is None:
        return jobs
    keep = {*rows, *FOUNDATIONS, *([DIN_WARM_UP] if DIN in rows else [])}
    return [j for j in jobs if j.name in keep
            or (FINETUNE_SWEEP in keep and j.name.startswith(FINETUNE_SWEEP))]


def _every_job(cfg: Config, data: DataRoot, out: Path,
               variants: dict[str, dict[str, Any]]) -> list[Job]:
    e = cfg.experiment
    t0, last = e.deploy_period, e.last_period()
    window, everything = range(t0, last + 1), range(last + 1)
    scored = [t + 1 for t in window]
    source_run = out / e.source_domain
    transfers = transfer_baselines(cfg)
    jobs = [Job(SOURCE_TOWER, e.source_domain, partial(
        train_continual, cfg, data, e.source_domain, everything, source_run, resume=True,
        evaluate=False), trains=everything, run=source_run)]
    source_tower = (SOURCE_TOWER, e.source_domain)
    for d in e.target_domains:
        base = out / d / "base"
        jobs.append(Job(WARM_UP, d, partial(train_continual, cfg, data, d, range(t0), base,
                                            resume=True),
                        trains=range(t0), scores=range(1, t0 + 1), run=base))
        jobs.append(Job(BASE, d, partial(train_continual, cfg, data, d, window, base,
                                         resume=True),
                        trains=window, scores=scored, run=base, needs=((WARM_UP, d),)))
        # what every transfer starts from: the source tower's checkpoints and the target's
        # warm-up checkpoint in Base's run, which Base trains on (so they wait for it to end)
        deployed = (source_tower, (BASE, d))
        din_run, din = out / d / slug(DIN), din_config(cfg)
        jobs.append(Job(DIN_WARM_UP, d, partial(train_continual, din, data, d, range(t0),
                                                din_run, resume=True),
                        trains=range(t0), scores=range(1, t0 + 1), run=din_run))
        jobs.append(Job(DIN, d, partial(train_continual, din, data, d, window, din_run,
                                        resume=True),
                        trains=window, scores=scored, run=din_run, needs=((DIN_WARM_UP, d),)))
        jobs.append(Job(SOURCE, d, partial(_source_direct, cfg, data, d, source_run, out),
                        scores=scored, needs=(source_tower,)))
        jobs.append(Job(LATE_FUSION, d, partial(run_late_fusion, cfg, data, d, source_run, base,
                                                out / d / LATE_FUSION_DIR),
                        scores=scored, run=out / d / LATE_FUSION_DIR, needs=deployed))
        if DUAL in transfers:
            run = out / d / slug(DUAL)
            jobs.append(Job(DUAL, d, partial(_deployed, cfg, Deployment(DUAL_EMBEDDING), data,
                                             d, source_run, base, run),
                            trains=window, scores=scored, run=run, needs=deployed))
        for name, depth in PRETRAIN_FINETUNE.items():
            if name not in transfers:
                continue
            run = out / d / slug(name)
            jobs.append(Job(name, d, partial(_finetune, cfg, depth, data, d, source_run, base,
                                             run),
                            trains=window, scores=scored, run=run, needs=deployed))
        for name in e.joint_baselines:
            run = out / d / slug(name)
            joint = Deployment(f"{JOINT}:{name}", source_domain=e.source_domain)
            jobs.append(Job(name, d, partial(_deployed, cfg, joint, data, d, source_run, base,
                                             run),
                            trains=window, scores=scored, run=run,
                            also_reads=e.source_domain, needs=deployed))
        for name, overrides in variants.items():
            run = out / d / slug(name)
            jobs.append(Job(name, d, partial(run_ctnet, cfg, overrides, data, d, source_run, base,
                                             run),
                            trains=window, scores=scored, run=run, needs=deployed))
        for k in finetune_sizes(cfg):
            run = out / d / "finetune-sweep" / f"last-{k}"
            jobs.append(Job(sweep_name(k), d, partial(_finetune_last, cfg, k, data, d,
                                                      source_run, run),
                            trains=range(last - k + 1, last + 1), scores=[last + 1], run=run,
                            needs=(source_tower,)))
    return jobs


def sweep_name(periods: int) -> str:
    return f"{FINETUNE_SWEEP} ({periods} period{'s' if periods > 1 else ''})"


def samples_read(job: Job) -> dict[str, int]:
    """Training rows the job read, per domain, from its run's per-period records."""
    counts: dict[str, int] = {}
    if job.run is None or not (job.run / "metrics.jsonl").exists():  # scores only, or failed
        return counts
    for record in read_jsonl(job.run / "metrics.jsonl"):
        if record["period"] in job.trains:
            rows = record.get("train_rows_by_domain", {record["domain"]: record["train_rows"]})
            for domain, n in rows.items():
                counts[domain] = counts.get(domain, 0) + n
    return counts


def _run_jobs(jobs: list[Job], data: DataRoot, out: Path,
              workers: int) -> dict[str, dict[str, dict[str, float]]]:
    """Run every job in its own process, `workers` at a time; returns each one's wall time
    (summed over the runs of an interrupted and resumed experiment) and peak memory (the
    highest of them). One experiment per folder: a second one started on it is refused,
    naming the first (its jobs would find the runs locked and its rows left empty)."""
    with run_lock(out):
        return _run_jobs_locked(jobs, data, out, workers)


def _run_jobs_locked(jobs: list[Job], data: DataRoot, out: Path,
                     workers: int) -> dict[str, dict[str, dict[str, float]]]:
    path = out / "usage.json"
    usage: dict[str, dict[str, dict[str, float]]] = \
        json.loads(path.read_text()) if path.exists() else {}
    progress = Progress(jobs, data)

    def finished(i: int, took: dict[str, float] | BaseException) -> None:
        job = jobs[i]
        if isinstance(took, BaseException):
            if job.name in FOUNDATIONS or not isinstance(took, Exception):  # all need these
                raise took
            log.error("%s on %s failed, its row is left empty: %s: %s", job.name,
                      job.domain, type(took).__name__, took)
            usage.setdefault(job.name, {})[job.domain] = {"failed": 1.0}
            return
        before = usage.setdefault(job.name, {}).get(job.domain, {})
        before.pop("failed", None)  # an earlier attempt's
        usage[job.name][job.domain] = {
            k: round(before.get(k, 0.0) + v if k == "seconds" else max(before.get(k, 0.0), v), 1)
            for k, v in took.items()}
        write_atomic(path, json.dumps(usage, indent=1) + "\n")
        progress.finished(i)

    runner = IsolatedRunner(preload=[__name__], workers=workers)
    try:
        run_in_order(jobs, runner, progress.starting, finished)
    finally:
        runner.close()
    return usage


def run_experiment(cfg: Config, data: DataRoot, out: Path, rows: Collection[str] | None = None,
                   variants: dict[str, dict[str, Any]] = CTNET_VARIANTS) -> Results:
    """Train and evaluate every compared model (or those of `rows`, see `plan`); returns their
    metrics (also written to OUT/metrics.json)."""
    e = cfg.experiment
    if cfg.train.keep_checkpoints:
        raise ConfigError(
            f"train.keep_checkpoints = {cfg.train.keep_checkpoints}: the experiment's later "
            "jobs (CTNet, fine-tuning, the deployed baselines) load the source and Base runs' "
            "checkpoints of every period after those runs have finished; set 0 (keep all) "
            "for `ctnet experiment` and prune its runs afterwards")
    check_periods(cfg, data)
    out.mkdir(parents=True, exist_ok=True)
    # every evaluation keeps its scores: the report pairs the models on the same rows
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_scores=True))
    check_same_settings(cfg, out)
    t0, trained = e.deploy_period, list(range(e.deploy_period, e.last_period() + 1))
    jobs = plan(cfg, data, out, rows, variants)
    usage = _run_jobs(jobs, data, out, e.parallel_jobs)
    costs: dict[str, dict[str, dict[str, float]]] = {}
    for job in jobs:
        read = samples_read(job)
        costs.setdefault(job.name, {})[job.domain] = {
            "target_samples": sum(read.get(d, 0) for d in e.target_domains),
            "source_samples": read.get(e.source_domain, 0), **usage[job.name][job.domain]}
    def chosen(names: list[str]) -> list[str]:
        return [n for n in names if rows is None or n in rows]

    baselines = chosen([DIN, *e.joint_baselines, *transfer_baselines(cfg)])
    ctnets = chosen([*variants])
    compared = [*baselines, *ctnets]
    models: dict[str, dict[str, dict[int, dict[str, Any]]]] = {  # the report's order
        name: {} for name in (*chosen([SOURCE]), BASE, *baselines, *chosen([LATE_FUSION]),
                              *ctnets, ORACLE)}
    for d in e.target_domains:
        base = metrics_by_period(out / d / "base")
        models[BASE][d] = {t: base[t] for t in trained}
        for name, file in ((SOURCE, "source-direct.json"),
                           (LATE_FUSION, f"{LATE_FUSION_DIR}/metrics.json")):
            path = out / d / file
            if name not in models:
                continue
            models[name][d] = {int(t): m for t, m in json.loads(path.read_text()).items()} \
                if path.exists() else {}
        for name in compared:
            models[name][d] = {t: m for t, m in metrics_by_period(out / d / slug(name)).items()
                               if t in trained}
        if all("oracle" in base[t] for t in trained):  # synthetic worlds: the ceiling row
            models[ORACLE][d] = {t: base[t]["oracle"] for t in trained}
    if not models[ORACLE]:
        del models[ORACLE]
    runs = {(j.name, j.domain): j.run for j in jobs if j.run is not None}
    for d in e.target_domains:
        for t in trained:
            def scores_of(name: str, t: int = t, d: str = d) -> np.ndarray | None:
                return _kept_scores(runs.get((name, d)), t + 1)

            pair_on_rows(models, d, t, scores_of,
                         partial(period_labels, data, d, t + 1, cfg.features))
    sweep = {d: {k: metrics_by_period(out / d / "finetune-sweep" / f"last-{k}").get(
        e.last_period(), {}) for k in finetune_sizes(cfg)} for d in e.target_domains}
    results = Results({"deploy_period": t0, "trained_periods": trained,
                       "source_domain": e.source_domain, "config": dataclasses.asdict(cfg),
                       "data": str(data), "jobs_at_a_time": e.parallel_jobs,
                       "torch_threads_per_job": torch_threads(e.parallel_jobs)},
                      models, costs, sweep)
    write_atomic(out / "metrics.json", json.dumps(results.to_json(), indent=1) + "\n")
    return results


def _kept_scores(run: Path | None, period: int) -> np.ndarray | None:
    path = run / SCORES / f"period={period}.npy" if run is not None else None
    return np.load(path) if path is not None and path.exists() else None


def pair_on_rows(models: dict[str, dict[str, dict[int, dict[str, Any]]]], d: str, t: int,
                 scores_of: Callable[[str], np.ndarray | None],
                 labels_of: Callable[[], np.ndarray]) -> None:
    """Each row's AUC gain over Base and over CTNet on test period t + 1 with the standard
    error of DeLong's paired test (`paired` in its metrics), where both models' scores were
    kept."""
    labels = None
    for ref in (BASE, CTNET_ROW):
        theirs = scores_of(ref)
        if theirs is None:
            continue
        for name, per in models.items():
            mine = scores_of(name) if name != ref and t in per.get(d, {}) else None
            if mine is None or len(mine) != len(theirs):
                continue
            labels = labels_of() if labels is None else labels
            gain, se = delong_difference(labels, mine, theirs)
            per[d][t].setdefault("paired", {})[ref] = {"gain": gain, "se": se}


def slug(name: str) -> str:
    """A folder name: "Pre-train & Fine-tune (ID embeddings)" -> pre-train-fine-tune-id-..."""
    words = "".join(c if c.isalnum() or c == "-" else " " for c in name.lower()).split()
    return "-".join(words)


def _finetune(cfg: Config, depth: Depth, data: DataRoot, domain: str, source_run: Path,
              base_run: Path, run: Path) -> None:
    """Pre-train & Fine-tune from the period t0 - 1 checkpoints, then on to the end."""
    e = cfg.experiment
    if not (run / INIT).exists():
        pretrain_finetune_init(cfg, depth, period_dir(source_run, e.deploy_period - 1),
                               period_dir(base_run, e.deploy_period - 1), run)
    train_continual(cfg, data, domain, range(e.deploy_period, e.last_period() + 1), run,
                    init=run / INIT, resume=True)


def _source_direct(cfg: Config, data: DataRoot, domain: str, source_run: Path, out: Path) -> None:
    """The source domain's model of each period scoring the target's next period."""
    path = out / domain / "source-direct.json"
    if path.exists():
        return
    source = complete_checkpoints(source_run)
    results = {t: evaluate_checkpoint(source[t], data, domain, t + 1)
               for t in range(cfg.experiment.deploy_period, cfg.experiment.last_period() + 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({str(t): m for t, m in results.items()}, indent=1) + "\n")


def finetune_sizes(cfg: Config) -> list[int]:
    """Table 4's amounts of fine-tuning data, in periods: 1, 2, 4 and all there are."""
    every = cfg.experiment.last_period() + 1
    return sorted({k for k in FINETUNE_PERIODS if k < every} | {every})


def _finetune_last(cfg: Config, periods: int, data: DataRoot, domain: str, source_run: Path,
                   run: Path) -> None:
    """Table 4: the newest source model (all parameters, period `last`) fine-tuned on the
    target's last `periods` periods, so every size ends at the same time and is tested on the
    same period; only the amount of fine-tuning data differs."""
    last = cfg.experiment.last_period()
    train_continual(cfg, data, domain, range(last - periods + 1, last + 1), run,
                    init=period_dir(source_run, last), resume=True, allow_domain_change=True)


def _deployed(cfg: Config, deployment: Deployment, data: DataRoot, domain: str, source_run: Path,
              base_run: Path, run: Path) -> None:
    """A model deployed from the warm-up checkpoints of period t0 - 1 (Dual Embedding, a
    joint-learning baseline), then trained on the window (a joint model also on the source's
    data of the window)."""
    e = cfg.experiment
    if not (run / INIT).exists():
        deploy(deployment, cfg, period_dir(source_run, e.deploy_period - 1),
               period_dir(base_run, e.deploy_period - 1), run)
    train_continual(cfg, data, domain, range(e.deploy_period, e.last_period() + 1), run,
                    init=run / INIT, resume=True, trainer_cls=partial(trainer_for, deployment))


def run_ctnet(cfg: Config, overrides: dict[str, Any], data: DataRoot, domain: str,
              source_run: Path, base_run: Path, run: Path) -> None:
    """Deploy CTNet from the warm-up checkpoints of period t0 - 1 and run it to the end."""
    e = cfg.experiment
    variant = copy.deepcopy(cfg)
    # a dict changes keys of a nested section, e.g. {"adapter_optimizer": {"lr": 0.3}}
    variant.ctnet = dataclasses.replace(variant.ctnet, **{
        k: dataclasses.replace(getattr(variant.ctnet, k), **v) if isinstance(v, dict) else v
        for k, v in overrides.items()})
    if not (run / INIT).exists():
        deploy(Deployment(CTNET), variant, period_dir(source_run, e.deploy_period - 1),
               period_dir(base_run, e.deploy_period - 1), run)
    transfer_run(run, data, domain, range(e.deploy_period, e.last_period() + 1), source_run)
