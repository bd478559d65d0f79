"""The portable building blocks on real DirectRunner runs: empty inputs, joins, sinks and the one final step."""

from __future__ import annotations

import json
import pathlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import portable as P
from beam_pipelines.runner import run_pipeline


def run(build) -> None:
    run_pipeline(PipelineOptions([]), build)


def test_combine_globally_gives_the_default_on_empty_input_and_the_join_applies_the_context(tmp_path):
    result = tmp_path / "result.json"

    def build(p: beam.Pipeline) -> None:
        empty = p | "Empty" >> beam.Create([])
        numbers = p | "Numbers" >> beam.Create(list(range(10)))
        counts = [
            P.counted(empty, "NoRows", "none"),
            P.counted(numbers, "Rows", "numbers"),
            P.combine_globally("Sum", numbers, beam.combiners.CountCombineFn()) | beam.Map(lambda n: ("again", n)),
        ]
        offset = p | "Offset" >> beam.Create([100])
        keyed = numbers | beam.Map(lambda n: (P.group_key(n, 3), n))
        shifted = P.with_context(
            "Shift", keyed, offset, range(3), lambda c, values: (("shifted", c + v) for v in values)
        )
        counts.append(shifted)

        def write(totals: dict, g: dict) -> None:
            result.write_text(json.dumps({"totals": totals, "lists": sorted(g["lists"][0])}))

        lists = P.combine_globally("Lists", empty, beam.combiners.ToListCombineFn())
        P.finish("Finish", counts, write, {"lists": lists})

    run(build)
    out = json.loads(result.read_text())
    assert out["totals"] == {"again": 10, "none": 0, "numbers": 10, "shifted": sum(range(100, 110))}
    assert out["lists"] == []


def test_with_context_refuses_elements_of_a_key_without_context():
    def build(p: beam.Pipeline) -> None:
        keyed = p | "Keyed" >> beam.Create([(5, "x")])
        context = p | "Context" >> beam.Create(["c"])
        joined = P.with_context("Join", keyed, context, range(3), lambda c, values: [(c, v) for v in values])
        P.finish("Finish", [joined], lambda totals, g: None)

    with pytest.raises(Exception, match="join key 5: 0 context elements"):
        run(build)


def test_sinks_write_every_shard_with_deterministic_names_and_count_records(tmp_path: pathlib.Path):
    schema = pa.schema([("user_id", pa.int64()), ("x", pa.float32())])
    sinks = {
        "text": P.Sink(str(tmp_path / "text" / "part"), ".jsonl", 3, "text", "lines"),
        "none": P.Sink(str(tmp_path / "none" / "part"), ".jsonl", 2, "text", "nothing"),
        "tfrecord": P.Sink(str(tmp_path / "tf" / "part"), ".tfrecord.gz", 2, "tfrecord", "records"),
        "parquet": P.Sink(str(tmp_path / "one"), ".parquet", 1, "parquet", "rows", False, schema, "user_id"),
    }
    counts_file = tmp_path / "counts.json"

    def build(p: beam.Pipeline) -> None:
        lines = p | "Lines" >> beam.Create([f"line {i}" for i in range(20)])
        records = p | "Records" >> beam.Create([f"r{i}".encode() for i in range(7)])
        rows = p | "Rows" >> beam.Create([{"user_id": i, "x": i / 2} for i in range(5)])
        empty = p | "Empty" >> beam.Create([])
        written = [
            P.write_shards("Text", lines, sinks["text"]),
            P.write_shards("None", empty, sinks["none"]),
            P.write_shards("TF", records, sinks["tfrecord"]),
            P.write_shards("Parquet", rows, sinks["parquet"]),
        ]
        P.finish("Finish", written, lambda totals, g: counts_file.write_text(json.dumps(totals)))

    run(build)
    assert json.loads(counts_file.read_text()) == {"lines": 20, "nothing": 0, "records": 7, "rows": 5}
    text = sorted(p.name for p in (tmp_path / "text").iterdir())
    assert text == [f"part-{i:05d}-of-00003.jsonl" for i in range(3)]  # no .tmp left
    assert sorted(x for f in (tmp_path / "text").iterdir() for x in f.read_text().splitlines()) == sorted(
        f"line {i}" for i in range(20)
    )
    assert [f.stat().st_size for f in sorted((tmp_path / "none").iterdir())] == [0, 0]
    import tensorflow as tf

    files = sorted(str(f) for f in (tmp_path / "tf").iterdir())
    assert sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")) == sorted(
        f"r{i}".encode() for i in range(7)
    )
    table = pq.read_table(tmp_path / "one.parquet")
    assert table.schema == schema and sorted(table.column("user_id").to_pylist()) == list(range(5))
