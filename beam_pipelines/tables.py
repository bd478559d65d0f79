"""What both pipelines do with raw tables: read them in chunks, validate, dead-letter, write files.

Every raw row is checked against :func:`tfrs_ctx.data.validation.row_problem` (references
against the valid ``items`` / ``subject_items``; duplicate keys of the small tables keep one row,
the first in a canonical order). For column-typed Parquet batches of the event tables the same
rules run vectorised first (:func:`typed_suspects`) and only the flagged rows go through
``row_problem``, which supplies the reason. Bad rows are never dropped silently: they go to the
dead-letter output (JSON lines with the reason), counted as ``dead_letter_<table>`` from the
dead-letter output itself; rows kept are counted as ``rows_<table>`` (:mod:`beam_pipelines.portable`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.portable import (
    COUNT,
    DEAD,
    MAIN,
    Sink,
    chunked,
    count,
    counted,
    gather,
    json_line,
    out,
    read_files,
    split,
    with_context,
    write_shards,
)
from tfrs_ctx import schema
from tfrs_ctx.data import examples as T
from tfrs_ctx.data import rawio
from tfrs_ctx.data.rawio import ItemColumns
from tfrs_ctx.data.validation import ALLOWED_VALUES, REFERENCES, row_problem

S = schema
DEAD_LETTER_DIR = "dead_letter"
USER_BATCH = 64  # users whose per-user work (examples, histories) is done together
CHUNK_ROWS = 20_000  # raw rows per chunk (the unit of reading and validation)
STATS = "stats"


def read_chunks(path: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[Any]:
    """One raw file as chunks: pyarrow record batches (Parquet) or lists of row dicts (JSONL)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        return
    yield from chunked(rawio.iter_rows(path), chunk_rows)


def chunk_rows(chunk: Any) -> list[dict]:
    return chunk if isinstance(chunk, list) else chunk.to_pylist()


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of a raw value (numpy, bytes, NaN and the like)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def dead_letter(table: schema.Table, reason: str, row: Mapping[str, Any]) -> dict:
    return {"table": table.name, "reason": reason, "row": json_safe(dict(row))}


def split_valid(
    table: schema.Table, rows: Iterable[Mapping[str, Any]], known: Mapping[str, Any] | None
) -> tuple[list[Mapping[str, Any]], list[dict]]:
    """Rows that pass :func:`validation.row_problem`, and dead letters for the rest."""
    good, dead = [], []
    for row in rows:
        problem = row_problem(table, row, known)
        if problem is None:
            good.append(row)
        else:
            dead.append(dead_letter(table, problem, row))
    return good, dead


class SortedIds(Collection):
    """A set of int ids held as a sorted int64 array (membership by binary search)."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __contains__(self, value: object) -> bool:
        i = int(np.searchsorted(self.ids, value))  # type: ignore[call-overload]
        return i < len(self.ids) and int(self.ids[i]) == value

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())


def _id_array(values: Iterable[Any]) -> np.ndarray:
    parts = [np.atleast_1d(np.asarray(v, dtype=np.int64)) for v in values]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class KnownIds:
    """Ids of the referenced tables as sorted arrays (compact to ship; :attr:`sets` for :func:`row_problem`)."""

    arrays: dict[str, np.ndarray]

    @property
    def sets(self) -> dict[str, SortedIds]:
        return {name: SortedIds(ids) for name, ids in self.arrays.items()}

    @classmethod
    def of(cls, ids: Mapping[str, Iterable[Any]]) -> KnownIds:
        """From ids per table name: ints, or int arrays (concatenated)."""
        return cls({name: _id_array(values) for name, values in ids.items()})


def typed_suspects(table: schema.Table, batch: Any, known: KnownIds) -> np.ndarray | None:
    """Rows of an Arrow batch that :func:`row_problem` may reject; ``None`` if the batch is not column-typed.

    When every column has exactly the schema's Arrow type (int64 / string, no lists), the
    only ways a row can fail :func:`row_problem` are a null in a non-nullable column, a
    timestamp out of range, a value outside a closed set (``ALLOWED_VALUES``) or an unknown
    referenced id. This flags a superset of those rows; the pipeline re-checks each flagged
    row with :func:`row_problem` itself.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(batch, pa.RecordBatch) or any(c.kind not in ("int64", "string") for c in table.columns):
        return None
    expected = table.arrow_schema()
    for column in table.columns:
        index = batch.schema.get_field_index(column.name)
        if index < 0 or batch.schema.field(index).type != expected.field(column.name).type:
            return None
    suspect = np.zeros(batch.num_rows, dtype=bool)
    for column in table.columns:
        values = batch.column(column.name)
        if not column.nullable and values.null_count:
            suspect |= values.is_null().to_numpy(zero_copy_only=False)
        if column.name == S.TIMESTAMP:
            ts = pc.fill_null(values, S.MIN_TIMESTAMP).to_numpy()
            suspect |= (ts < S.MIN_TIMESTAMP) | (ts >= S.MAX_TIMESTAMP)
        if column.name in ALLOWED_VALUES:
            allowed = pa.array(sorted(ALLOWED_VALUES[column.name]), pa.string())
            suspect |= ~pc.fill_null(pc.is_in(values, value_set=allowed), False).to_numpy(zero_copy_only=False)
    for (name, column), ref in REFERENCES.items():
        if name == table.name and ref in known.arrays:
            ids = pc.fill_null(batch.column(column), 0).to_numpy()
            suspect |= ~np.isin(ids, known.arrays[ref])
    return suspect


