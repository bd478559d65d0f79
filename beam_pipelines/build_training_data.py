"""Beam: raw tables -> sharded gzip TFRecords, vocabularies, ad corpus and metadata.

    python -m beam_pipelines.build_training_data --input RAW_DIR --output DATA_DIR \\
        [--cutoff TS] [--eval_fraction 0.2] [--context_drop_prob 0.3] [--context_weight_jitter 0.2] \\
        [--max_targets_per_user 0] [--num_shards 4 (0: runner-decided)] [--seed 0] [Beam options, e.g.
        --direct_running_mode=multi_processing --direct_num_workers=2 | --runner=DataflowRunner ...]

Time split
----------
One cutoff timestamp (``--cutoff``; by default the last ``--eval_fraction`` of the valid
conversions' time range is held out) splits the data:

* ``train``: one example per conversion with ``timestamp < cutoff``. Its history is the
  user's previous (up to ``MAX_HISTORY``) conversions strictly before the target's
  timestamp, and its context is synthesised from the label item's categories (each dropped
  with ``--context_drop_prob``, weights jittered by ``--context_weight_jitter``).
* ``train_requests``: one example per related-items request with ``timestamp < cutoff``,
  with its real context (the subject item's categories): the real-context ablation.
* ``eval``: one example per request with ``timestamp >= cutoff``, real context.

Request histories hold the conversions strictly before the request, minus the user's
conversions of the request's subject item (a real previous event used as the subject must
not also be history). No training target or training history event is at or after the
cutoff, and no history holds an event at or after its own target.

Validation
----------
Every raw row is checked against :func:`tfrs_ctx.data.validation.row_problem` (references
against the valid ``items`` / ``subject_items``; duplicate keys of the small tables and
duplicate request ids keep one row, the first in a canonical order). For column-typed
Parquet batches of the event tables the same rules run vectorised first
(:func:`typed_suspects`) and only the flagged rows go through ``row_problem``, which
supplies the reason; a test checks both paths give the same result. Bad rows are never
dropped silently: they go to the dead-letter output, and for every table the rows read
equal the rows kept (``metadata.json`` ``rows``) plus the dead letters (``dead_letter``).

Outputs (names from :mod:`tfrs_ctx.schema`): ``DATA_DIR/<split>/part-*-of-N.tfrecord.gz``,
``vocab/<name>.txt``, ``item_counts.tsv``, ``corpus.parquet``, ``metadata.json`` and
``dead_letter/<table>-*.jsonl`` (rows that fail validation, with the reason; counted in the
Beam metrics ``tfrs_ctx/dead_letter_<table>`` and in the metadata).

The default runner is the DirectRunner, run in-process (``--direct_running_mode=in_memory``)
or with worker processes (``multi_processing``); Beam's switch to the Prism runner (which
downloads a binary) is never attempted.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m` runs this file as __main__: hand over to the importable module instead, so
    # the classes Beam pickles (options, DoFns, elements) exist once, under their module name.
    from beam_pipelines.build_training_data import main

    sys.exit(main())

import dataclasses
import heapq
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions

from beam_pipelines import cli_main
from beam_pipelines import transforms as T
from tfrs_ctx import schema
from tfrs_ctx.data import rawio
from tfrs_ctx.data.validation import ALLOWED_VALUES, REFERENCES, row_problem
from tfrs_ctx.data.vocab import is_missing, vocab_text

S = schema
NAMESPACE = "tfrs_ctx"
DEAD_LETTER_DIR = "dead_letter"
CHUNK_ROWS = 20_000  # raw rows per chunk (the unit of reading and validation)
USER_BATCH = 64  # users whose examples are built and serialised together
DIRECT_RUNNERS = ("directrunner", "direct", "switchingdirectrunner")
DEAD = "dead"
STATS = "stats"
DUP = "dup"


class BuildDataOptions(PipelineOptions):
    """The pipeline's own flags."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add = parser.add_argument
        add("--input", help="raw-table directory (RAW_DIR/<table>/*.parquet|*.jsonl)")
        add("--output", help="data directory to write")
        add("--cutoff", type=int, default=None, help="split timestamp (unix s); default: from --eval_fraction")
        add("--eval_fraction", type=float, default=0.2, help="share of the conversion time range held out")
        add("--context_drop_prob", type=float, default=0.3, help="synthetic context: drop each category")
        add("--context_weight_jitter", type=float, default=0.2, help="synthetic context: weight *= U(1-j, 1+j)")
        add("--max_targets_per_user", type=int, default=0, help="keep the last N training targets (0: all)")
        add("--num_shards", type=int, default=4, help="TFRecord shards per split (0: one per bundle, no shuffle)")
        add("--seed", type=int, default=0, help="seed of the synthetic-context randomness")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Validated pipeline flags."""

    input: str
    output: str
    cutoff: int | None
    eval_fraction: float
    context_drop_prob: float
    context_weight_jitter: float
    max_targets_per_user: int
    num_shards: int
    seed: int

    @classmethod
    def from_options(cls, options: PipelineOptions) -> BuildConfig:
        o = options.view_as(BuildDataOptions)
        if not o.input or not o.output:
            raise ValueError("--input and --output are required")
        checks = {
            "--eval_fraction must lie in (0, 1)": 0.0 < o.eval_fraction < 1.0,
            "--context_drop_prob must lie in [0, 1]": 0.0 <= o.context_drop_prob <= 1.0,
            "--context_weight_jitter must lie in [0, 1]": 0.0 <= o.context_weight_jitter <= 1.0,
            "--max_targets_per_user must be >= 0": o.max_targets_per_user >= 0,
            "--num_shards must be >= 0": o.num_shards >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)
        return cls(**{f.name: getattr(o, f.name) for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------
def read_chunks(path: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[Any]:
    """One raw file as chunks: pyarrow record batches (Parquet) or lists of row dicts (JSONL)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        return
    chunk: list[dict] = []
    for row in rawio.iter_rows(path):
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


