"""The experiment's report: markdown tables in the layout of the paper's Tables 2-5 and a
cost table (Table 1 as measurements), each gain with its 95% interval, and PNG plots. Every
number comes from `Results` (the same numbers as OUT/metrics.json). Over several seeds, each
cell is the mean and standard deviation of that cell across the seeds.

Real data has holes: a slice with no rows (no new items in a period), a period with one class
(no AUC), a model whose job failed. Each is a "-" in its cell, explained under the table; the
report never fails on them."""

from __future__ import annotations

import math
import statistics
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from ctnet_rec.experiment.significance import (  # noqa: E402
    Z80,
    Z975,
    auc_standard_error,
    mark,
    paired_interval,
)

SLICES = ["new_users", "old_users", "new_items", "old_items"]
CTNET, ONCE = "CTNet", "CTNet transfer-once"


class Gain(float):
    """A difference between two metrics: printed with its sign."""


# int: counts, seconds, MB; float: a metric; Gain: a difference; None: no value ("-")
Cell = str | int | float | None
MISSING = "-"


@dataclass
class Table:
    head: list[str]
    rows: list[list[Cell]]
    note: str = ""  # under the table: what its "-" cells mean


def _fmt(value: float, kind: type) -> str:
    return f"{value:+.4f}" if kind is Gain else f"{value:.0f}" if kind is int else f"{value:.4f}"


def _text(cell: Cell) -> str:
    if isinstance(cell, str):
        return cell
    if cell is None or math.isnan(cell):
        return MISSING
    return _fmt(cell, type(cell))


