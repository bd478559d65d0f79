"""Portable Beam building blocks: the same output on the DirectRunner and on Beam's DaskRunner.

Beam 2.77's ``DaskRunner`` translates only Create, ParDo, GroupByKey and Flatten (every other
primitive is an identity or ``None``), and differs silently from the DirectRunner where a
pipeline relies on more (docs/beam/dask_runner.md). Both pipelines therefore use only:

* **One output per ParDo**: every element is a ``(tag, value)`` pair (:func:`out`,
  :func:`count`) split with :func:`split` (a FlatMap per tag). ``with_outputs`` would hand
  every tagged PCollection *all* outputs on Dask.
* **Counts as data**: :func:`count` emits ``("count", (name, n))`` (and bumps a Beam metric
  of the same name, for runners that collect them); sinks emit their record counts; :func:`finish`
  sums them all into the pipeline's own summary. Nothing reads ``result.metrics()`` (Dask
  raises ``NotImplementedError``).
* **No side inputs**: Dask recomputes a side input's whole upstream once per consuming bundle.
  A singleton is joined to the elements that need it by :func:`with_context` (fanned out to a
  fixed key set, one GroupByKey), several PCollections are gathered into one element by
  :func:`gather` (a CoGroupByKey on one key).
* **Sources**: ``Create(file list) | Reshuffle | FlatMap(read one file)`` (:func:`read_files`);
  ``ReadFrom*`` are not translated.
* **Sinks**: records keyed by a stable hash of the record to one of N shards, GroupByKey, one
  ParDo call writes one shard to ``<path>.tmp`` and renames it into place (deterministic
  names, idempotent on retry): :func:`write_shards`. Beam's file sinks emit from
  ``finish_bundle`` (lost on Dask) and use side inputs for their temp directories.
* **No ``finish_bundle`` output** (BatchElements, RunInference's batching, Top, the file sinks):
  batches are formed inside one ``process`` call over a group.
* **One terminal transform**: Dask computes only the last transform's graph, so every branch
  ends in :func:`finish`, applied last.

Beam internals used: ``apache_beam.io.tfrecordio._TFRecordUtil.write_record`` (TFRecord framing
with masked CRC32C, what ``WriteToTFRecord`` writes).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines.runner import NAMESPACE

MAIN = "main"
DEAD = "dead"  # dead letters: rows that fail validation
COUNT = "count"
JOIN_GROUPS = 16  # keys a context is fanned out to (the parallelism of a joined step)
AUTO_SHARDS = 4  # shards of a sink whose flag says 0 ("runner-decided" before)
PARQUET_ROWS = 10_000  # rows per Parquet row group written
_CONTEXT, _ELEMENT = 0, 1


def chunked(values: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` values (the last one shorter), for batches formed in ``process``."""
    chunk: list = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def out(tag: str, value: Any) -> tuple[str, Any]:
    """A tagged element of a single-output ParDo (see :func:`split`)."""
    return tag, value


def count(name: str, n: int = 1) -> tuple[str, tuple[str, int]]:
    """A count element (``COUNT``); also increments the Beam metric ``tfrs_ctx/<name>``."""
    Metrics.counter(NAMESPACE, name).inc(n)
    return COUNT, (name, int(n))


def _select(element: tuple[str, Any], tag: str) -> list:
    return [element[1]] if element[0] == tag else []


def split(pcoll: beam.PCollection, label: str, tags: Iterable[str]) -> dict[str, beam.PCollection]:
    """A PCollection of ``(tag, value)`` -> ``{tag: PCollection of values}``."""
    return {tag: pcoll | f"{label}.{tag}" >> beam.FlatMap(_select, tag) for tag in tags}


def counted(pcoll: beam.PCollection, label: str, name: str) -> beam.PCollection:
    """``(name, number of elements of pcoll)``, one element (0 when empty)."""
    total = combine_globally(f"{label}Count", pcoll, beam.combiners.CountCombineFn())
    return total | f"{label}Name" >> beam.Map(lambda n: (name, n))


class _Seed:
    """The element :func:`combine_globally` adds so that an empty input still yields one output."""


class _IgnoringSeed(beam.CombineFn):
    """``fn`` with the :class:`_Seed` element ignored."""

    def __init__(self, fn: beam.CombineFn):
        self.fn = fn

    def create_accumulator(self) -> Any:
        return self.fn.create_accumulator()

    def add_input(self, acc: Any, element: Any) -> Any:
        return acc if isinstance(element, _Seed) else self.fn.add_input(acc, element)

    def merge_accumulators(self, accs: Iterable[Any]) -> Any:
        return self.fn.merge_accumulators(accs)

    def compact(self, acc: Any) -> Any:
        return self.fn.compact(acc)

    def extract_output(self, acc: Any) -> Any:
        return self.fn.extract_output(acc)


