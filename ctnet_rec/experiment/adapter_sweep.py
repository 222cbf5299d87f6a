"""How CTNet's adapters should train: a measurement of candidate settings against Base.

For each seed: the source tower and each target domain's warm-up and Base exactly as in
`ctnet experiment`, then CTNet deployed from the same checkpoints once per candidate. Every
CTNet period is evaluated twice, as trained and with its adapters adding nothing, so the table
shows both what CTNet gains over Base and how much of it comes through the adapters.

    python -m ctnet_rec.experiment.adapter_sweep examples/demo.toml --seeds 3 \\
        --out runs/adapter-sweep/demo
    python -m ctnet_rec.experiment.adapter_sweep examples/movielens.toml \\
        --data runs/movielens/data --seeds 3 --out runs/adapter-sweep/movielens

Writes OUT/sweep.json (per candidate, domain, seed and period: AUC and GAUC of Base, CTNet and
CTNet without adapters) and prints the summary, mean gain over Base with a 95% interval paired
over periods x seeds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from ctnet_rec.config import Config, OptimizerConfig, load_config
from ctnet_rec.data.storage import DataRoot, data_root
from ctnet_rec.data.synth import synthesize
from ctnet_rec.experiment.runner import (
    check_periods,
    metrics_by_period,
    quick,
    run_ctnet,
    slug,
)
from ctnet_rec.experiment.significance import paired_interval
from ctnet_rec.training.loop import train_continual

log = logging.getLogger(__name__)

# name -> (changes to [ctnet], changes to [ctnet.adapter_optimizer])
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "AdaGrad lr 0.01, accumulator 0": ({}, {"lr": 0.01, "initial_accumulator": 0.0}),
    "AdaGrad lr 0.01, accumulator 0.01": ({}, {"lr": 0.01, "initial_accumulator": 0.01}),
    "AdaGrad lr 0.01, accumulator 0.1": ({}, {"lr": 0.01, "initial_accumulator": 0.1}),
    "AdaGrad lr 0.1, accumulator 0.1": ({}, {"lr": 0.1, "initial_accumulator": 0.1}),
    "AdaGrad lr 0.3, accumulator 0.1, warm-up 200": (
        {}, {"lr": 0.3, "initial_accumulator": 0.1, "warmup_steps": 200}),
    "AdaGrad lr 1, accumulator 0.1, warm-up 200": (
        {}, {"lr": 1.0, "initial_accumulator": 0.1, "warmup_steps": 200}),
    "AdaGrad lr 0.01, accumulator 0, warm-up 200": (
        {}, {"lr": 0.01, "initial_accumulator": 0.0, "warmup_steps": 200}),
}


def candidate_config(cfg: Config, name: str) -> Config:
    net, opt = CANDIDATES[name]
    out = copy.deepcopy(cfg)
    out.ctnet = dataclasses.replace(  # the adapters alone: what their optimiser changes
        out.ctnet, **{"output_fusion": False, **net},
        adapter_optimizer=dataclasses.replace(OptimizerConfig(), **opt))
    out.validate()
    return out


def run_seed(cfg: Config, data: DataRoot, out: Path, candidates: list[str]) -> dict[str, Any]:
    """One seed: per domain, Base's and each candidate's per-period metrics."""
    e = cfg.experiment
    check_periods(cfg, data)
    t0, last = e.deploy_period, e.last_period()
    window = range(t0, last + 1)
    source_run = out / e.source_domain
    train_continual(cfg, data, e.source_domain, range(last + 1), source_run, resume=True,
                    evaluate=False)
    results: dict[str, Any] = {}
    for d in e.target_domains:
        base = out / d / "base"
        train_continual(cfg, data, d, range(t0), base, resume=True)
        train_continual(cfg, data, d, window, base, resume=True)
        base_metrics = metrics_by_period(base)
        per: dict[str, Any] = {"Base": {t: _short(base_metrics[t]) for t in window}}
        for name in candidates:
            run = out / d / slug(name)
            run_ctnet(candidate_config(cfg, name), {}, data, d, source_run, base, run)
            m = metrics_by_period(run)
            per[name] = {t: {**_short(m[t]), "without_adapters": _short(m[t]["without_adapters"])}
                         for t in window}
        results[d] = per
    return results


def _short(m: dict[str, Any]) -> dict[str, float]:
    return {"auc": m["auc"], "gauc": m["gauc"], "rows": m["rows"]}


def summarise(by_seed: dict[int, dict[str, Any]], candidates: list[str]) -> list[dict[str, Any]]:
    """Per candidate and domain: mean gain over Base (AUC, GAUC), as trained and without the
    adapters, each with a 95% interval paired over (seed, period)."""
    rows = []
    domains = next(iter(by_seed.values())).keys()
    for name in candidates:
        for d in domains:
            row: dict[str, Any] = {"candidate": name, "domain": d}
            for metric in ("auc", "gauc"):
                for what, pick in (("ctnet", lambda m: m),
                                   ("without_adapters", lambda m: m["without_adapters"])):
                    # the unit is a seed: its gain is the mean over its test periods
                    per_seed = [statistics.fmean(pick(res[d][name][t])[metric]
                                                 - res[d]["Base"][t][metric]
                                                 for t in res[d]["Base"])
                                for res in by_seed.values()]
                    row[f"{what}_{metric}"] = paired_interval(per_seed)
            worst = min(res[d][name][t]["auc"] - res[d]["Base"][t]["auc"]
                        for res in by_seed.values() for t in res[d]["Base"])
            row["worst_period_auc"] = worst
            rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    def cell(iv: dict[str, float]) -> str:
        return f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"

    head = (f"{'candidate':<46}{'dom':<4}{'CTNet - Base AUC':>28}{'no adapters - Base AUC':>28}"
            f"{'CTNet - Base GAUC':>28}{'worst period':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['candidate']:<46}{r['domain']:<4}{cell(r['ctnet_auc']):>28}"
                     f"{cell(r['without_adapters_auc']):>28}{cell(r['ctnet_gauc']):>28}"
                     f"{r['worst_period_auc']:>+14.4f}")
    return "\n".join(lines)


def markdown(sweeps: dict[str, dict[str, Any]], metric: str = "ctnet_auc") -> str:
    """One markdown table over several sweeps (dataset name -> sweep.json): per candidate, the
    mean gain over Base [95% interval] on each dataset's target domains."""
    columns = [(name, d) for name, sweep in sweeps.items()
               for d in dict.fromkeys(r["domain"] for r in sweep["summary"])]
    candidates = list(dict.fromkeys(r["candidate"] for sw in sweeps.values()
                                    for r in sw["summary"]))
    head = ["adapters' optimiser", *(f"{n} {d}" for n, d in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in candidates:
        cells = []
        for name, d in columns:
            row = next((r for r in sweeps[name]["summary"]
                        if r["candidate"] == c and r["domain"] == d), None)
            iv = row[metric] if row else None
            cells.append("-" if iv is None else
                         f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]")
        lines.append("| " + " | ".join([c, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="TOML config (not with --markdown)")
    p.add_argument("--markdown", nargs="+", metavar="NAME=SWEEP_JSON",
                   help="print the gains of finished sweeps as one markdown table")
    p.add_argument("--metric", default="ctnet_auc",
                   choices=["ctnet_auc", "ctnet_gauc", "without_adapters_auc"])
    p.add_argument("--data", help="dataset root (default: the config's synthetic world, "
                   "one per seed under OUT)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="the small world of --quick")
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown({n: json.loads(Path(f).read_text())
                        for n, f in (x.split("=", 1) for x in args.markdown)}, args.metric))
        return
    if not (args.config and args.out):
        p.error("CONFIG and --out are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    if args.quick:
        cfg = quick(cfg)
    out = Path(args.out)
    by_seed = {}
    for seed in range(args.seeds):
        cfg.train.seed = seed
        seed_out = out / f"seed={seed}"
        world = seed_out / "data"
        if args.data is None and not (world / "world.json").exists():
            synthesize(cfg.synth, world, seed=seed)
        by_seed[seed] = run_seed(cfg, data_root(args.data) if args.data else world, seed_out,
                                 args.candidates)
        summary = summarise(by_seed, args.candidates)
        (out / "sweep.json").write_text(json.dumps(
            {"config": args.config, "data": args.data, "seeds": sorted(by_seed),
             "candidates": {n: CANDIDATES[n] for n in args.candidates},
             "summary": summary, "by_seed": by_seed}, indent=1) + "\n")
    print(format_summary(summarise(by_seed, args.candidates)))


if __name__ == "__main__":
    main()
