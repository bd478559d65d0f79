"""The ad corpus (``items``) column-wise: read part by part, validated, deduplicated, one element.

At 10M ads a row dict per ad (what :func:`beam_pipelines.tables.small_table` makes of the small
tables) costs minutes and gigabytes; here each raw file is read in Arrow batches of
``ITEM_CHUNK_ROWS``, validated vectorised (:func:`typed_item_suspects`; only flagged rows go
through :func:`tfrs_ctx.data.validation.row_problem`, which gives the reason) and turned into
:class:`tfrs_ctx.data.rawio.ItemColumns`. The parts are gathered into one element, duplicate
item ids keep one row (the first in the same canonical order as ``keep_first``), and the
bad and duplicate rows go to the dead-letter output like every other table's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from beam_pipelines.portable import COUNT, DEAD, MAIN, count, gather, out, read_files, split
from beam_pipelines.tables import chunk_rows, dead_letter, json_safe, read_chunks, split_valid
from tfrs_ctx import schema as S
from tfrs_ctx.data import rawio
from tfrs_ctx.data.rawio import ItemColumns

ITEM_CHUNK_ROWS = 100_000  # raw item rows per Arrow batch read and validated at once


def _arrow_kind_matches(kind: str, arrow_type: Any) -> bool:
    import pyarrow as pa

    scalar = {"int64": pa.int64(), "float32": pa.float32()}
    if kind.startswith("list_"):
        return pa.types.is_list(arrow_type) and arrow_type.value_type == scalar[kind.removeprefix("list_")]
    return kind in scalar and arrow_type == scalar[kind]


def typed_item_suspects(table: S.Table, batch: Any) -> np.ndarray | None:
    """Rows of an Arrow batch that :func:`row_problem` may reject; ``None`` if the batch is not column-typed.

    Column-typed: exactly the table's columns, int64 ids and list<int64> / list<float32> lists.
    Then a row can only fail by a null (id, list or list element), a confidence outside [0, 1]
    or not finite, or list lengths that differ; this flags those rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(batch, pa.RecordBatch) or sorted(batch.schema.names) != sorted(table.column_names):
        return None
    if not all(_arrow_kind_matches(c.kind, batch.schema.field(c.name).type) for c in table.columns):
        return None
    suspect = np.zeros(batch.num_rows, dtype=bool)
    for column in table.columns:
        values = batch.column(column.name)
        if values.null_count:
            suspect |= values.is_null().to_numpy(zero_copy_only=False)
        if column.kind.startswith("list_"):
            flat = values.flatten()
            parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            bad = flat.is_null().to_numpy(zero_copy_only=False)
            if column.name == S.CONFIDENCES:
                v = pc.fill_null(flat, 0.0).to_numpy(zero_copy_only=False)
                bad |= ~np.isfinite(v) | (v < 0.0) | (v > 1.0)
            suspect[parents[bad]] = True
    lengths = [
        pc.fill_null(pc.list_value_length(batch.column(name)), -1).to_numpy(zero_copy_only=False)
        for name in (S.CATEGORIES, S.CONFIDENCES)
    ]
    suspect |= lengths[0] != lengths[1]
    return suspect


def validate_item_chunk(table: S.Table, chunk: Any) -> tuple[ItemColumns, list[dict]]:
    """A chunk of an items-like table -> its valid rows column-wise, and dead letters for the rest."""
    with_advertiser = S.ADVERTISER_ID in table.column_names
    suspect = typed_item_suspects(table, chunk)
    if suspect is None:
        good, dead = split_valid(table, chunk_rows(chunk), None)
        return ItemColumns.from_rows(good, with_advertiser), dead
    flagged = np.flatnonzero(suspect)
    if not len(flagged):
        return ItemColumns.from_arrow(chunk, with_advertiser), []
    good, dead = split_valid(table, chunk.take(flagged).to_pylist(), None)
    clean = ItemColumns.from_arrow(chunk.filter(~suspect), with_advertiser)
    return ItemColumns.concat([clean, ItemColumns.from_rows(good, with_advertiser)]), dead


def read_items(table: S.Table, path: str) -> Iterator[tuple]:
    """One raw file -> tagged :class:`ItemColumns` per chunk (``MAIN``) and dead letters (``DEAD``)."""
    for chunk in read_chunks(path, ITEM_CHUNK_ROWS):
        columns, dead = validate_item_chunk(table, chunk)
        for d in dead:
            yield out(DEAD, d)
        if len(columns):
            yield out(MAIN, columns)


def dedupe_items(table: S.Table, parts: Iterable[ItemColumns]) -> Iterator[tuple]:
    """All parts -> one :class:`ItemColumns` with unique ids (``MAIN``), duplicates (``DEAD``), the row count.

    Of the rows sharing an id, the first by the canonical JSON of the row as read is kept
    (:func:`beam_pipelines.tables.keep_first`'s rule), whatever order the parts arrive in.
    """
    columns = ItemColumns.concat(
        [p for p in parts if len(p)] or [ItemColumns.empty(S.ADVERTISER_ID in table.column_names)]
    )
    ids = columns.item_id
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    dropped: list[int] = []
    if len(shared):
        groups: dict[int, list[int]] = {}
        for i in shared.tolist():
            groups.setdefault(int(ids[i]), []).append(i)
        reason = f"duplicate key ({', '.join(table.key)})"
        for positions in groups.values():
            ranked = sorted(positions, key=lambda i: json.dumps(json_safe(columns.row_dict(i)), sort_keys=True))
            for i in ranked[1:]:
                dropped.append(i)
                yield out(DEAD, dead_letter(table, reason, columns.row_dict(i)))
        columns = columns.drop(np.asarray(dropped, dtype=np.int64))
    columns.rows = None  # the raw rows served the dead letters only
    yield count(f"rows_{table.name}", len(columns))
    yield out(MAIN, columns)


def item_table(p: beam.Pipeline, raw_dir: str, table: S.Table = S.ITEMS) -> tuple[beam.PCollection, list, list]:
    """The validated, id-unique items table as one :class:`ItemColumns` element; dead letters; row count."""
    name = table.name
    with_advertiser = S.ADVERTISER_ID in table.column_names
    read = read_files(p, name, rawio.table_files(raw_dir, table), lambda path, t=table: read_items(t, path))
    checked = split(read, f"Split{name}", (MAIN, DEAD))
    seed = p | f"Empty{name}" >> beam.Create([ItemColumns.empty(with_advertiser)])
    parts = (checked[MAIN], seed) | f"{name}Parts" >> beam.Flatten()
    deduped = gather(f"Gather{name}", {"parts": parts}) | f"Dedupe{name}" >> beam.FlatMap(
        lambda g, t=table: dedupe_items(t, g["parts"])
    )
    deduped = split(deduped, f"SplitDedupe{name}", (MAIN, DEAD, COUNT))
    return deduped[MAIN], [checked[DEAD], deduped[DEAD]], [deduped[COUNT]]
