"""The Parquet data contract: where files live, what their columns must hold, and the checks
that refuse bad input (naming file, column and reason) before any training step.

Layout: ``<root>/<domain>/period=<int>/<any>.parquet``, hive style, periods sorted
numerically. Folders whose names start with ``_`` or ``.`` are not domains (the synthetic
world keeps its true click probabilities in ``<root>/_oracle``).
"""

# Annotations are evaluated (no `from __future__ import annotations`): this module travels
# inside exported artifacts (torch.package), where dataclasses cannot read string annotations.

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctnet_rec.config import FeatureConfig
from ctnet_rec.data.storage import DataFile, DataRoot, entries, entries_below, is_uri, join

ORACLE_DIR = "_oracle"
ORACLE_COLUMN = "p_click"
_PERIOD_RE = re.compile(r"^period=(-?\d+)$")


# rows a training step needs on each rank: batch norm normalises a batch by its statistics
MIN_TRAINING_ROWS = 2


class DataError(ValueError):
    """Input that breaks the contract; the message names the file, column and reason."""


@dataclass(frozen=True)
class ParquetPiece:
    """One row group of one file: the unit of decoding and of sharding across ranks."""

    path: DataFile
    row_group: int
    num_rows: int
    period: int


def list_domains(root: DataRoot) -> list[str]:
    found = entries(root)
    if found is None:
        raise DataError(f"{root}: data root does not exist or is not a folder")
    return [e.name for e in found if e.is_dir and not e.name.startswith(("_", "."))]


SUCCESS = "_SUCCESS"  # a period folder's completion marker (the convention of Spark/Hadoop jobs)


def _period_folders(root: DataRoot, domain: str
                    ) -> tuple[dict[int, list[DataFile]], dict[int, str], set[int]]:
    """A domain's period folders: period -> its Parquet files (sorted), period -> folder
    name, and the periods whose folder has no `_SUCCESS`."""
    tree = entries_below(root, domain, depth=2)  # the periods and their files, one listing
    if tree is None:
        raise DataError(f"{join(root, domain)}: domain folder not found (domains: "
                        f"{list_domains(root)})")
    found = tree[""]
    periods: dict[int, list[DataFile]] = {}
    names: dict[int, str] = {}
    unmarked: set[int] = set()
    for p in found:
        if p.name.startswith(("_", ".")):
            continue
        m = _PERIOD_RE.match(p.name)
        if not p.is_dir or not m:
            raise DataError(f"{p.file}: expected a folder named period=<int>")
        inside = tree.get(p.name, [])
        files = [f.file for f in inside
                 if not f.is_dir and f.name.endswith(".parquet") and not f.name.startswith(".")]
        t = int(m.group(1))
        if t in periods:
            raise DataError(f"{p.file}: period {t} again (also {join(root, domain, names[t])}); "
                            "keep one folder")
        if not any(f.name == SUCCESS for f in inside):
            unmarked.add(t)
        periods[t], names[t] = files, p.name
    return periods, names, unmarked


def list_periods(root: DataRoot, domain: str,
                 marked_only: bool = False) -> dict[int, list[DataFile]]:
    """Period -> its Parquet files (sorted), for one domain; an empty period, or two folders
    of one period (`period=1`, `period=01`), is an error. Hidden files and folders (`.x`, a
    partial upload) and `_`-folders are skipped. In a domain whose writer marks complete
    periods (some period folder holds `_SUCCESS`), or with `marked_only`, a folder without
    the marker is still being written and is skipped too."""
    periods, names, unmarked = _period_folders(root, domain)
    if marked_only or len(unmarked) < len(periods):  # the unmarked are being written
        periods = {t: f for t, f in periods.items() if t not in unmarked}
    for t, files in periods.items():
        if not files:
            raise DataError(f"{join(root, domain, names[t])}: empty period (no .parquet files)")
    return dict(sorted(periods.items()))


