"""Reading and writing raw tables (Parquet directories; JSON lines also read)."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tfrs_ctx import schema
from tfrs_ctx.schema import Table


class TableWriter:
    """Writes a raw table as numbered Parquet part files, one per ``write`` call.

    Keeps memory bounded: each chunk goes to disk as soon as it is written.
    """

    def __init__(self, raw_dir: str, table: Table):
        self.table = table
        self.dir = schema.raw_table_path(raw_dir, table)
        os.makedirs(self.dir, exist_ok=True)
        for old in glob.glob(os.path.join(self.dir, "part-*.parquet")):
            os.remove(old)
        self.parts = 0
        self.rows = 0

    def write(self, columns: Mapping[str, Sequence[Any]]) -> None:
        arrays = pa.table(dict(columns), schema=self.table.arrow_schema())
        path = os.path.join(self.dir, f"part-{self.parts:05d}.parquet")
        pq.write_table(arrays, path, compression="zstd")
        self.parts += 1
        self.rows += arrays.num_rows


def write_table(raw_dir: str, table: Table, frame: pd.DataFrame | Mapping[str, Sequence[Any]]) -> int:
    """Write a whole table in one part; returns the number of rows."""
    writer = TableWriter(raw_dir, table)
    columns = {c: frame[c] for c in table.column_names}
    if isinstance(frame, pd.DataFrame):
        columns = {c: _column_values(frame[c]) for c in table.column_names}
    writer.write(columns)
    return writer.rows


def _column_values(series: pd.Series) -> Any:
    """A frame column for Arrow: lists for objects, ``None`` for nulls of a nullable number column."""
    if series.dtype == object:
        return series.tolist()
    if series.hasnans:  # e.g. a nullable int64 (pandas Int64, or floats with NaN for null)
        return [None if pd.isna(v) else v for v in series.astype(object).tolist()]
    return series.to_numpy()


def table_files(raw_dir: str, table: Table) -> list[str]:
    """The files of a raw table: ``*.parquet`` or ``*.jsonl`` under ``RAW_DIR/<table>/``."""
    base = schema.raw_table_path(raw_dir, table)
    files = sorted(glob.glob(os.path.join(base, "*.parquet")) + glob.glob(os.path.join(base, "*.jsonl")))
    if not files:
        raise FileNotFoundError(f"raw table '{table.name}': no .parquet or .jsonl files under {base}")
    return files


def read_table(raw_dir: str, table: Table) -> pd.DataFrame:
    """Read a whole raw table into pandas, as it is (``validation.read_valid_table`` also checks it)."""
    frames = []
    for path in table_files(raw_dir, table):
        if path.endswith(".jsonl"):
            frames.append(pd.read_json(path, lines=True, dtype=False, convert_dates=False))
        else:
            frames.append(pq.read_table(path).to_pandas())
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def iter_rows(path: str, batch_size: int = 65536):
    """Yield rows of one raw file as dicts (used by the Beam readers)."""
    if path.endswith(".jsonl"):
        import json

        with open(path) as f:
            for line_number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__unparseable__": f"{os.path.basename(path)}:{line_number}: {e}"}
        return
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


# --------------------------------------------------------------------------------------
# Items-like tables column-wise (the ad corpus at 10M rows)
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ItemColumns:
    """Valid rows of ``items`` (or ``subject_items``: no advertiser) column-wise.

    ``categories`` / ``confidences`` are the rows' lists concatenated, row ``i`` holding
    ``[offsets[i], offsets[i + 1])``; confidences stay float64 (the raw values, before the
    float32 of the examples). ``rows`` keeps the raw row dicts where they came row by row
    (JSON lines, odd Parquet types; ``None`` entries: rebuilt from the columns), so a dead
    letter shows the row as read.
    """

    item_id: np.ndarray
    advertiser_id: np.ndarray | None
    offsets: np.ndarray
    categories: np.ndarray
    confidences: np.ndarray
    rows: list | None = None
    # subject_items only: each row's AD_ID, schema.NO_SUBJECT_AD where null (None: no row has the column)
    ad_id: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_id)

    @classmethod
    def empty(cls, with_advertiser: bool = True) -> ItemColumns:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z if with_advertiser else None, np.zeros(1, dtype=np.int64), z, np.zeros(0, np.float64))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], with_advertiser: bool = True) -> ItemColumns:
        """Columns of valid raw row dicts (ints may be integer-valued floats)."""
        lengths = np.fromiter((len(r[schema.CATEGORIES]) for r in rows), dtype=np.int64, count=len(rows))
        n = int(lengths.sum())
        flat = (c for r in rows for c in r[schema.CATEGORIES])
        return cls(
            item_id=np.fromiter((int(r[schema.ITEM_ID]) for r in rows), dtype=np.int64, count=len(rows)),
            advertiser_id=np.fromiter((int(r[schema.ADVERTISER_ID]) for r in rows), dtype=np.int64, count=len(rows))
            if with_advertiser
            else None,
            offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
            categories=np.fromiter((int(c) for c in flat), dtype=np.int64, count=n),
            confidences=np.fromiter((float(v) for r in rows for v in r[schema.CONFIDENCES]), dtype=np.float64, count=n),
            rows=list(rows),
            ad_id=_ad_ids(rows),
        )

    @classmethod
    def from_arrow(cls, batch: Any, with_advertiser: bool = True) -> ItemColumns:
        """Columns of an Arrow batch of valid rows of the schema's types (no nulls)."""
        import pyarrow.compute as pc

        def flat(name: str, dtype: Any) -> np.ndarray:
            return batch.column(name).flatten().to_numpy(zero_copy_only=False).astype(dtype)

        lengths = pc.list_value_length(batch.column(schema.CATEGORIES)).to_numpy(zero_copy_only=False)
        return cls(
            item_id=batch.column(schema.ITEM_ID).to_numpy().astype(np.int64),
            advertiser_id=batch.column(schema.ADVERTISER_ID).to_numpy().astype(np.int64) if with_advertiser else None,
            offsets=np.r_[0, np.cumsum(lengths, dtype=np.int64)].astype(np.int64),
            categories=flat(schema.CATEGORIES, np.int64),
            confidences=flat(schema.CONFIDENCES, np.float64),
            ad_id=(
                pc.fill_null(batch.column(schema.AD_ID), schema.NO_SUBJECT_AD).to_numpy().astype(np.int64)
                if schema.AD_ID in batch.schema.names
                else None
            ),
        )

    @classmethod
    def concat(cls, parts: Sequence[ItemColumns]) -> ItemColumns:
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [len(p.categories) for p in parts[:-1]])
        rows = None
        if any(p.rows is not None for p in parts):
            rows = [r for p in parts for r in (p.rows if p.rows is not None else [None] * len(p))]
        return cls(
            item_id=np.concatenate([p.item_id for p in parts]),
            advertiser_id=None if parts[0].advertiser_id is None else np.concatenate([p.advertiser_id for p in parts]),
            offsets=np.r_[0, np.concatenate([p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])].astype(
                np.int64
            ),
            categories=np.concatenate([p.categories for p in parts]),
            confidences=np.concatenate([p.confidences for p in parts]),
            rows=rows,
            ad_id=None
            if all(p.ad_id is None for p in parts)
            else np.concatenate([p.ad_id if p.ad_id is not None else _no_ads(len(p)) for p in parts]),
        )

    def row_dict(self, i: int) -> dict:
        """Row ``i`` as read (the raw dict), or as ``pyarrow``'s ``to_pylist`` gives it."""
        if self.rows is not None and self.rows[i] is not None:
            return dict(self.rows[i])
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        row = {schema.ITEM_ID: int(self.item_id[i])}
        if self.advertiser_id is not None:
            row[schema.ADVERTISER_ID] = int(self.advertiser_id[i])
        row[schema.CATEGORIES] = self.categories[a:b].tolist()
        row[schema.CONFIDENCES] = self.confidences[a:b].tolist()
        if self.ad_id is not None:
            row[schema.AD_ID] = None if self.ad_id[i] == schema.NO_SUBJECT_AD else int(self.ad_id[i])
        return row

    def row_dicts(self) -> list[dict]:
        return [self.row_dict(i) for i in range(len(self))]

    def drop(self, positions: np.ndarray) -> ItemColumns:
        """These columns without the rows at ``positions``."""
        keep = np.ones(len(self), dtype=bool)
        keep[positions] = False
        lengths = np.diff(self.offsets)
        flat = np.repeat(keep, lengths)
        return ItemColumns(
            item_id=self.item_id[keep],
            advertiser_id=None if self.advertiser_id is None else self.advertiser_id[keep],
            offsets=np.r_[0, np.cumsum(lengths[keep])].astype(np.int64),
            categories=self.categories[flat],
            confidences=self.confidences[flat],
            rows=None if self.rows is None else [r for r, k in zip(self.rows, keep.tolist(), strict=True) if k],
            ad_id=None if self.ad_id is None else self.ad_id[keep],
        )


def _no_ads(n: int) -> np.ndarray:
    return np.full(n, schema.NO_SUBJECT_AD, dtype=np.int64)


def _ad_ids(rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
    """Each row's AD_ID (``NO_SUBJECT_AD`` where null or absent); ``None`` when no row has the column."""
    if not any(schema.AD_ID in r for r in rows):
        return None
    values = (r.get(schema.AD_ID) for r in rows)
    return np.fromiter(
        (schema.NO_SUBJECT_AD if v is None or v != v else int(v) for v in values), dtype=np.int64, count=len(rows)
    )