def validate_event_chunk(table: schema.Table, chunk: Any, known: KnownIds) -> tuple[list, list[dict], dict]:
    """An event-table chunk -> (``(user_id, packed block)`` per user, dead letters, column-wise valid rows)."""
    suspect = typed_suspects(table, chunk, known)
    if suspect is None:
        good, dead = split_valid(table, chunk_rows(chunk), known.sets)
        columns = {c.name: T.column_values(good, c) for c in table.columns}
    else:
        flagged = np.flatnonzero(suspect)
        good_rows, dead = split_valid(table, chunk.take(flagged).to_pylist(), known.sets) if len(flagged) else ([], [])
        clean = chunk.filter(~suspect) if len(flagged) else chunk
        columns = {
            c.name: np.concatenate([_arrow_column(clean, c), T.column_values(good_rows, c)]) for c in table.columns
        }
    data = {name: values for name, values in columns.items() if name != S.USER_ID}
    blocks = [(user, T.pack_block(block)) for user, block in T.columns_to_user_blocks(columns[S.USER_ID], data)]
    return blocks, dead, columns


def _arrow_column(batch: Any, column: schema.Column) -> np.ndarray:
    values = batch.column(column.name)
    if column.kind == "string":
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=str)
    return values.to_numpy().astype(np.int64)


def validate_events(table: schema.Table, known: KnownIds, paths: Iterable[str]) -> Iterator[tuple]:
    """Raw event files -> tagged ``(user_id, block)`` per user (``MAIN``), bad rows (``DEAD``), counts.

    For conversions it also emits per-chunk ``STATS`` (timestamp range, event types). Each file
    is read chunk by chunk (:func:`read_chunks`), so memory stays bounded by the chunk size.
    """
    for path in paths:
        for chunk in read_chunks(path):
            blocks, dead, columns = validate_event_chunk(table, chunk, known)
            for d in dead:
                yield out(DEAD, d)
            n = len(columns[S.USER_ID])
            yield count(f"rows_{table.name}", n)
            if table.name == S.CONVERSIONS.name and n:
                ts, types = columns[S.TIMESTAMP], columns[S.EVENT_TYPE]
                values, counts = np.unique(types, return_counts=True)
                types_seen = Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))
                yield out(STATS, (int(ts.min()), int(ts.max()), types_seen))
            for block in blocks:
                yield out(MAIN, block)


def validate_rows(chunk: Any, table: schema.Table) -> Iterator[tuple]:
    """Chunk of a small table -> tagged valid rows (``MAIN``) and dead letters (``DEAD``)."""
    good, dead = split_valid(table, chunk_rows(chunk), None)
    for d in dead:
        yield out(DEAD, d)
    for row in good:
        yield out(MAIN, row)


