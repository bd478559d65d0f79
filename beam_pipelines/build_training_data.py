"""Beam: raw tables -> sharded gzip TFRecords, vocabularies, ad corpus and metadata.

    python -m beam_pipelines.build_training_data --input RAW_DIR --output DATA_DIR \\
        [--cutoff TS] [--eval_fraction 0.2] [--context_drop_prob 0.3] [--context_weight_jitter 0.2] \\
        [--max_targets_per_user 0] [--sequence_stride 25] [--num_shards 4] [--seed 0]
        [Beam options, e.g.
        --direct_running_mode=multi_processing --direct_num_workers=2 |
        --runner DaskRunner [--dask_workers 2 | --dask_client_address tcp://HOST:8786] | --runner=DataflowRunner ...]

Time split
----------
One cutoff timestamp splits the data: ``--cutoff``, or by default the ``1 - --eval_fraction``
quantile of the valid requests' timestamps, so that about that share of the request traffic is
held out whatever the shape of its time tail (a share of the time *range* held out 36 of 8,000
requests on logs with a long tail). Without any request the cutoff falls back, loudly, to the
last ``--eval_fraction`` of the conversions' time range (there is nothing to evaluate then).

* ``train``: one example per conversion with ``timestamp < cutoff``. Its history is the
  user's previous (up to ``MAX_HISTORY``) conversions strictly before the target's
  timestamp, and its context is synthesised from the label item's categories (each dropped
  with ``--context_drop_prob``, weights jittered by ``--context_weight_jitter``).
* ``train_requests``: one example per related-items request with ``timestamp < cutoff``,
  with its real context (the subject item's categories): the real-context ablation.
* ``eval``: one example per request with ``timestamp >= cutoff``, real context; beside it,
  ``eval_consumed/part-*.jsonl``: every ad the request's user converted on strictly before the
  request (all of them, not only the last ``MAX_HISTORY``), for evaluation's ``exclude_history``.
* ``train_sequences``: dense-training windows (:data:`tfrs_ctx.schema.SEQUENCE_FEATURES`): every
  conversion before the cutoff is the target of exactly one position (no ``--max_targets_per_user``
  cap); windows end every ``--sequence_stride`` targets, so a target sees at least
  ``MAX_HISTORY - stride`` earlier events (or all its user has); synthetic context per position
  from the same keys as ``train``; input time gaps in ``next_event`` semantics (see the schema).

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
``dead_letter/<table>-*.jsonl`` (rows that fail validation, with the reason). Every count
(examples per split, dead letters, rows, users) is computed in the pipeline from the outputs
themselves and written into ``metadata.json`` by its last step (also bumped as Beam metrics
``tfrs_ctx/<name>``, never read back).

The default runner is the DirectRunner, run in-process (``--direct_running_mode=in_memory``)
or with worker processes (``multi_processing``); Beam's switch to the Prism runner (which
downloads a binary) is never attempted. ``--runner DaskRunner`` runs the same pipeline on a
``dask.distributed`` cluster with the same output: it is built only from the portable subset
of :mod:`beam_pipelines.portable` (docs/beam/dask_runner.md).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m` runs this file as __main__: hand over to the importable module instead, so
    # the classes Beam pickles (options, DoFns, elements) exist once, under their module name.
    from beam_pipelines.build_training_data import main

    sys.exit(main())

import dataclasses
import io
import json
import math
import os
import pickle
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.transforms.stats import ApproximateQuantilesCombineFn

from beam_pipelines.combiners import LastTargets, MergeCounts, MergeDemographics, StatsFn, demographic_counts
from beam_pipelines.item_table import item_table
from beam_pipelines.portable import (
    AUTO_SHARDS,
    COUNT,
    DEAD,
    JOIN_GROUPS,
    MAIN,
    Sink,
    chunked,
    combine_globally,
    count,
    finish,
    gather,
    group_key,
    out,
    split,
    with_context,
    write_shards,
)
from beam_pipelines.runner import OutputOptions, cli_main, run_pipeline
from beam_pipelines.tables import (
    DEAD_LETTER_DIR,
    STATS,
    USER_BATCH,
    keep_first,
    known_ids,
    small_table,
    validated_events,
    write_bytes,
    write_dead_letters,
)
from tfrs_ctx import schema
from tfrs_ctx.data import examples as T
from tfrs_ctx.data.tf_example_wire import serialize_examples
from tfrs_ctx.data.vocab import file_text

S = schema
DUP = "dup"
CONSUMED = "consumed"  # BuildExamples' output of the eval requests' consumed items
SEARCH_CONSUMED = "search_consumed"  # the same for the eval search requests


class BuildDataOptions(OutputOptions):
    """The pipeline's own flags."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add = parser.add_argument
        add("--input", help="raw-table directory (RAW_DIR/<table>/*.parquet|*.jsonl)")
        add("--cutoff", type=int, default=None, help="split timestamp (unix s); default: from --eval_fraction")
        add("--eval_fraction", type=float, default=0.2, help="share of the requests held out (a timestamp quantile)")
        add("--context_drop_prob", type=float, default=0.3, help="synthetic context: drop each category")
        add("--context_weight_jitter", type=float, default=0.2, help="synthetic context: weight *= U(1-j, 1+j)")
        add("--max_targets_per_user", type=int, default=0, help="keep the last N training targets (0: all)")
        add("--sequence_stride", type=int, default=S.SEQUENCE_STRIDE, help="targets between sequence windows' ends")
        add("--num_shards", type=int, default=4, help="TFRecord shards per split (0: 4)")
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
    sequence_stride: int
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
            f"--sequence_stride must lie in [1, {S.MAX_HISTORY}]": 1 <= o.sequence_stride <= S.MAX_HISTORY,
            "--num_shards must be >= 0": o.num_shards >= 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)
        return cls(**{f.name: getattr(o, f.name) for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------


def _cell(values: np.ndarray, i: int) -> Any:
    return str(values[i]) if values.dtype.kind in "US" else int(values[i])


def split_duplicate_requests(duplicated: frozenset, blocks: Iterable[tuple[int, tuple]]) -> Iterator[tuple]:
    """Validated request blocks -> blocks without the duplicated request ids (``MAIN``), and those rows (``DUP``)."""
    wanted = np.fromiter(duplicated, dtype=np.int64, count=len(duplicated))
    for block in blocks:
        user, packed = block
        if not duplicated:
            yield out(MAIN, block)
            continue
        b = T.unpack_block(packed)
        dup = np.isin(b[S.REQUEST_ID], wanted)
        if not dup.any():
            yield out(MAIN, block)
            continue
        for i in np.flatnonzero(dup):
            row = {S.USER_ID: user, **{name: _cell(values, i) for name, values in b.items()}}
            yield out(DUP, (row[S.REQUEST_ID], row))
        if not dup.all():
            yield out(MAIN, (user, T.pack_block({name: values[~dup] for name, values in b.items()})))


def keep_first_request(kv: tuple[int, Iterable[Mapping]], table: S.Table = S.REQUESTS) -> Iterator[tuple]:
    """One request row per id (``MAIN``); the others are dead letters, taken back from ``rows_<table>``."""
    for tag, value in keep_first(table, kv):
        yield tag, value
        if tag == DEAD:
            yield count(f"rows_{table.name}", -1)


def request_block(row: Mapping[str, Any], table: S.Table = S.REQUESTS) -> tuple[int, tuple]:
    """One kept request row (of ``table``: requests or search_requests) as a one-row block of its user."""
    data = {
        c.name: np.asarray([row[c.name]], str if c.kind == "string" else np.int64)
        for c in table.columns
        if c.name != S.USER_ID
    }
    return int(row[S.USER_ID]), T.pack_block(data)


def by_user(block: tuple[int, Any]) -> tuple[int, tuple[int, Any]]:
    """Key a per-user element by its user's join group."""
    return group_key(block[0]), block


def dedupe_requests(
    blocks: beam.PCollection, table: S.Table = S.REQUESTS
) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
    """Validated request blocks with one row per ``request_id``, the duplicates' dead letters, counts.

    Request ids seen more than once are found first (normally none: the blocks then pass
    through untouched); their rows are grouped by id and :func:`keep_first` keeps one.
    ``table``: the requests or the search requests (their transforms' labels start with ``Search``).
    """
    x = "" if table is S.REQUESTS else "Search"
    ids = (
        blocks
        | f"{x}RequestIds" >> beam.FlatMap(lambda b: T.unpack_block(b[1])[S.REQUEST_ID].tolist())
        | f"{x}CountRequestIds" >> beam.combiners.Count.PerElement()
        | f"{x}DuplicatedIds" >> beam.FlatMap(lambda kv: [kv[0]] if kv[1] > 1 else [])
    )
    listed = combine_globally(f"{x}DuplicatedList", ids, beam.combiners.ToListCombineFn())
    duplicated = listed | f"{x}DuplicatedSet" >> beam.Map(frozenset)
    keyed = blocks | f"{x}KeyRequestBlocks" >> beam.Map(by_user)
    split_blocks = split(
        with_context(f"{x}SplitDuplicateRequests", keyed, duplicated, range(JOIN_GROUPS), split_duplicate_requests),
        f"{x}SplitDuplicates",
        (MAIN, DUP),
    )
    kept = (
        split_blocks[DUP]
        | f"{x}GroupDuplicateRequests" >> beam.GroupByKey()
        | f"{x}KeepFirstRequest" >> beam.FlatMap(keep_first_request, table)
    )
    kept = split(kept, f"{x}SplitKeptRequests", (MAIN, DEAD, COUNT))
    kept_blocks = kept[MAIN] | f"{x}KeptRequestBlocks" >> beam.Map(request_block, table)
    deduped = (split_blocks[MAIN], kept_blocks) | f"{x}DedupedRequests" >> beam.Flatten()
    return deduped, kept[DEAD], kept[COUNT]


QUANTILES = 1001  # request-timestamp quantiles computed (0.1% resolution of --eval_fraction)


def compute_cutoff(
    stats: tuple, cutoff: int | None, eval_fraction: float, request_quantiles: list | None = None
) -> int:
    """The split timestamp: ``cutoff`` if given, else the ``1 - eval_fraction`` request-timestamp quantile.

    ``request_quantiles``: ``QUANTILES`` evenly spaced quantiles (min to max) of the valid
    requests' timestamps (empty or ``None``: no requests; then the last ``eval_fraction`` of the
    conversions' time range, with a warning: no request can be evaluated or validated on).
    """
    if cutoff is not None:
        return int(cutoff)
    if request_quantiles:
        q = list(request_quantiles)
        return int(q[min(len(q) - 1, round((1.0 - eval_fraction) * (len(q) - 1)))])
    lo, hi, _ = stats
    if lo is None:
        raise ValueError("no valid conversions: cannot compute a cutoff (pass --cutoff)")
    print(
        "WARNING: no valid requests: the cutoff is the last --eval_fraction of the conversions' time range; "
        "there is no request to evaluate or validate on",
        file=sys.stderr,
    )
    return math.floor(lo + (1.0 - eval_fraction) * (hi - lo))


# --------------------------------------------------------------------------------------
# Per-user work
# --------------------------------------------------------------------------------------
def assemble_user(item: tuple[int, Mapping[str, Sequence]]) -> Iterator[tuple]:
    """One user's grouped blocks and users row -> :class:`tfrs_ctx.data.examples.UserData` (none without events)."""
    user_id, grouped = item
    rows = list(grouped[S.USERS.name])
    conversions, requests = list(grouped[S.CONVERSIONS.name]), list(grouped[S.REQUESTS.name])
    if not conversions and not requests and not list(grouped.get(S.SEARCH_REQUESTS.name, ())):
        yield count("users_without_events")
        return
    if not rows:
        yield count("users_without_users_row")
    yield count("users")
    conversions, requests = [T.unpack_block(b) for b in conversions], [T.unpack_block(b) for b in requests]
    searches = [T.unpack_block(b) for b in grouped.get(S.SEARCH_REQUESTS.name, ())]
    yield out(
        MAIN,
        T.UserData(
            int(user_id),
            T.UserEvents.from_blocks(conversions),
            T.UserRequests.from_blocks(requests),
            dict(rows[0]) if rows else None,
            T.UserSearches.from_blocks(searches) if searches else None,
        ),
    )


def block_target_counts(cutoff: int, blocks: Iterable[tuple[int, tuple]]) -> Iterator[Counter]:
    """Item counts of each block's training targets (every conversion before the cutoff)."""
    for block in blocks:
        b = T.unpack_block(block[1])
        items, counts = np.unique(b[S.ITEM_ID][b[S.TIMESTAMP] < cutoff], return_counts=True)
        yield Counter(dict(zip(items.tolist(), counts.tolist(), strict=True)))


def block_targets(cutoff: int, blocks: Iterable[tuple[int, tuple]]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Each block's training targets as ``(timestamp, item_id)`` pairs, keyed by user."""
    for block in blocks:
        user, b = block[0], T.unpack_block(block[1])
        before = b[S.TIMESTAMP] < cutoff
        yield user, list(zip(b[S.TIMESTAMP][before].tolist(), b[S.ITEM_ID][before].tolist(), strict=True))


def kept_target_counts(user_targets: tuple[int, tuple[int, list]]) -> Iterator[tuple]:
    total, kept = user_targets[1]
    if total > len(kept):
        yield count("train_targets_dropped_max_targets", total - len(kept))
    yield out(MAIN, Counter(item for _, item in kept))


def item_counts(
    blocks: beam.PCollection, cutoff: beam.PCollection, max_targets: int
) -> tuple[beam.PCollection, beam.PCollection]:
    """Training-target counts per item id (a one-element PCollection), from the validated blocks; counts."""
    keyed = blocks | "KeyConversionBlocks" >> beam.Map(by_user)
    groups = range(JOIN_GROUPS)
    if not max_targets:
        per_block = with_context("TargetCounts", keyed, cutoff, groups, block_target_counts)
        dropped = blocks.pipeline | "NoDroppedTargets" >> beam.Create([])
    else:
        kept = (
            with_context("Targets", keyed, cutoff, groups, block_targets)
            | "LastTargets" >> beam.CombinePerKey(LastTargets(max_targets))
            | "TargetCounts" >> beam.FlatMap(kept_target_counts)
        )
        kept = split(kept, "SplitTargetCounts", (MAIN, COUNT))
        per_block, dropped = kept[MAIN], kept[COUNT]
    return combine_globally("ItemCounts", per_block, MergeCounts()), dropped


STAGING_DIR = ".staging"  # under the output: the shared lookups of a run (removed when it ends)
_LOADED: dict[str, T.Lookups] = {}  # the lookups this process loaded (one run's)
_LOAD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What every batch of users needs: the cutoff and where the lookups are.

    The lookups (per-ad tables: about 100 bytes per ad) are written once, as a file, and
    loaded once per worker process (:func:`load_lookups`), rather than shipped inside the
    context to each of the ``JOIN_GROUPS`` join keys.
    """

    lookups_path: str
    cutoff: int
    metadata: dict

    @property
    def lookups(self) -> T.Lookups:
        return load_lookups(self.lookups_path)


def load_lookups(path: str) -> T.Lookups:
    """The lookups written at ``path`` (read once per process and run)."""
    with _LOAD_LOCK:
        if path not in _LOADED:
            _LOADED.clear()
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                _LOADED[path] = pickle.load(f)
        return _LOADED[path]


def build_context(g: Mapping[str, list], output: str, config: BuildConfig) -> BuildContext:
    """Lookups from the gathered tables; writes the artefacts and the shared lookups file."""
    (counts,), (stats,), (demographics,), (cutoff,) = g["counts"], g["stats"], g["demographics"], g["cutoff"]
    (items,) = g["items"]
    subjects = T.as_item_columns(g["subjects"], with_advertiser=False)
    vocabs = T.build_vocabularies(items, subjects, counts, stats[2], demographics)
    names = {int(r[S.CATEGORY_ID]): str(r[S.NAME]) for r in g["names"]} if "names" in g else None
    lookups = T.Lookups.build(vocabs, items, subjects, counts, names)
    metadata = write_artifacts(lookups, counts, int(cutoff), output, config)
    path = os.path.join(output, STAGING_DIR, f"lookups-{uuid.uuid4().hex}.pickle")
    _ensure_parent(path)
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pickle.dump(lookups, f, protocol=pickle.HIGHEST_PROTOCOL)
    return BuildContext(path, int(cutoff), metadata)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)


class BuildExamples:
    """Serialised examples of a join group's users (in batches of ``USER_BATCH``), tagged by split."""

    def __init__(self, config: BuildConfig, search: bool = False):
        self.config = config
        self.search = search

    def __call__(self, context: BuildContext, users: Iterable[T.UserData]) -> Iterator[tuple]:
        options = T.ExampleOptions(
            cutoff=context.cutoff,
            context_drop_prob=self.config.context_drop_prob,
            context_weight_jitter=self.config.context_weight_jitter,
            max_targets_per_user=self.config.max_targets_per_user,
            seed=self.config.seed,
            sequence_stride=self.config.sequence_stride,
            search=self.search,
        )
        lookups = context.lookups
        for batch in chunked(users, USER_BATCH):
            per_split = T.batch_examples(batch, lookups, options)
            for split_name, columns in per_split.items():
                for record in serialize_examples(columns, T.example_features(split_name, columns)):
                    yield split_name, record
            sequences = per_split[S.SPLIT_TRAIN_SEQUENCES]
            yield count("train_sequence_targets", int((sequences[S.SEQ_LABEL_ITEM] != S.PAD_ID).sum()))
            for request_id, items in T.eval_consumed(batch, lookups, context.cutoff):
                yield CONSUMED, json.dumps({S.REQUEST_ID: request_id, S.CONSUMED_ITEMS: items})
            if self.search:
                for request_id, items in T.eval_consumed(batch, lookups, context.cutoff, search=True):
                    yield SEARCH_CONSUMED, json.dumps({S.REQUEST_ID: request_id, S.CONSUMED_ITEMS: items})


# --------------------------------------------------------------------------------------
# Small artefacts: vocabularies, item counts, corpus, metadata
# --------------------------------------------------------------------------------------


def corpus_parquet(lookups: T.Lookups) -> bytes:
    """The corpus as Parquet, built from its columns (list columns from flat values and offsets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: _arrow_array(name, values) for name, values in lookups.corpus_columns().items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _arrow_array(name: str, values: np.ndarray) -> Any:
    import pyarrow as pa

    kind = _arrow_type(name)
    if values.ndim == 1:
        return pa.array(values, type=kind)
    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=kind.value_type), type=kind)


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    if name == S.ITEM_ID:
        return pa.int64()
    f = S.FEATURES[name]
    scalar = pa.int64() if f.dtype == "int64" else pa.float32()
    return pa.list_(scalar) if f.shape else scalar


LINES_BLOCK = 1_000_000  # lines formatted at once (bounds the text's scratch memory)


def item_counts_text(ids: np.ndarray, counts: np.ndarray) -> str:
    """``item_counts.tsv``: ``<id>\t<count>`` per line."""
    blocks = []
    for a in range(0, len(ids), LINES_BLOCK):
        pairs = zip(ids[a : a + LINES_BLOCK].tolist(), counts[a : a + LINES_BLOCK].tolist(), strict=True)
        blocks.append("".join(f"{v}\t{c}\n" for v, c in pairs))
    return "".join(blocks)


def write_artifacts(
    lookups: T.Lookups, counts: Mapping[int, int], cutoff: int, output: str, config: BuildConfig
) -> dict:
    """Vocabularies, item counts and corpus; returns the metadata (counts filled in by :func:`finalize_metadata`)."""
    for name, vocab in lookups.vocabularies.items():
        write_bytes(os.path.join(output, S.VOCAB_DIR, S.vocab_filename(name)), file_text(vocab).encode())
    ids = lookups.item_ids[S.NUM_RESERVED_IDS :]
    text = item_counts_text(ids, T.count_array(counts, ids))
    write_bytes(os.path.join(output, S.ITEM_COUNTS_FILE), text.encode())
    write_bytes(os.path.join(output, S.CORPUS_FILE), corpus_parquet(lookups))
    return {
        "schema_version": S.SCHEMA_VERSION,
        "cutoff_timestamp": int(cutoff),
        "vocab_sizes": {name: v.size for name, v in lookups.vocabularies.items()},
        "train_targets": int(sum(counts.values())),
        "options": dataclasses.asdict(config),
    }


def finalize_metadata(
    output: str,
    totals: Mapping[str, int],
    metadata: dict,
    splits: Sequence[str] = S.SPLITS,
    optional_tables: Sequence[str] = (),
) -> dict:
    """Write the metadata file with the run's counts (examples per split, dead letters, rows).

    ``splits``: the splits written; ``optional_tables``: the OPTIONAL_RAW_TABLES the data has
    (counted beside the raw tables, and listed as ``optional_tables``).
    """
    metadata = dict(metadata)
    tables = [*S.RAW_TABLES, *optional_tables]
    metadata["counts"] = {split: totals.get(f"examples_{split}", 0) for split in splits}
    metadata["train_sequence_targets"] = totals.get("train_sequence_targets", 0)
    metadata["optional_tables"] = list(optional_tables)
    metadata["dead_letter"] = {name: totals.get(f"dead_letter_{name}", 0) for name in tables}
    metadata["rows"] = {name: totals.get(f"rows_{name}", 0) for name in tables}
    metadata["pipeline_counters"] = dict(sorted(totals.items()))
    write_bytes(os.path.join(output, S.METADATA_FILE), json.dumps(metadata, indent=2).encode())
    return metadata


def _finalize(totals: dict, gathered: dict, output: str, splits: Sequence[str], optional: Sequence[str]) -> dict:
    return finalize_metadata(output, totals, gathered["metadata"][0], splits, optional)


def optional_tables(raw_dir: str) -> list[str]:
    """The OPTIONAL_RAW_TABLES present under ``raw_dir`` (decided when the pipeline is built)."""
    return [name for name in S.OPTIONAL_RAW_TABLES if FileSystems.exists(S.raw_table_path(raw_dir, name))]


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------


def _cutoff(g: Mapping[str, list], cutoff: int | None, eval_fraction: float) -> int:
    return compute_cutoff(g["stats"][0], cutoff, eval_fraction, g["quantiles"][0] if g["quantiles"] else None)


def build_pipeline(p: beam.Pipeline, config: BuildConfig) -> beam.PCollection:
    """Wire every transform of the training-data pipeline into ``p``; returns its one terminal PCollection."""
    raw, out_dir = config.input, config.output
    dead: dict[str, list] = {}
    counts: list[beam.PCollection] = []
    items, dead[S.ITEMS.name], rows = item_table(p, raw)
    counts += rows
    small = {}
    for table in (S.SUBJECT_ITEMS, S.USERS):
        small[table.name], dead[table.name], rows = small_table(p, raw, table)
        counts += rows
    subjects, users = small[S.SUBJECT_ITEMS.name], small[S.USERS.name]
    optional = optional_tables(raw)
    has_search = S.SEARCH_REQUESTS.name in optional
    names = None
    if S.CATEGORY_NAMES.name in optional:
        names, dead[S.CATEGORY_NAMES.name], rows = small_table(p, raw, S.CATEGORY_NAMES)
        counts += rows

    known = known_ids({S.ITEMS.name: items, S.SUBJECT_ITEMS.name: subjects})

    events = {}
    stats = None
    for table in (S.CONVERSIONS, S.REQUESTS, *([S.SEARCH_REQUESTS] if has_search else [])):
        checked = validated_events(p, raw, table, known)
        events[table.name] = checked[MAIN]
        dead[table.name] = [checked[DEAD]]
        counts.append(checked[COUNT])
        if table is S.CONVERSIONS:
            stats = combine_globally("Stats", checked[STATS], StatsFn())
        else:
            events[table.name], duplicates, uncounted = dedupe_requests(checked[MAIN], table)
            dead[table.name].append(duplicates)
            counts.append(uncounted)

    timestamps = events[S.REQUESTS.name] | "RequestTimestamps" >> beam.FlatMap(
        lambda b: T.unpack_block(b[1])[S.TIMESTAMP].tolist()
    )
    quantiles = combine_globally(
        "RequestQuantiles", timestamps, ApproximateQuantilesCombineFn.create(num_quantiles=QUANTILES)
    )
    cutoff = gather("Cutoff", {"stats": stats, "quantiles": quantiles}) | "ComputeCutoff" >> beam.Map(
        _cutoff, config.cutoff, config.eval_fraction
    )
    keyed_users = users | "KeyUsers" >> beam.Map(lambda r: (int(r[S.USER_ID]), r))
    per_user = (
        {**events, S.USERS.name: keyed_users}
        | "GroupByUser" >> beam.CoGroupByKey()
        | "AssembleUser" >> beam.FlatMap(assemble_user)
    )
    per_user = split(per_user, "SplitUsers", (MAIN, COUNT))
    counts.append(per_user[COUNT])
    target_counts, dropped = item_counts(events[S.CONVERSIONS.name], cutoff, config.max_targets_per_user)
    counts.append(dropped)
    demographics = combine_globally(
        "DemographicCounts", users | "DemographicValues" >> beam.Map(demographic_counts), MergeDemographics()
    )
    gathered = {
        "items": items,
        "subjects": subjects,
        "counts": target_counts,
        "stats": stats,
        "demographics": demographics,
        "cutoff": cutoff,
    }
    if names is not None:
        gathered["names"] = names
    context = gather("Context", gathered) | "BuildContext" >> beam.Map(build_context, out_dir, config)
    artifacts = context | "Metadata" >> beam.Map(lambda c: c.metadata)

    keyed = per_user[MAIN] | "KeyUserData" >> beam.Map(lambda u: (group_key(u.user_id), u))
    examples = with_context("BuildExamples", keyed, context, range(JOIN_GROUPS), BuildExamples(config, has_search))
    splits = (*S.SPLITS, *(S.SEARCH_SPLITS if has_search else ()))
    tags = (*splits, CONSUMED, *((SEARCH_CONSUMED,) if has_search else ()), COUNT)
    examples = split(examples, "SplitExamples", tags)
    counts.append(examples[COUNT])
    shards = config.num_shards or AUTO_SHARDS
    for split_name in splits:
        sink = Sink(
            os.path.join(out_dir, split_name, "part"), S.TFRECORD_SUFFIX, shards, "tfrecord", f"examples_{split_name}"
        )
        counts.append(write_shards(f"Write{split_name}", examples[split_name], sink))
    consumed = Sink(os.path.join(out_dir, S.EVAL_CONSUMED_DIR, "part"), ".jsonl", shards, "text", "eval_consumed")
    counts.append(write_shards("WriteEvalConsumed", examples[CONSUMED], consumed))
    if has_search:
        path = os.path.join(out_dir, S.EVAL_SEARCH_CONSUMED_DIR, "part")
        sink = Sink(path, ".jsonl", shards, "text", "eval_search_consumed")
        counts.append(write_shards("WriteEvalSearchConsumed", examples[SEARCH_CONSUMED], sink))
    counts += write_dead_letters(dead, out_dir)
    return finish(
        "Finish", counts, lambda totals, g: _finalize(totals, g, out_dir, splits, optional), {"metadata": artifacts}
    )


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def clear_outputs(output: str) -> None:
    """Remove the shards and dead letters of a previous run (their count may differ)."""
    dirs = (*S.SPLITS, *S.SEARCH_SPLITS, S.EVAL_CONSUMED_DIR, S.EVAL_SEARCH_CONSUMED_DIR)
    patterns = [os.path.join(output, split, "part-*") for split in dirs]
    patterns.append(os.path.join(output, DEAD_LETTER_DIR, "*.jsonl"))
    patterns.append(os.path.join(output, STAGING_DIR, "*"))
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def run(argv: Sequence[str] | None = None, save_main_session: bool = True) -> dict:
    """Build the training data; returns the metadata written to ``metadata.json``."""
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = save_main_session
    config = BuildConfig.from_options(options)
    clear_outputs(config.output)
    try:
        run_pipeline(options, lambda p: build_pipeline(p, config))
    finally:
        _LOADED.clear()
        staging = os.path.join(config.output, STAGING_DIR)
        if FileSystems.exists(staging):
            FileSystems.delete([staging])
    with FileSystems.open(os.path.join(config.output, S.METADATA_FILE)) as f:
        metadata = json.loads(f.read())
    summary = {k: metadata[k] for k in ("counts", "dead_letter", "cutoff_timestamp", "vocab_sizes")}
    print(json.dumps(summary, indent=2))
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``tfrs-ctx build-data``)."""
    return cli_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