@dataclasses.dataclass(frozen=True)
class KnownIds:
    """Ids of the referenced tables: sets for :func:`row_problem`, sorted arrays for batches."""

    sets: dict[str, frozenset]
    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, ids: Mapping[str, Iterable[int]]) -> KnownIds:
        sets = {name: frozenset(values) for name, values in ids.items()}
        return cls(sets, {name: np.sort(np.fromiter(v, dtype=np.int64, count=len(v))) for name, v in sets.items()})


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


class ValidateEvents(beam.DoFn):
    """Chunk of an event table -> ``(user_id, block)`` per user; bad rows -> ``DEAD``.

    For conversions it also emits per-chunk ``STATS`` (timestamp range, event types).
    """

    def __init__(self, table: schema.Table):
        self.table = table

    def process(self, chunk: Any, known: KnownIds) -> Iterator[Any]:
        blocks, dead, columns = validate_event_chunk(self.table, chunk, known)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD, d)
        n = len(columns[S.USER_ID])
        Metrics.counter(NAMESPACE, f"rows_{self.table.name}").inc(n)
        if self.table.name == S.CONVERSIONS.name and n:
            ts, types = columns[S.TIMESTAMP], columns[S.EVENT_TYPE]
            values, counts = np.unique(types, return_counts=True)
            yield beam.pvalue.TaggedOutput(
                STATS, (int(ts.min()), int(ts.max()), Counter(dict(zip(values.tolist(), counts.tolist(), strict=True))))
            )
        yield from blocks


class ValidateRows(beam.DoFn):
    """Chunk of a small table -> valid rows; bad rows -> ``DEAD``."""

    def __init__(self, table: schema.Table):
        self.table = table

    def process(self, chunk: Any) -> Iterator[Any]:
        good, dead = split_valid(self.table, chunk_rows(chunk), None)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD, d)
        yield from good


def _row_key(table: schema.Table, row: Mapping[str, Any]) -> Any:
    return tuple(int(row[c]) if table.column(c).kind == "int64" else row[c] for c in table.key)


def keep_first(table: schema.Table, key_rows: tuple[Any, Iterable[Mapping]]) -> Iterator[Any]:
    """One row per key (the first in a canonical order); duplicates go to ``DEAD``."""
    rows = list(key_rows[1])
    if len(rows) > 1:
        rows.sort(key=lambda r: json.dumps(json_safe(dict(r)), sort_keys=True))
    yield rows[0]
    for row in rows[1:]:
        yield beam.pvalue.TaggedOutput(DEAD, dead_letter(table, f"duplicate key ({', '.join(table.key)})", row))


