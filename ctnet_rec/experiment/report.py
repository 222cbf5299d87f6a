"""The experiment's report: markdown tables in the layout of the paper's Tables 2-5 and a
cost table (Table 1 as measurements), and PNG plots. Every number comes from `Results` (the
same numbers as OUT/metrics.json). Over several seeds, each cell is the mean and standard
deviation of that cell across the seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ctnet_rec.experiment.runner import (  # noqa: E402
    BASE,
    DIN_WARM_UP,
    ORACLE,
    SOURCE_TOWER,
    WARM_UP,
    Results,
    sweep_name,
)

SLICES = ["new_users", "old_users", "new_items", "old_items"]
CTNET, ONCE = "CTNet", "CTNet transfer-once"


class Gain(float):
    """A difference between two metrics: printed with its sign."""


Cell = str | int | float  # int: counts, seconds, MB; float: a metric; Gain: a difference


@dataclass
class Table:
    head: list[str]
    rows: list[list[Cell]]


def _fmt(value: float, kind: type) -> str:
    return f"{value:+.4f}" if kind is Gain else f"{value:.0f}" if kind is int else f"{value:.4f}"


def render(table: Table) -> str:
    lines = ["| " + " | ".join(table.head) + " |", "|" + "---|" * len(table.head)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c, type(c)) for c in row)
              + " |" for row in table.rows]
    return "\n".join(lines)


def pooled(tables: Sequence[Table]) -> Table:
    """The tables of several seeds as one: numbers become "mean ± std" (sample std)."""
    first = tables[0]
    rows = []
    for i, row in enumerate(first.rows):
        cells: list[Cell] = []
        for j, cell in enumerate(row):
            values = [t.rows[i][j] for t in tables]
            if isinstance(cell, str):
                if len(set(values)) > 1:
                    raise ValueError(f"seeds disagree on a label: {values}")
                cells.append(cell)
            else:
                nums = [float(v) for v in values]
                kind = type(cell)
                cells.append(f"{_fmt(statistics.fmean(nums), kind)} ± "
                             f"{_fmt(statistics.stdev(nums), kind).lstrip('+')}")
        rows.append(cells)
    return Table(first.head, rows)


def table2(res: Results) -> Table:
    """AUC and GAUC on the last test period, with the gain over Base."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.models[BASE])
    head = ["model"] + [f"{d} {m}" for d in domains for m in ("AUC", "GAUC", "AUC gain")]
    rows: list[list[Cell]] = []
    for name, per in res.models.items():
        row: list[Cell] = [name]
        for d in domains:
            m, b = per[d][last], res.models[BASE][d][last]
            row += [m["auc"], m["gauc"], Gain(m["auc"] - b["auc"])]
        rows.append(row)
    return Table(head, rows)


def table3(res: Results, domain: str) -> Table:
    """Per period: Base vs CTNet transfer-once vs CTNet, AUC and gain."""
    base, once, ctnet = (res.models[n][domain] for n in (BASE, ONCE, CTNET))
    head = ["trained on", "tested on", "Base AUC", "transfer-once AUC", "gain",
            "CTNet AUC", "gain"]
    return Table(head, [[str(t), str(t + 1), base[t]["auc"], once[t]["auc"],
                         Gain(once[t]["auc"] - base[t]["auc"]), ctnet[t]["auc"],
                         Gain(ctnet[t]["auc"] - base[t]["auc"])]
                        for t in res.settings["trained_periods"]])


def table4(res: Results) -> Table:
    """Pre-train & Fine-tune (all parameters) with more and more fine-tuning data vs CTNet, on
    the last test period."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.finetune_sweep)
    head = ["model", *(f"{d} AUC" for d in domains), *(f"{d} gain vs CTNet" for d in domains)]
    ctnet = {d: res.models[CTNET][d][last]["auc"] for d in domains}
    sizes = sorted({k for per in res.finetune_sweep.values() for k in per})
    rows: list[list[Cell]] = [
        [f"Pre-train & Fine-tune, last {k} period{'s' if k > 1 else ''}",
         *(res.finetune_sweep[d][k]["auc"] for d in domains),
         *(Gain(res.finetune_sweep[d][k]["auc"] - ctnet[d]) for d in domains)]
        for k in sizes]
    rows.append([CTNET, *(ctnet[d] for d in domains), *("" for _ in domains)])
    return Table(head, rows)


def table5(res: Results) -> Table:
    """CTNet's AUC gain over Base on new/old users and items, mean over the test periods."""
    rows: list[list[Cell]] = []
    for d in res.models[BASE]:
        row: list[Cell] = [d]
        for s in SLICES:
            gains = [res.models[CTNET][d][t]["slices"][s]["auc"]
                     - res.models[BASE][d][t]["slices"][s]["auc"]
                     for t in res.settings["trained_periods"]]
            row.append(Gain(sum(gains) / len(gains)))
        rows.append(row)
    return Table(["domain", *SLICES], rows)


