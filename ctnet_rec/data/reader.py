"""Stream a domain's periods from Parquet into `Batch`es, fast enough that training never waits.

Pipeline: a pool of `decode_threads` workers reads row-group slices with pyarrow (which
releases the GIL), checks their values and maps ids to table rows in place (`RowBlock`: Arrow's
buffers plus per-row starts and truncated lengths); a producer thread fills a bounded shuffle
window and draws each batch's rows from it in random order; the same pool assembles the KJTs
(one gather per key), in order; a bounded queue hands batches to the training loop (background
prefetch). There is no Python loop per row.

Distributed: the rows of the chosen periods, in (period, file, row group) order, are split into
`world_size` contiguous, disjoint ranges that together cover every row. Each rank cuts its
range into the same number of batches (full batches, the last one smaller), so no rank waits
forever in a collective.
"""

# Annotations are evaluated (no `from __future__ import annotations`): this module travels
# inside exported artifacts (torch.package), where dataclasses cannot read string annotations.

import collections
import math
import queue
import threading
import typing
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnet_rec.config import DataConfig, FeatureConfig
from ctnet_rec.data.batch import Batch
from ctnet_rec.data.contract import (
    MIN_TRAINING_ROWS,
    DataError,
    ParquetPiece,
    check_content,
    check_period_schemas,
    iter_piece,
    pieces_of,
    select_periods,
)
from ctnet_rec.data.ids import map_ids_
from ctnet_rec.data.storage import DataRoot, join

DECODE_ROWS = 8192  # rows per decoded Arrow batch (and per RowBlock); measured best of 1k-16k


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _single_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _writable_int64(arr: pa.Array, copy: bool) -> np.ndarray:
    """The int64 values of a null-free array: a writable view of Arrow's buffer when that buffer
    is mutable (freshly decoded, ours alone), else a copy."""
    buf = arr.buffers()[1]
    if copy or arr.type != pa.int64() or not buf.is_mutable:
        return np.array(arr.to_numpy(), dtype=np.int64)
    return np.frombuffer(buf, np.int64, count=len(arr), offset=arr.offset * 8)


def _gather_positions(grp: "IdGroup") -> np.ndarray:
    """Flat positions of rows' values: starts[i] .. starts[i] + lengths[i] - 1, row after row.

    Built as the running sum of +1 steps with a jump at each row's start (a third of the cost
    of np.repeat + arange on 200-long sequences)."""
    lens = grp.lengths.astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    nz = lens > 0
    starts, lens = grp.starts[nz], lens[nz]
    at = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=at[1:])
    steps = np.ones(total, np.int64)
    steps[0] = starts[0]
    steps[at[1:]] = starts[1:] - (starts[:-1] + lens[:-1] - 1)
    return np.cumsum(steps, out=steps)


@dataclass
class IdGroup:
    """Sparse features that share per-row lengths (a scalar id, or a sequence's aligned item and
    category lists): row i's values are values[k][starts[i] : starts[i] + lengths[i]].

    Values stay raw and where Arrow decoded them; truncation lives in `lengths`. Only batch
    assembly copies values, once, straight into the batch."""

    starts: np.ndarray  # int64 per row
    lengths: np.ndarray  # int32 per row
    values: dict[str, np.ndarray]

    def take(self, idx: np.ndarray) -> "IdGroup":
        return IdGroup(self.starts[idx], self.lengths[idx], self.values)


@dataclass
class RowBlock:
    """Decoded rows of one row group (or a selection of them), cheap to select from."""

    groups: list[IdGroup]
    dense: np.ndarray  # float32 (n, num_dense)
    labels: np.ndarray  # float32 (n,)
    user_ids: np.ndarray  # int64 raw
    item_ids: np.ndarray  # int64 raw

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "RowBlock":
        return RowBlock(
            [g.take(idx) for g in self.groups],
            self.dense[idx],
            self.labels[idx],
            self.user_ids[idx],
            self.item_ids[idx],
        )


