"""`ctnet data from-events`: a team's event log (one row per impression: user, item, time,
click, domain, a few side columns) -> the data contract, each row with its behaviour
sequences built leak-free: the long one over every domain, the short one over the row's own
domain, strictly earlier events only (the same second excluded), newest first, capped.

Events are ordered by (time, user, input row) everywhere: that order cuts `period = "equal"`
into equal row counts, and breaks ties within a user's history. Periods by a time unit count
whole units (UTC) from the first event's; a unit without events has no folder.

Inputs larger than memory: the events are first spread over buckets by user (a user's history
never leaves its bucket), each of at most `memory_rows` events on average, then each bucket is
built alone and writes its own part file of every period. Only the time, user and period of
all events are held at once (24 bytes an event), to cut the periods. Nothing is written to OUT
until every input has been read and checked (OUT.partial, renamed at the end).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ctnet_rec.config import ConfigError, build_section
from ctnet_rec.data.contract import DataError, mark_complete, write_parquet
from ctnet_rec.data.ids import splitmix64

TIME_UNITS = {"hour": 3600, "day": 86_400, "week": 7 * 86_400}
HISTORIES = (("long_", "long_history"), ("", "short_history"))  # column prefix, cap setting


@dataclass
class EventColumns:
    """Which column of the event table holds what (the output's names are the contract's)."""

    user: str  # -> user_id; integer ids, or text (hashed to a stable int64)
    item: str  # -> item_id
    time: str  # -> ts: unix seconds (integer), a timestamp, or ISO 8601 text
    label: str  # -> label: 0/1 or bool
    domain: str  # its values name the domains (see `EventsConfig.domains`)
    category: str | None = None  # -> category_id (0 without one)
    seller: str | None = None  # -> seller_id (0 without one)
    price: str | None = None  # -> price (numeric)
    side: list[str] = field(default_factory=list)  # other id columns, kept by their names
    keep: list[str] = field(default_factory=list)  # columns kept as they are, after `label`


@dataclass
class EventsConfig:
    """The column mapping and how periods and histories are cut (a TOML file)."""

    columns: EventColumns
    # domain value (as text) -> its folder's name; empty: the values themselves
    domains: dict[str, str] = field(default_factory=dict)
    period: Literal["hour", "day", "week", "equal"] = "day"
    periods: int = 10  # with period = "equal": that many periods of equal row counts
    behaviours: Literal["clicks", "all"] = "clicks"  # what a history holds
    long_history: int = 128
    short_history: int = 30
    hour: bool = True  # an `hour` column: the event's hour of the day, UTC
    memory_rows: int = 20_000_000  # events built at once (more: buckets by user)

    def validate(self) -> None:
        names = list(self.domains.values())
        for bad, key, reason in (
                (self.period == "equal" and self.periods < 2, "periods", "at least 2"),
                (min(self.long_history, self.short_history) < 1, "long_history",
                 "histories keep at least 1 behaviour"),
                (self.memory_rows < 1, "memory_rows", "must be >= 1"),
                (len(set(names)) != len(names), "domains", "two values name one domain")):
            if bad:
                raise ConfigError(f"{key}: {reason}")


def load_events_config(path: Path) -> EventsConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
        cfg = build_section(EventsConfig, raw)
        cfg.validate()
    except FileNotFoundError:
        raise ConfigError(f"{path}: mapping file not found") from None
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


_KEYS = ("row", "ts", "user", "item", "category", "seller", "label", "domain", "period")


@dataclass
class Events:
    """Events normalised to the contract's types, in input order (`row`: the input row
    number, the last tie-break), with each event's period and domain (index into the names)."""

    row: np.ndarray
    ts: np.ndarray
    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    seller: np.ndarray
    label: np.ndarray
    domain: np.ndarray
    period: np.ndarray
    before: dict[str, np.ndarray]  # output columns between label and user_id
    after: dict[str, np.ndarray]  # output columns after seller_id

    def take(self, idx: np.ndarray) -> Events:
        return Events(**{k: getattr(self, k)[idx] for k in _KEYS},
                      before={k: v[idx] for k, v in self.before.items()},
                      after={k: v[idx] for k, v in self.after.items()})


# -- reading and checking -----------------------------------------------------------------------