def cost_table(res: Results) -> Table:
    """Per job: training rows read from the target and the source domain, wall time and
    peak memory of its process."""
    source = res.settings["source_domain"]
    head = ["model", "domain", "target samples", f"source ({source}) samples", "wall s",
            "peak RSS MB", "above start MB"]
    order = [SOURCE_TOWER, WARM_UP, DIN_WARM_UP, *res.models, *(sweep_name(k) for k in sorted(
        {k for per in res.finetune_sweep.values() for k in per}))]
    rows: list[list[Cell]] = []
    for name in order:
        for d, c in res.costs.get(name, {}).items():
            rows.append([name, d, int(c["target_samples"]), int(c["source_samples"]),
                         int(round(c["seconds"])), int(round(c["peak_rss_mb"])),
                         int(round(c["peak_rss_mb"] - c["start_rss_mb"]))])
    return Table(head, rows)


def standing(runs: Sequence[Results]) -> str:
    """In words, per target domain: the rows whose AUC, averaged over the test periods (and
    the seeds), is above CTNet's, so a reader cannot miss where CTNet loses."""
    periods = runs[0].settings["trained_periods"]

    def mean_auc(name: str, d: str) -> float:
        return statistics.fmean(r.models[name][d][t]["auc"] for r in runs for t in periods)

    lines = []
    for d in runs[0].models[BASE]:
        ctnet = mean_auc(CTNET, d)
        above = sorted(((mean_auc(n, d) - ctnet, n) for n in runs[0].models
                        if n not in (CTNET, ORACLE)), reverse=True)
        better = [f"{n} ({gain:+.4f})" for gain, n in above if gain > 0]
        lines.append(f"- Target {d}: CTNet's mean AUC over the test periods is {ctnet:.4f}, "
                     f"{ctnet - mean_auc(BASE, d):+.4f} over Base; "
                     + (f"rows above it: {', '.join(better)}." if better
                        else "no compared row is above it."))
    return "\n".join(lines)


def plot_gains(runs: Sequence[Results], path: Path) -> None:
    """AUC gain over Base per test period, continual CTNet vs transfer-once, one panel per
    target domain; over several seeds, the mean with the standard deviation as error bars."""
    first = runs[0]
    domains = list(first.models[BASE])
    periods = first.settings["trained_periods"]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        for name, style, dodge in ((CTNET, "o-", -0.03), (ONCE, "s--", 0.03)):
            gains = [[r.models[name][d][t]["auc"] - r.models[BASE][d][t]["auc"] for r in runs]
                     for t in periods]
            ax.errorbar([t + 1 + dodge for t in periods], [statistics.fmean(g) for g in gains],
                        yerr=[statistics.stdev(g) for g in gains] if len(runs) > 1 else None,
                        fmt=style, capsize=3, label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks([t + 1 for t in periods])
        ax.set_title(f"target domain {d}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        ax.set_xlabel("test period")
        ax.set_ylabel("AUC gain over Base" + (" (mean ± std)" if len(runs) > 1 else ""))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: Sequence[Results], out: Path) -> Path:
    """OUT/report.md and OUT/gain_over_time.png for one seed or, pooled, for several."""
    plot = out / "gain_over_time.png"
    plot_gains(runs, plot)
    s = runs[0].settings
    seeds = [r.settings["config"]["train"]["seed"] for r in runs]

    def table(make: Callable[..., Table], *args: str) -> str:
        tables = [make(r, *args) for r in runs]
        return render(tables[0] if len(runs) == 1 else pooled(tables))

    parts = [
        "# CTNet experiment",
        f"Data: `{s['data']}`. CTNet deployed at period {s['deploy_period']} from the "
        f"period-{s['deploy_period'] - 1} checkpoints; each model trained on periods "
        f"{s['trained_periods'][0]}-{s['trained_periods'][-1]}, each evaluated on the next "
        "period. " + (f"Seed {seeds[0]}." if len(runs) == 1 else
                      f"Seeds {', '.join(map(str, seeds))} (a world and a training run each): "
                      "every number is mean ± standard deviation over the seeds."),
        "## Where CTNet stands",
        standing(runs),
        "## Table 2: last test period",
        table(table2),
        *(f"## Table 3: continual vs transfer-once, target {d}\n\n{table(table3, d)}"
          for d in runs[0].models[BASE]),
        f"![AUC gain over time]({plot.name})",
        "## Table 4: Pre-train & Fine-tune (all parameters) by amount of fine-tuning data\n\n"
        f"The newest source model fine-tuned on the target's last k periods, tested on period "
        f"{s['trained_periods'][-1] + 1}.\n\n{table(table4)}",
        "## Table 5: cold start (CTNet AUC gain over Base, mean over test periods)",
        table(table5),
        "## Cost\n\nPer job, each in a process of its own: the training rows it read from "
        "each domain, its wall time (with evaluation and checkpoints), its process's peak "
        "resident memory and how far that peak rose above what the process held at start "
        "(the imported libraries). The source tower is trained once for all targets (in "
        "production, by the source team); Source domain model only scores. The warm-up "
        "stands for the target model's years of training before t0.\n\n"
        + table(cost_table),
    ]
    if ORACLE in runs[0].models:
        parts.append(f"{ORACLE}: the world's true click probabilities scored as a model.")
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