def period_marks(root: DataRoot, domain: str) -> tuple[set[int], set[int]]:
    """The domain's period folders with `_SUCCESS` and those without (being written, or
    never marked), from one listing."""
    periods, _, unmarked = _period_folders(root, domain)
    return set(periods) - unmarked, unmarked


def mark_complete(root: Path) -> None:
    """`_SUCCESS` in every period folder of every domain under `root`: for writers that write
    a whole dataset at once, so a job waiting for marked periods (`ctnet pipeline`) takes it."""
    for domain in list_domains(root):
        for folder in (Path(root) / domain).glob("period=*"):
            (folder / SUCCESS).touch()


def select_periods(root: DataRoot, domain: str,
                   periods: Iterable[int]) -> dict[int, list[DataFile]]:
    available = list_periods(root, domain)
    chosen = {}
    for t in periods:
        if t not in available:
            why = (f"not marked complete (no {SUCCESS} in it, while other periods of the "
                   "domain have one): still being written, or its writer did not mark it"
                   if t in period_marks(root, domain)[1] else "missing period")
            raise DataError(f"{join(root, domain)}/period={t}: {why} "
                            f"(available: {sorted(available)})")
        chosen[t] = available[t]
    return chosen


MAX_PERIODS = 100_000  # in one --periods range: 270 years of days


def parse_periods(spec: str) -> list[int]:
    """'3' -> [3]; '0:8' -> [0..7] (Python slice, end exclusive); '1,4,6' -> [1, 4, 6].
    Periods train in time order, so the list must be non-empty and strictly increasing (a
    checkpoint of period 0 trained after period 2 would have seen the future)."""
    try:
        if ":" in spec:
            a, b = (int(x) for x in spec.split(":"))
            span: range | list[int] = range(a, b)
        else:
            span = [int(x) for x in spec.split(",")]
    except ValueError:
        raise DataError(f"--periods {spec!r}: use N, A:B (B exclusive) or N,M,...") from None
    if len(span) > MAX_PERIODS:
        raise DataError(f"--periods {spec!r}: {len(span)} periods; at most {MAX_PERIODS:,} "
                        "at once")
    periods = list(span)
    if not periods:
        raise DataError(f"--periods {spec!r}: no periods (A:B needs A < B)")
    if any(a >= b for a, b in zip(periods, periods[1:], strict=False)):
        raise DataError(f"--periods {spec!r}: periods must be strictly increasing (time order)")
    return periods


# ---------------------------------------------------------------------------------------------
# Schema checks (metadata only, cheap) and content checks (vectorised, per decoded piece).
# ---------------------------------------------------------------------------------------------


def _kind_ok(kind: str, t: pa.DataType) -> bool:
    if kind in ("id", "time"):
        return pa.types.is_integer(t)
    if kind == "label":
        return pa.types.is_integer(t) or pa.types.is_boolean(t)
    if kind == "numeric":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if kind == "list":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(
            t.value_type
        )
    raise AssertionError(kind)


KIND_TEXT = {
    "id": "an integer (int64) id",
    "time": "integer unix seconds",
    "label": "int or bool 0/1",
    "numeric": "int or float",
    "list": "list<int64>",
}


def read_schema(path: DataFile) -> pa.Schema:
    try:
        return pq.read_schema(path.path, filesystem=path.fs)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None


def check_schema(path: DataFile | Path, schema: pa.Schema, features: FeatureConfig) -> None:
    for col, kind in features.required_columns().items():
        idx = schema.get_field_index(col)
        if idx < 0:
            raise DataError(f"{path}: missing column {col!r} ({KIND_TEXT[kind]})")
        t = schema.field(idx).type
        if not _kind_ok(kind, t):
            raise DataError(f"{path}: column {col!r} has type {t}, expected {KIND_TEXT[kind]}")


