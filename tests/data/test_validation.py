"""Raw-table validation on real bad files: whole tables (check_table / check_raw_dir) and rows (row_problem).

Each bad case starts from a good synthetic table, breaks it in one way, writes it to disk
(Parquet, or JSON lines where Parquet cannot hold the mistake) and reads it back through
``rawio`` exactly as the pipelines do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tfrs_ctx import schema
from tfrs_ctx.apps import cli
from tfrs_ctx.data.rawio import iter_rows, read_table, table_files
from tfrs_ctx.data.validation import (
    MAX_ROWS_SHOWN,
    RawTableError,
    check_raw_dir,
    check_table,
    read_valid_table,
    row_problem,
)
from tfrs_ctx.schema import Table

ALL = "all"  # every row is bad
UNKNOWN_ID = 10**9


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def _replace(raw_dir: pathlib.Path, table: Table, data: pd.DataFrame | list[dict], fmt: str) -> None:
    """Replace a table's files by ``data`` as one Parquet file or one JSON-lines file."""
    base = pathlib.Path(schema.raw_table_path(str(raw_dir), table))
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(data, preserve_index=False), base / "part-00000.parquet")
    else:
        with open(base / "part-00000.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)


def _set(frame: pd.DataFrame, column: str, rows: list[int], values: list[Any]) -> pd.DataFrame:
    frame = frame.copy()
    if frame[column].dtype != object:
        frame[column] = frame[column].astype(object)
    for r, v in zip(rows, values, strict=True):
        frame.at[r, column] = v
    return frame


def _set_records(records: list[dict], column: str, rows: list[int], values: list[Any]) -> list[dict]:
    for r, v in zip(rows, values, strict=True):
        records[r][column] = v
    return records


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    table: Table
    column: str
    rows: list[int] | str  # expected offending rows, or ALL
    problem: str  # fragment of the problem text
    fmt: str  # "parquet": break(frame) -> frame; "jsonl": break(records) -> records
    breaks: Callable[[Any], Any]
    cross_table: bool = False  # only visible with the other tables (check_raw_dir / known ids)
    per_row: bool = True  # row_problem can see it (a duplicate key needs the whole table)


def _shrink_confidences(frame: pd.DataFrame) -> pd.DataFrame:
    return _set(frame, schema.CONFIDENCES, [2], [frame[schema.CONFIDENCES].iloc[2][:-1]])


def _out_of_range_confidences(frame: pd.DataFrame) -> pd.DataFrame:
    high = np.array(frame[schema.CONFIDENCES].iloc[0], dtype=np.float32)
    low = np.array(frame[schema.CONFIDENCES].iloc[3], dtype=np.float32)
    high[0], low[-1] = 1.5, -0.1
    return _set(frame, schema.CONFIDENCES, [0, 3], [high, low])


CASES = [
    Case(
        "missing-column", schema.USERS, schema.GENDER, ALL, "missing",
        "parquet", lambda f: f.drop(columns=[schema.GENDER]),
    ),
    Case(
        "string-in-int-column-parquet", schema.CONVERSIONS, schema.USER_ID, ALL, "expected an int64, got str",
        "parquet", lambda f: f.assign(**{schema.USER_ID: f[schema.USER_ID].astype(str)}),
    ),
    Case(
        "string-in-int-column-jsonl", schema.ITEMS, schema.ADVERTISER_ID, [3], "expected an int64, got str 'acme'",
        "jsonl", lambda r: _set_records(r, schema.ADVERTISER_ID, [3], ["acme"]),
    ),
    Case(
        "bool-in-int-column-jsonl", schema.ITEMS, schema.ADVERTISER_ID, [1], "expected an int64, got bool",
        "jsonl", lambda r: _set_records(r, schema.ADVERTISER_ID, [1], [True]),
    ),
    Case(
        "fraction-in-int-column-jsonl", schema.SUBJECT_ITEMS, schema.ITEM_ID, [6], "expected an int64, got float",
        "jsonl", lambda r: _set_records(r, schema.ITEM_ID, [6], [6.5]),
    ),
    Case(
        "non-list-in-list-column-jsonl", schema.ITEMS, schema.CATEGORIES, [4], "expected a list, got int",
        "jsonl", lambda r: _set_records(r, schema.CATEGORIES, [4], [1001]),
    ),
    Case(
        "non-list-in-list-column-parquet", schema.SUBJECT_ITEMS, schema.CATEGORIES, ALL, "expected a list",
        "parquet", lambda f: f.assign(**{schema.CATEGORIES: f[schema.ITEM_ID]}),
    ),
    Case(
        "string-in-list-column-jsonl", schema.ITEMS, schema.CATEGORIES, [8],
        "expected a list of int64, got element str 'sofa'",
        "jsonl", lambda r: _set_records(r, schema.CATEGORIES, [8], [[1001, "sofa", 1002]]),
    ),
    Case(
        "null-in-int-column", schema.CONVERSIONS, schema.USER_ID, [2, 5], "missing value",
        "parquet", lambda f: _set(f, schema.USER_ID, [2, 5], [None, None]),
    ),
    Case(
        "null-in-string-column", schema.CONVERSIONS, schema.EVENT_TYPE, [1, 4], "missing value",
        "parquet", lambda f: _set(f, schema.EVENT_TYPE, [1, 4], [None, None]),
    ),
    Case(
        "null-in-list-column", schema.ITEMS, schema.CONFIDENCES, [0], "missing value",
        "parquet", lambda f: _set(f, schema.CONFIDENCES, [0], [None]),
    ),
    Case(
        "categories-confidences-length-mismatch", schema.ITEMS, schema.CONFIDENCES, [2], f"'{schema.CATEGORIES}'",
        "parquet", _shrink_confidences,
    ),
    Case(
        "confidence-out-of-range", schema.ITEMS, schema.CONFIDENCES, [0, 3], "out of [0, 1]",
        "parquet", _out_of_range_confidences,
    ),
    Case(
        "duplicate-key", schema.ITEMS, schema.ITEM_ID, [4, 5], f"duplicate key ({schema.ITEM_ID}=",
        "parquet", lambda f: _set(f, schema.ITEM_ID, [5], [f[schema.ITEM_ID].iloc[4]]), per_row=False,
    ),
    Case(
        "timestamp-out-of-range", schema.CONVERSIONS, schema.TIMESTAMP, [1, 6], "out of range",
        "parquet", lambda f: _set(f, schema.TIMESTAMP, [1, 6], [100, schema.MAX_TIMESTAMP]).astype(
            {schema.TIMESTAMP: np.int64}),
    ),
    Case(
        "unknown-conversion-item", schema.CONVERSIONS, schema.ITEM_ID, [7],
        f"unknown id {UNKNOWN_ID} (not in table '{schema.ITEMS.name}')",
        "parquet", lambda f: _set(f, schema.ITEM_ID, [7], [UNKNOWN_ID]).astype({schema.ITEM_ID: np.int64}),
        cross_table=True,
    ),
    Case(
        "unknown-request-subject-item", schema.REQUESTS, schema.SUBJECT_ITEM_ID, [0, 9],
        f"unknown id {UNKNOWN_ID} (not in table '{schema.SUBJECT_ITEMS.name}')",
        "parquet", lambda f: _set(f, schema.SUBJECT_ITEM_ID, [0, 9], [UNKNOWN_ID] * 2).astype(
            {schema.SUBJECT_ITEM_ID: np.int64}),
        cross_table=True,
    ),
    Case(
        "unknown-request-label-item", schema.REQUESTS, schema.ITEM_ID, [3], f"not in table '{schema.ITEMS.name}'",
        "parquet", lambda f: _set(f, schema.ITEM_ID, [3], [UNKNOWN_ID]).astype({schema.ITEM_ID: np.int64}),
        cross_table=True,
    ),
]  # fmt: skip


@pytest.fixture
def raw_copy(small_raw, tmp_path) -> pathlib.Path:
    """A private copy of the good synthetic raw tables, free to break."""
    return pathlib.Path(shutil.copytree(small_raw, tmp_path / "raw"))


def _break(raw_dir: pathlib.Path, case: Case) -> int:
    """Write the broken table; returns its number of rows."""
    good = read_valid_table(str(raw_dir), case.table)
    bad = case.breaks(good if case.fmt == "parquet" else _records(good))
    _replace(raw_dir, case.table, bad, case.fmt)
    return len(bad)


def _expected_rows(case: Case, n_rows: int) -> list[int]:
    return list(range(n_rows)) if case.rows == ALL else list(case.rows)


def _known_ids(raw_dir: pathlib.Path) -> dict[str, set[int]]:
    return {
        t.name: set(read_valid_table(str(raw_dir), t)[schema.ITEM_ID].tolist())
        for t in (schema.ITEMS, schema.SUBJECT_ITEMS)
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_table_error_names_table_column_and_rows(raw_copy, case):
    n_rows = _break(raw_copy, case)
    with pytest.raises(RawTableError) as caught:
        if case.cross_table:
            check_raw_dir(str(raw_copy))
        else:
            read_valid_table(str(raw_copy), case.table)
    err, message = caught.value, str(caught.value)
    assert err.table == case.table.name
    assert err.column == case.column
    assert case.problem in message
    assert message.startswith(f"raw table '{case.table.name}', column '{case.column}': ")
    if case.id == "missing-column":
        assert err.rows == []
        return
    expected = _expected_rows(case, n_rows)
    assert err.rows == expected
    shown = ", ".join(str(r) for r in expected[:MAX_ROWS_SHOWN])
    assert f"at rows [{shown}]" in message
    if len(expected) > MAX_ROWS_SHOWN:
        assert f"(+{len(expected) - MAX_ROWS_SHOWN} more)" in message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_row_problem_flags_exactly_the_bad_rows(raw_copy, case):
    """What the Beam dead-letter sees: rows as ``rawio.iter_rows`` yields them."""
    known = _known_ids(raw_copy) if case.cross_table else None
    n_rows = _break(raw_copy, case)
    rows = [row for path in table_files(str(raw_copy), case.table) for row in iter_rows(path)]
    assert len(rows) == n_rows
    problems = {i: p for i, row in enumerate(rows) if (p := row_problem(case.table, row, known)) is not None}
    if not case.per_row:
        assert problems == {}
        return
    assert sorted(problems) == _expected_rows(case, n_rows)
    for problem in problems.values():
        assert problem.startswith(f"column '{case.column}': ")
        assert case.problem in problem


def test_row_problem_accepts_good_rows_and_reports_unparseable_lines(small_raw, tmp_path):
    known = _known_ids(small_raw)
    for table in schema.RAW_TABLES.values():
        for path in table_files(str(small_raw), table):
            assert all(row_problem(table, row, known) is None for row in iter_rows(path)), table.name
    path = tmp_path / "items.jsonl"
    good = {schema.ITEM_ID: 1, schema.ADVERTISER_ID: 2, schema.CATEGORIES: [3], schema.CONFIDENCES: [0.5]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good)[:12] + "\n")
    problems = [row_problem(schema.ITEMS, row) for row in iter_rows(str(path))]
    assert problems[0] is None
    assert problems[1].startswith("unparseable row: items.jsonl:2:")


def test_rows_are_positions_across_part_files(raw_copy):
    """Offending rows are positions in the whole table, all parts concatenated in name order."""
    good = read_valid_table(str(raw_copy), schema.USERS)
    first, second = good.iloc[:100], good.iloc[100:].reset_index(drop=True)
    second = second.assign(**{schema.USER_ID: second[schema.USER_ID].astype(object)})
    second.at[1, schema.USER_ID] = None
    base = pathlib.Path(schema.raw_table_path(str(raw_copy), schema.USERS))
    shutil.rmtree(base)
    base.mkdir()
    pq.write_table(pa.Table.from_pandas(first, preserve_index=False), base / "part-00000.parquet")
    pq.write_table(pa.Table.from_pandas(second, preserve_index=False), base / "part-00001.parquet")
    with pytest.raises(RawTableError, match=rf"column '{schema.USER_ID}': missing value .* at rows \[101\]"):
        read_valid_table(str(raw_copy), schema.USERS)


def test_missing_demographics_are_allowed(raw_copy):
    users = read_valid_table(str(raw_copy), schema.USERS)
    for column in schema.DEMOGRAPHIC_COLUMNS:
        users[column] = None
    _replace(raw_copy, schema.USERS, users, "parquet")
    check_table(schema.USERS, read_table(str(raw_copy), schema.USERS))


def test_good_synthetic_tables_pass(small_raw):
    frames = check_raw_dir(str(small_raw))
    assert set(frames) == set(schema.RAW_TABLES) | set(schema.OPTIONAL_RAW_TABLES)  # the search surface is on
    assert all(len(f) > 0 for f in frames.values())


def _normalised(frame: pd.DataFrame) -> list[list[Any]]:
    def plain(v: Any) -> Any:
        if isinstance(v, (np.ndarray, list)):
            return [round(float(x), 4) for x in v]
        return None if pd.isna(v) else v

    return [[plain(v) for v in row] for row in frame.itertuples(index=False)]


@pytest.mark.parametrize("table", list(schema.RAW_TABLES.values()), ids=list(schema.RAW_TABLES))
def test_jsonl_tables_read_like_parquet(raw_copy, table):
    parquet = read_valid_table(str(raw_copy), table)
    _replace(raw_copy, table, _records(parquet), "jsonl")
    assert [p.endswith(".jsonl") for p in table_files(str(raw_copy), table)] == [True]
    jsonl = read_valid_table(str(raw_copy), table)  # validates
    assert list(jsonl.columns) == list(parquet.columns)
    for column in table.columns:
        if column.kind == "int64" and not column.nullable:  # an all-null column reads as float NaN
            assert pd.api.types.is_integer_dtype(jsonl[column.name].dtype), (column.name, jsonl[column.name].dtype)
    assert _normalised(jsonl) == _normalised(parquet)


def test_validate_cli_good_dir(small_raw, capsys):
    assert cli.main(["validate", "--raw", str(small_raw)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True
    tables = {**schema.RAW_TABLES, **schema.OPTIONAL_RAW_TABLES}
    assert report["rows"] == {name: len(read_valid_table(str(small_raw), t)) for name, t in tables.items()}


def test_validate_cli_bad_dir(raw_copy, capsys):
    case = next(c for c in CASES if c.id == "unknown-request-subject-item")
    _break(raw_copy, case)
    assert cli.main(["validate", "--raw", str(raw_copy)]) == 1
    err = capsys.readouterr().err
    assert f"raw table '{schema.REQUESTS.name}', column '{schema.SUBJECT_ITEM_ID}'" in err
    assert "at rows [0, 9]" in err


def test_validate_cli_missing_table(raw_copy, capsys):
    shutil.rmtree(schema.raw_table_path(str(raw_copy), schema.SUBJECT_ITEMS))
    assert cli.main(["validate", "--raw", str(raw_copy)]) == 1
    assert f"raw table '{schema.SUBJECT_ITEMS.name}': no .parquet or .jsonl files" in capsys.readouterr().err
    assert not os.path.exists(schema.raw_table_path(str(raw_copy), schema.SUBJECT_ITEMS))


def test_list_columns_of_numpy_arrays_are_checked_like_lists():
    """Parquet reads give list cells as numpy arrays (checked vectorised): same rows, same problem."""
    confidences = [[0.5, 0.25], [0.5, float("nan")], [1.5, 0.0], [], [0.0, -0.5]]
    categories = [[1, 2], [1, 2], [1, 2], [], [1, 2]]
    for cell in (np.asarray, list):
        frame = pd.DataFrame(
            {
                schema.ITEM_ID: np.arange(5, dtype=np.int64),
                schema.ADVERTISER_ID: np.ones(5, dtype=np.int64),
                schema.CATEGORIES: [np.asarray(c, dtype=np.int64) if cell is np.asarray else c for c in categories],
                schema.CONFIDENCES: [np.asarray(c, dtype=np.float32) if cell is np.asarray else c for c in confidences],
            }
        )
        with pytest.raises(RawTableError) as error:
            check_table(schema.ITEMS, frame)
        assert (error.value.column, error.value.rows) == (schema.CONFIDENCES, [1, 2, 4])
        assert "expected a list of float32" in error.value.problem


# ---- subject_items.ad_id: stated, nullable, optional (older data) ------------------------------


def test_subject_ad_id_may_be_null_or_an_int_and_bad_values_are_named(raw_copy):
    subjects = read_valid_table(str(raw_copy), schema.SUBJECT_ITEMS)
    subjects[schema.AD_ID] = [None if i % 2 else 100 + i for i in range(len(subjects))]
    check_table(schema.SUBJECT_ITEMS, subjects.astype({schema.AD_ID: "Int64"}))
    records = _set_records(_records(subjects.astype({schema.AD_ID: object})), schema.AD_ID, [3], ["ad-7"])
    _replace(raw_copy, schema.SUBJECT_ITEMS, records, "jsonl")
    with pytest.raises(RawTableError, match=rf"column '{schema.AD_ID}': expected an int64, got str .* at rows \[3\]"):
        read_valid_table(str(raw_copy), schema.SUBJECT_ITEMS)
    assert row_problem(schema.SUBJECT_ITEMS, {**records[3], schema.AD_ID: None}) is None


def test_subject_items_without_ad_id_are_valid_and_the_report_says_none_is_an_ad(raw_copy, capsys):
    """Older data (no ad_id column) is valid: every row reads as not an ad, and the report says so."""
    subjects = read_valid_table(str(raw_copy), schema.SUBJECT_ITEMS).drop(columns=[schema.AD_ID])
    _replace(raw_copy, schema.SUBJECT_ITEMS, subjects, "parquet")
    assert schema.AD_ID not in read_table(str(raw_copy), schema.SUBJECT_ITEMS).columns
    row = {k: v for k, v in _records(subjects)[0].items()}
    assert row_problem(schema.SUBJECT_ITEMS, row) is None  # the Beam readers' per-row check
    assert cli.main(["validate", "--raw", str(raw_copy)]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes == [
        f"{schema.SUBJECT_ITEMS.name} has no '{schema.AD_ID}' column (older data): no subject item is an ad"
    ]
