"""One test per contract violation: each is refused with file, column and reason named."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctnet_rec.data.contract import (
    SUCCESS,
    DataError,
    list_periods,
    parse_periods,
    validate_periods,
)
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.summary import validate_dataset

from .conftest import valid_table, write_period


def _set(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, arr)


def _refused(tmp_path, demo_config, table: pa.Table, *needles: str) -> None:
    (path,) = write_period(tmp_path, "B", 0, [table])
    with pytest.raises(DataError) as e:
        validate_periods(tmp_path, "B", [0], demo_config.features)
    msg = str(e.value)
    assert path.name in msg
    for n in needles:
        assert n in msg, msg


def test_valid_data_passes(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table(), valid_table(seed=1)])
    files = validate_periods(tmp_path, "B", [0], demo_config.features)
    assert len(files[0]) == 2


def test_bool_labels_are_accepted(tmp_path, demo_config):
    t = valid_table()
    write_period(tmp_path, "B", 0, [_set(t, "label", pc.cast(t["label"], pa.bool_()))])
    validate_periods(tmp_path, "B", [0], demo_config.features)


def test_missing_column(tmp_path, demo_config):
    t = valid_table().drop_columns(["hist_category_ids"])
    _refused(tmp_path, demo_config, t, "missing column 'hist_category_ids'")


def test_wrong_type(tmp_path, demo_config):
    t = valid_table()
    t = _set(t, "item_id", pc.cast(t["item_id"], pa.float64()))
    _refused(tmp_path, demo_config, t, "'item_id'", "type double", "integer")


def test_wrong_list_type(tmp_path, demo_config):
    t = valid_table()
    t = _set(t, "long_hist_item_ids", pc.cast(t["long_hist_item_ids"], pa.list_(pa.string())))
    _refused(tmp_path, demo_config, t, "'long_hist_item_ids'", "list<int64>")


def test_label_not_binary(tmp_path, demo_config):
    t = valid_table()
    labels = t["label"].to_numpy().copy()
    labels[7] = 2
    _refused(tmp_path, demo_config, _set(t, "label", pa.array(labels)),
             "'label'", "1 labels not in {0,1}", "e.g. 2")


def test_misaligned_lists(tmp_path, demo_config):
    t = valid_table()
    cats = t["hist_category_ids"].to_pylist()
    cats[3] = cats[3] + [1]
    t = _set(t, "hist_category_ids", pa.array(cats, pa.list_(pa.int64())))
    _refused(tmp_path, demo_config, t, "'hist_item_ids'", "'hist_category_ids'", "misaligned",
             "row 3")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_numeric(tmp_path, demo_config, bad):
    t = valid_table()
    price = t["price"].to_numpy().copy()
    price[5] = bad
    _refused(tmp_path, demo_config, _set(t, "price", pa.array(price)), "'price'", "NaN/inf")


def test_null_ids(tmp_path, demo_config):
    t = valid_table()
    users = t["user_id"].to_pylist()
    users[0] = None
    _refused(tmp_path, demo_config, _set(t, "user_id", pa.array(users, pa.int64())),
             "'user_id'", "null")


def test_empty_period_folder(tmp_path, demo_config):
    (tmp_path / "B" / "period=0").mkdir(parents=True)
    with pytest.raises(DataError, match=r"period=0: empty period"):
        validate_periods(tmp_path, "B", [0], demo_config.features)


def test_period_with_zero_rows(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table().slice(0, 0)])
    with pytest.raises(DataError, match=r"period=0: empty period \(0 rows\)"):
        validate_periods(tmp_path, "B", [0], demo_config.features)


def test_missing_period(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table()])
    with pytest.raises(DataError, match=r"period=3: missing period \(available: \[0\]\)"):
        validate_periods(tmp_path, "B", [0, 3], demo_config.features)


def test_a_period_not_marked_complete_is_named_so(tmp_path, demo_config):
    for t in (0, 1):
        write_period(tmp_path, "B", t, [valid_table()])
    (tmp_path / "B" / "period=0" / SUCCESS).touch()  # a marking writer, still writing 1
    with pytest.raises(DataError, match=r"period=1: not marked complete \(no _SUCCESS in it, "
                       r"while other periods of the domain have one\).*\(available: \[0\]\)"):
        validate_periods(tmp_path, "B", [0, 1], demo_config.features)


def test_validate_says_which_periods_it_skips_as_being_written(tmp_path, demo_config, caplog):
    for t in (0, 1):
        write_period(tmp_path, "B", t, [valid_table()])
    (tmp_path / "B" / "period=0" / SUCCESS).touch()
    with caplog.at_level(logging.INFO, logger="ctnet_rec.data.summary"):
        summary = validate_dataset(tmp_path, demo_config.features)
    assert [s.period for s in summary] == [0]
    assert "B: period(s) [1] not marked complete (no _SUCCESS" in caplog.text


def test_validate_says_which_periods_are_too_small_to_train_on(tmp_path, demo_config, caplog):
    write_period(tmp_path, "B", 0, [valid_table(2)])
    write_period(tmp_path, "B", 1, [valid_table(1)])
    with caplog.at_level(logging.INFO, logger="ctnet_rec.data.summary"):
        summary = validate_dataset(tmp_path, demo_config.features)
    assert [s.rows for s in summary] == [2, 1]
    assert "B/period=1: 1 row(s), too few to train on" in caplog.text
    assert "period=0" not in caplog.text


def test_missing_domain_and_bad_folder(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table()])
    with pytest.raises(DataError, match=r"domain folder not found \(domains: \['B'\]\)"):
        validate_periods(tmp_path, "Z", [0], demo_config.features)
    (tmp_path / "B" / "day=1").mkdir()
    with pytest.raises(DataError, match=r"day=1: expected a folder named period=<int>"):
        list_periods(tmp_path, "B")


def test_unreadable_parquet(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table()])
    bad = tmp_path / "B" / "period=0" / "part-9.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"part-9.parquet: unreadable Parquet file"):
        validate_periods(tmp_path, "B", [0], demo_config.features)


def test_conflicting_schemas_in_one_period(tmp_path, demo_config):
    t = valid_table()
    t2 = _set(valid_table(seed=1), "label", pc.cast(valid_table(seed=1)["label"], pa.int32()))
    write_period(tmp_path, "B", 0, [t, t2])
    with pytest.raises(DataError) as e:
        validate_periods(tmp_path, "B", [0], demo_config.features)
    assert "part-1.parquet: schema conflicts with part-0.parquet" in str(e.value)
    assert "'label'" in str(e.value) and "int32" in str(e.value)


def test_periods_sorted_numerically(tmp_path):
    for t in (10, 2, 1):
        write_period(tmp_path, "A", t, [valid_table(5)])
    assert list(list_periods(tmp_path, "A")) == [1, 2, 10]
    assert parse_periods("0:3") == [0, 1, 2] and parse_periods("1,4") == [1, 4]


@pytest.mark.parametrize(("spec", "why"), [
    ("2,0", "strictly increasing"), ("1,1", "strictly increasing"), ("3:1", "no periods"),
    ("a", "use N, A:B"), ("1:2:3", "use N, A:B")])
def test_period_lists_out_of_time_order_are_refused(spec, why):
    with pytest.raises(DataError, match=why):
        parse_periods(spec)


def test_a_period_in_two_folders_is_refused_and_hidden_files_are_skipped(tmp_path):
    write_period(tmp_path, "A", 1, [valid_table(5)])
    (tmp_path / "A" / "period=1" / ".partial-upload.parquet").write_bytes(b"not parquet")
    assert [f.name for f in list_periods(tmp_path, "A")[1]] == ["part-0.parquet"]
    other = tmp_path / "A" / "period=01"
    other.mkdir()
    pq.write_table(valid_table(5), other / "part-0.parquet")
    with pytest.raises(DataError, match=r"period=1.*period 1 again|period=01.*period 1 again"):
        list_periods(tmp_path, "A")


def test_reader_refuses_bad_schema_before_any_batch(tmp_path, demo_config):
    write_period(tmp_path, "B", 0, [valid_table().drop_columns(["price"])])
    with pytest.raises(DataError, match="missing column 'price'"):
        ParquetBatchReader(tmp_path, "B", [0], demo_config.features, demo_config.data)


def test_reader_refuses_bad_values_naming_file(tmp_path, demo_config):
    t = valid_table(200)
    labels = t["label"].to_numpy().copy()
    labels[150] = 3
    write_period(tmp_path, "B", 0, [_set(t, "label", pa.array(labels))])
    reader = ParquetBatchReader(tmp_path, "B", [0], demo_config.features, demo_config.data,
                                batch_size=16)
    with pytest.raises(DataError, match=r"part-0.parquet \(row group 9\).*labels not in"):
        list(reader)


def test_a_damaged_page_is_refused_and_nullability_alone_is_no_conflict(tmp_path,
                                                                        demo_config):
    """Our writer checksums every page and the reader verifies it: one flipped byte in a
    data page is refused by file, not read as another price. A file written by plain pyarrow
    (columns nullable) and one by ours (non-null) are one schema."""
    from ctnet_rec.data.contract import write_parquet

    path = tmp_path / "A" / "period=0" / "part-0.parquet"
    write_parquet(valid_table(200), path)
    pq.write_table(valid_table(50, seed=1), path.with_name("part-1.parquet"))
    validate_periods(tmp_path, "A", [0], demo_config.features)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside the column chunks, before the footer
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part-0\.parquet: unreadable"):
        validate_periods(tmp_path, "A", [0], demo_config.features)


def test_an_oracle_file_that_does_not_line_up_is_refused(tmp_path, demo_config):
    """The true probabilities must line up with the data row for row: a shuffled file (same
    row count) is refused by `data validate` and before training, naming the row."""
    from ctnet_rec.data.contract import oracle_path
    from ctnet_rec.data.summary import validate_domain

    table = valid_table(20)
    write_period(tmp_path, "A", 0, [table])
    oracle = oracle_path(tmp_path, "A", 0)
    oracle.parent.mkdir(parents=True)
    rows = pa.table({"user_id": table["user_id"], "item_id": table["item_id"],
                     "p_click": pa.array(np.linspace(0.1, 0.9, 20))})
    pq.write_table(rows, oracle)
    validate_periods(tmp_path, "A", [0], demo_config.features)
    assert validate_domain(tmp_path, "A", demo_config.features)[0].oracle_auc is not None
    pq.write_table(rows.slice(0, 19), oracle)
    with pytest.raises(DataError, match=r"part-0\.parquet: 19 rows, the period has 20"):
        validate_periods(tmp_path, "A", [0], demo_config.features)
    pq.write_table(rows.take(np.r_[1, 0, 2:20]), oracle)
    for check in (lambda: validate_periods(tmp_path, "A", [0], demo_config.features),
                  lambda: validate_domain(tmp_path, "A", demo_config.features)):
        with pytest.raises(DataError, match=r"row 0 has user_id .*\(2 rows differ\)"):
            check()
    pq.write_table(rows.select(["p_click"]), oracle)
    with pytest.raises(DataError, match="no column item_id, user_id"):
        validate_periods(tmp_path, "A", [0], demo_config.features)


def test_validate_reads_uint64_ids_as_training_does(tmp_path, demo_config):
    """New-user shares of ids stored as uint64 (here in one period, int64 in the other: a
    period rewritten by another tool) equal those of the same ids stored as int64: ids are
    compared bit for bit, as training reads them."""
    from ctnet_rec.data.summary import validate_domain

    first, second = valid_table(40, seed=1), valid_table(40, seed=2)
    second = second.set_column(second.schema.get_field_index("user_id"), "user_id",
                               pa.concat_arrays([first["user_id"].combine_chunks()[:30],
                                                 second["user_id"].combine_chunks()[30:]]))
    def unsigned(t: pa.Table) -> pa.Table:
        return t.set_column(t.schema.get_field_index("user_id"), "user_id",
                            pa.array(t["user_id"].to_numpy().view(np.uint64)))

    for name, cast in (("int64", lambda t: t), ("uint64", unsigned)):
        root = tmp_path / name
        write_period(root, "A", 0, [first])
        write_period(root, "A", 1, [cast(second)])
        shares = [s.new_user_share for s in validate_domain(root, "A", demo_config.features)]
        assert shares == [1.0, 0.25], name
