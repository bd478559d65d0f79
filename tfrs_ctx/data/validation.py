"""Raw-table validation shared by every reader (pandas readers and the Beam pipelines).

Two entry points over the same rules:

* :func:`check_table` validates a whole table (pandas) and raises :class:`RawTableError`
  naming the table, the column, the problem and the offending rows (0-based positions in
  the table as read, all part files concatenated in name order).
* :func:`row_problem` validates one row (a dict) and returns the reason it is bad, or
  ``None``; the Beam pipelines route bad rows to a dead-letter output with that reason.

The rules, per column (``schema.Table``): present; not null unless nullable; of the
column's kind (an integer-valued float counts as an integer, a bool does not); list
columns hold lists; ``confidences`` lie in [0, 1] and have one entry per category;
``event_type`` is one of ``schema.EVENT_TYPES`` (:data:`ALLOWED_VALUES`);
timestamps lie in ``[MIN_TIMESTAMP, MAX_TIMESTAMP)``; the table key is unique; ids listed
in :data:`REFERENCES` exist in the referenced table.

``tfrs-ctx validate --raw DIR`` (:func:`main`) checks every table of a raw directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd

from tfrs_ctx import schema
from tfrs_ctx.data.rawio import read_table
from tfrs_ctx.schema import Column, Table

# Columns whose ids must exist in another table: (table, column) -> referenced table.
REFERENCES: dict[tuple[str, str], str] = {
    (schema.CONVERSIONS.name, schema.ITEM_ID): schema.ITEMS.name,
    (schema.REQUESTS.name, schema.ITEM_ID): schema.ITEMS.name,
    (schema.REQUESTS.name, schema.SUBJECT_ITEM_ID): schema.SUBJECT_ITEMS.name,
    (schema.SEARCH_REQUESTS.name, schema.ITEM_ID): schema.ITEMS.name,
}
# Closed sets of string values: column -> the values allowed (anything else is a bad row).
ALLOWED_VALUES: dict[str, frozenset[str]] = {schema.EVENT_TYPE: frozenset(schema.EVENT_TYPES)}
LIST_PAIRS = ((schema.CATEGORIES, schema.CONFIDENCES),)  # (a, b): b has one entry per entry of a
MAX_ROWS_SHOWN = 5
INT64_MIN, INT64_END = -(2**63), 2**63  # int64 range: [INT64_MIN, INT64_END)
_NOT_FOUND = object()


class RawTableError(ValueError):
    """A raw table breaks the schema; the message names table, column, problem and rows."""

    def __init__(self, table: str, column: str | None, problem: str, rows: Collection[int] = ()):
        rows = [int(r) for r in rows]
        where = f", column '{column}'" if column else ""
        shown = ", ".join(str(r) for r in rows[:MAX_ROWS_SHOWN])
        more = f" (+{len(rows) - MAX_ROWS_SHOWN} more)" if len(rows) > MAX_ROWS_SHOWN else ""
        at = f" at rows [{shown}]{more}" if rows else ""
        super().__init__(f"raw table '{table}'{where}: {problem}{at}")
        self.table, self.column, self.problem, self.rows = table, column, problem, rows


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _is_int(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return INT64_MIN <= int(value) < INT64_END
    if isinstance(value, (float, np.floating)):
        return float(value).is_integer() and INT64_MIN <= float(value) < INT64_END
    return False


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def _as_list(value: Any) -> list | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def value_problem(column: Column, value: Any) -> str | None:
    """Why ``value`` is not a valid value of ``column`` (``None`` when it is)."""
    if _as_list(value) is None and _is_null(value):
        return None if column.nullable else "missing value (column is not nullable)"
    kind = column.kind
    if kind == "int64" and not _is_int(value):
        return f"expected an int64, got {type(value).__name__} {_show(value)}"
    if kind == "float32" and not _is_number(value):
        return f"expected a finite number, got {type(value).__name__} {_show(value)}"
    if kind == "string" and not isinstance(value, str):
        return f"expected a string, got {type(value).__name__} {_show(value)}"
    if column.name in ALLOWED_VALUES and value not in ALLOWED_VALUES[column.name]:
        return f"unknown value {_show(value)} (expected one of {sorted(ALLOWED_VALUES[column.name])})"
    if kind.startswith("list_"):
        items = _as_list(value)
        if items is None:
            return f"expected a list, got {type(value).__name__} {_show(value)}"
        element = kind.removeprefix("list_")
        check = _is_int if element == "int64" else _is_number
        bad = next((v for v in items if not check(v)), _NOT_FOUND)
        if bad is not _NOT_FOUND:
            return f"expected a list of {element}, got element {type(bad).__name__} {_show(bad)}"
        if column.name == schema.CONFIDENCES and not all(0.0 <= float(v) <= 1.0 for v in items):
            return f"confidence out of [0, 1] in {_show(items)}"
    if column.name == schema.TIMESTAMP and not schema.MIN_TIMESTAMP <= int(value) < schema.MAX_TIMESTAMP:
        return f"timestamp {int(value)} out of range [{schema.MIN_TIMESTAMP}, {schema.MAX_TIMESTAMP})"
    return None


def row_problem(
    table: Table, row: Mapping[str, Any], known_ids: Mapping[str, Collection[int]] | None = None
) -> str | None:
    """Why one row is bad, naming the column (``None`` for a good row).

    ``known_ids`` maps a referenced table name to its ids (see :data:`REFERENCES`). Key
    uniqueness needs the whole table and is checked by :func:`check_table` only.
    """
    if "__unparseable__" in row:
        return f"unparseable row: {row['__unparseable__']}"
    for column in table.columns:
        if column.name not in row:
            if column.optional:  # older data: the column absent means null
                continue
            return f"column '{column.name}': missing"
        problem = value_problem(column, row[column.name])
        if problem:
            return f"column '{column.name}': {problem}"
    for a, b in LIST_PAIRS:
        if a in table.column_names and b in table.column_names:
            len_a, len_b = len(_as_list(row[a]) or []), len(_as_list(row[b]) or [])
            if len_a != len_b:
                return f"column '{b}': {len_b} entries but '{a}' has {len_a}"
    for (tname, col), ref in REFERENCES.items():
        if known_ids is not None and tname == table.name and ref in known_ids and int(row[col]) not in known_ids[ref]:
            return f"column '{col}': unknown id {int(row[col])} (not in table '{ref}')"
    return None


def _bad_values(column: Column, series: pd.Series) -> np.ndarray:
    """Boolean mask of the rows whose value breaks ``column`` (vectorised where possible)."""
    if (
        column.kind == "int64"
        and pd.api.types.is_integer_dtype(series.dtype)
        and not series.isna().any()
        and not (pd.api.types.is_unsigned_integer_dtype(series.dtype) and len(series) and series.max() >= INT64_END)
    ):
        if column.name == schema.TIMESTAMP:
            return ~series.between(schema.MIN_TIMESTAMP, schema.MAX_TIMESTAMP - 1).to_numpy(dtype=bool)
        return np.zeros(len(series), dtype=bool)
    if column.kind == "string" and pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        nulls = series.isna().to_numpy(dtype=bool)
        bad = np.zeros(len(series), dtype=bool) if column.nullable else nulls
        if column.name in ALLOWED_VALUES:
            bad = bad | (~nulls & ~series.isin(ALLOWED_VALUES[column.name]).to_numpy(dtype=bool))
        return bad
    if column.kind.startswith("list_"):
        bad = _bad_typed_lists(column, series)
        if bad is not None:
            return bad
    return series.map(lambda v: value_problem(column, v) is not None).to_numpy(dtype=bool)


_LIST_DTYPES = {"list_int64": ("i",), "list_float32": ("f",)}


def _bad_typed_lists(column: Column, series: pd.Series) -> np.ndarray | None:
    """:func:`_bad_values` for a list column whose every value is a 1-d numpy array of the element kind
    (what Parquet reads give), vectorised over the concatenated values; ``None`` for anything else."""
    values = series.to_numpy(dtype=object)
    kinds = _LIST_DTYPES[column.kind]
    if not all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in kinds for v in values):
        return None
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    bad = np.zeros(len(values), dtype=bool)
    if kinds == ("i",):  # int64 elements are always valid ints
        return bad
    flat = np.concatenate(list(values)) if len(values) else np.zeros(0)
    wrong = ~np.isfinite(flat)
    if column.name == schema.CONFIDENCES:
        with np.errstate(invalid="ignore"):
            wrong |= (flat < 0.0) | (flat > 1.0)
    rows = np.repeat(np.arange(len(values)), lengths)
    bad[rows[wrong]] = True
    return bad


def check_table(table: Table, frame: pd.DataFrame, known_ids: Mapping[str, Collection[int]] | None = None) -> None:
    """Raise :class:`RawTableError` for the first class of problem found in ``frame``.

    Order: missing columns, bad values (column by column), list-length mismatches,
    duplicate keys, unknown ids (only for references whose table is in ``known_ids``).
    """
    missing = [c.name for c in table.columns if c.name not in frame.columns and not c.optional]
    if missing:
        raise RawTableError(table.name, missing[0], f"missing column (table has {sorted(map(str, frame.columns))})")
    for column in table.columns:
        if column.name not in frame.columns:  # an optional column the data predates
            continue
        series = frame[column.name]
        bad = _bad_values(column, series)
        if bad.any():
            rows = np.flatnonzero(bad)
            problem = value_problem(column, series.iloc[rows[0]]) or "bad value"
            raise RawTableError(table.name, column.name, problem, rows)
    for a, b in LIST_PAIRS:
        if a in table.column_names and b in table.column_names:
            len_a, len_b = (np.fromiter(map(len, frame[c]), dtype=np.int64, count=len(frame)) for c in (a, b))
            bad = len_a != len_b
            if bad.any():
                rows = np.flatnonzero(bad)
                first = rows[0]
                problem = f"length differs from '{a}' ({len_b[first]} vs {len_a[first]} entries)"
                raise RawTableError(table.name, b, problem, rows)
    if table.key and len(frame):
        dup = frame.duplicated(list(table.key), keep=False).to_numpy()
        if dup.any():
            rows = np.flatnonzero(dup)
            value = ", ".join(f"{k}={frame[k].iloc[rows[0]]!r}" for k in table.key)
            raise RawTableError(table.name, ",".join(table.key), f"duplicate key ({value}, ...)", rows)
    for (tname, col), ref in REFERENCES.items():
        if known_ids is not None and tname == table.name and ref in known_ids:
            known = known_ids[ref]
            ids = known if isinstance(known, np.ndarray) else np.fromiter(known, dtype=np.int64, count=len(known))
            bad = ~np.isin(frame[col].to_numpy(dtype=np.int64), ids)
            if bad.any():
                rows = np.flatnonzero(bad)
                problem = f"unknown id {int(frame[col].iloc[rows[0]])} (not in table '{ref}')"
                raise RawTableError(table.name, col, problem, rows)


def read_valid_table(raw_dir: str, table: Table) -> pd.DataFrame:
    """Read a whole raw table into pandas; raises :class:`RawTableError` on any bad row."""
    frame = read_table(raw_dir, table)
    check_table(table, frame)
    return frame


def check_raw_dir(raw_dir: str) -> dict[str, pd.DataFrame]:
    """Read and validate every raw table of a directory, cross-table references included.

    Referenced tables (items, subject items) are checked first, so a broken id column is
    reported as such rather than as unknown ids elsewhere. Optional tables
    (``schema.OPTIONAL_RAW_TABLES``) are checked where present. Returns the frames by table name.
    """
    tables = {**schema.RAW_TABLES}
    for name, table in schema.OPTIONAL_RAW_TABLES.items():
        if os.path.isdir(schema.raw_table_path(raw_dir, table)):
            tables[name] = table
    frames = {name: read_table(raw_dir, t) for name, t in tables.items()}
    referenced = sorted(set(REFERENCES.values()))
    for name in referenced:
        check_table(tables[name], frames[name])
    known = {name: np.unique(frames[name][schema.ITEM_ID].to_numpy(dtype=np.int64)) for name in referenced}
    for name, table in tables.items():
        if name not in referenced:
            check_table(table, frames[name], known)
    return frames


def absent_optional_columns(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    """One line per optional column a table lacks, saying what that means (the validation report's notes)."""
    notes = []
    for name, frame in frames.items():
        table = schema.RAW_TABLES.get(name) or schema.OPTIONAL_RAW_TABLES[name]
        for column in table.columns:
            if column.optional and column.name not in frame.columns:
                notes.append(
                    f"{name} has no '{column.name}' column (older data): {OPTIONAL_MEANING[name, column.name]}"
                )
    return notes


OPTIONAL_MEANING = {(schema.SUBJECT_ITEMS.name, schema.AD_ID): "no subject item is an ad"}


def main(argv: list[str] | None = None) -> int:
    """``tfrs-ctx validate --raw DIR``: print row counts (0) or the first problem (1)."""
    parser = argparse.ArgumentParser(prog="tfrs-ctx validate", description="Validate every raw table of a directory.")
    parser.add_argument("--raw", required=True, help="raw-table directory (one sub-directory per table)")
    args = parser.parse_args(argv)
    try:
        frames = check_raw_dir(args.raw)
    except (ValueError, OSError) as e:  # RawTableError, missing table, unreadable file
        print(f"tfrs-ctx validate: {args.raw}: {e}", file=sys.stderr)
        return 1
    report = {"raw": args.raw, "valid": True, "rows": {name: len(f) for name, f in frames.items()}}
    report["notes"] = absent_optional_columns(frames)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
