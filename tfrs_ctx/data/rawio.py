"""Reading and writing raw tables (Parquet directories; JSON lines also read)."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

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
        columns = {
            c: frame[c].tolist() if frame[c].dtype == object else frame[c].to_numpy() for c in table.column_names
        }
    writer.write(columns)
    return writer.rows


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
