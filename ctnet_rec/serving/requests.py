"""Raw rows in: what turns a serving request, rows of the data's own columns (raw ids, behaviour
lists newest first, numeric values), into the exported model's input. It travels inside the
artifact beside the model (`request.pkl`), so a client never re-implements the id policy
(modulo, splitmix64 hash, managed ids), bucketing or truncation: it runs the very code
training's reader runs (`RowCodec`), under the config the model was trained with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnet_rec.config import FeatureConfig
from ctnet_rec.data.contract import KIND_TEXT, DataError, check_content, check_schema
from ctnet_rec.data.reader import RowCodec

_TYPES = {"id": pa.int64(), "time": pa.int64(), "label": pa.int8(), "numeric": pa.float64(),
          "list": pa.list_(pa.int64())}
# a request has no click yet, and its time is not a feature: both optional
_OPTIONAL = ("label", "time")


class RequestCodec:
    """Rows of raw columns (dicts, e.g. a JSON request, or a pyarrow table) -> the model's
    (KeyedJaggedTensor, dense) input, checked as the data contract checks a Parquet file."""

    def __init__(self, features: FeatureConfig) -> None:
        self.features = features
        self.codec = RowCodec(features)
        self.columns = {c: k for c, k in features.required_columns().items()
                        if k not in _OPTIONAL}

    def table(self, rows: Sequence[Mapping[str, Any]] | pa.Table) -> pa.Table:
        """The request as a table of the contract's columns; a missing column, a value of the
        wrong kind or a misaligned behaviour list is refused, naming the column."""
        if isinstance(rows, pa.Table):
            table = rows
        else:
            for i, row in enumerate(rows):
                missing = [c for c in self.columns if c not in row]
                if missing:
                    raise DataError(f"request row {i}: missing column {missing[0]!r} "
                                    f"({KIND_TEXT[self.columns[missing[0]]]})")
            arrays = {}
            for column, kind in self.columns.items():
                try:
                    arrays[column] = pa.array([row[column] for row in rows], type=_TYPES[kind])
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
                    raise DataError(f"request: column {column!r} is not "
                                    f"{KIND_TEXT[kind]} ({e})") from None
            table = pa.table(arrays)
        f = self.features
        for column, kind in ((f.label_column, "label"), (f.time_column, "time")):
            if column not in table.column_names:
                table = table.append_column(column, pa.array([0] * table.num_rows,
                                                             _TYPES[kind]))
        check_schema(Path("request"), table.schema, f)
        check_content(table, f, "request")
        return table

    def __call__(self, rows: Sequence[Mapping[str, Any]] | pa.Table,
                 ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        batch = self.codec.assemble([self.codec.decode(self.table(rows))])
        return batch.sparse, batch.dense
