"""When transfer helps: the regime map. Synthetic worlds of every `[synth] domain_gap` in GAPS
times target rows a period in SCALES (of the config's), each with K seeds (a world and a
training run each); per world, each transfer row's gain over Base (AUC, GAUC, new users'
and new items' AUC) with Student's t interval over the seeds (`significance`). The CTNet
design candidates are chosen among by RULE, written down before the map is run.

    python benchmarks/regime_map.py                     # the whole map: 8 worlds x 5 seeds
    python benchmarks/regime_map.py --seeds 2 --gaps 0.5 1.0 --scales 1
    python benchmarks/regime_map.py --real examples/movielens.toml runs/movielens/data
    python benchmarks/regime_map.py --scales --real ...   # the real dataset only

`--real CONFIG DATA` adds a real dataset (`make movielens`) as one more world, with the same
rows and seeds (training runs on the same data); RULE's point 2 reads it, point 3 does not.

Resumable: each (world, seed) is an experiment folder under OUT that resumes where it
stopped; OUT/regime_map.json and OUT/regime_map.md are rewritten after each one (seeds are
the outer loop, so an interrupted map has every world at the seeds done so far), and
OUT/regime_map.png plots the AUC gains.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctnet_rec.config import Config, load_config  # noqa: E402
from ctnet_rec.data.synth import synthesize  # noqa: E402
from ctnet_rec.experiment.runner import (  # noqa: E402
    BASE,
    DUAL,
    LATE_FUSION,
    SOURCE,
    Results,
    quick,
    run_experiment,
)
from ctnet_rec.experiment.significance import mark, paired_interval  # noqa: E402
from ctnet_rec.files import write_atomic  # noqa: E402

log = logging.getLogger("regime_map")

GAPS = (0.2, 0.5, 0.8, 1.0)
SCALES = (1.0, 0.25)  # target rows a period, as a share of the config's
FINETUNE_ALL = "Pre-train & Fine-tune (all parameters)"
BASELINES = (SOURCE, LATE_FUSION, DUAL, FINETUNE_ALL, "DDTCDR")
# the CTNet designs compared (name -> changes to [ctnet], each pinned, whatever the defaults):
# the paper's adapters alone first; the output fusion won the map and is the default
CANDIDATES: dict[str, dict[str, Any]] = {
    "CTNet": {"output_fusion": False},
    "CTNet + output fusion": {"output_fusion": True},
    "CTNet, adapters on E^S": {"adapter_tap": "previous_layer", "output_fusion": False},
    "CTNet, source_lag 0": {"source_lag": 0, "output_fusion": False},
    "CTNet + output fusion, source_lag 0": {"output_fusion": True, "source_lag": 0},
    # the adapters' designs, each on top of the output fusion
    "CTNet + output fusion, both taps": {"output_fusion": True, "adapter_tap": "both"},
    "CTNet + output fusion, adapter lr 0.3": {"output_fusion": True,
                                              "adapter_optimizer": {"lr": 0.3}},
    "CTNet + output fusion, adapter lr 1": {"output_fusion": True,
                                            "adapter_optimizer": {"lr": 1.0}},
    "CTNet + output fusion, gated adapters": {"output_fusion": True, "adapter_gate": True},
    "CTNet + output fusion, normalised source states": {"output_fusion": True,
                                                        "adapter_input_norm": True},
    "CTNet + output fusion, prequential adapter pass": {"output_fusion": True,
                                                        "adapter_prequential_pass": True},
    # the fusion's weight kept only where its gain on the fit rows is beyond noise
    "CTNet + output fusion, weight beyond noise": {"output_fusion": True,
                                                   "output_fusion_min_z": 1.96},
    # ... beyond noise on the evidence of every period so far
    "CTNet + output fusion, pooled weight beyond noise": {
        "output_fusion": True, "output_fusion_evidence": "pooled", "output_fusion_min_z": 1.96},
    # ... with the source reading the target's long-sequence interests (a cheaper step):
    # for everything, or for the adapters' states only (its logit its own)
    "CTNet + output fusion, pooled, source reuses the target's long sequence": {
        "output_fusion": True, "output_fusion_evidence": "pooled", "output_fusion_min_z": 1.96,
        "source_long_interest": "target"},
    "CTNet + output fusion, pooled, adapters' source states on the target's long sequence": {
        "output_fusion": True, "output_fusion_evidence": "pooled", "output_fusion_min_z": 1.96,
        "source_long_interest": "target_for_adapters"},
}
# whatever the defaults, each candidate says whether it runs the prequential pass and how
# the fusion's weight is guarded
for _changes in CANDIDATES.values():
    _changes.setdefault("adapter_prequential_pass", False)
    _changes.setdefault("output_fusion_min_z", 0.0)
    _changes.setdefault("output_fusion_evidence", "period")
METRICS = {"AUC": ("auc",), "GAUC": ("gauc",), "new users AUC": ("slices", "new_users", "auc"),
           "new items AUC": ("slices", "new_items", "auc")}
RULE = """\
The default CTNet design is the candidate that
1. passes the no-harm tests (`make test`: CTNet starts within 1e-4 of the target model, and
   the output fusion's weight is 0 at deployment);
2. is on no map world below Base beyond noise: no 95% interval (t over the seeds) of its AUC
   gain over Base entirely below 0 (the same on MovieLens-1M, run apart with
   `ctnet experiment examples/movielens.toml --seeds 5`);
3. has, among those, the largest mean AUC gain over Base averaged over the map worlds where
   the late fusion is above Base (its interval entirely above 0; all worlds if there is
   none). An exact tie goes to the candidate listed first."""


def world_config(cfg: Config, gap: float, scale: float, seed: int, target: list[str]) -> Config:
    """The config's world at `gap`, its target domains' rows a period times `scale` (all
    else as the config's: at scale 1 and the config's gap, the config's own world), only the
    joint row DDTCDR."""
    w = copy.deepcopy(cfg)
    e = w.experiment
    domains = {name: dataclasses.replace(d, impressions_per_period=max(
        1, round(d.impressions_per_period * scale)) if name in target else
        d.impressions_per_period) for name, d in w.synth.domains.items()}
    w.synth = dataclasses.replace(w.synth, domain_gap=gap, domains=domains)
    w.experiment = dataclasses.replace(e, target_domains=target, joint_baselines=["DDTCDR"])
    w.train.seed = seed
    w.validate()
    return w


def world_name(gap: float, scale: float) -> str:
    return f"gap={gap:g}/rows={scale:g}"


def real_config(path: str, seed: int, jobs: int | None) -> Config:
    """A real dataset's config with the map's rows: only the joint row DDTCDR."""
    cfg = load_config(path)
    cfg.experiment = dataclasses.replace(cfg.experiment, joint_baselines=["DDTCDR"],
                                         parallel_jobs=jobs or cfg.experiment.parallel_jobs)
    cfg.train.seed = seed
    cfg.validate()
    return cfg


def run_world(cfg: Config, out: Path, data: Path | None = None,
              rows: tuple[str, ...] = BASELINES,
              candidates: dict[str, dict[str, Any]] = CANDIDATES) -> Results:
    """One (world, seed): the experiment's `rows` and CTNet `candidates` on `data` (default:
    the config's synthetic world of the seed, made in OUT/data), resumed if begun."""
    done = out / "metrics.json"
    if done.exists():
        return Results.from_json(json.loads(done.read_text()))
    if data is None:
        data = out / "data"
        if not (data / "world.json").exists():
            synthesize(cfg.synth, data, seed=cfg.train.seed)
    return run_experiment(cfg, data, out, rows=[*rows, *candidates], variants=candidates)


DEMO_RULE = """\
The demo world's domain_gap is the smallest of the map's gaps at which the Source domain model
is below Base beyond noise (the 95% interval over the seeds of its AUC gain over Base entirely
below 0) on both target domains, B and C, at the demo's rows: as in the paper's Table 2, where
the source model is below every target's own. Read from the Source and Base rows only, blind
to CTNet."""


def source_below_base(cfg: Config, out: Path, gaps: list[float], seeds: int,
                      domains: tuple[str, ...] = ("B", "C")) -> dict[str, Any]:
    """DEMO_RULE on the map's worlds at scale 1: per gap and target domain, the Source domain
    model's AUC gain over Base with its interval over the seeds. B's rows are the map's; each
    other domain's Base and Source rows train in WORLD/seed=<s>/target-<d>/ on the same world
    and source tower (linked, not retrained)."""
    table: dict[str, dict[str, Any]] = {}
    for gap in gaps:
        name = world_name(gap, 1.0)
        for d in domains:
            gains = []
            for seed in range(seeds):
                folder = out / name / f"seed={seed}"
                if not (folder / "metrics.json").exists():
                    continue  # the map has not reached this world yet
                results = Results.from_json(json.loads((folder / "metrics.json").read_text()))
                if d not in results.models[BASE]:
                    sub = folder / f"target-{d}"
                    sub.mkdir(exist_ok=True)
                    if not (sub / cfg.experiment.source_domain).exists():
                        (sub / cfg.experiment.source_domain).symlink_to(
                            folder / cfg.experiment.source_domain)
                    done = sub / "metrics.json"
                    results = Results.from_json(json.loads(done.read_text())) \
                        if done.exists() else run_experiment(
                            world_config(cfg, gap, 1.0, seed, [d]), folder / "data", sub,
                            rows=[SOURCE], variants={})
                gains.append(seed_gains(results, d)[SOURCE]["AUC"])
            table.setdefault(f"{gap:g}", {})[d] = paired_interval(gains)
    below = [g for g, per in table.items()
             if all(mark(per[d]) == "-" for d in domains)]
    return {"rule": DEMO_RULE, "source_minus_base_auc": table,
            "chosen_gap": float(below[0]) if below else None}


def _value(m: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        if not isinstance(m, dict) or key not in m:
            return math.nan
        m = m[key]
    return float(m)


def seed_gains(results: Results, domain: str) -> dict[str, dict[str, float]]:
    """Per row and metric: the seed's gain over Base, its mean over the test periods (NaN
    where a period's slice is empty for either)."""
    base = results.models[BASE][domain]
    gains: dict[str, dict[str, float]] = {}
    for row, per in results.models.items():
        if row == BASE or domain not in per:
            continue
        gains[row] = {}
        for name, path in METRICS.items():
            diffs = [_value(per[domain][t], path) - _value(base[t], path)
                     for t in base if t in per[domain]]
            diffs = [d for d in diffs if not math.isnan(d)]
            gains[row][name] = statistics.fmean(diffs) if diffs else math.nan
    return gains


def merged(by_world: dict[str, dict[str, dict[str, dict[str, float]]]],
           earlier: dict[str, dict[str, dict[str, dict[str, float]]]],
           rerun: frozenset[str] = frozenset(),
           ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """`by_world` with the rows only `earlier` (another map run's `by_world`) has, for the
    worlds and seeds both have. The two must be runs of the same worlds and training: every
    row both have (e.g. the late fusion) must agree to 1e-9 per seed and metric, or refused;
    except the `rerun` rows, which this run replaces (run again by a newer version)."""
    out = copy.deepcopy(by_world)
    for world, seeds in out.items():
        for seed, rows in seeds.items():
            old = earlier.get(world, {}).get(seed)
            if old is None:
                continue
            for row in (rows.keys() & old.keys()) - rerun:
                for metric, value in rows[row].items():
                    other = old[row].get(metric, math.nan)
                    if not (math.isnan(value) and math.isnan(other)) and \
                            not abs(value - other) <= 1e-9:
                        raise ValueError(
                            f"{world} seed {seed}: {row} {metric} is {value} here and {other} "
                            "in the earlier run: not the same worlds or training")
            rows.update({r: v for r, v in old.items() if r not in rows})
    return out


def summarise(by_world: dict[str, dict[str, dict[str, dict[str, float]]]],
              ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per world, row and metric: the interval over the seeds of the per-seed gains."""
    return {world: {row: {metric: paired_interval([g[row][metric] for g in seeds.values()
                                                   if row in g])
                          for metric in METRICS}
                    for row in dict.fromkeys(r for g in seeds.values() for r in g)}
            for world, seeds in by_world.items()}


def choose(summary: dict[str, dict[str, dict[str, dict[str, float]]]],
           real: list[str]) -> dict[str, Any]:
    """RULE's points 2 and 3 (point 1 is the test suite's); `real`: the worlds that are real
    datasets, read by point 2 only."""
    worlds = list(summary)
    synthetic = [w for w in worlds if w not in real]
    fused = [w for w in synthetic if mark(summary[w][LATE_FUSION]["AUC"]) == "+"]
    verdict: dict[str, Any] = {"worlds_where_late_fusion_helps": fused, "candidates": {}}
    fused = fused or synthetic
    for name in CANDIDATES:
        harmed = [w for w in worlds if mark(summary[w].get(name, {}).get(
            "AUC", {"low": math.nan, "high": math.nan})) == "-"]
        gains = [summary[w][name]["AUC"]["mean"] for w in fused if name in summary[w]]
        # ranked only when run at every world's seeds (the late fusion's count there)
        complete = all(summary[w].get(name, {}).get("AUC", {}).get("n") ==
                       summary[w][LATE_FUSION]["AUC"]["n"] for w in worlds)
        verdict["candidates"][name] = {
            "below_base_on": harmed, "every_world_and_seed": complete,
            "mean_auc_gain": statistics.fmean(gains) if gains else math.nan}
    eligible = [n for n, v in verdict["candidates"].items()
                if not v["below_base_on"] and v["every_world_and_seed"]
                and not math.isnan(v["mean_auc_gain"])]
    verdict["winner"] = max(eligible, key=lambda n: verdict["candidates"][n]["mean_auc_gain"]) \
        if eligible else None  # max keeps the first of equal gains
    return verdict


def cell(iv: dict[str, float]) -> str:
    if iv["n"] == 0:
        return "-"
    if iv["n"] == 1:
        return f"{iv['mean']:+.4f}"
    return f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]{mark(iv)}"


def markdown(summary: dict[str, dict[str, dict[str, dict[str, float]]]], metric: str) -> str:
    worlds = list(summary)
    rows = [r for r in (*BASELINES, *CANDIDATES) if any(r in summary[w] for w in worlds)]
    lines = ["| row | " + " | ".join(worlds) + " |", "|---|" + "---|" * len(worlds)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(
            cell(summary[w][r][metric]) if r in summary[w] else "-" for w in worlds) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict[str, dict[str, float]]]], scales: list[float],
         path: Path) -> None:
    """AUC gain over Base against domain_gap, a panel per target-row scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scales), figsize=(6 * len(scales), 4.5), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        worlds = [w for w in summary if w.endswith(f"rows={scale:g}")]
        gaps = [float(w.split("/")[0].split("=")[1]) for w in worlds]
        shown = [r for r in (*BASELINES, *CANDIDATES) if r != SOURCE]
        for i, r in enumerate(shown):
            ivs = [summary[w].get(r, {}).get("AUC") for w in worlds]
            if not all(ivs):
                continue
            means = [iv["mean"] for iv in ivs]
            errs = [0.0 if math.isnan(iv["low"]) else iv["mean"] - iv["low"] for iv in ivs]
            shift = (i - len(shown) / 2) * 0.008  # side by side at each gap
            ax.errorbar([g + shift for g in gaps], means, yerr=errs, marker="o", capsize=2,
                        lw=1, ms=4, label=r)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"target rows x{scale:g}", xlabel="domain_gap",
               ylabel="AUC gain over Base (95% over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    p.add_argument("--gaps", type=float, nargs="*", default=list(GAPS))
    p.add_argument("--scales", type=float, nargs="*", default=list(SCALES))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", nargs="+", default=["B"], help="target domains (default B)")
    p.add_argument("--jobs", type=int, help="jobs at a time (default: the config's)")
    p.add_argument("--quick", action="store_true", help="the small world of --quick")
    p.add_argument("--out", default=str(ROOT / "runs" / "regime-map"))
    p.add_argument("--real", nargs=2, metavar=("CONFIG", "DATA"),
                   help="a real dataset as one more world (e.g. examples/movielens.toml "
                   "runs/movielens/data)")
    p.add_argument("--rows", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="the baseline rows (default: all)")
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES),
                   default=list(CANDIDATES), help="the CTNet designs (default: all)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds FIRST .. FIRST + SEEDS - 1 (another range: other worlds)")
    p.add_argument("--with", dest="earlier", metavar="REGIME_MAP_JSON",
                   help="an earlier run of the same worlds and seeds (its regime_map.json): "
                   "its other rows join this run's table and verdict, checked equal on the "
                   "rows both have")
    p.add_argument("--rerun", action="store_true",
                   help="with --with: this run's candidates replace the earlier run's rows of "
                   "the same names (they were run by another version) instead of being "
                   "checked equal")
    p.add_argument("--demo-rule", action="store_true",
                   help="only DEMO_RULE, on the map's worlds done so far (adds target C's "
                   "Source and Base rows)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    if args.quick:
        cfg = quick(cfg)
    if args.jobs:
        cfg.experiment.parallel_jobs = args.jobs
    out = Path(args.out)
    if args.demo_rule:
        verdict = source_below_base(cfg, out, args.gaps, args.seeds)
        write_atomic(out / "demo_world_rule.json", json.dumps(verdict, indent=1) + "\n")
        print(json.dumps(verdict, indent=1))
        return
    worlds = [(g, s) for s in args.scales for g in args.gaps]
    by_world: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    real = [Path(args.real[0]).stem] if args.real else []
    before = out / "regime_map.json"  # each (world, seed)'s seconds, as first run
    seconds: dict[str, float] = json.loads(before.read_text())["seconds"] \
        if before.exists() else {}

    rows, candidates = tuple(args.rows), {c: CANDIDATES[c] for c in args.candidates}
    earlier = json.loads(Path(args.earlier).read_text())["by_world"] if args.earlier else {}
    rerun = frozenset(candidates) if args.rerun else frozenset()

    def timed(name: str, seed: int, config: Config, data: Path | None = None) -> Results:
        folder = out / name / f"seed={seed}"
        start, cached = time.perf_counter(), (folder / "metrics.json").exists()
        results = run_world(config, folder, data, rows, candidates)
        if not cached:
            seconds[f"{name}/seed={seed}"] = round(time.perf_counter() - start, 1)
            log.info("%s seed %d done in %.0f s", name, seed, seconds[f"{name}/seed={seed}"])
        return results

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for gap, scale in worlds:
            name = world_name(gap, scale)
            results = timed(name, seed, world_config(cfg, gap, scale, seed, args.target))
            for d in args.target:
                by_world.setdefault(f"{name} {d}" if len(args.target) > 1 else name, {})[
                    str(seed)] = seed_gains(results, d)
            report = write_map(out, args, merged(by_world, earlier, rerun), seconds, seed, real)
        if args.real:
            config, data = args.real
            name = Path(config).stem
            rcfg = real_config(config, seed, args.jobs)
            results = timed(name, seed, rcfg, Path(data))
            for d in rcfg.experiment.target_domains:
                by_world.setdefault(name, {})[str(seed)] = seed_gains(results, d)
            report = write_map(out, args, merged(by_world, earlier, rerun), seconds, seed, real)
    if args.scales:  # no synthetic world (`--scales` alone with --real): nothing to plot
        plot({w: v for w, v in report["summary"].items() if w not in real}, args.scales,
             out / "regime_map.png")
    print((out / "regime_map.md").read_text())
    print(json.dumps(report["choice"], indent=1))


def write_map(out: Path, args: argparse.Namespace,
              by_world: dict[str, dict[str, dict[str, dict[str, float]]]],
              seconds: dict[str, float], seed: int, real: list[str]) -> dict[str, Any]:
    """OUT/regime_map.json and OUT/regime_map.md from the seeds done so far."""
    summary = summarise(by_world)
    report = {"config": args.config, "real": args.real,
              "seeds_done": seed + 1 - args.first_seed, "rule": RULE,
              "candidates": CANDIDATES, "seconds": seconds, "summary": summary,
              "by_world": by_world, "choice": choose(summary, real)}
    write_atomic(out / "regime_map.json", json.dumps(report, indent=1) + "\n")
    text = "\n\n".join([*(f"### {m} gain over Base\n\n{markdown(summary, m)}"
                           for m in METRICS), verdict_markdown(report)])
    write_atomic(out / "regime_map.md", text + "\n")
    return report


def verdict_markdown(report: dict[str, Any]) -> str:
    """The rule's verdict and what the map cost, as the docs quote them."""
    choice, seconds = report["choice"], report["seconds"]
    helps = choice["worlds_where_late_fusion_helps"]
    ranked = ", ".join(helps) if helps else "none, so all synthetic worlds rank"
    lines = ["### The rule's verdict", "",
             f"Seeds per world: {report['seeds_done']}. Worlds where the late fusion is above "
             f"Base (those that rank): {ranked}.", "",
             "| candidate | below Base beyond noise on | mean AUC gain over the ranking worlds |",
             "|---|---|---|"]
    for name, v in choice["candidates"].items():
        if math.isnan(v["mean_auc_gain"]):
            continue  # not in this run
        gain = f"{v['mean_auc_gain']:+.4f}" + (
            "" if v.get("every_world_and_seed", True) else " (not every world and seed: "
            "not ranked)")
        lines.append(f"| {name} | {', '.join(v['below_base_on']) or 'no world'} | {gain} |")
    lines += ["", f"Winner: {choice['winner'] or 'none'}.", ""]
    by_world: dict[str, list[float]] = {}
    for key, s in seconds.items():
        by_world.setdefault(key.rsplit("/seed=", 1)[0], []).append(s)
    lines.append("Cost (wall seconds per seed, two jobs at a time, this machine): " + "; ".join(
        f"{w} {statistics.fmean(v):.0f}" for w, v in by_world.items())
                 + f"; in all {sum(seconds.values()) / 3600:.1f} h.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