def stable_id(text: str) -> int:
    """A non-negative int64 id from a string, the same on every machine."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _files(paths: list[Path]) -> list[tuple[Path, str]]:
    out = []
    for p in paths:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            kind = "csv" if f.name.endswith((".csv", ".csv.gz")) else \
                "parquet" if f.suffix == ".parquet" else None
            if kind is None:
                if not p.is_dir():
                    raise DataError(f"{f}: neither Parquet (.parquet) nor CSV (.csv, .csv.gz)")
                continue
            out.append((f, kind))
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no Parquet or CSV files")
    return out


@dataclass(frozen=True)
class _Place:
    """Where a batch's rows are, for messages: the file and its rows, counted from 0 as
    pyarrow does; in a CSV file also the line an editor shows (the header is line 1)."""

    path: str
    first_row: int
    csv: bool

    def row(self, i: int = 0) -> str:
        r = self.first_row + i
        return f"{self.path}: row {r}" + (f" (line {r + 2})" if self.csv else "")


def _first_bad(at: _Place, column: str, bad: np.ndarray, what: str) -> None:
    if bad.any():
        raise DataError(f"{at.row(int(np.flatnonzero(bad)[0]))}: column {column!r} {what}")


def _ids(arr: pa.Array, at: _Place, column: str) -> np.ndarray:
    if pa.types.is_integer(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False), np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        enc = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) \
            else pc.dictionary_encode(arr)
        ids = np.array([stable_id(s) for s in enc.dictionary.to_pylist()], np.int64)
        return ids[enc.indices.to_numpy(zero_copy_only=False)]
    if pa.types.is_floating(arr.type):  # a CSV column with a fractional value somewhere
        values = np.asarray(arr.to_numpy(zero_copy_only=False), np.float64)
        _first_bad(at, column, ~np.isfinite(values) | (values != np.floor(values)),
                   "is not an integer id (ids are integers or text)")
        raise DataError(f"{at.path}: column {column!r} is stored as {arr.type}: write its "
                        "ids as integers or text (a float loses ids above 2^53)")
    raise DataError(f"{at.path}: column {column!r} has type {arr.type}, "
                    "expected integer or text ids")


def _seconds(arr: pa.Array, at: _Place, column: str) -> np.ndarray:
    if pa.types.is_integer(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False), np.int64)
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        return np.asarray(pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64()).to_numpy(
            zero_copy_only=False), np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            return _seconds(pc.cast(arr, pa.timestamp("s")), at, column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for i, text in enumerate(arr.to_pylist()):
                try:
                    pc.cast(pa.array([text]), pa.timestamp("s"))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise DataError(f"{at.row(i)}: column {column!r}: time "
                                    f"{text!r} is not ISO 8601 (e.g. 2024-05-01T13:45:00)"
                                    ) from None
    raise DataError(f"{at.row()}: column {column!r} has type {arr.type}, "
                    "expected unix seconds, a timestamp or ISO 8601 text")


def _normalise(batch: pa.RecordBatch, cfg: EventsConfig, at: _Place, row: int,
               names: dict[str, int]) -> Events:
    """One batch of a file (its rows `at` the file, from `row` of all inputs): its
    events in the contract's types, checked (no empty values, labels 0/1, times that parse, a
    known domain), or a DataError naming the file, row and column."""
    c = cfg.columns
    n = batch.num_rows
    for name in batch.schema.names:
        nulls = batch.column(name).is_null().to_numpy(zero_copy_only=False)
        _first_bad(at, name, nulls, "is empty")
    label_arr = batch.column(c.label)
    if not (pa.types.is_integer(label_arr.type) or pa.types.is_boolean(label_arr.type)):
        raise DataError(f"{at.row()}: column {c.label!r} has type "
                        f"{label_arr.type}, expected 0/1 labels")
    label = np.asarray(label_arr.to_numpy(zero_copy_only=False)).astype(np.int64)
    _first_bad(at, c.label, (label != 0) & (label != 1), "is not 0 or 1")
    domain = np.empty(n, np.int64)
    for i, v in enumerate(batch.column(c.domain).cast(pa.string()).to_pylist()):
        name = cfg.domains.get(v, None if cfg.domains else v)
        if name is None:
            raise DataError(f"{at.row(i)}: column {c.domain!r}: domain "
                            f"{v!r} is not in the mapping's [domains] ({sorted(cfg.domains)})")
        domain[i] = names.setdefault(name, len(names))
    ts = _seconds(batch.column(c.time), at, c.time)
    zero = np.zeros(n, np.int64)

    def ids(column: str | None) -> np.ndarray:
        return zero if column is None else _ids(batch.column(column), at, column)

    after = {}
    if c.price is not None:
        after["price"] = np.asarray(batch.column(c.price).to_numpy(zero_copy_only=False),
                                    np.float64)
    after.update({k: ids(k) for k in c.side})
    if cfg.hour:
        after["hour"] = (ts // 3600) % 24
    return Events(np.arange(row, row + n, dtype=np.int64), ts, ids(c.user), ids(c.item),
                  ids(c.category), ids(c.seller), label.astype(np.int8), domain, zero,
                  {k: batch.column(k).to_numpy(zero_copy_only=False) for k in c.keep}, after)


def read_events(paths: list[Path], cfg: EventsConfig, names: dict[str, int],
                batch_rows: int = 1 << 20) -> Iterator[Events]:
    """Every input file's events, batch by batch, in input order (rows numbered on across
    files); `names` collects the domains' names as they first appear."""
    c = cfg.columns
    wanted = list(dict.fromkeys(x for x in (c.user, c.item, c.time, c.label, c.domain,
                                            c.category, c.seller, c.price, *c.side, *c.keep)
                                if x is not None))
    row = 0
    for path, kind in _files(paths):
        data = ds.dataset(path, format=kind)
        missing = [x for x in wanted if x not in data.schema.names]
        if missing:
            raise DataError(f"{path}: missing column {missing[0]!r} (named in the mapping's "
                            f"[columns]; the file has {data.schema.names})")
        first = 0
        for batch in data.to_batches(columns=wanted, batch_size=batch_rows):
            if batch.num_rows:
                yield _normalise(batch, cfg, _Place(str(path), first, kind == "csv"), row, names)
            first += batch.num_rows
            row += batch.num_rows


