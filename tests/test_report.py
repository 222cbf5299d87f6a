"""The report on made-up results: intervals computed as documented, and real data's holes
(an empty slice, a period with one class, a failed model) shown as "-", never a crash."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from ctnet_rec.experiment.report import gain_interval, significance_table, standing, write_report
from ctnet_rec.experiment.runner import BASE, Results
from ctnet_rec.experiment.significance import auc_standard_error, paired_interval, t975

MODELS = ["Source domain model", BASE, "DIN", "CTNet transfer-once", "CTNet w/o GLU", "CTNet"]
SLICES = ["new_users", "old_users", "new_items", "old_items"]


def _metrics(auc: float, rows: int = 4000) -> dict:
    m = {"auc": auc, "gauc": auc - 0.05, "logloss": 0.6, "ne": 1.5 - auc, "ctr_pred": 0.3,
         "ctr_true": 0.3, "rows": rows}
    return {**m, "slices": {s: dict(m, rows=rows // 2) for s in SLICES}}


def _results(seed: int, ctnet_gain: float) -> Results:
    rng = np.random.default_rng(seed)
    periods = [6, 7, 8]
    models = {}
    for i, name in enumerate(MODELS):
        models[name] = {}
        for d in ("B", "C"):
            per = {}
            for t in periods:
                # a level of its own per model (a row shown under another's name shows),
                # CTNet's at Base's so that `ctnet_gain` is its whole gain
                level = 0.01 * (MODELS.index(BASE) if name == "CTNet" else i)
                auc = 0.65 + level + rng.normal(0, 0.002)
                if name.startswith("CTNet"):
                    auc += ctnet_gain
                per[t] = _metrics(auc)
                if name.startswith("CTNet"):
                    per[t]["without_adapters"] = _metrics(auc - ctnet_gain)
            models[name][d] = per
    costs = {n: {d: {"target_samples": 1, "source_samples": 0, "seconds": 1.0,
                     "peak_rss_mb": 10.0, "start_rss_mb": 5.0} for d in ("B", "C")}
             for n in MODELS}
    sweep = {d: {k: _metrics(0.6) for k in (1, 2, 9)} for d in ("B", "C")}
    settings = {"deploy_period": 6, "trained_periods": periods, "source_domain": "A",
                "config": {"train": {"seed": seed}}, "data": "made-up"}
    return Results(settings, models, costs, sweep)


def test_paired_interval_is_students_t():
    iv = paired_interval([0.01, 0.02, 0.03])
    half = t975(2) * 0.01 / math.sqrt(3)
    assert iv["mean"] == pytest.approx(0.02) and iv["low"] == pytest.approx(0.02 - half)
    # by hand: sd 0.01, se 0.01 / sqrt(3) = 0.0057735; t(0.975, 2) = 4.303, t(0.80, 2) = 1.061
    assert iv["high"] == pytest.approx(0.02 + 4.303 * 0.0057735, abs=1e-6)
    assert iv["detectable"] == pytest.approx((4.303 + 1.061) * 0.0057735, abs=1e-6)
    assert math.isnan(paired_interval([0.01])["low"])
    assert paired_interval([float("nan"), 0.01, 0.03])["n"] == 2


def test_hanley_mcneil_standard_error():
    # the paper's example: AUC 0.5 on 50 + 50 rows -> 0.0577 (about 1 / sqrt(3 n))
    assert auc_standard_error(0.5, 50, 50) == pytest.approx(math.sqrt(1 / 300), rel=0.02)
    assert math.isnan(auc_standard_error(0.7, 0, 10))


def test_several_seeds_the_unit_is_a_seed():
    """Each seed's gain is its mean over the test periods; the interval is t over the seeds
    (K - 1 degrees of freedom), not over seeds x periods."""
    runs = [_results(s, 0.01) for s in range(3)]
    iv = gain_interval(runs, "CTNet", BASE, "B")
    per_seed = [sum(r.models["CTNet"]["B"][t]["auc"] - r.models[BASE]["B"][t]["auc"]
                    for t in (6, 7, 8)) / 3 for r in runs]
    assert iv == paired_interval(per_seed) and iv["n"] == 3
    assert iv["low"] > 0  # a clear gain is marked
    table = significance_table(runs, "B")
    assert "over K = 3 seeds" in table.note and "2 degrees of freedom" in table.note
    assert "smallest gain over Base these intervals detect" in table.note
    ctnet = next(r for r in table.rows if r[0] == "CTNet")
    assert ctnet[4].endswith("]+")
    for row in table.rows:  # each row's mean NE is its own model's
        aucs = [r.models[row[0]]["B"][t]["auc"] for r in runs for t in (6, 7, 8)]
        assert row[3] == pytest.approx(1.5 - sum(aucs) / len(aucs)), row[0]
    assert "significantly above Base" in standing(runs)


def test_one_seed_uses_the_test_rows():
    run = _results(0, 0.0)
    iv = gain_interval([run], "CTNet", BASE, "B")
    ses = [auc_standard_error(run.models[n]["B"][t]["auc"], 1200, 2800)
           for t in (6, 7, 8) for n in ("CTNet", BASE)]
    se = math.sqrt(sum(x * x for x in ses)) / 3
    assert iv["high"] - iv["mean"] == pytest.approx(1.959964 * se)
    assert iv["detectable"] == pytest.approx((1.959964 + 0.841621) * se)
    assert "not distinguishable from Base" in standing([run])
    assert "one training run: training noise not included" in significance_table([run], "B").note


def test_report_survives_empty_slices_one_class_periods_and_failed_models(tmp_path):
    runs = []
    for seed in (0, 1):
        r = _results(seed, 0.005)
        for per in r.models.values():  # no new items in any test period (MovieLens)
            for d in per.values():
                for m in d.values():
                    m["slices"].pop("new_items")
        r.models[BASE]["C"][7]["auc"] = float("nan")  # one class in a test period
        r.models["DIN"] = {"B": {}, "C": {}}  # its job failed
        r.costs["DIN"] = {"B": {"failed": 1.0}, "C": {"failed": 1.0}}
        r.finetune_sweep["C"][2] = {}
        runs.append(r)
    for group in (runs[:1], runs):
        out = tmp_path / str(len(group))
        out.mkdir()
        report = write_report(copy.deepcopy(group), out).read_text()
        assert "| DIN | - | - | - |" in report
        assert "the slice is empty" in report
        assert "job failed" in report
        table5 = report.split("## Table 5", 1)[1].split("##", 1)[0]
        assert "| - |" in table5
        assert "failed" in report.split("## Cost", 1)[1]


def test_delong_matches_a_hand_computation():
    """DeLong's paired test by midranks against its definition (the pairwise kernel psi,
    structural components, their covariances), ties included."""
    from ctnet_rec.experiment.significance import delong_difference

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    first = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: ties
    second = np.round(0.5 * first + rng.normal(0, 1.0, 60), 1)
    pos, neg = labels == 1, labels == 0
    m, n = pos.sum(), neg.sum()

    def components(s):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (a1, v10a, v01a), (a2, v10b, v01b) = components(first), components(second)
    d10, d01 = v10a - v10b, v01a - v01b
    var = d10.var(ddof=1) / m + d01.var(ddof=1) / n
    gain, se = delong_difference(labels, first, second)
    assert gain == pytest.approx(a1 - a2, abs=1e-12)
    assert se == pytest.approx(math.sqrt(var), rel=1e-9)
    assert math.isnan(delong_difference(np.ones(5), first[:5], second[:5])[1])


def test_one_seed_uses_delong_where_scores_were_kept():
    run = _results(0, 0.0)
    for t in (6, 7, 8):
        run.models["CTNet"]["B"][t]["paired"] = {BASE: {"gain": 0.0, "se": 0.001 * (t - 5)}}
    iv = gain_interval([run], "CTNet", BASE, "B")
    se = math.sqrt(0.001 ** 2 + 0.002 ** 2 + 0.003 ** 2) / 3
    assert iv["high"] - iv["mean"] == pytest.approx(1.959964 * se)
    assert "DeLong's paired test" in significance_table([run], "B").note