def count_row(row: Any, table: str, delta: int = 1) -> Any:
    """Count a row kept (``delta`` 1) or taken back (-1) in the ``rows_<table>`` metric; returns it."""
    Metrics.counter(NAMESPACE, f"rows_{table}").inc(delta)
    return row


class SplitDuplicateRequests(beam.DoFn):
    """Validated request blocks -> blocks without the duplicated request ids, and those rows (``DUP``)."""

    def process(self, block: tuple[int, tuple], duplicated: frozenset) -> Iterator[Any]:
        user, packed = block
        if not duplicated:
            yield block
            return
        b = T.unpack_block(packed)
        dup = np.isin(b[S.REQUEST_ID], np.fromiter(duplicated, dtype=np.int64, count=len(duplicated)))
        if not dup.any():
            yield block
            return
        for i in np.flatnonzero(dup):
            row = {S.USER_ID: user, **{name: int(values[i]) for name, values in b.items()}}
            yield beam.pvalue.TaggedOutput(DUP, (row[S.REQUEST_ID], row))
        if not dup.all():
            yield user, T.pack_block({name: values[~dup] for name, values in b.items()})


def request_block(row: Mapping[str, int]) -> tuple[int, tuple]:
    """One kept request row as a one-row block of its user."""
    data = {c.name: np.asarray([row[c.name]], np.int64) for c in S.REQUESTS.columns if c.name != S.USER_ID}
    return int(row[S.USER_ID]), T.pack_block(data)


def dedupe_requests(blocks: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
    """Validated request blocks with one row per ``request_id``, and the duplicates' dead letters.

    Request ids seen more than once are found first (normally none: the blocks then pass
    through untouched); their rows are grouped by id and :func:`keep_first` keeps one.
    """
    name = S.REQUESTS.name
    duplicated = (
        blocks
        | "RequestIds" >> beam.FlatMap(lambda b: T.unpack_block(b[1])[S.REQUEST_ID].tolist())
        | "CountRequestIds" >> beam.combiners.Count.PerElement()
        | "DuplicatedIds" >> beam.FlatMap(lambda kv: [kv[0]] if kv[1] > 1 else [])
        | "DuplicatedList" >> beam.combiners.ToList()
        | "DuplicatedSet" >> beam.Map(frozenset)
    )
    split = blocks | "SplitDuplicateRequests" >> beam.ParDo(
        SplitDuplicateRequests(), duplicated=beam.pvalue.AsSingleton(duplicated)
    ).with_outputs(DUP, main="blocks")
    kept = (
        split[DUP]
        | "GroupDuplicateRequests" >> beam.GroupByKey()
        | "KeepFirstRequest" >> beam.FlatMap(lambda kv: keep_first(S.REQUESTS, kv)).with_outputs(DEAD, main="rows")
    )
    dead = kept[DEAD] | "UncountDuplicateRequests" >> beam.Map(count_row, name, -1)
    kept_blocks = kept.rows | "KeptRequestBlocks" >> beam.Map(request_block)
    return (split.blocks, kept_blocks) | "DedupedRequests" >> beam.Flatten(), dead


class StatsFn(beam.CombineFn):
    """Merges per-chunk (min timestamp, max timestamp, event-type counts)."""

    def create_accumulator(self) -> tuple:
        return (None, None, Counter())

    def add_input(self, acc: tuple, stats: tuple) -> tuple:
        return self.merge_accumulators([acc, stats])

    def merge_accumulators(self, accs: Iterable[tuple]) -> tuple:
        lo, hi, types = None, None, Counter()
        for a_lo, a_hi, a_types in accs:
            lo = a_lo if lo is None else (lo if a_lo is None else min(lo, a_lo))
            hi = a_hi if hi is None else (hi if a_hi is None else max(hi, a_hi))
            types.update(a_types)
        return lo, hi, types

    def extract_output(self, acc: tuple) -> tuple:
        return acc


class MergeCounts(beam.CombineFn):
    """Sums ``Counter``s (or mappings of counts)."""

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, counts: Mapping) -> Counter:
        acc.update(counts)
        return acc

    def merge_accumulators(self, accs: Iterable[Counter]) -> Counter:
        out = Counter()
        for a in accs:
            out.update(a)
        return out

    def extract_output(self, acc: Counter) -> dict:
        return dict(acc)


