from __future__ import annotations

import bisect
import copy
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from ctnet_rec.data.contract import DataError, validate_periods
from ctnet_rec.data.reader import ParquetBatchReader, batch_sizes

from .conftest import valid_table, write_period


@pytest.fixture()
def features(demo_config):
    f = copy.deepcopy(demo_config.features)
    f.sequences[0].max_len = 3  # the tables' lists average 5 and 40: both get truncated
    f.sequences[1].max_len = 30
    return f


@pytest.fixture()
def dataset(tmp_path) -> tuple:
    tables = [valid_table(70, seed=1), valid_table(61, seed=2), valid_table(72, seed=3)]
    write_period(tmp_path, "B", 0, tables[:2])
    write_period(tmp_path, "B", 1, tables[2:])
    return tmp_path, pa.concat_tables(tables)


def expected_rows(table: pa.Table, features) -> dict[int, dict]:
    """Per raw user id (unique in the fixture), the row's expected sparse values, naively."""
    rows = {}
    for r in table.to_pylist():
        exp = {}
        for f in features.id_features:
            exp[f.name] = [r[f.column] % features.table(f.table).num_embeddings]
        for n in features.numeric:
            exp[n.name] = [bisect.bisect_right(n.boundaries, r[n.column])]
        for s in features.sequences:
            pairs = ((s.item_column, s.item_table), (s.category_column, s.category_table))
            for col, tname in pairs:
                exp[col] = [v % features.table(tname).num_embeddings for v in r[col][: s.max_len]]
        exp["_label"] = float(r["label"])
        exp["_raw_item"] = r["item_id"]
        rows[r["user_id"]] = exp
    return rows


def check_batch(batch, expected: dict[int, dict], features) -> list[int]:
    d = batch.sparse.to_dict()
    users = batch.user_ids.tolist()
    for key in features.sparse_keys():
        jt = d[key]
        got = [x.tolist() for x in jt.values().split(jt.lengths().tolist())]
        assert got == [expected[u][key] for u in users], key
    assert batch.labels.tolist() == [expected[u]["_label"] for u in users]
    assert batch.item_ids.tolist() == [expected[u]["_raw_item"] for u in users]
    assert batch.dense.shape == (len(users), 0)
    return users


def read_all(reader) -> list:
    return [b for b in reader]


def test_round_trip_in_order(dataset, features, demo_config):
    root, table = dataset
    reader = ParquetBatchReader(root, "B", [0, 1], features, demo_config.data, batch_size=32,
                                shuffle=False)
    exp = expected_rows(table, features)
    users = [u for b in read_all(reader) for u in check_batch(b, exp, features)]
    assert users == table["user_id"].to_pylist()  # stored order, every row once
    assert len(reader) == 7 and reader.sizes == [32] * 6 + [11]


def test_shuffle_keeps_rows_whole_and_is_seeded(dataset, features, demo_config):
    root, table = dataset
    data = copy.deepcopy(demo_config.data)
    data.shuffle_buffer = 40
    exp = expected_rows(table, features)

    def order(seed: int, epoch: int = 0) -> list[int]:
        r = ParquetBatchReader(root, "B", [0, 1], features, data, batch_size=16, seed=seed)
        r.set_epoch(epoch)
        return [u for b in read_all(r) for u in check_batch(b, exp, features)]

    a, b = order(0), order(0)
    assert a == b  # same seed, same batches
    assert sorted(a) == sorted(table["user_id"].to_pylist())  # a permutation of all rows
    assert a != table["user_id"].to_pylist()
    assert order(1) != a and order(0, epoch=1) != a


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size", [16, 50])
def test_rank_shares_disjoint_complete_equal_batches(dataset, features, demo_config,
                                                     world_size, batch_size):
    root, table = dataset
    shares, counts = [], []
    for rank in range(world_size):
        r = ParquetBatchReader(root, "B", [0, 1], features, demo_config.data,
                               batch_size=batch_size, rank=rank, world_size=world_size, seed=3)
        batches = read_all(r)
        assert len(batches) == len(r)
        assert all(0 < len(b) <= batch_size for b in batches)
        counts.append(len(batches))
        shares.append([u for b in batches for u in b.user_ids.tolist()])
    assert len(set(counts)) == 1
    flat = [u for s in shares for u in s]
    assert len(flat) == len(set(flat)) == table.num_rows  # disjoint and complete
    assert set(flat) == set(table["user_id"].to_pylist())