def check_period_schemas(period_files: dict[int, list[DataFile]],
                         features: FeatureConfig) -> None:
    """Each file matches the feature config, and all files of a period agree on used columns."""
    cols = list(features.required_columns())
    for _, files in period_files.items():
        first: tuple[DataFile, pa.Schema] | None = None
        for f in files:
            schema = read_schema(f)
            check_schema(f, schema, features)
            # nullability aside: the contract allows no nulls (checked per value), and pyarrow's
            # writers declare columns nullable by default while ours declare them non-null
            used = non_null_schema(pa.schema([schema.field(c) for c in cols]))
            if first is None:
                first = (f, used)
            elif not used.equals(first[1]):
                diff = [
                    c for c in cols if used.field(c).type != first[1].field(c).type
                ]
                raise DataError(
                    f"{f}: schema conflicts with {first[0].name} of the same period "
                    f"(columns {diff}: {[str(used.field(c).type) for c in diff]} vs "
                    f"{[str(first[1].field(c).type) for c in diff]})"
                )


def check_content(table: pa.Table, features: FeatureConfig, where: str) -> None:
    """Value checks on decoded rows: nulls, labels in {0,1}, aligned lists, finite numerics."""
    for col in features.required_columns():
        arr = table.column(col)
        if arr.null_count:
            raise DataError(f"{where}: column {col!r} has {arr.null_count} null values")
    label = table.column(features.label_column)
    if not pa.types.is_boolean(label.type):
        bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], type=label.type)))
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            example = pc.filter(label, bad)[0].as_py()
            raise DataError(
                f"{where}: column {features.label_column!r}: {n_bad} labels not in {{0,1}} "
                f"(e.g. {example})"
            )
    for s in features.sequences:
        li = pc.list_value_length(table.column(s.item_column))
        lc = pc.list_value_length(table.column(s.category_column))
        mis = pc.not_equal(li, lc)
        n_mis = pc.sum(mis).as_py() or 0
        if n_mis:
            row = int(np.flatnonzero(mis.to_numpy(zero_copy_only=False))[0])
            raise DataError(
                f"{where}: columns {s.item_column!r} and {s.category_column!r} are misaligned "
                f"in {n_mis} rows (first at row {row}: {li[row]} vs {lc[row]} entries)"
            )
        for col in (s.item_column, s.category_column):
            nulls = pc.list_flatten(table.column(col)).null_count
            if nulls:
                raise DataError(f"{where}: column {col!r} has {nulls} null list entries")
    for n in features.numeric:
        arr = table.column(n.column)
        if pa.types.is_floating(arr.type):
            bad = pc.sum(pc.invert(pc.is_finite(arr))).as_py() or 0
            if bad:
                raise DataError(f"{where}: column {n.column!r} has {bad} NaN/inf values")


def parquet_file(f: DataFile, **options: bool) -> pq.ParquetFile:
    return pq.ParquetFile(f.path, filesystem=f.fs, **options)


def pieces_of(period_files: dict[int, list[DataFile]]) -> list[ParquetPiece]:
    pieces = []
    for t, files in period_files.items():
        for f in files:
            try:
                md = parquet_file(f).metadata
            except Exception as e:
                raise DataError(f"{f}: unreadable Parquet file ({e})") from None
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                if n:
                    pieces.append(ParquetPiece(f, rg, n, t))
    return pieces


def read_piece(piece: ParquetPiece, columns: list[str]) -> pa.Table:
    try:
        # pre_buffer off: one row group per call, decoded in our own threads; the read-ahead
        # cache only adds work here (measured: ~40% more CPU per row)
        return parquet_file(piece.path, pre_buffer=False,
                            page_checksum_verification=True).read_row_group(
            piece.row_group, columns=columns, use_threads=False
        )
    except Exception as e:
        raise DataError(f"{piece.path}: unreadable Parquet file ({e})") from None


def iter_piece(piece: ParquetPiece, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """A row group as tables of at most `batch_rows` rows. Decoding in small batches keeps
    pyarrow's growing column buffers small: whole 16k-row list columns spend a fifth of the
    decode time reallocating and copying."""
    try:
        pf = parquet_file(piece.path, pre_buffer=False, page_checksum_verification=True)
        for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[piece.row_group],
                                  columns=columns, use_threads=False):
            yield pa.Table.from_batches([rb])
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{piece.path}: unreadable Parquet file ({e})") from None


