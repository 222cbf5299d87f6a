"""The regime map's arithmetic and its rule, on hand-made numbers (the map itself takes hours:
`python benchmarks/regime_map.py`)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from ctnet_rec.config import load_config
from ctnet_rec.experiment.runner import BASE, LATE_FUSION, Results, plan, quick

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import regime_map  # noqa: E402

DEMO = ROOT / "examples" / "demo.toml"


def _iv(mean: float, low: float, high: float) -> dict[str, float]:
    return {"mean": mean, "low": low, "high": high, "n": 5, "detectable": math.nan}


def _world(fusion: tuple[float, float, float], **rows: tuple[float, float, float]) -> dict:
    return {LATE_FUSION: {"AUC": _iv(*fusion)}, **{r: {"AUC": _iv(*v)} for r, v in rows.items()}}


def test_the_rule_excludes_harm_anywhere_and_ranks_where_the_late_fusion_helps():
    a, b, c = list(regime_map.CANDIDATES)[:3]
    summary = {
        # the late fusion above Base: these two worlds rank the candidates
        "w1": _world((0.01, 0.005, 0.015), **{a: (0.001, -0.001, 0.003),
                                              b: (0.004, 0.001, 0.007),
                                              c: (0.009, 0.004, 0.014)}),
        "w2": _world((0.02, 0.01, 0.03), **{a: (0.002, -0.001, 0.005),
                                            b: (0.006, 0.002, 0.010),
                                            c: (0.011, 0.006, 0.016)}),
        # not above Base here: not ranked on, but harm here still counts
        "w3": _world((0.0, -0.01, 0.01), **{a: (0.0, -0.002, 0.002),
                                            b: (0.05, 0.04, 0.06),
                                            c: (-0.004, -0.007, -0.001)}),
        "real": _world((0.0, -0.01, 0.01), **{a: (0.0, -0.001, 0.001),
                                              b: (0.0, -0.002, 0.002),
                                              c: (0.0, -0.001, 0.001)}),
    }
    verdict = regime_map.choose(summary, real=["real"])
    assert verdict["worlds_where_late_fusion_helps"] == ["w1", "w2"]
    assert verdict["candidates"][c]["below_base_on"] == ["w3"]
    assert verdict["candidates"][b]["mean_auc_gain"] == pytest.approx(0.005)  # w3 not ranked
    assert verdict["winner"] == b
    # harm on the real dataset excludes too, and a candidate never run is not eligible
    summary["real"][b]["AUC"] = _iv(-0.003, -0.005, -0.001)
    verdict = regime_map.choose(summary, real=["real"])
    assert verdict["candidates"][b]["below_base_on"] == ["real"] and verdict["winner"] == a
    assert math.isnan(verdict["candidates"][list(regime_map.CANDIDATES)[3]]["mean_auc_gain"])
    # one run on fewer seeds than the map's somewhere is reported, never ranked
    summary["w3"][a]["AUC"] = {**summary["w3"][a]["AUC"], "n": 2}
    verdict = regime_map.choose(summary, real=["real"])
    assert not verdict["candidates"][a]["every_world_and_seed"] and verdict["winner"] is None


def test_a_seed_gain_is_its_mean_over_test_periods_and_the_interval_is_over_seeds():
    def m(auc: float, new_users: float | None = None) -> dict:
        slices = {} if new_users is None else {"new_users": {"auc": new_users}}
        return {"auc": auc, "gauc": auc, "slices": slices}

    def results(gains: tuple[float, float]) -> Results:
        base = {7: m(0.60, 0.55), 8: m(0.62)}  # period 8 has no new users
        row = {7: m(0.60 + gains[0], 0.56), 8: m(0.62 + gains[1])}
        return Results({}, {BASE: {"B": base}, "CTNet": {"B": row}}, {}, {})

    by_seed = {str(s): regime_map.seed_gains(results(g), "B")
               for s, g in enumerate([(0.01, 0.03), (0.02, 0.02), (0.03, 0.05)])}
    assert by_seed["0"]["CTNet"]["AUC"] == pytest.approx(0.02)
    assert by_seed["0"]["CTNet"]["new users AUC"] == pytest.approx(0.01)  # the one period
    assert math.isnan(by_seed["0"]["CTNet"]["new items AUC"])  # no period has any
    iv = regime_map.summarise({"w": by_seed})["w"]["CTNet"]["AUC"]
    # per seed 0.02, 0.02, 0.04: mean 0.08/3, sd 0.011547, t(2) 4.303
    half = 4.303 * 0.011547005 / math.sqrt(3)
    assert iv["mean"] == pytest.approx(0.08 / 3)
    assert (iv["low"], iv["high"]) == pytest.approx((0.08 / 3 - half, 0.08 / 3 + half))
    assert iv["n"] == 3


def test_a_map_world_changes_only_the_gap_and_the_target_rows(tmp_path):
    cfg = load_config(DEMO)
    w = regime_map.world_config(cfg, 0.5, 0.25, 3, ["B"])
    assert w.synth.domain_gap == 0.5 and w.train.seed == 3
    rows = {d: v.impressions_per_period for d, v in w.synth.domains.items()}
    assert rows == {"A": 60000, "B": 2500, "C": 5000}
    assert w.synth == dataclasses.replace(cfg.synth, domain_gap=0.5, domains=w.synth.domains)
    assert w.experiment.target_domains == ["B"] and w.experiment.joint_baselines == ["DDTCDR"]
    names = {j.name for j in plan(quick(w), tmp_path / "data", tmp_path,
                                  rows=[*regime_map.BASELINES, *regime_map.CANDIDATES],
                                  variants=regime_map.CANDIDATES)}
    assert names == {"source tower", "warm-up", BASE, *regime_map.BASELINES,
                     *regime_map.CANDIDATES}


def test_an_earlier_runs_rows_join_only_when_the_shared_rows_agree():
    nan = math.nan
    now = {"w": {"0": {LATE_FUSION: {"AUC": 0.01, "new users AUC": nan},
                       "new": {"AUC": 0.02, "new users AUC": nan}}}}
    earlier = {"w": {"0": {LATE_FUSION: {"AUC": 0.01, "new users AUC": nan},
                           "old": {"AUC": 0.03, "new users AUC": 0.1}},
                     "1": {"old": {"AUC": 0.5}}},
               "other world": {"0": {"old": {"AUC": 0.5}}}}
    both = regime_map.merged(now, earlier)
    assert set(both) == {"w"} and set(both["w"]) == {"0"}  # this run's worlds and seeds only
    assert both["w"]["0"]["old"] == {"AUC": 0.03, "new users AUC": 0.1}
    assert both["w"]["0"]["new"]["AUC"] == 0.02 and "old" not in now["w"]["0"]
    earlier["w"]["0"][LATE_FUSION]["AUC"] = 0.0100001
    with pytest.raises(ValueError, match="w seed 0: Late fusion .* AUC is 0.01 here"):
        regime_map.merged(now, earlier)
    # a row run again by a newer version replaces the earlier one; the others are still checked
    earlier["w"]["0"][LATE_FUSION]["AUC"] = 0.01
    earlier["w"]["0"]["new"] = {"AUC": 0.5}
    with pytest.raises(ValueError, match="new AUC is 0.02 here"):
        regime_map.merged(now, earlier)
    assert regime_map.merged(now, earlier, frozenset({"new"}))["w"]["0"]["new"]["AUC"] == 0.02
    earlier["w"]["0"][LATE_FUSION]["AUC"] = 0.0100001
    with pytest.raises(ValueError, match="Late fusion"):
        regime_map.merged(now, earlier, frozenset({"new"}))
