"""The experiment's report: markdown tables in the layout of the paper's Tables 2, 3 and 5,
and PNG plots. Every number comes from `Results` (the same numbers as OUT/metrics.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ctnet_rec.experiment.runner import BASE, ORACLE, Results  # noqa: E402

SLICES = ["new_users", "old_users", "new_items", "old_items"]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _gain(value: float, base: float) -> str:
    return f"{value - base:+.4f}"


def table2(res: Results) -> str:
    """AUC and GAUC on the last test period, with the gain over Base."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.models[BASE])
    head = ["model"] + [f"{d} {m}" for d in domains for m in ("AUC", "GAUC", "AUC gain")]
    rows = []
    for name, per in res.models.items():
        row = [name]
        for d in domains:
            m, b = per[d][last], res.models[BASE][d][last]
            row += [f"{m['auc']:.4f}", f"{m['gauc']:.4f}", _gain(m["auc"], b["auc"])]
        rows.append(row)
    return _table(head, rows)


def table3(res: Results, domain: str) -> str:
    """Per period: Base vs CTNet transfer-once vs CTNet, AUC and gain."""
    base, once, ctnet = (res.models[n][domain] for n in (BASE, "CTNet transfer-once", "CTNet"))
    head = ["trained on", "tested on", "Base AUC", "transfer-once AUC", "gain",
            "CTNet AUC", "gain"]
    rows = [[str(t), str(t + 1), f"{base[t]['auc']:.4f}", f"{once[t]['auc']:.4f}",
             _gain(once[t]["auc"], base[t]["auc"]), f"{ctnet[t]['auc']:.4f}",
             _gain(ctnet[t]["auc"], base[t]["auc"])] for t in res.settings["trained_periods"]]
    return _table(head, rows)


def table4(res: Results) -> str:
    """Pre-train & Fine-tune (all parameters) with more and more fine-tuning data vs CTNet, on
    the last test period."""
    last = res.settings["trained_periods"][-1]
    domains = list(res.finetune_sweep)
    head = ["model", *(f"{d} AUC" for d in domains), *(f"{d} gain vs CTNet" for d in domains)]
    ctnet = {d: res.models["CTNet"][d][last]["auc"] for d in domains}
    sizes = sorted({k for per in res.finetune_sweep.values() for k in per})
    rows = [[f"Pre-train & Fine-tune, last {k} period{'s' if k > 1 else ''}",
             *(f"{res.finetune_sweep[d][k]['auc']:.4f}" for d in domains),
             *(_gain(res.finetune_sweep[d][k]["auc"], ctnet[d]) for d in domains)]
            for k in sizes]
    rows.append(["CTNet", *(f"{ctnet[d]:.4f}" for d in domains), *("" for _ in domains)])
    return _table(head, rows)


def table5(res: Results) -> str:
    """CTNet's AUC gain over Base on new/old users and items, mean over the test periods."""
    head = ["domain", *SLICES]
    rows = []
    for d in res.models[BASE]:
        row = [d]
        for s in SLICES:
            gains = [res.models["CTNet"][d][t]["slices"][s]["auc"]
                     - res.models[BASE][d][t]["slices"][s]["auc"]
                     for t in res.settings["trained_periods"]]
            row.append(f"{sum(gains) / len(gains):+.4f}")
        rows.append(row)
    return _table(head, rows)


def plot_gains(res: Results, path: Path) -> None:
    """AUC gain over Base per test period, continual CTNet vs transfer-once, one panel per
    target domain."""
    domains = list(res.models[BASE])
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    periods = res.settings["trained_periods"]
    for ax, d in zip(axes[0], domains, strict=True):
        base = res.models[BASE][d]
        for name, style in (("CTNet", "o-"), ("CTNet transfer-once", "s--")):
            ax.plot([t + 1 for t in periods],
                    [res.models[name][d][t]["auc"] - base[t]["auc"] for t in periods],
                    style, label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks([t + 1 for t in periods])
        ax.set_title(f"target domain {d}")
        ax.set_xlabel("test period")
        ax.set_ylabel("AUC gain over Base")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(res: Results, out: Path) -> Path:
    plot = out / "gain_over_time.png"
    plot_gains(res, plot)
    s = res.settings
    domains = sorted({d for per in res.seconds.values() for d in per})
    parts = [
        "# CTNet experiment",
        f"Data: `{s['data']}`. CTNet deployed at period {s['deploy_period']} from the "
        f"period-{s['deploy_period'] - 1} checkpoints; each model trained on periods "
        f"{s['trained_periods'][0]}-{s['trained_periods'][-1]}, each evaluated on the next "
        f"period. Seed {s['config']['train']['seed']}.",
        "## Table 2: last test period",
        table2(res),
        *(f"## Table 3: continual vs transfer-once, target {d}\n\n{table3(res, d)}"
          for d in res.models[BASE]),
        f"![AUC gain over time]({plot.name})",
        "## Table 4: Pre-train & Fine-tune (all parameters) by amount of fine-tuning data\n\n"
        f"The newest source model fine-tuned on the target's last k periods, tested on period "
        f"{s['trained_periods'][-1] + 1}.\n\n{table4(res)}",
        "## Table 5: cold start (CTNet AUC gain over Base, mean over test periods)",
        table5(res),
        "## Wall time (seconds; the source tower is trained once for all targets)",
        _table(["model", *domains],
               [[n, *(str(per.get(d, "")) for d in domains)] for n, per in res.seconds.items()]),
    ]
    if ORACLE in res.models:
        parts.append(f"{ORACLE}: the world's true click probabilities scored as a model.")
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
