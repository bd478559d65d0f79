"""Raw-table validation shared by every reader (pandas readers and the Beam pipelines).

Two entry points over the same rules:

* :func:`check_table` validates a whole table (pandas) and raises :class:`RawTableError`
  naming the table, the column, the problem and the offending rows.
* :func:`row_problem` validates one row (a dict) and returns the reason it is bad, or
  ``None``; the Beam pipelines route bad rows to a dead-letter output with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd

from tfrs_ctx import schema
from tfrs_ctx.schema import Column, Table

# Columns whose ids must exist in another table: (table, column) -> referenced table.
REFERENCES: dict[tuple[str, str], str] = {
    (schema.CONVERSIONS.name, schema.ITEM_ID): schema.ITEMS.name,
    (schema.REQUESTS.name, schema.ITEM_ID): schema.ITEMS.name,
    (schema.REQUESTS.name, schema.SUBJECT_ITEM_ID): schema.SUBJECT_ITEMS.name,
}
LIST_PAIRS = ((schema.CATEGORIES, schema.CONFIDENCES),)
MAX_ROWS_SHOWN = 5


class RawTableError(ValueError):
    """A raw table breaks the schema; the message names table, column, problem and rows."""

    def __init__(self, table: str, column: str | None, problem: str, rows: Collection[int] = ()):
        rows = list(rows)
        where = f", column '{column}'" if column else ""
        shown = ", ".join(str(r) for r in rows[:MAX_ROWS_SHOWN])
        more = f" (+{len(rows) - MAX_ROWS_SHOWN} more)" if len(rows) > MAX_ROWS_SHOWN else ""
        at = f" at rows [{shown}]{more}" if rows else ""
        super().__init__(f"raw table '{table}'{where}: {problem}{at}")
        self.table, self.column, self.problem, self.rows = table, column, problem, rows


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _as_list(value: Any) -> list | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    return None


def value_problem(column: Column, value: Any) -> str | None:
    """Why ``value`` is not a valid value of ``column`` (``None`` when it is)."""
    if _is_null(value):
        return None if column.nullable else "missing value"
    kind = column.kind
    if kind == "int64" and not _is_int(value):
        return f"expected an integer, got {type(value).__name__} {value!r:.40}"
    if kind == "float32" and not _is_number(value):
        return f"expected a number, got {type(value).__name__}"
    if kind == "string" and not isinstance(value, str):
        return f"expected a string, got {type(value).__name__} {value!r:.40}"
    if kind.startswith("list_"):
        items = _as_list(value)
        if items is None:
            return f"expected a list, got {type(value).__name__}"
        check = _is_int if kind == "list_int64" else _is_number
        if not all(check(v) for v in items):
            return f"expected a list of {kind[5:]}"
        if kind == "list_float32" and not all(0.0 <= float(v) <= 1.0 for v in items):
            return "confidences must lie in [0, 1]"
    if column.name == schema.TIMESTAMP and not schema.MIN_TIMESTAMP <= int(value) < schema.MAX_TIMESTAMP:
        return f"timestamp {int(value)} out of range [{schema.MIN_TIMESTAMP}, {schema.MAX_TIMESTAMP})"
    return None


def row_problem(
    table: Table, row: Mapping[str, Any], known_ids: Mapping[str, Collection[int]] | None = None
) -> str | None:
    """Why one row is bad, naming the column (``None`` for a good row).

    ``known_ids`` maps a referenced table name to its ids (see :data:`REFERENCES`).
    """
    if "__unparseable__" in row:
        return f"unparseable row: {row['__unparseable__']}"
    for column in table.columns:
        if column.name not in row:
            return f"column '{column.name}': missing"
        problem = value_problem(column, row[column.name])
        if problem:
            return f"column '{column.name}': {problem}"
    for a, b in LIST_PAIRS:
        if a in table.column_names and len(_as_list(row[a]) or []) != len(_as_list(row[b]) or []):
            return f"column '{b}': length differs from '{a}'"
    for (tname, col), ref in REFERENCES.items():
        if known_ids is not None and tname == table.name and ref in known_ids and int(row[col]) not in known_ids[ref]:
            return f"column '{col}': unknown id {int(row[col])} (not in table '{ref}')"
    return None


def check_table(
    table: Table, frame: pd.DataFrame, known_ids: Mapping[str, Collection[int]] | None = None
) -> None:
    """Raise :class:`RawTableError` for the first class of problem found in ``frame``."""
    missing = [c for c in table.column_names if c not in frame.columns]
    if missing:
        raise RawTableError(table.name, missing[0], f"missing column (have {sorted(frame.columns)})")
    for column in table.columns:
        series = frame[column.name]
        if column.kind == "int64" and pd.api.types.is_integer_dtype(series.dtype):
            bad = np.zeros(len(series), dtype=bool)
            if column.name == schema.TIMESTAMP:
                bad = ~series.between(schema.MIN_TIMESTAMP, schema.MAX_TIMESTAMP - 1).to_numpy()
        else:
            bad = series.map(lambda v, c=column: value_problem(c, v) is not None).to_numpy(dtype=bool)
        if bad.any():
            rows = np.flatnonzero(bad).tolist()
            raise RawTableError(table.name, column.name, value_problem(column, series.iloc[rows[0]]) or "bad value", rows)
    for a, b in LIST_PAIRS:
        if a in table.column_names:
            lengths_a = frame[a].map(len).to_numpy()
            bad = lengths_a != frame[b].map(len).to_numpy()
            if bad.any():
                raise RawTableError(table.name, b, f"length differs from '{a}'", np.flatnonzero(bad).tolist())
    if table.key:
        dup = frame.duplicated(list(table.key), keep="first").to_numpy()
        if dup.any():
            raise RawTableError(table.name, ",".join(table.key), "duplicate key", np.flatnonzero(dup).tolist())
    for (tname, col), ref in REFERENCES.items():
        if known_ids is not None and tname == table.name and ref in known_ids:
            ids = np.fromiter(known_ids[ref], dtype=np.int64)
            bad = ~np.isin(frame[col].to_numpy(dtype=np.int64), ids)
            if bad.any():
                rows = np.flatnonzero(bad).tolist()
                raise RawTableError(table.name, col, f"unknown id {int(frame[col].iloc[rows[0]])} (not in table '{ref}')", rows)


def check_raw_dir(raw_dir: str) -> dict[str, pd.DataFrame]:
    """Read and validate every raw table of a directory, cross-table references included."""
    from tfrs_ctx.rawio import read_table

    frames = {name: read_table(raw_dir, t, validate=False) for name, t in schema.RAW_TABLES.items()}
    known = {
        schema.ITEMS.name: set(frames[schema.ITEMS.name][schema.ITEM_ID].tolist()),
        schema.SUBJECT_ITEMS.name: set(frames[schema.SUBJECT_ITEMS.name][schema.ITEM_ID].tolist()),
    }
    for name, table in schema.RAW_TABLES.items():
        check_table(table, frames[name], known)
    return frames