class RowCodec:
    """Arrow table -> RowBlock (`decode`), and selected rows -> Batch (`assemble`) under a
    feature config: truncation to `max_len` (newest first), bucketising, id mapping."""

    def __init__(self, features: FeatureConfig) -> None:
        self.features = features
        self.columns = list(features.required_columns())
        # (keys, max_len or None for one value per row), one entry per IdGroup, in KJT order
        seq_of = {s.item_column: s for s in features.sequences}
        self.layout: list[tuple[list[str], int | None]] = []
        for k in features.sparse_keys():
            if k in seq_of:
                self.layout.append(([k, seq_of[k].category_column], seq_of[k].max_len))
            elif k not in {s.category_column for s in features.sequences}:
                self.layout.append(([k], None))
        self.keys = [k for keys, _ in self.layout for k in keys]
        assert self.keys == features.sparse_keys()

    def decode(self, table: pa.Table) -> RowBlock:
        """Ids are mapped to rows here, in the decode threads, in place in Arrow's freshly
        decoded buffers (no copy); sequences keep all values, truncation lives in lengths."""
        f = self.features
        n = table.num_rows
        user_ids = np.array(table.column(f.user_column).to_numpy(), dtype=np.int64)
        item_ids = np.array(table.column(f.item_column).to_numpy(), dtype=np.int64)
        # a column read by several features (each with its own table) is mapped in place at
        # its last read only: the reads before it map copies of the raw ids
        reads = collections.Counter([x.column for x in f.id_features] + [
            c for s in f.sequences for c in (s.item_column, s.category_column)])

        def mapped(col: str, arr: pa.Array, table: str) -> np.ndarray:
            reads[col] -= 1
            values = _writable_int64(arr, copy=reads[col] > 0)
            return map_ids_(values, f.table(table).num_embeddings, f.policy_of(table))

        row_index, ones = np.arange(n, dtype=np.int64), np.ones(n, np.int32)
        groups: dict[str, IdGroup] = {}  # by first key
        for f_id in f.id_features:
            arr = _single_chunk(table.column(f_id.column))
            rows = mapped(f_id.column, arr, f_id.table)
            groups[f_id.name] = IdGroup(row_index, ones, {f_id.name: rows})
        dense_cols = []
        for num in f.numeric:
            x = table.column(num.column).to_numpy().astype(np.float64, copy=False)
            if num.bucketized:
                b = np.searchsorted(np.asarray(num.boundaries), x, side="right")
                groups[num.name] = IdGroup(row_index, ones, {num.name: b.astype(np.int64)})
            else:
                dense_cols.append(x.astype(np.float32))
        for s in f.sequences:
            values = {}
            pairs = ((s.item_column, s.item_table), (s.category_column, s.category_table))
            for col, tname in pairs:
                arr = _single_chunk(table.column(col))
                off = arr.offsets.to_numpy()
                flat = arr.values.slice(off[0], off[-1] - off[0])
                values[col] = mapped(col, flat, tname)
            lengths = np.minimum(np.diff(off), s.max_len).astype(np.int32)
            groups[s.item_column] = IdGroup(off[:-1] - off[0], lengths, values)
        dense = np.stack(dense_cols, 1) if dense_cols else np.zeros((n, 0), np.float32)
        labels = table.column(f.label_column).to_numpy().astype(np.float32)
        ordered = [groups[keys[0]] for keys, _ in self.layout]
        return RowBlock(ordered, dense, labels, user_ids, item_ids)

    def assemble(self, parts: list[RowBlock]) -> Batch:
        """One batch from rows of several blocks: each key's values are gathered once, straight
        into their slice of the KJT's values array."""
        group_lengths = [
            np.concatenate([p.groups[g].lengths for p in parts]) for g in range(len(self.layout))
        ]
        totals = [int(x.sum(dtype=np.int64)) for x in group_lengths]
        lengths = np.concatenate(
            [group_lengths[g] for g, (keys, _) in enumerate(self.layout) for _ in keys]
        )
        size = sum(t * len(keys) for t, (keys, _) in zip(totals, self.layout, strict=True))
        values = np.empty(size, np.int64)
        base = 0
        for g, (keys, max_len) in enumerate(self.layout):
            at = base
            for p in parts:
                grp = p.groups[g]
                pos = grp.starts if max_len is None else _gather_positions(grp)
                for j, k in enumerate(keys):
                    s = at + j * totals[g]
                    np.take(grp.values[k], pos, out=values[s : s + len(pos)], mode="clip")
                at += len(pos)
            base += len(keys) * totals[g]

        def cat(xs: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)))

        return Batch(
            sparse=KeyedJaggedTensor(
                keys=self.keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
            ),
            dense=cat([p.dense for p in parts]),
            labels=cat([p.labels for p in parts]),
            user_ids=cat([p.user_ids for p in parts]),
            item_ids=cat([p.item_ids for p in parts]),
        )