def combine_globally(label: str, pcoll: beam.PCollection, fn: beam.CombineFn) -> beam.PCollection:
    """``CombineGlobally(fn)`` without its side input: exactly one element, ``fn``'s default when empty.

    Beam's ``CombineGlobally`` injects the empty input's default through a side input, which the
    DaskRunner recomputes (with everything upstream) once per consuming bundle; this combines
    per key on a single key, seeded so that the key always exists.
    """
    keyed = pcoll | f"{label}Key" >> beam.Map(lambda v: (None, v))
    seed = pcoll.pipeline | f"{label}Seed" >> beam.Create([(None, _Seed())])
    return (
        (keyed, seed)
        | f"{label}Seeded" >> beam.Flatten()
        | f"{label}Combine" >> beam.CombinePerKey(_IgnoringSeed(fn))
        | f"{label}Value" >> beam.Values()
    )


def read_files(p: beam.Pipeline, label: str, files: Sequence[str], read: Callable[[str], Iterable]) -> beam.PCollection:
    """Every element ``read(path)`` yields, for each file (files spread over workers first)."""
    return (
        p
        | f"List{label}" >> beam.Create(list(files))
        | f"Spread{label}" >> beam.Reshuffle()
        | f"Read{label}" >> beam.FlatMap(read)
    )


def _fan_out(context: Any, keys: Sequence) -> list:
    return [(k, (_CONTEXT, context)) for k in keys]


def _tag_element(kv: tuple) -> tuple:
    return kv[0], (_ELEMENT, kv[1])


def _apply_context(group: tuple[Any, Iterable], fn: Callable[[Any, Iterator], Iterable]) -> Iterator:
    key, values = group
    context = [v for tag, v in values if tag == _CONTEXT]
    elements = (v for tag, v in values if tag == _ELEMENT)
    if len(context) != 1:
        if context or next(elements, None) is not None:
            raise ValueError(f"join key {key!r}: {len(context)} context elements (want 1)")
        return
    yield from fn(context[0], elements)


def with_context(
    label: str,
    keyed: beam.PCollection,
    context: beam.PCollection,
    keys: Sequence,
    fn: Callable[[Any, Iterator], Iterable],
) -> beam.PCollection:
    """``fn(context, values)`` for each key's values of ``keyed`` (``(key, value)``, keys from ``keys``).

    ``context`` holds exactly one element; it is copied to every key and grouped with that
    key's values (a side input without the DaskRunner's per-bundle recomputation). ``values``
    is iterated lazily, once; ``fn`` may batch them.
    """
    fanned = context | f"{label}Fan" >> beam.FlatMap(_fan_out, list(keys))
    tagged = keyed | f"{label}Tag" >> beam.Map(_tag_element)
    return (
        (fanned, tagged)
        | f"{label}Join" >> beam.Flatten()
        | f"{label}Group" >> beam.GroupByKey()
        | f"{label}Apply" >> beam.FlatMap(_apply_context, fn)
    )


def group_key(value: int, groups: int = JOIN_GROUPS) -> int:
    """A stable join key of an integer id (a user id)."""
    return int(value) % groups


def _gathered(kv: tuple[Any, Mapping[str, Iterable]]) -> dict[str, list]:
    return {name: list(values) for name, values in kv[1].items()}


def gather(label: str, pcolls: Mapping[str, beam.PCollection]) -> beam.PCollection:
    """One element ``{name: list of pcolls[name]'s elements}`` (at least one must be non-empty)."""
    keyed = {name: pc | f"{label}Key{name}" >> beam.Map(lambda v: (None, v)) for name, pc in pcolls.items()}
    return keyed | f"{label}Gather" >> beam.CoGroupByKey() | f"{label}Lists" >> beam.Map(_gathered)


# --------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sink:
    """Where and how a sharded output is written.

    Files are ``<prefix>-SSSSS-of-NNNNN<suffix>`` (``templated``) or exactly ``<prefix><suffix>``
    (one shard). ``kind``: ``tfrecord`` (gzip-compressed, as ``WriteToTFRecord(compression_type=GZIP)``),
    ``text`` (one line per str record), ``parquet`` (dict rows, ``schema`` a pyarrow schema).
    ``shard_field``: for dict rows, the field whose value picks the shard (else the record bytes).
    ``counter``: the name of the count of records written. ``every_shard``: write all
    ``num_shards`` files even when some (or all) get no record, like Beam's fixed-shard sinks.
    """

    prefix: str
    suffix: str
    num_shards: int
    kind: str
    counter: str
    templated: bool = True
    schema: Any = None
    shard_field: str | None = None
    every_shard: bool = True  # also write the shards no record falls in (empty files)

    def path(self, shard: int) -> str:
        if not self.templated:
            return f"{self.prefix}{self.suffix}"
        return f"{self.prefix}-{shard:05d}-of-{self.num_shards:05d}{self.suffix}"