def compute_cutoff(stats: tuple, cutoff: int | None, eval_fraction: float) -> int:
    """The split timestamp: ``cutoff`` if given, else the last ``eval_fraction`` of the range."""
    if cutoff is not None:
        return int(cutoff)
    lo, hi, _ = stats
    if lo is None:
        raise ValueError("no valid conversions: cannot compute a cutoff (pass --cutoff)")
    return math.floor(lo + (1.0 - eval_fraction) * (hi - lo))


def demographic_counts(user: Mapping[str, Any]) -> dict[str, Counter]:
    return {c: Counter() if is_missing(user.get(c)) else Counter([str(user[c])]) for c in S.DEMOGRAPHIC_COLUMNS}


class MergeDemographics(beam.CombineFn):
    """Value counts per demographic column."""

    def create_accumulator(self) -> dict[str, Counter]:
        return {c: Counter() for c in S.DEMOGRAPHIC_COLUMNS}

    def add_input(self, acc: dict, counts: Mapping[str, Counter]) -> dict:
        for c in S.DEMOGRAPHIC_COLUMNS:
            acc[c].update(counts[c])
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for a in accs:
            self.add_input(out, a)
        return out

    def extract_output(self, acc: dict) -> dict:
        return {c: dict(v) for c, v in acc.items()}


# --------------------------------------------------------------------------------------
# Per-user work
# --------------------------------------------------------------------------------------
def assemble_user(item: tuple[int, Mapping[str, Sequence]]) -> Iterator[T.UserData]:
    """One user's grouped blocks and users row -> :class:`transforms.UserData` (none without events)."""
    user_id, grouped = item
    rows = list(grouped[S.USERS.name])
    conversions, requests = list(grouped[S.CONVERSIONS.name]), list(grouped[S.REQUESTS.name])
    if not conversions and not requests:
        Metrics.counter(NAMESPACE, "users_without_events").inc()
        return
    if not rows:
        Metrics.counter(NAMESPACE, "users_without_users_row").inc()
    Metrics.counter(NAMESPACE, "users").inc()
    conversions, requests = [T.unpack_block(b) for b in conversions], [T.unpack_block(b) for b in requests]
    yield T.UserData(
        int(user_id),
        T.UserEvents.from_blocks(conversions),
        T.UserRequests.from_blocks(requests),
        dict(rows[0]) if rows else None,
    )


def block_target_counts(block: tuple[int, tuple], cutoff: int) -> Counter:
    """Item counts of a block's training targets (every conversion before the cutoff)."""
    b = T.unpack_block(block[1])
    items, counts = np.unique(b[S.ITEM_ID][b[S.TIMESTAMP] < cutoff], return_counts=True)
    return Counter(dict(zip(items.tolist(), counts.tolist(), strict=True)))


def block_targets(block: tuple[int, tuple], cutoff: int) -> tuple[int, list[tuple[int, int]]]:
    """A block's training targets as ``(timestamp, item_id)`` pairs, keyed by user."""
    user, b = block[0], T.unpack_block(block[1])
    before = b[S.TIMESTAMP] < cutoff
    return user, list(zip(b[S.TIMESTAMP][before].tolist(), b[S.ITEM_ID][before].tolist(), strict=True))