class RowWindow:
    """Blocks held for shuffling; `draw(n)` returns n rows not drawn before, in random order
    (or in stored order without an rng), as one selection per block touched."""

    def __init__(self, blocks: list[RowBlock], rng: np.random.Generator | None) -> None:
        self.blocks = blocks
        self.starts = _offsets(np.array([len(b) for b in blocks], np.int64))
        total = int(self.starts[-1])
        self.order = rng.permutation(total) if rng is not None else np.arange(total)
        self.pos, self.total = 0, total

    @property
    def remaining(self) -> int:
        return self.total - self.pos

    def draw(self, n: int) -> list[RowBlock]:
        idx = np.sort(self.order[self.pos : self.pos + n])
        self.pos += n
        which = np.searchsorted(self.starts, idx, side="right") - 1
        bounds = np.searchsorted(which, np.arange(len(self.blocks) + 1))
        return [
            self.blocks[k].take(idx[bounds[k] : bounds[k + 1]] - self.starts[k])
            for k in range(len(self.blocks))
            if bounds[k + 1] > bounds[k]
        ]


@dataclass(frozen=True)
class PieceSlice:
    piece: ParquetPiece
    start: int
    stop: int


def rank_slices(
    pieces: list[ParquetPiece], rank: int, world_size: int
) -> tuple[list[PieceSlice], int, int]:
    """This rank's contiguous share of all rows: (slices, its row count, the largest share)."""
    total = sum(p.num_rows for p in pieces)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out, a = [], 0
    for p in pieces:
        b = a + p.num_rows
        s, e = max(lo, a), min(hi, b)
        if s < e:
            out.append(PieceSlice(p, s - a, e - a))
        a = b
    return out, hi - lo, -(-total // world_size)


def batch_sizes(rows: int, num_batches: int, batch_size: int) -> list[int]:
    """`num_batches` sizes summing to `rows`: full batches, then the remainder; when the
    remainder would be empty (this rank is short of a full last batch) or a single row (a
    training step's batch norm needs two), the last full batch and it are split in two."""
    if rows < num_batches:
        raise ValueError(f"{rows} rows cannot fill {num_batches} batches")
    sizes = [batch_size] * (num_batches - 1)
    rest = rows - batch_size * (num_batches - 1)
    if rest >= MIN_TRAINING_ROWS or not sizes:
        return sizes + [rest]
    last_two = batch_size + rest
    return sizes[:-1] + [last_two - last_two // 2, last_two // 2]


class ParquetBatchReader:
    """Batches of one domain's periods for rank `rank` of `world_size`.

    Schemas are checked when the reader is built; values are checked as rows are decoded.
    Iterating twice replays the same batches; `set_epoch` changes the shuffle."""

    def __init__(
        self,
        root: DataRoot,
        domain: str,
        periods: Iterable[int],
        features: FeatureConfig,
        data: DataConfig,
        *,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.features, self.data = features, data
        self.batch_size = batch_size or data.batch_size
        self.shuffle, self.seed, self.rank, self.epoch = shuffle, seed, rank, 0
        # batches in page-locked memory (CUDA runs): their copies to the GPU can then run
        # asynchronously and overlap compute; pinned by the producer thread
        self.pin_memory = pin_memory
        self.period_files = select_periods(root, domain, periods)
        check_period_schemas(self.period_files, features)
        pieces = pieces_of(self.period_files)
        self.slices, self.num_rows, largest = rank_slices(pieces, rank, world_size)
        self.total_rows = sum(p.num_rows for p in pieces)  # every rank's together
        if self.total_rows < world_size:  # some rank would have none: refused on every rank
            raise DataError(
                f"{join(root, domain)} periods {sorted(self.period_files)}: "
                f"{self.total_rows} rows cannot be shared by {world_size} ranks"
            )
        self.num_batches = math.ceil(largest / self.batch_size)
        self.sizes = batch_sizes(self.num_rows, self.num_batches, self.batch_size)
        self.codec = RowCodec(features)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, sl: PieceSlice) -> list[RowBlock]:
        blocks, at = [], 0
        where = f"{sl.piece.path} (row group {sl.piece.row_group})"
        for table in iter_piece(sl.piece, self.codec.columns, DECODE_ROWS):
            a, b = at, at + table.num_rows
            at = b
            lo, hi = max(a, sl.start), min(b, sl.stop)
            if lo < hi:
                part = table.slice(lo - a, hi - lo)
                check_content(part, self.features, where)
                blocks.append(self.codec.decode(part))
        return blocks

    def _blocks(self, rng: np.random.Generator | None, pool: ThreadPoolExecutor
                ) -> Iterator[RowBlock]:
        """Decoded slices in (possibly shuffled) order, decoded ahead by the pool."""
        order = list(self.slices)
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        ahead = self.data.decode_threads + 1
        futures: list[Future[list[RowBlock]]] = []
        for sl in order:
            futures.append(pool.submit(self._decode, sl))
            if len(futures) > ahead:
                yield from futures.pop(0).result()
        for fut in futures:
            yield from fut.result()

    def _batches(self) -> Generator[Batch, None, None]:
        """Fill a window of at least `shuffle_buffer` rows, draw batches from it in random order;
        rows left over when it runs short are carried into the next window. Decoding and batch
        assembly share one pool of `decode_threads` workers; batches come out in order."""
        rng = np.random.default_rng([self.seed, self.rank, self.epoch]) if self.shuffle else None
        window_rows = max(self.data.shuffle_buffer, self.batch_size) if rng is not None else 0
        with ThreadPoolExecutor(self.data.decode_threads, thread_name_prefix="decode") as pool:
            blocks = self._blocks(rng, pool)
            window = RowWindow([], rng)
            pending: list[Future[Batch]] = []
            for size in self.sizes:
                if window.remaining < size:
                    parts = window.draw(window.remaining)
                    rows = sum(len(p) for p in parts)
                    while rows < max(window_rows, size):
                        block = next(blocks, None)
                        if block is None:
                            break
                        parts.append(block)
                        rows += len(block)
                    window = RowWindow(parts, rng)
                pending.append(pool.submit(self.codec.assemble, window.draw(size)))
                if len(pending) > self.data.decode_threads:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def __iter__(self) -> Iterator[Batch]:
        """Batches produced by a background thread, at most `prefetch_batches` ahead."""
        q: queue.Queue[object] = queue.Queue(maxsize=self.data.prefetch_batches)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            batches = self._batches()
            try:
                for b in batches:
                    if self.pin_memory:
                        b = b.pin_memory()
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)
            finally:
                batches.close()

        thread = threading.Thread(target=produce, name="batch-producer", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield typing.cast(Batch, item)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
