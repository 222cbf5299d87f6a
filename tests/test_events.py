"""`ctnet data from-events`: an event log -> the contract, histories leak-free, periods cut
as configured, the same rows whether built in memory or in buckets of users, bad input refused
naming file, row and column."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from ctnet_rec.cli import main
from ctnet_rec.config import ConfigError, load_config
from ctnet_rec.data.contract import (
    SUCCESS,
    DataError,
    list_domains,
    list_periods,
    period_marks,
    validate_periods,
)
from ctnet_rec.data.events import (
    EventColumns,
    EventsConfig,
    import_events,
    load_events_config,
    stable_id,
)

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400
T0 = 1_714_521_600  # 2024-05-01 00:00 UTC
MAPPING = EventsConfig(EventColumns(user="uid", item="iid", time="t", label="click",
                                    domain="surface", category="cat"),
                       domains={"feed": "A", "search": "B"}, short_history=2)


def _log() -> pa.Table:
    """User 1's events over two days and both surfaces (two share a second), user 2's one."""
    rows = [  # uid, iid, t, click, surface, cat
        (1, "a", T0 + 10, 1, "feed", 5),
        (1, "b", T0 + 20, 0, "feed", 6),
        (1, "c", T0 + 30, 1, "search", 7),
        (1, "d", T0 + 40, 1, "feed", 8),
        (1, "e", T0 + 40, 1, "feed", 9),  # the same second as d: neither sees the other
        (2, "a", T0 + 50, 1, "search", 5),
        (1, "f", T0 + DAY + 5, 0, "search", 7),
        (1, "g", T0 + DAY + 6, 1, "feed", 8),
    ]
    return pa.table({k: [r[i] for r in rows] for i, k in
                     enumerate(["uid", "iid", "t", "click", "surface", "cat"])})


def _rows(out: Path, domain: str) -> dict[int, list[dict]]:
    return {int(p.name.split("=")[1]): pa.concat_tables(
        [pq.read_table(f) for f in sorted(p.glob("*.parquet"))]).to_pylist()
        for p in sorted((out / domain).glob("period=*"))}


def test_histories_are_strictly_earlier_clicks_newest_first(tmp_path):
    pq.write_table(_log(), tmp_path / "log.parquet")
    summary = import_events([tmp_path / "log.parquet"], MAPPING, tmp_path / "out")
    a, b = _rows(tmp_path / "out", "A"), _rows(tmp_path / "out", "B")
    assert sorted(a) == sorted(b) == [0, 1]  # by day
    assert summary["rows"] == {"A": {"0": 4, "1": 1}, "B": {"0": 2, "1": 1}}
    item = {x: stable_id(x) for x in "abcdefg"}  # text ids: a stable int64 each
    mine = {r["item_id"]: r for rows in (*a.values(), *b.values()) for r in rows
            if r["user_id"] == 1}
    long = {x: mine[item[x]]["long_hist_item_ids"] for x in "abcdefg"}
    short = {x: mine[item[x]]["hist_item_ids"] for x in "abcdefg"}
    assert long["a"] == [] and long["b"] == [item["a"]]
    assert long["c"] == [item["a"]]  # b was not clicked
    assert long["d"] == long["e"] == [item["c"], item["a"]]  # not each other: same second
    # newest first; of one second, the later input row first
    assert long["f"] == [item[x] for x in "edca"]
    assert short["d"] == [item["a"]] and short["f"] == [item["c"]]  # own domain only
    assert short["g"] == [item["e"], item["d"]]  # capped at short_history = 2
    assert mine[item["g"]]["hist_category_ids"] == [9, 8]
    assert mine[item["g"]]["hour"] == 0 and mine[item["g"]]["ts"] == T0 + DAY + 6
    # user 2 knows nothing of user 1
    assert [r["long_hist_item_ids"] for r in b[0] if r["user_id"] == 2] == [[]]
    # rows of a period file in time order
    assert [r["ts"] for r in a[0]] == sorted(r["ts"] for r in a[0])


def _random_log(n: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"uid": rng.integers(0, 60, n), "iid": rng.integers(0, 500, n),
                     "t": T0 + rng.integers(0, 9 * DAY, n) // 7 * 7,  # ties of a second
                     "click": rng.integers(0, 2, n),
                     "surface": rng.choice(["feed", "search"], n),
                     "cat": rng.integers(0, 20, n)})


@pytest.mark.parametrize("period", ["day", "equal"])
def test_buckets_of_users_build_the_same_rows_as_memory(tmp_path, period):
    """Inputs larger than memory: with room for 500 events of 3,000 the log is built in
    buckets of users, one part file each; every period holds the same rows, histories
    included, as when built in memory (and the contract's checks pass)."""
    log = _random_log()
    pq.write_table(log.slice(0, 1700), tmp_path / "one.parquet")
    pcsv.write_csv(log.slice(1700), tmp_path / "two.csv")
    inputs = [tmp_path / "one.parquet", tmp_path / "two.csv"]
    cfg = copy.deepcopy(MAPPING)
    cfg.period, cfg.periods = period, 4
    import_events(inputs, cfg, tmp_path / "memory")
    cfg.memory_rows = 500
    import_events(inputs, cfg, tmp_path / "buckets")
    assert len(list((tmp_path / "buckets" / "A" / "period=0").glob("part-*.parquet"))) > 1
    features = load_config(ROOT / "examples" / "template.toml").features
    for domain in ("A", "B"):
        memory, buckets = _rows(tmp_path / "memory", domain), _rows(tmp_path / "buckets", domain)
        assert sorted(memory) == sorted(buckets)
        if period == "equal":
            assert len(memory) == 4
        key = ("ts", "user_id", "item_id", "label")
        for t in memory:
            assert sorted(memory[t], key=lambda r: [r[k] for k in key]) == \
                sorted(buckets[t], key=lambda r: [r[k] for k in key])
        validate_periods(tmp_path / "buckets", domain, sorted(buckets), features)
    total = sum(len(v) for d in "AB" for v in _rows(tmp_path / "memory", d).values())
    assert total == 3000


def test_bad_input_is_refused_naming_file_row_and_column(tmp_path):
    good = _log()
    cases = {
        "missing": (good.drop_columns(["cat"]), "missing column 'cat'"),
        "label": (good.set_column(3, "click", pa.array([0, 1, 2, 0, 1, 1, 0, 1])),
                  "row 2: column 'click' is not 0 or 1"),
        "time": (good.set_column(2, "t", pa.array(["2024-05-01T00:00:10"] * 4 + ["soon"] +
                                                  ["2024-05-01T00:00:10"] * 3)),
                 "row 4: column 't': time 'soon' is not ISO 8601"),
        "domain": (good.set_column(4, "surface", pa.array(["feed"] * 7 + ["mail"])),
                   "row 7: column 'surface': domain 'mail' is not in the mapping"),
        "empty": (good.set_column(0, "uid", pa.array([1, None, 1, 1, 1, 2, 1, 1])),
                  "row 1: column 'uid' is empty"),
        # a CSV column of ids with one fractional value is read as floats: that row is named
        "fraction": (good.set_column(5, "cat", pa.array([5, 6, 7, 8, 9.5, 5, 7, 8])),
                     "row 4: column 'cat' is not an integer id"),
        "float ids": (good.set_column(5, "cat", pa.array([5.0, 6, 7, 8, 9, 5, 7, 8])),
                      "column 'cat' is stored as double: write its ids as integers or text"),
        "bool ids": (good.set_column(5, "cat", pa.array([True] * 8)),
                     "column 'cat' has type bool, expected integer or text ids"),
    }
    for name, (table, message) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path)
        with pytest.raises(DataError, match=f"{path}: .*{message}" if name == "missing"
                           else f"{path}: {message}"):
            import_events([path], MAPPING, tmp_path / name)
        assert not (tmp_path / name).exists()  # nothing half-written
        assert not (tmp_path / f"{name}.partial").exists()
    # ISO 8601 text times are read as UTC seconds
    iso = good.set_column(2, "t", pa.array(["2024-05-01T00:00:10"] * 8))
    pq.write_table(iso, tmp_path / "iso.parquet")
    import_events([tmp_path / "iso.parquet"], MAPPING, tmp_path / "iso")
    assert {r["ts"] for rows in _rows(tmp_path / "iso", "A").values() for r in rows} == \
        {T0 + 10}