def shard_of(record: Any, sink: Sink) -> int:
    """A record's shard: a CRC32 of its bytes (or of ``shard_field``'s value), the same on every worker."""
    if sink.shard_field is not None:
        record = str(record[sink.shard_field])
    data = record if isinstance(record, bytes) else str(record).encode()
    return zlib.crc32(data) % sink.num_shards


def _ensure_dir(path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    if not FileSystems.exists(parent):
        try:
            FileSystems.mkdirs(parent)
        except OSError:  # another worker made it
            if not FileSystems.exists(parent):
                raise


def _write_tfrecords(f: Any, records: Iterable[bytes]) -> int:
    from apache_beam.io.tfrecordio import _TFRecordUtil

    n = 0
    for record in records:
        _TFRecordUtil.write_record(f, record)
        n += 1
    return n


def _write_text(f: Any, records: Iterable[str]) -> int:
    n = 0
    for record in records:
        f.write(record.encode("utf-8") + b"\n")
        n += 1
    return n


def _write_parquet(f: Any, rows: Iterable[dict], schema: Any) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, batch = 0, []
    with pq.ParquetWriter(f, schema) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n, batch = n + len(batch), []
        if batch or not n:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        n += len(batch)
    return n


def write_shard(path: str, records: Iterable, sink: Sink) -> int:
    """Write one shard file: to ``path + '.tmp'``, then renamed to ``path``; returns the records written."""
    _ensure_dir(path)
    tmp = path + ".tmp"
    compression = CompressionTypes.GZIP if sink.kind == "tfrecord" else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(tmp, mime_type="application/octet-stream", compression_type=compression) as f:
        if sink.kind == "tfrecord":
            n = _write_tfrecords(f, records)
        elif sink.kind == "text":
            n = _write_text(f, records)
        elif sink.kind == "parquet":
            n = _write_parquet(f, records, sink.schema)
        else:
            raise ValueError(f"unknown sink kind {sink.kind!r}")
    if FileSystems.exists(path):
        FileSystems.delete([path])  # a retried shard: replace it
    FileSystems.rename([tmp], [path])
    return n


def _key_record(record: Any, sink: Sink) -> tuple[int, Any]:
    return shard_of(record, sink), record


def _write_group(group: tuple[int, Iterable], sink: Sink) -> Iterator[tuple[str, int]]:
    shard, values = group
    n = write_shard(sink.path(shard), (v for v in values if v is not None), sink)
    Metrics.counter(NAMESPACE, sink.counter).inc(n)
    yield sink.counter, n


def write_shards(label: str, records: beam.PCollection, sink: Sink) -> beam.PCollection:
    """Write ``records`` as ``sink.num_shards`` files; ``(counter, n)`` per file written."""
    if sink.num_shards < 1 or (not sink.templated and sink.num_shards != 1):
        raise ValueError(f"{label}: a sink needs num_shards >= 1 (exactly 1 without the shard template)")
    keyed = records | f"{label}Shard" >> beam.Map(_key_record, sink)
    seeds = [(i, None) for i in range(sink.num_shards)] if sink.every_shard else []
    every = records.pipeline | f"{label}Shards" >> beam.Create(seeds)
    return (
        (keyed, every)
        | f"{label}Flatten" >> beam.Flatten()
        | f"{label}Group" >> beam.GroupByKey()
        | f"{label}Write" >> beam.ParDo(_write_group, sink)
    )


def json_line(record: Any) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False)


# --------------------------------------------------------------------------------------
# The one terminal transform
# --------------------------------------------------------------------------------------
def _sum_counts(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, n in pairs:
        totals[name] = totals.get(name, 0) + int(n)
    return dict(sorted(totals.items()))


def finish(
    label: str,
    counts: Sequence[beam.PCollection],
    write: Callable[[dict[str, int], dict[str, list]], Any],
    extra: Mapping[str, beam.PCollection] | None = None,
) -> beam.PCollection:
    """The pipeline's last transform: ``write(summed counts, {name: elements of extra[name]})``.

    ``counts``: every PCollection of ``(name, n)`` (count elements, sink results); apply this
    last, after every other transform, and route every branch's output into it.
    """
    flat = counts | f"{label}Counts" >> beam.Flatten()
    summed = flat | f"{label}Sum" >> beam.CombinePerKey(sum)
    summed = combine_globally(f"{label}List", summed, beam.combiners.ToListCombineFn()) | f"{label}Totals" >> beam.Map(
        _sum_counts
    )
    gathered = gather(label, {"__counts__": summed, **(extra or {})})
    return gathered | f"{label}Write" >> beam.Map(lambda g: write(g.pop("__counts__")[0], g))