def render(table: Table) -> str:
    lines = ["| " + " | ".join(table.head) + " |", "|" + "---|" * len(table.head)]
    lines += ["| " + " | ".join(_text(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + (f"\n\n{table.note}" if table.note else "")


def pooled(tables: Sequence[Table]) -> Table:
    """The tables of several seeds as one: numbers become "mean ± std" (sample std) over the
    seeds that have the number; "-" where none has it."""
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
                continue
            kind = next((type(v) for v in values if _number(v)), float)
            nums = [float(v) for v in values if _number(v)]
            if not nums:
                cells.append(None)
            elif len(nums) == 1:
                cells.append(_fmt(nums[0], kind))
            else:
                cells.append(f"{_fmt(statistics.fmean(nums), kind)} ± "
                             f"{_fmt(statistics.stdev(nums), kind).lstrip('+')}")
        rows.append(cells)
    notes = [t.note for t in tables if t.note]
    return Table(first.head, rows, notes[0] if notes else "")


def _number(v: Cell) -> typing.TypeGuard[int | float]:
    return isinstance(v, int | float) and not math.isnan(v)


def metric(res: Results, name: str, d: str, t: int, key: str = "auc",
           part: str | None = None) -> float | None:
    """A model's metric on domain d after period t (of `part`: a slice, or
    "without_adapters"); None when missing: a failed model, an empty slice, one class."""
    m = res.models.get(name, {}).get(d, {}).get(t)
    if m is not None and part is not None:
        m = m.get(part) or m.get("slices", {}).get(part)
    value = None if m is None else m.get(key)
    return None if value is None or math.isnan(value) else float(value)


def gain(a: float | None, b: float | None) -> Gain | None:
    return None if a is None or b is None else Gain(a - b)


def table2(res: Results) -> Table:
    """AUC and GAUC on the last test period, with the gain over Base."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.models[BASE])
    head = ["model"] + [f"{d} {m}" for d in domains for m in ("AUC", "GAUC", "AUC gain")]
    rows: list[list[Cell]] = []
    for name in res.models:
        row: list[Cell] = [name]
        for d in domains:
            auc = metric(res, name, d, last)
            row += [auc, metric(res, name, d, last, "gauc"),
                    gain(auc, metric(res, BASE, d, last))]
        rows.append(row)
    return Table(head, rows, _missing_note(rows))


def _missing_note(rows: list[list[Cell]]) -> str:
    if not any(c is None for row in rows for c in row):
        return ""
    return (f"{MISSING}: no value: the model's job failed (see the experiment's log), or the "
            "period's test rows hold one class only (AUC undefined).")


def table3(res: Results, domain: str) -> Table:
    """Per period: Base vs CTNet transfer-once vs CTNet, AUC and gain."""
    head = ["trained on", "tested on", "Base AUC", "transfer-once AUC", "gain",
            "CTNet AUC", "gain"]
    rows: list[list[Cell]] = []
    for t in res.settings["trained_periods"]:
        base, once, ctnet = (metric(res, n, domain, t) for n in (BASE, ONCE, CTNET))
        rows.append([str(t), str(t + 1), base, once, gain(once, base), ctnet, gain(ctnet, base)])
    return Table(head, rows, _missing_note(rows))


def table4(res: Results) -> Table:
    """Pre-train & Fine-tune (all parameters) with more and more fine-tuning data vs CTNet, on
    the last test period."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.finetune_sweep)
    head = ["model", *(f"{d} AUC" for d in domains), *(f"{d} gain vs CTNet" for d in domains)]
    ctnet = {d: metric(res, CTNET, d, last) for d in domains}
    sizes = sorted({k for per in res.finetune_sweep.values() for k in per})

    def sweep(d: str, k: int) -> float | None:
        value = res.finetune_sweep[d].get(k, {}).get("auc")
        return None if value is None or math.isnan(value) else value

    rows: list[list[Cell]] = [
        [f"Pre-train & Fine-tune, last {k} period{'s' if k > 1 else ''}",
         *(sweep(d, k) for d in domains), *(gain(sweep(d, k), ctnet[d]) for d in domains)]
        for k in sizes]
    rows.append([CTNET, *(ctnet[d] for d in domains), *("" for _ in domains)])
    return Table(head, rows, _missing_note(rows))


def table5(res: Results) -> Table:
    """CTNet's AUC gain over Base on new/old users and items, mean over the test periods."""
    rows: list[list[Cell]] = []
    for d in res.models[BASE]:
        row: list[Cell] = [d]
        for s in SLICES:
            gains = [g for t in res.settings["trained_periods"]
                     if (g := gain(metric(res, CTNET, d, t, part=s),
                                   metric(res, BASE, d, t, part=s))) is not None]
            row.append(Gain(sum(gains) / len(gains)) if gains else None)
        rows.append(row)
    note = ("" if not any(c is None for r in rows for c in r) else
            f"{MISSING}: the slice is empty (or holds one class) in every test period, e.g. "
            "no item the model had not seen: nothing to compare.")
    return Table(["domain", *SLICES], rows, note)


def sharing(settings: dict[str, Any]) -> str:
    """How the jobs shared the machine, for the cost table's wall times."""
    jobs = settings.get("jobs_at_a_time", 1)
    if jobs == 1:
        return ""
    threads = settings.get("torch_threads_per_job")
    return (f" Jobs ran {jobs} at a time, each with {threads} torch thread"
            f"{'s' if threads != 1 else ''}: a wall time is with the machine shared.")


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
            if "failed" in c:
                rows.append([name, d, *(["failed"] * 5)])
                continue
            rows.append([name, d, int(c["target_samples"]), int(c["source_samples"]),
                         int(round(c["seconds"])), int(round(c["peak_rss_mb"])),
                         int(round(c["peak_rss_mb"] - c["start_rss_mb"]))])
    return Table(head, rows)


def gain_interval(runs: Sequence[Results], name: str, ref: str, d: str,
                  periods: Sequence[int] | None = None) -> dict[str, float]:
    """The mean AUC gain of `name` over `ref` on domain d across the test periods (or those
    given), with its 95% interval: with several seeds, t over the seeds' gains (each seed's
    mean over the periods); with one, from each period's test rows (the AUCs' standard
    errors, combined over the periods)."""
    periods = list(periods if periods is not None else runs[0].settings["trained_periods"])
    if len(runs) > 1:
        per_seed = []
        for r in runs:
            seed_gains = [g for t in periods
                     if (g := gain(metric(r, name, d, t), metric(r, ref, d, t))) is not None
                     and not math.isnan(g)]
            if seed_gains:
                per_seed.append(statistics.fmean(seed_gains))
        return paired_interval(per_seed)
    res, var = runs[0], 0.0
    gains: list[float] = []
    for t in periods:
        a, b = metric(res, name, d, t), metric(res, ref, d, t)
        if a is None or b is None:
            continue
        gains.append(a - b)
        paired = res.models[name][d][t].get("paired", {}).get(ref)
        if paired is not None and not math.isnan(paired["se"]):  # DeLong, on the same rows
            var += paired["se"] ** 2
        else:
            var += sum(_auc_se(res, n, d, t, v) ** 2 for n, v in ((name, a), (ref, b)))
    if not gains:
        return paired_interval([])
    mean, se = statistics.fmean(gains), math.sqrt(var) / len(gains)
    return {"mean": mean, "low": mean - Z975 * se, "high": mean + Z975 * se, "n": len(gains),
            "detectable": (Z975 + Z80) * se}


def _auc_se(res: Results, name: str, d: str, t: int, auc: float) -> float:
    m = res.models[name][d][t]
    positives = round(m["rows"] * m["ctr_true"])
    return auc_standard_error(auc, positives, m["rows"] - positives)


def _interval_text(iv: dict[str, float]) -> str:
    if math.isnan(iv["mean"]):
        return MISSING
    if math.isnan(iv["low"]):
        return f"{iv['mean']:+.4f}"
    return f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]{mark(iv)}"


def significance_table(runs: Sequence[Results], d: str) -> Table:
    """Per row: mean AUC, GAUC and NE over the test periods (and seeds), the AUC's gain over
    Base and over CTNet with 95% intervals; + / - marks a gain whose interval lies above /
    below zero."""
    periods = runs[0].settings["trained_periods"]
    rows: list[list[Cell]] = []
    for name in runs[0].models:
        means = []
        for key in ("auc", "gauc", "ne"):
            xs = [x for r in runs for t in periods if (x := metric(r, name, d, t, key)) is not None]
            means.append(statistics.fmean(xs) if xs else None)
        rows.append([name, *means,
                     *(_interval_text(gain_interval(runs, name, ref, d)) if name != ref else ""
                       for ref in (BASE, CTNET))])
    how = (f"over K = {len(runs)} seeds (each seed's gain its mean over the test periods; "
           f"Student's t, {len(runs) - 1} degrees of freedom)" if len(runs) > 1 else
           "from the test rows of each period (DeLong's paired test where both models' scores "
           "were kept, else the AUCs' standard errors, Hanley & McNeil); one training run: "
           "training noise not included")
    detectable = [iv["detectable"] for name in runs[0].models if name != BASE
                  if not math.isnan((iv := gain_interval(runs, name, BASE, d))["detectable"])]
    if detectable:
        how += (f". The smallest gain over Base these intervals detect (5% level, 80% power): "
                f"{statistics.fmean(detectable):.4f} on average over the rows")
    return Table(["model", "mean AUC", "mean GAUC", "mean NE", "AUC gain over Base [95%]",
                  "AUC gain over CTNet [95%]"], rows,
                 f"Intervals {how}. + / -: the whole interval is above / below zero. NE: "
                 "logloss over the entropy of the period's click rate (lower is better). "
                 + (_missing_note(rows) or ""))


def adapters_table(res: Results, d: str) -> Table:
    """Per CTNet variant and test period: AUC and GAUC as trained and with the adapters
    adding nothing, beside Base's: whether the source is used, and whether it helps."""
    rows: list[list[Cell]] = []
    for name in res.models:
        per = res.models[name].get(d, {})
        if not any("without_adapters" in m for m in per.values()):
            continue
        for t in res.settings["trained_periods"]:
            rows.append([name, str(t + 1), metric(res, BASE, d, t),
                         metric(res, name, d, t), metric(res, name, d, t, part="without_adapters"),
                         metric(res, BASE, d, t, "gauc"), metric(res, name, d, t, "gauc"),
                         metric(res, name, d, t, "gauc", part="without_adapters")])
    return Table(["model", "tested on", "Base AUC", "AUC", "AUC, adapters off", "Base GAUC",
                  "GAUC", "GAUC, adapters off"], rows, _missing_note(rows))


def standing(runs: Sequence[Results]) -> str:
    """In words, per target domain: the rows significantly above CTNet (their gain over it has
    a 95% interval above zero), and those within noise of it, so a reader cannot miss where
    CTNet loses nor read noise as a win."""
    lines = []
    for d in runs[0].models[BASE]:
        vs_base = gain_interval(runs, CTNET, BASE, d)
        if math.isnan(vs_base["mean"]):
            lines.append(f"- Target {d}: CTNet has no result (its job failed).")
            continue
        above: list[str] = []
        level: list[str] = []
        for name in runs[0].models:
            if name in (CTNET, ORACLE):
                continue
            iv = gain_interval(runs, name, CTNET, d)
            if math.isnan(iv["mean"]):
                continue
            (above if mark(iv) == "+" else level if mark(iv) == "" else []).append(
                f"{name} ({_interval_text(iv).rstrip('+')})")
        verdict = {"+": "significantly above Base", "-": "significantly BELOW Base",
                   "": "not distinguishable from Base"}[mark(vs_base)]
        lines.append(
            f"- Target {d}: CTNet's gain over Base is {_interval_text(vs_base)}, {verdict}. "
            + (f"Significantly above CTNet: {', '.join(above)}. " if above else
               "No compared row is significantly above CTNet. ")
            + (f"Within noise of it: {', '.join(level)}." if level else ""))
    return "\n".join(lines)


def plot_gains(runs: Sequence[Results], path: Path) -> None:
    """AUC gain over Base per test period, continual CTNet vs transfer-once, one panel per
    target domain, with the 95% interval of each gain as error bars (over the seeds with
    several, from the test rows with one)."""
    first = runs[0]
    domains = list(first.models[BASE])
    periods = first.settings["trained_periods"]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        for name, style, dodge in ((CTNET, "o-", -0.03), (ONCE, "s--", 0.03)):
            ivs = [gain_interval(runs, name, BASE, d, [t]) for t in periods]
            shown = [(t, iv) for t, iv in zip(periods, ivs, strict=True)
                     if not math.isnan(iv["mean"])]
            if not shown:
                continue
            err = [[0.0 if math.isnan(iv["low"]) else iv["mean"] - iv["low"] for _, iv in shown],
                   [0.0 if math.isnan(iv["high"]) else iv["high"] - iv["mean"]
                    for _, iv in shown]]
            ax.errorbar([t + 1 + dodge for t, _ in shown], [iv["mean"] for _, iv in shown],
                        yerr=err, fmt=style, capsize=3, label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks([t + 1 for t in periods])
        ax.set_title(f"target domain {d}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        ax.set_xlabel("test period")
        ax.set_ylabel("AUC gain over Base (95% interval)")
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
        *(f"## Gains with 95% intervals, target {d} (mean over the test periods)\n\n"
          + render(significance_table(runs, d)) for d in runs[0].models[BASE]),
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
        "## What the adapters do\n\nEach CTNet period evaluated twice: as trained, and with "
        "its adapters adding nothing (the target tower alone, `ctnet eval --zero-adapters`). "
        "The difference is what the source tower contributes through the adapters.",
        *(f"### Target {d}\n\n{table(adapters_table, d)}" for d in runs[0].models[BASE]),
        "## Cost\n\nPer job, each in a process of its own: the training rows it read from "
        "each domain, its wall time (with evaluation and checkpoints), its process's peak "
        "resident memory and how far that peak rose above what the process held at start "
        "(the imported libraries). The source tower is trained once for all targets (in "
        "production, by the source team); Source domain model only scores. The warm-up "
        "stands for the target model's years of training before t0."
        + sharing(runs[0].settings) + "\n\n" + table(cost_table),
    ]
    if ORACLE in runs[0].models:
        parts.append(f"{ORACLE}: the world's true click probabilities scored as a model.")
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