def period_labels(data: DataRoot, domain: str, period: int, features: FeatureConfig) -> np.ndarray:
    """A period's labels in file order (the order every model's kept scores are in)."""
    files = select_periods(data, domain, [period])[period]
    return np.concatenate([pq.read_table(f.path, filesystem=f.fs,
                                         columns=[features.label_column])
                           .column(features.label_column).to_numpy() for f in files])


def validate_periods(
    root: DataRoot, domain: str, periods: Iterable[int], features: FeatureConfig
) -> dict[int, list[DataFile]]:
    """Full check of some periods of a domain: schemas, then every value. Raises DataError."""
    period_files = select_periods(root, domain, periods)
    check_period_schemas(period_files, features)
    cols = list(features.required_columns())
    for t, files in period_files.items():
        rows = 0
        users, items = [], []
        for piece in pieces_of({t: files}):
            table = read_piece(piece, cols)
            check_content(table, features, str(piece.path))
            users.append(raw_id_column(table, features.user_column))
            items.append(raw_id_column(table, features.item_column))
            rows += piece.num_rows
        if rows == 0:
            raise DataError(f"{join(root, domain)}/period={t}: empty period (0 rows)")
        read_oracle(root, domain, t, np.concatenate(users), np.concatenate(items))
    return period_files


def raw_id_column(table: pa.Table, column: str) -> np.ndarray:
    """An id column's raw ids as int64, as training reads them (uint64 bit for bit)."""
    return np.asarray(table.column(column).to_numpy()).astype(np.int64, copy=False)


def read_oracle(root: DataRoot, domain: str, period: int, users: np.ndarray,
                items: np.ndarray) -> np.ndarray | None:
    """A synthetic world's true click probabilities of a period (None without them, and for
    remote data), once they are shown to line up with the period's rows: the oracle file's
    user_id and item_id equal the period's, row for row (its row count alone would pass a
    shuffled file)."""
    if is_uri(root):
        return None
    path = oracle_path(Path(root), domain, period)
    if not path.exists():
        return None
    table = pq.read_table(path)
    missing = sorted({"user_id", "item_id", ORACLE_COLUMN} - set(table.column_names))
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; the true probabilities "
                        "cannot be lined up with the data")
    if table.num_rows != len(users):
        raise DataError(f"{path}: {table.num_rows} rows, the period has {len(users)}; the true "
                        "probabilities must line up with the data row for row")
    for column, want in (("user_id", users), ("item_id", items)):
        have = raw_id_column(table, column)
        if len(bad := np.flatnonzero(have != want)):
            raise DataError(f"{path}: row {bad[0]} has {column} {have[bad[0]]}, the period's "
                            f"row {bad[0]} has {want[bad[0]]} ({len(bad)} rows differ); the "
                            "true probabilities must line up with the data row for row")
    return table.column(ORACLE_COLUMN).to_numpy()


def non_null_schema(schema: pa.Schema) -> pa.Schema:
    """The same schema with every field (and list element) declared non-nullable."""
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_list(t):
            t = pa.list_(pa.field(t.value_field.name, t.value_type, nullable=False))
        fields.append(pa.field(f.name, t, nullable=False))
    return pa.schema(fields)


def write_parquet(table: pa.Table, path: Path, row_group_size: int = 16_384) -> None:
    """Write one file the way ctnet's own producers do. The contract allows no nulls, so the
    schema says so and readers skip definition levels; LZ4 decodes faster than the default
    snappy; page checksums (CRC32) let the reader, which verifies them where present, refuse
    a damaged page instead of decoding wrong values. All are choices of the writer: the
    reader takes any valid file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.cast(non_null_schema(table.schema))
    pq.write_table(table, path, row_group_size=row_group_size, compression="lz4",
                   write_page_checksum=True)


def oracle_path(root: Path, domain: str, period: int) -> Path:
    return Path(root) / ORACLE_DIR / domain / f"period={period}" / "part-0.parquet"