# -- building -----------------------------------------------------------------------------------


def assign_periods(ts: np.ndarray, user: np.ndarray, cfg: EventsConfig) -> np.ndarray:
    """Each event's period, events in input order: whole time units from the first event's,
    or `periods` equal row counts in (time, user, input row) order."""
    if cfg.period != "equal":
        unit = TIME_UNITS[cfg.period]
        return np.asarray(ts // unit - ts.min() // unit, np.int64)
    n = len(ts)
    period = np.empty(n, np.int64)
    period[np.lexsort((np.arange(n), user, ts))] = (np.arange(n) * cfg.periods) // n
    return period


def histories(user: np.ndarray, ts: np.ndarray, keep: np.ndarray,
              cap: int) -> tuple[np.ndarray, np.ndarray]:
    """For events sorted by (user, ts), each one's behaviours among the events where `keep`
    holds: same user, strictly earlier ts, newest first, at most `cap`. Returns the list
    lengths and the behaviours' indices, concatenated."""
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_second = new_user | np.r_[True, ts[1:] != ts[:-1]]
    user_start = np.flatnonzero(new_user)[np.cumsum(new_user) - 1]
    first_same = np.flatnonzero(new_second)[np.cumsum(new_second) - 1]
    kept = np.flatnonzero(keep)
    end = np.searchsorted(kept, first_same)  # kept events before the event's second
    begin = np.searchsorted(kept, user_start)  # ... and from the user's first event
    take = np.minimum(end - begin, cap)
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    return take, kept[np.repeat(end, take) - 1 - within]


def _take_lists(lengths: np.ndarray, values: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lists of `rows` (lengths, values) out of all rows' lists."""
    starts = np.cumsum(lengths) - lengths
    take = lengths[rows]
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    return take, values[np.repeat(starts[rows], take) + within]


def _list_column(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


@dataclass
class Written:
    """What was written: per domain and period, rows and clicks; each period's first time."""

    rows: dict[str, dict[int, int]] = field(default_factory=dict)
    positives: dict[str, dict[int, int]] = field(default_factory=dict)
    period_start: dict[int, int] = field(default_factory=dict)


def _write_bucket(ev: Events, names: list[str], cfg: EventsConfig, tmp: Path, part: int,
                  written: Written) -> None:
    """One bucket's events (every event of its users) as part `part` of each period's file
    of each domain, rows in (time, user, item) order, histories attached."""
    e = ev.take(np.lexsort((ev.row, ev.ts, ev.user)))  # each user's events together, in order
    keep = e.label == 1 if cfg.behaviours == "clicks" else np.ones(len(e.ts), bool)
    long = histories(e.user, e.ts, keep, cfg.long_history)
    for d, name in enumerate(names):
        short = histories(e.user, e.ts, keep & (e.domain == d), cfg.short_history)
        mine = e.domain == d
        for t in np.unique(e.period[mine]).tolist():
            rows = np.flatnonzero(mine & (e.period == t))
            rows = rows[np.lexsort((e.item[rows], e.user[rows], e.ts[rows]))]
            table: dict[str, Any] = {
                "ts": e.ts[rows], "label": e.label[rows],
                **{k: v[rows] for k, v in e.before.items()},
                "user_id": e.user[rows], "item_id": e.item[rows],
                "category_id": e.category[rows], "seller_id": e.seller[rows],
                **{k: v[rows] for k, v in e.after.items()}}
            for prefix, (lengths, values) in (("long_", long), ("", short)):
                take, behaviours = _take_lists(lengths, values, rows)
                table[f"{prefix}hist_item_ids"] = _list_column(take, e.item[behaviours])
                table[f"{prefix}hist_category_ids"] = _list_column(take, e.category[behaviours])
            write_parquet(pa.table(table), tmp / name / f"period={t}" / f"part-{part}.parquet")
            written.rows.setdefault(name, {})[t] = written.rows.get(name, {}).get(t, 0) + \
                len(rows)
            written.positives.setdefault(name, {})[t] = \
                written.positives.get(name, {}).get(t, 0) + int(e.label[rows].sum())
        for t in np.unique(e.period).tolist():
            first = int(e.ts[e.period == t].min())
            written.period_start[t] = min(written.period_start.get(t, first), first)


def _to_table(e: Events) -> pa.Table:
    return pa.table({**{k: getattr(e, k) for k in _KEYS},
                     **{f"before:{k}": v for k, v in e.before.items()},
                     **{f"after:{k}": v for k, v in e.after.items()}})


def _from_table(t: pa.Table) -> Events:
    cols = {k: t.column(k).to_numpy() for k in t.column_names}
    return Events(**{k: cols[k] for k in _KEYS},
                  before={k[7:]: v for k, v in cols.items() if k.startswith("before:")},
                  after={k[6:]: v for k, v in cols.items() if k.startswith("after:")})


def _concat(parts: list[Events]) -> Events:
    return Events(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in _KEYS},
                  before={k: np.concatenate([p.before[k] for p in parts])
                          for k in parts[0].before},
                  after={k: np.concatenate([p.after[k] for p in parts]) for k in parts[0].after})


Summary = Callable[[Written], tuple[str, dict[str, Any]]]


def write_events(events: Callable[[], Iterator[Events]], period: np.ndarray,
                 names: dict[str, int], cfg: EventsConfig, out: Path, summary: Summary,
                 held: list[Events] | None = None) -> Written:
    """The contract under OUT from the events (`held` when they are all in memory, else read
    again from `events()`), each event's period by its input row; then the file `summary`
    makes. Written to OUT.partial, renamed to OUT at the end."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    order = sorted(names, key=names.__getitem__)
    written = Written()
    n = len(period)
    buckets = max(1, math.ceil(n / cfg.memory_rows))
    if held is not None and buckets == 1:
        ev = _concat(held)
        ev.period = period[ev.row]
        _write_bucket(ev, order, cfg, tmp, 0, written)
    else:  # spread over buckets by user, then one bucket at a time
        spill = tmp / "_buckets"
        spill.mkdir(parents=True)
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            for e in events():
                e.period = period[e.row]
                bucket = (splitmix64(e.user) % np.uint64(buckets)).astype(np.int64)
                for b in np.unique(bucket).tolist():
                    table = _to_table(e.take(np.flatnonzero(bucket == b)))
                    if b not in writers:
                        writers[b] = pq.ParquetWriter(spill / f"{b}.parquet", table.schema)
                    writers[b].write_table(table)
        finally:
            for w in writers.values():
                w.close()
        for b in sorted(writers):
            _write_bucket(_from_table(pq.read_table(spill / f"{b}.parquet")), order, cfg,
                          tmp, b, written)
            (spill / f"{b}.parquet").unlink()
        spill.rmdir()
    name, content = summary(written)
    (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
    mark_complete(tmp)
    out.mkdir(parents=True, exist_ok=True)
    for child in tmp.iterdir():
        child.rename(out / child.name)
    tmp.rmdir()
    return written


def import_events(paths: list[Path], cfg: EventsConfig, out: Path) -> dict[str, Any]:
    """`ctnet data from-events`: OUT/<domain>/period=<t>/part-<b>.parquet and OUT/events.json
    (the mapping and, per domain and period, rows and clicks). Returns that summary."""
    names: dict[str, int] = {}
    held: list[Events] | None = []  # the events themselves while they fit in memory
    keys: list[tuple[np.ndarray, np.ndarray]] = []
    n = 0
    for e in read_events(paths, cfg, names):  # every input read and checked first
        keys.append((e.ts, e.user))
        n += len(e.row)
        if held is not None:
            held.append(e)
            if n > cfg.memory_rows:
                held = None
    if not n:
        raise DataError(f"{', '.join(map(str, paths))}: no events")
    ts, user = (np.concatenate(k) for k in zip(*keys, strict=True))
    period = assign_periods(ts, user, cfg)  # events in input order: row i is event i

    def summary(w: Written) -> tuple[str, dict[str, Any]]:
        return "events.json", {
            "inputs": [str(p) for p in paths], "mapping": asdict(cfg),
            "domains": sorted(names, key=names.__getitem__),
            "rows": {d: {str(t): r for t, r in sorted(v.items())} for d, v in w.rows.items()},
            "positives": {d: {str(t): r for t, r in sorted(v.items())}
                          for d, v in w.positives.items()},
            "period_start_ts": {str(t): s for t, s in sorted(w.period_start.items())}}

    write_events(lambda: read_events(paths, cfg, {**names}), period, names, cfg, out,
                 summary, held)
    return json.loads((Path(out) / "events.json").read_text())