class LastTargets(beam.CombineFn):
    """A user's latest ``n`` targets by (timestamp, item_id), the order examples use, and their total."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self) -> tuple[int, list]:
        return 0, []

    def add_input(self, acc: tuple[int, list], targets: list) -> tuple[int, list]:
        return self.merge_accumulators([acc, (len(targets), targets)])

    def merge_accumulators(self, accs: Iterable[tuple[int, list]]) -> tuple[int, list]:
        accs = list(accs)
        return sum(a[0] for a in accs), heapq.nlargest(self.n, (t for a in accs for t in a[1]))

    def extract_output(self, acc: tuple[int, list]) -> tuple[int, list]:
        return acc


def kept_target_counts(user_targets: tuple[int, tuple[int, list]]) -> Counter:
    total, kept = user_targets[1]
    if total > len(kept):
        Metrics.counter(NAMESPACE, "train_targets_dropped_max_targets").inc(total - len(kept))
    return Counter(item for _, item in kept)


def item_counts(blocks: beam.PCollection, cutoff: beam.PCollection, max_targets: int) -> beam.PCollection:
    """Training-target counts per item id (a one-element PCollection), from the validated blocks."""
    if not max_targets:
        per_block = blocks | "TargetCounts" >> beam.Map(block_target_counts, beam.pvalue.AsSingleton(cutoff))
    else:
        per_block = (
            blocks
            | "Targets" >> beam.Map(block_targets, beam.pvalue.AsSingleton(cutoff))
            | "LastTargets" >> beam.CombinePerKey(LastTargets(max_targets))
            | "TargetCounts" >> beam.Map(kept_target_counts)
        )
    return per_block | "ItemCounts" >> beam.CombineGlobally(MergeCounts())


def build_lookups(_: Any, items: list, subjects: list, counts: dict, stats: tuple, demographics: dict) -> T.Lookups:
    vocabs = T.build_vocabularies(items, subjects, counts, stats[2], demographics)
    return T.Lookups.build(vocabs, items, subjects, counts)


class BuildExamples(beam.DoFn):
    """Serialised examples of a batch of users, one tagged output per split."""

    def __init__(self, config: BuildConfig):
        self.config = config

    def process(self, users: Sequence[T.UserData], lookups: T.Lookups, cutoff: int) -> Iterator[Any]:
        options = T.ExampleOptions(
            cutoff=cutoff,
            context_drop_prob=self.config.context_drop_prob,
            context_weight_jitter=self.config.context_weight_jitter,
            max_targets_per_user=self.config.max_targets_per_user,
            seed=self.config.seed,
        )
        per_split = T.batch_examples(users, lookups, options)
        for split in S.SPLITS:
            serialized = T.serialize_examples(per_split[split])
            Metrics.counter(NAMESPACE, f"examples_{split}").inc(len(serialized))
            for record in serialized:
                yield beam.pvalue.TaggedOutput(split, record)


# --------------------------------------------------------------------------------------
# Small artefacts: vocabularies, item counts, corpus, metadata
# --------------------------------------------------------------------------------------
def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file through Beam's filesystems (local, gs://, ...)."""
    parent = os.path.dirname(path)
    if not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(path) as f:
        f.write(data)


