from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctnet_rec.config import ConfigError, config_from_dict
from ctnet_rec.data.contract import list_domains, list_periods, oracle_path
from ctnet_rec.data.summary import validate_dataset
from ctnet_rec.data.synth import synthesize

from .conftest import tiny_synth


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tiny_world, demo_config, tmp_path):
    synthesize(tiny_synth(demo_config), tmp_path / "again", seed=7)
    synthesize(tiny_synth(demo_config), tmp_path / "other", seed=8)
    first = _digest(tiny_world)
    assert first == _digest(tmp_path / "again")
    other = _digest(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first if k.endswith(".parquet"))


def test_refuses_non_empty_output(tiny_world, demo_config):
    with pytest.raises(FileExistsError):
        synthesize(tiny_synth(demo_config), tiny_world, seed=7)


def test_world_is_valid_and_has_the_documented_shape(tiny_world, demo_config):
    assert list_domains(tiny_world) == ["A", "B", "C"]
    for domain in "ABC":  # every period marked complete, so `ctnet pipeline` takes it
        assert list_periods(tiny_world, domain, marked_only=True) == \
            list_periods(tiny_world, domain) and len(list_periods(tiny_world, domain)) == 4
    summary = validate_dataset(tiny_world, demo_config.features)
    by = defaultdict(list)
    for s in summary:
        by[s.domain].append(s)
        assert 0.05 < s.positive_rate < 0.4
        assert 0.6 < s.oracle_auc < 1.0 and 0.5 < s.oracle_gauc < 1.0
    assert [len(v) for v in by.values()] == [4, 4, 4]
    assert by["A"][0].rows == 8000 and by["B"][0].rows == 600 and by["C"][0].rows == 400
    # after the first period, C sees far more new items than B (the paper's ~40% vs "almost
    # all old items"), and every target period brings some new users
    new_items = {d: np.mean([s.new_item_share for s in v[1:]]) for d, v in by.items()}
    assert new_items["C"] > 2 * new_items["B"] and new_items["C"] > 0.15
    assert all(s.new_user_share > 0 for d in "BC" for s in by[d][1:])


def test_target_users_and_items_mostly_seen_in_source(tiny_world):
    def ids(domain: str, col: str) -> set:
        return {v for t in list_periods(tiny_world, domain)
                for v in pq.read_table(tiny_world / domain / f"period={t}",
                                       columns=[col])[col].to_pylist()}
    a_users, a_items = ids("A", "user_id"), ids("A", "item_id")
    for d in "BC":
        users, items = ids(d, "user_id"), ids(d, "item_id")
        assert len(users & a_users) / len(users) > 0.8
        assert len(items & a_items) / len(items) > 0.6


def test_oracle_rows_align_with_data(tiny_world):
    for t in range(4):
        data = pq.read_table(tiny_world / "C" / f"period={t}")
        oracle = pq.read_table(oracle_path(tiny_world, "C", t))
        assert oracle["ts"].equals(data["ts"]) and oracle["user_id"].equals(data["user_id"])
        p = oracle["p_click"].to_numpy()
        assert ((p > 0) & (p < 1)).all()


def test_histories_are_earlier_clicks_newest_first(demo_config, tmp_path):
    """Without background clicks the long sequence is every domain click before the row and the
    short one the same domain's: both can be rebuilt from the labels alone."""
    cfg = tiny_synth(demo_config, background_clicks=0.0, periods=3)
    synthesize(cfg, tmp_path / "w", seed=3)
    rows = []
    for d in "ABC":
        for t in range(3):
            tab = pq.read_table(tmp_path / "w" / d / f"period={t}").to_pylist()
            rows += [dict(r, domain=d) for r in tab]
    clicks = defaultdict(list)  # user -> [(ts, domain, item, category)]
    item_cat = {}
    for r in rows:
        item_cat[r["item_id"]] = r["category_id"]
        if r["label"]:
            clicks[r["user_id"]].append((r["ts"], r["domain"], r["item_id"], r["category_id"]))
    checked = with_history = 0
    for r in rows:
        mine = clicks[r["user_id"]]
        if len({c[0] for c in mine}) != len(mine):
            continue  # two clicks in the same second: their order is not defined
        prior = sorted((c for c in mine if c[0] < r["ts"]), key=lambda c: -c[0])
        same = [c for c in prior if c[1] == r["domain"]]
        assert r["long_hist_item_ids"] == [c[2] for c in prior][: cfg.long_history_max]
        assert r["long_hist_category_ids"] == [c[3] for c in prior][: cfg.long_history_max]
        assert r["hist_item_ids"] == [c[2] for c in same][: cfg.short_history_max]
        assert r["hist_category_ids"] == [item_cat[i] for i in r["hist_item_ids"]]
        checked += 1
        with_history += bool(prior)
    assert checked > 0.9 * len(rows) and with_history > 0.5 * checked


def test_background_clicks_lengthen_long_sequences(tiny_world):
    tab = pq.read_table(tiny_world / "B" / "period=3")
    short = np.mean([len(x) for x in tab["hist_item_ids"].to_pylist()])
    long = np.mean([len(x) for x in tab["long_hist_item_ids"].to_pylist()])
    assert long > 3 * max(short, 1.0)


def test_domain_gap_is_the_domain_specific_share_of_the_click_logit(demo_config):
    """At 0 every domain clicks alike; the larger the gap, the less A's true click logits
    tell of B's on the same user-item pairs (the knob the demo sets to the paper's regime)."""
    from ctnet_rec.data.synth import SyntheticWorld

    rng = np.random.default_rng(0)
    corr = {}
    for gap in (0.0, 0.2, 0.5, 0.9):
        world = SyntheticWorld(tiny_synth(demo_config, domain_gap=gap), seed=1)
        users = rng.integers(0, 600, 5000)
        items = rng.integers(0, len(world.item_cat), 5000)
        ts = np.zeros(5000, np.int64)
        a, b = world._logits("A", users, items, ts), world._logits("B", users, items, ts)
        corr[gap] = np.corrcoef(a, b)[0, 1]
        if gap == 0.0:
            np.testing.assert_allclose(a, b)
    assert corr[0.2] > corr[0.5] + 0.1 > corr[0.9] + 0.2, corr
    with pytest.raises(ConfigError, match=r"synth.domain_gap: must be in \[0, 1\]"):
        config_from_dict({**asdict(demo_config), "synth": {"domain_gap": 1.5}})