def test_batch_sizes_never_leave_an_empty_batch():
    assert batch_sizes(100, 4, 32) == [32, 32, 32, 4]
    assert batch_sizes(64, 3, 32) == [32, 16, 16]  # a short rank splits its last batch
    assert sum(batch_sizes(33, 2, 32)) == 33
    with pytest.raises(ValueError):
        batch_sizes(1, 2, 32)


def test_no_batch_holds_a_single_row_where_a_rank_has_two():
    """A training step's batch norm needs two rows: a remainder of one row (a period of
    batch_size + 1 rows) joins the last full batch, split in two."""
    assert batch_sizes(257, 2, 256) == [129, 128]
    assert batch_sizes(513, 3, 256) == [256, 129, 128]
    for batch_size in range(4, 40):
        for total in range(2, 130):
            for world in (1, 2, 3, 8):
                if total < 2 * world:
                    continue
                largest = -(-total // world)
                for share in {total // world, largest}:
                    sizes = batch_sizes(share, -(-largest // batch_size), batch_size)
                    assert sum(sizes) == share and min(sizes) >= 2, (batch_size, total, world)


def test_uneven_split_same_batch_count(tmp_path, features, demo_config):
    write_period(tmp_path, "B", 0, [valid_table(65, seed=4)])
    readers = [ParquetBatchReader(tmp_path, "B", [0], features, demo_config.data, batch_size=16,
                                  rank=r, world_size=2) for r in range(2)]
    assert [r.sizes for r in readers] == [[16, 8, 8], [16, 9, 8]]  # never a 1-row batch


def test_too_few_rows_for_ranks(tmp_path, features, demo_config):
    write_period(tmp_path, "B", 0, [valid_table(1)])
    for rank in range(2):  # every rank refuses (the one with the row too): none waits
        with pytest.raises(DataError, match="cannot be shared by 2 ranks"):
            ParquetBatchReader(tmp_path, "B", [0], features, demo_config.data, rank=rank,
                               world_size=2)


def test_breaking_early_stops_background_threads(dataset, features, demo_config):
    root, _ = dataset
    before = threading.active_count()
    reader = ParquetBatchReader(root, "B", [0, 1], features, demo_config.data, batch_size=8)
    for _ in reader:
        break
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_dense_numeric_features(tmp_path, demo_config):
    f = copy.deepcopy(demo_config.features)
    f.numeric[0].boundaries = []  # price stays a dense float
    t = valid_table(40)
    write_period(tmp_path, "B", 0, [t])
    (batch,) = read_all(ParquetBatchReader(tmp_path, "B", [0], f, demo_config.data,
                                           batch_size=64, shuffle=False))
    assert "price" not in batch.sparse.keys()
    np.testing.assert_allclose(batch.dense[:, 0].numpy(), t["price"].to_numpy(), rtol=1e-6)


def test_two_features_reading_one_column_each_map_the_raw_ids(tmp_path, demo_config):
    """Two id features on one column, with tables of 7 and 5 rows: each maps the raw ids
    (the first mapping is not seen by the second)."""
    from ctnet_rec.config import IdFeatureConfig, TableConfig

    f = copy.deepcopy(demo_config.features)
    f.tables += [TableConfig("seven", 7, 4), TableConfig("five", 5, 4)]
    f.id_features += [IdFeatureConfig("hour_a", "seven", "hour"),
                      IdFeatureConfig("hour_b", "five", "hour")]
    t = valid_table(10)
    t = t.set_column(t.schema.get_field_index("hour"), "hour",
                     pa.array(np.arange(100, 110, dtype=np.int64)))
    write_period(tmp_path, "B", 0, [t])
    (batch,) = read_all(ParquetBatchReader(tmp_path, "B", [0], f, demo_config.data,
                                           batch_size=64, shuffle=False))
    got = batch.sparse.to_dict()
    assert got["hour_a"].values().tolist() == [2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert got["hour_b"].values().tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert got["hour"].values().tolist() == list(range(100 % 24, 100 % 24 + 10))


def test_pinned_batches_and_copies_one_ahead(dataset, features, demo_config, monkeypatch):
    """`pin_memory` pins every batch in the producer (a CUDA run's reader); `on_device` hands
    out each host batch with its device copy, in order, the next copy issued ahead."""
    from ctnet_rec.data.batch import Batch, on_device

    root, _ = dataset
    pinned = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(len(self)) or self)
    reader = ParquetBatchReader(root, "B", [0, 1], features, demo_config.data, batch_size=50,
                                shuffle=False, pin_memory=True)
    batches = read_all(reader)
    assert pinned == [len(b) for b in batches]
    plain = read_all(ParquetBatchReader(root, "B", [0, 1], features, demo_config.data,
                                        batch_size=50, shuffle=False))
    assert len(pinned) == len(plain)
    pulled = []

    def source():
        for b in plain:
            pulled.append(len(pulled))
            yield b

    seen = 0
    for i, (host, dev) in enumerate(on_device(source(), torch.device("cpu"))):
        assert host is plain[i] and torch.equal(dev.sparse.values(), host.sparse.values())
        assert len(pulled) == min(i + 2, len(plain))  # the next batch is already fetched
        seen += 1
    assert seen == len(plain)


def test_narrow_integer_and_large_list_columns_read_as_int64_lists(tmp_path, features,
                                                                   demo_config):
    """The contract takes any integer id type and list or large_list sequences: such a file
    gives the same batches as its int64 / list<int64> twin."""
    import pyarrow.compute as pc

    t = valid_table(50, seed=4)
    for col in ("item_id", "category_id", "hist_item_ids", "hist_category_ids",
                "long_hist_item_ids"):  # ids that fit 16 bits
        arr = t[col].combine_chunks()
        small = pc.bit_wise_and(arr.flatten() if pa.types.is_list(arr.type) else arr, 0x7FFF)
        if pa.types.is_list(arr.type):
            small = pa.ListArray.from_arrays(arr.offsets, small)
        t = t.set_column(t.schema.get_field_index(col), col, small)
    narrow = t
    for col, typ in [("item_id", pa.int32()), ("category_id", pa.int16()), ("hour", pa.uint8()),
                     ("hist_item_ids", pa.large_list(pa.int64())),
                     ("hist_category_ids", pa.large_list(pa.int32())),
                     ("long_hist_item_ids", pa.list_(pa.int32()))]:
        narrow = narrow.set_column(narrow.schema.get_field_index(col), col,
                                   narrow[col].cast(typ))
    assert narrow.schema.field("hist_item_ids").type == pa.large_list(pa.int64())
    write_period(tmp_path / "wide", "B", 0, [t])
    write_period(tmp_path / "narrow", "B", 0, [narrow])
    validate_periods(tmp_path / "narrow", "B", [0], features)  # the contract takes it
    wide_batch, narrow_batch = (
        next(iter(ParquetBatchReader(tmp_path / name, "B", [0], features, demo_config.data,
                                     batch_size=64, shuffle=False)))
        for name in ("wide", "narrow"))
    for key in features.sparse_keys():
        a, b = wide_batch.sparse[key], narrow_batch.sparse[key]
        assert b.values().dtype == torch.int64, key
        assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths()), key
    assert torch.equal(wide_batch.labels, narrow_batch.labels)
    assert torch.equal(wide_batch.item_ids, narrow_batch.item_ids)