def corpus_parquet(lookups: T.Lookups) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = lookups.corpus_columns()
    table = pa.table(
        {
            name: pa.array(values.tolist() if values.ndim > 1 else values, type=_arrow_type(name))
            for name, values in columns.items()
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    if name == S.ITEM_ID:
        return pa.int64()
    f = S.FEATURES[name]
    scalar = pa.int64() if f.dtype == "int64" else pa.float32()
    return pa.list_(scalar) if f.shape else scalar


def write_artifacts(lookups: T.Lookups, output: str, cutoff: int, counts: dict, config: BuildConfig) -> dict:
    """Vocabularies, item counts, corpus and the metadata (counts filled in after the run)."""
    for name, vocab in lookups.vocabularies.items():
        write_bytes(os.path.join(output, S.VOCAB_DIR, S.vocab_filename(name)), vocab_text(vocab.values).encode())
    item_counts = "".join(f"{v}\t{counts.get(int(v), 0)}\n" for v in lookups.vocabularies[S.VOCAB_ITEM].values)
    write_bytes(os.path.join(output, S.ITEM_COUNTS_FILE), item_counts.encode())
    write_bytes(os.path.join(output, S.CORPUS_FILE), corpus_parquet(lookups))
    metadata = {
        "schema_version": S.SCHEMA_VERSION,
        "cutoff_timestamp": int(cutoff),
        "vocab_sizes": {name: v.size for name, v in lookups.vocabularies.items()},
        "train_targets": int(sum(counts.values())),
        "options": dataclasses.asdict(config),
    }
    write_bytes(os.path.join(output, S.METADATA_FILE), json.dumps(metadata, indent=2).encode())
    return metadata


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------
def read_table(p: beam.Pipeline, raw_dir: str, table: schema.Table, reshuffle: bool) -> beam.PCollection:
    chunks = (
        p
        | f"List{table.name}" >> beam.Create(rawio.table_files(raw_dir, table))
        | f"Read{table.name}" >> beam.FlatMap(read_chunks)
    )
    return chunks | f"Spread{table.name}" >> beam.Reshuffle() if reshuffle else chunks


def small_table(p: beam.Pipeline, raw_dir: str, table: schema.Table) -> tuple[beam.PCollection, list]:
    """A validated, key-deduplicated small table and its dead-letter PCollections."""
    name = table.name
    checked = read_table(p, raw_dir, table, False) | f"Validate{name}" >> beam.ParDo(ValidateRows(table)).with_outputs(
        DEAD, main="rows"
    )
    unique = (
        checked.rows
        | f"Key{name}" >> beam.Map(lambda r, t=table: (_row_key(t, r), r))
        | f"Group{name}" >> beam.GroupByKey()
        | f"Dedupe{name}" >> beam.FlatMap(lambda kv, t=table: keep_first(t, kv)).with_outputs(DEAD, main="rows")
    )
    rows = unique.rows | f"Count{name}" >> beam.Map(count_row, name)
    return rows, [checked[DEAD], unique[DEAD]]


def build_pipeline(p: beam.Pipeline, config: BuildConfig) -> None:
    """Wire every transform of the training-data pipeline into ``p``."""
    raw, out = config.input, config.output
    dead: dict[str, list] = {}
    items, dead[S.ITEMS.name] = small_table(p, raw, S.ITEMS)
    subjects, dead[S.SUBJECT_ITEMS.name] = small_table(p, raw, S.SUBJECT_ITEMS)
    users, dead[S.USERS.name] = small_table(p, raw, S.USERS)

    item_ids = items | "ItemIds" >> beam.Map(lambda r: int(r[S.ITEM_ID]))
    subject_ids = subjects | "SubjectIds" >> beam.Map(lambda r: int(r[S.ITEM_ID]))
    known = (
        p
        | "KnownSeed" >> beam.Create([None])
        | "KnownIds"
        >> beam.Map(
            lambda _, a, b: KnownIds.of({S.ITEMS.name: a, S.SUBJECT_ITEMS.name: b}),
            beam.pvalue.AsList(item_ids),
            beam.pvalue.AsList(subject_ids),
        )
    )

    events = {}
    stats = None
    for table in (S.CONVERSIONS, S.REQUESTS):
        checked = read_table(p, raw, table, True) | f"Validate{table.name}" >> beam.ParDo(
            ValidateEvents(table), known=beam.pvalue.AsSingleton(known)
        ).with_outputs(DEAD, STATS, main="blocks")
        events[table.name] = checked.blocks
        dead[table.name] = [checked[DEAD]]
        if table is S.CONVERSIONS:
            stats = checked[STATS] | "Stats" >> beam.CombineGlobally(StatsFn())
        else:
            events[table.name], duplicates = dedupe_requests(checked.blocks)
            dead[table.name].append(duplicates)

    cutoff = stats | "Cutoff" >> beam.Map(compute_cutoff, config.cutoff, config.eval_fraction)
    keyed_users = users | "KeyUsers" >> beam.Map(lambda r: (int(r[S.USER_ID]), r))
    per_user = (
        {**events, S.USERS.name: keyed_users}
        | "GroupByUser" >> beam.CoGroupByKey()
        | "AssembleUser" >> beam.FlatMap(assemble_user)
    )
    counts = item_counts(events[S.CONVERSIONS.name], cutoff, config.max_targets_per_user)
    demographics = (
        users
        | "DemographicValues" >> beam.Map(demographic_counts)
        | "DemographicCounts" >> beam.CombineGlobally(MergeDemographics())
    )
    lookups = (
        p
        | "LookupSeed" >> beam.Create([None])
        | "Lookups"
        >> beam.Map(
            build_lookups,
            beam.pvalue.AsList(items),
            beam.pvalue.AsList(subjects),
            beam.pvalue.AsSingleton(counts),
            beam.pvalue.AsSingleton(stats),
            beam.pvalue.AsSingleton(demographics),
        )
    )
    _ = lookups | "WriteArtifacts" >> beam.Map(
        write_artifacts, out, beam.pvalue.AsSingleton(cutoff), beam.pvalue.AsSingleton(counts), config
    )

    examples = (
        per_user
        | "BatchUsers" >> beam.BatchElements(min_batch_size=USER_BATCH, max_batch_size=USER_BATCH)
        | "BuildExamples"
        >> beam.ParDo(
            BuildExamples(config), lookups=beam.pvalue.AsSingleton(lookups), cutoff=beam.pvalue.AsSingleton(cutoff)
        ).with_outputs(*S.SPLITS)
    )
    write_examples(examples, out, config.num_shards)
    write_dead_letters(dead, out)


def write_examples(examples: Any, out: str, num_shards: int) -> None:
    """Each split's serialised examples as sharded gzip TFRecords."""
    for split in S.SPLITS:
        _ = examples[split] | f"Write{split}" >> beam.io.WriteToTFRecord(
            os.path.join(out, split, "part"),
            file_name_suffix=S.TFRECORD_SUFFIX,
            num_shards=num_shards,
            compression_type=CompressionTypes.GZIP,
        )


def write_dead_letters(dead: Mapping[str, list], out: str) -> None:
    """Each table's dead letters as JSON lines, counted in the ``dead_letter_<table>`` metric."""
    for name, pcolls in dead.items():
        _ = (
            pcolls
            | f"FlattenDead{name}" >> beam.Flatten()
            | f"CountDead{name}" >> beam.Map(_count_dead_letter, name)
            | f"WriteDead{name}"
            >> beam.io.WriteToText(os.path.join(out, DEAD_LETTER_DIR, name), file_name_suffix=".jsonl")
        )


def _count_dead_letter(record: dict, table: str) -> str:
    Metrics.counter(NAMESPACE, f"dead_letter_{table}").inc()
    return json.dumps(record, sort_keys=True, allow_nan=False)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def make_runner(options: PipelineOptions) -> Any:
    """The runner to use: for the DirectRunner (the default), its FnApiRunner directly.

    Beam's DirectRunner first tries the Prism runner, which downloads a binary; this uses
    the same in-process / multi-process FnApiRunner the DirectRunner would fall back to.
    """
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or "DirectRunner"
    if standard.runner.lower() not in DIRECT_RUNNERS:
        return None  # Beam creates it by name
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory" and direct.direct_num_workers not in (None, 1):
        direct.direct_num_workers = 1  # in_memory has one worker; avoids Beam's warning
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def clear_outputs(output: str) -> None:
    """Remove the shards and dead letters of a previous run (their count may differ)."""
    patterns = [os.path.join(output, split, "part-*") for split in S.SPLITS]
    patterns.append(os.path.join(output, DEAD_LETTER_DIR, "*.jsonl"))
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def counters(result: Any) -> dict[str, int]:
    """The pipeline's ``tfrs_ctx`` counters, summed over steps."""
    totals: Counter = Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value or 0)
    return dict(totals)


def finalize_metadata(output: str, totals: Mapping[str, int]) -> dict:
    """Add the run's counts (examples per split, dead letters, rows) to the metadata file."""
    path = os.path.join(output, S.METADATA_FILE)
    with FileSystems.open(path) as f:
        metadata = json.loads(f.read())
    metadata["counts"] = {split: totals.get(f"examples_{split}", 0) for split in S.SPLITS}
    metadata["dead_letter"] = {name: totals.get(f"dead_letter_{name}", 0) for name in S.RAW_TABLES}
    metadata["rows"] = {name: totals.get(f"rows_{name}", 0) for name in S.RAW_TABLES}
    metadata["pipeline_counters"] = dict(sorted(totals.items()))
    write_bytes(path, json.dumps(metadata, indent=2).encode())
    return metadata


def run(argv: Sequence[str] | None = None, save_main_session: bool = True) -> dict:
    """Build the training data; returns the metadata written to ``metadata.json``."""
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = save_main_session
    config = BuildConfig.from_options(options)
    runner = make_runner(options)
    clear_outputs(config.output)
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    metadata = finalize_metadata(config.output, counters(result))
    summary = {k: metadata[k] for k in ("counts", "dead_letter", "cutoff_timestamp", "vocab_sizes")}
    print(json.dumps(summary, indent=2))
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``tfrs-ctx build-data``)."""
    return cli_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