def test_a_bad_csv_row_is_named_by_its_line_too(tmp_path):
    """Rows count from 0, as pyarrow's; in a CSV the message also gives the line an editor
    shows (the header is line 1)."""
    path = tmp_path / "log.csv"
    pcsv.write_csv(_log().set_column(4, "surface", pa.array(["feed"] * 7 + ["mail"])), path)
    with pytest.raises(DataError, match=f"{path}: row 7 \\(line 9\\): column 'surface': "
                       "domain 'mail'"):
        import_events([path], MAPPING, tmp_path / "out")


def test_the_cli_with_the_example_mapping(tmp_path, monkeypatch):
    """examples/events.toml on a CSV log with its column names: a dataset the template
    config validates, written to and read from a URI (fsspec's in-memory filesystem); a bad
    mapping is refused naming the key."""
    import fsspec

    from ctnet_rec.data.storage import data_root
    from ctnet_rec.training.run_copy import CACHE_ENV, RunCopy

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    log = _random_log(400).rename_columns(["user_id", "item_id", "event_time", "clicked",
                                           "surface", "category_id"])
    log = log.append_column("seller_id", pa.array(np.arange(400) % 7)).append_column(
        "age_group", pa.array(np.arange(400) % 5))
    pcsv.write_csv(log, tmp_path / "log.csv")
    uploaded: list[str] = []
    copy_file = RunCopy._copy

    def recorded(self, src, src_fs, dst, dst_fs):
        uploaded.append(dst)
        copy_file(self, src, src_fs, dst, dst_fs)

    monkeypatch.setattr(RunCopy, "_copy", recorded)
    assert main(["data", "from-events", str(tmp_path / "log.csv"), "--mapping",
                 str(ROOT / "examples" / "events.toml"), "--out", "memory://events/out"]) == 0
    assert fsspec.filesystem("memory").isfile("/events/out/events.json")
    # every period marked complete (`ctnet pipeline` takes it), each marker uploaded after
    # every data file: a reader of the URI never sees a marked period without its files
    root = data_root("memory://events/out")
    for domain in list_domains(root):
        assert period_marks(root, domain)[1] == set()
        assert list_periods(root, domain, marked_only=True)
    markers = [i for i, f in enumerate(uploaded) if f.endswith(f"/{SUCCESS}")]
    assert len(markers) == sum(len(list_periods(root, d)) for d in list_domains(root))
    assert min(markers) == len(uploaded) - len(markers)
    assert main(["data", "validate", "memory://events/out", "--config",
                 str(ROOT / "examples" / "template.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "examples" / "events.toml").read_text().replace(
        'period = "day"', 'period = "month"'))
    with pytest.raises(ConfigError, match="period: must be one of"):
        load_events_config(bad)


def test_a_log_of_one_period_is_said_to_be_too_short_to_train_on(tmp_path, caplog):
    """A day's log cut by day is one period a domain: valid data, but nothing to test a
    continually trained model on."""
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[columns]\nuser = "uid"\nitem = "iid"\ntime = "t"\nlabel = "click"\n'
                       'domain = "surface"\n[domains]\n"feed" = "A"\n"search" = "B"\n')
    log = _random_log(200)
    for name, step in (("day", 1), ("days", 1000)):  # 200 s; 200,000 s: 3 days
        pq.write_table(log.set_column(2, "t", pa.array(T0 + step * np.arange(200))),
                       tmp_path / f"{name}.parquet")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["data", "from-events", str(tmp_path / f"{name}.parquet"), "--mapping",
                         str(mapping), "--out", str(tmp_path / name)]) == 0
        warned = "A, B: one period only; training continually needs two at least" in caplog.text
        assert warned == (name == "day")
        assert ("rows in 1 period," in caplog.text) == (name == "day")