def _row_key(table: schema.Table, row: Mapping[str, Any]) -> Any:
    return tuple(int(row[c]) if table.column(c).kind == "int64" else row[c] for c in table.key)


def keep_first(table: schema.Table, key_rows: tuple[Any, Iterable[Mapping]]) -> Iterator[tuple]:
    """One row per key (the first in a canonical order, ``MAIN``); duplicates go to ``DEAD``."""
    rows = list(key_rows[1])
    if len(rows) > 1:
        rows.sort(key=lambda r: json.dumps(json_safe(dict(r)), sort_keys=True))
    yield out(MAIN, rows[0])
    for row in rows[1:]:
        yield out(DEAD, dead_letter(table, f"duplicate key ({', '.join(table.key)})", row))


def small_table(p: beam.Pipeline, raw_dir: str, table: schema.Table) -> tuple[beam.PCollection, list, list]:
    """A validated, key-deduplicated small table, its dead-letter PCollections and its row count."""
    name = table.name
    checked = read_files(p, name, rawio.table_files(raw_dir, table), read_chunks) | f"Validate{name}" >> beam.FlatMap(
        validate_rows, table
    )
    checked = split(checked, f"Split{name}", (MAIN, DEAD))
    unique = (
        checked[MAIN]
        | f"Key{name}" >> beam.Map(lambda r, t=table: (_row_key(t, r), r))
        | f"Group{name}" >> beam.GroupByKey()
        | f"Dedupe{name}" >> beam.FlatMap(lambda kv, t=table: keep_first(t, kv))
    )
    unique = split(unique, f"SplitDedupe{name}", (MAIN, DEAD))
    rows = unique[MAIN]
    return rows, [checked[DEAD], unique[DEAD]], [counted(rows, f"Rows{name}", f"rows_{name}")]


def _known(gathered: Mapping[str, list]) -> KnownIds:
    return KnownIds.of(gathered)


def _ids_of(element: Any) -> Any:
    return element.item_id if isinstance(element, ItemColumns) else int(element[S.ITEM_ID])


def known_ids(referenced: Mapping[str, beam.PCollection]) -> beam.PCollection:
    """The ids of referenced tables (``{table name: rows, or one ItemColumns}``), as one :class:`KnownIds`."""
    ids = {n: rows | f"{n}Ids" >> beam.Map(_ids_of) for n, rows in referenced.items()}
    return gather("KnownIds", ids) | "KnownIdSets" >> beam.Map(_known)


def validated_events(p: beam.Pipeline, raw_dir: str, table: schema.Table, known: beam.PCollection) -> dict:
    """An event table read and validated: ``{MAIN: (user_id, packed block), DEAD, STATS, COUNT}``.

    The files are joined with the :class:`KnownIds` (one key per file) and each file is read
    and validated in one call.
    """
    files = rawio.table_files(raw_dir, table)
    name = table.name
    keyed = p | f"List{name}" >> beam.Create(list(enumerate(files)))
    checked = with_context(
        f"Validate{name}", keyed, known, range(len(files)), lambda k, paths, t=table: validate_events(t, k, paths)
    )
    return split(checked, f"Split{name}", (MAIN, DEAD, STATS, COUNT))


def write_dead_letters(dead: Mapping[str, list], out_dir: str) -> list[beam.PCollection]:
    """Each table's dead letters as JSON lines (one file); the ``(dead_letter_<table>, n)`` counts."""
    written = []
    for name, pcolls in dead.items():
        sink = Sink(os.path.join(out_dir, DEAD_LETTER_DIR, name), ".jsonl", 1, "text", f"dead_letter_{name}")
        lines = pcolls | f"FlattenDead{name}" >> beam.Flatten() | f"DeadJson{name}" >> beam.Map(json_line)
        written.append(write_shards(f"WriteDead{name}", lines, sink))
    return written


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file through Beam's filesystems (local, gs://, ...)."""
    parent = os.path.dirname(path)
    if not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(path) as f:
        f.write(data)
