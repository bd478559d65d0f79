"""Beam: raw tables -> sharded gzip TFRecords, vocabularies, ad corpus and metadata.

    python -m beam_pipelines.build_training_data --input RAW_DIR --output DATA_DIR \\
        [--cutoff TS] [--eval_fraction 0.2] [--context_drop_prob 0.3] [--context_weight_jitter 0.2] \\
        [--max_targets_per_user 0] [--sequence_stride 25] [--num_shards 4 (0: runner-decided)] [--seed 0]
        [Beam options, e.g.
        --direct_running_mode=multi_processing --direct_num_workers=2 | --runner=DataflowRunner ...]

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
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.transforms.stats import ApproximateQuantiles

from beam_pipelines.combiners import LastTargets, MergeCounts, MergeDemographics, StatsFn, demographic_counts
from beam_pipelines.runner import NAMESPACE, OutputOptions, cli_main, counters, make_runner
from beam_pipelines.tables import (
    DEAD,
    DEAD_LETTER_DIR,
    STATS,
    USER_BATCH,
    count_row,
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
from tfrs_ctx.data.vocab import vocab_text

S = schema
DUP = "dup"
CONSUMED = "consumed"  # BuildExamples' output of the eval requests' consumed items


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
def assemble_user(item: tuple[int, Mapping[str, Sequence]]) -> Iterator[T.UserData]:
    """One user's grouped blocks and users row -> :class:`tfrs_ctx.data.examples.UserData` (none without events)."""
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
            sequence_stride=self.config.sequence_stride,
        )
        per_split = T.batch_examples(users, lookups, options)
        for split in S.SPLITS:
            serialized = serialize_examples(per_split[split], S.split_features(split))
            Metrics.counter(NAMESPACE, f"examples_{split}").inc(len(serialized))
            for record in serialized:
                yield beam.pvalue.TaggedOutput(split, record)
        sequences = per_split[S.SPLIT_TRAIN_SEQUENCES]
        Metrics.counter(NAMESPACE, "train_sequence_targets").inc(int((sequences[S.SEQ_LABEL_ITEM] != S.PAD_ID).sum()))
        for request_id, items in T.eval_consumed(users, lookups, cutoff):
            yield beam.pvalue.TaggedOutput(CONSUMED, json.dumps({S.REQUEST_ID: request_id, S.CONSUMED_ITEMS: items}))


# --------------------------------------------------------------------------------------
# Small artefacts: vocabularies, item counts, corpus, metadata
# --------------------------------------------------------------------------------------


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


def build_pipeline(p: beam.Pipeline, config: BuildConfig) -> None:
    """Wire every transform of the training-data pipeline into ``p``."""
    raw, out = config.input, config.output
    dead: dict[str, list] = {}
    items, dead[S.ITEMS.name] = small_table(p, raw, S.ITEMS)
    subjects, dead[S.SUBJECT_ITEMS.name] = small_table(p, raw, S.SUBJECT_ITEMS)
    users, dead[S.USERS.name] = small_table(p, raw, S.USERS)

    known = known_ids(p, {S.ITEMS.name: items, S.SUBJECT_ITEMS.name: subjects})

    events = {}
    stats = None
    for table in (S.CONVERSIONS, S.REQUESTS):
        checked = validated_events(p, raw, table, known)
        events[table.name] = checked.blocks
        dead[table.name] = [checked[DEAD]]
        if table is S.CONVERSIONS:
            stats = checked[STATS] | "Stats" >> beam.CombineGlobally(StatsFn())
        else:
            events[table.name], duplicates = dedupe_requests(checked.blocks)
            dead[table.name].append(duplicates)

    quantiles = (
        events[S.REQUESTS.name]
        | "RequestTimestamps" >> beam.FlatMap(lambda b: T.unpack_block(b[1])[S.TIMESTAMP].tolist())
        | "RequestQuantiles" >> ApproximateQuantiles.Globally(QUANTILES)
    )
    cutoff = stats | "Cutoff" >> beam.Map(
        compute_cutoff, config.cutoff, config.eval_fraction, beam.pvalue.AsSingleton(quantiles)
    )
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
        ).with_outputs(*S.SPLITS, CONSUMED)
    )
    write_examples(examples, out, config.num_shards)
    _ = examples[CONSUMED] | "WriteEvalConsumed" >> beam.io.WriteToText(
        os.path.join(out, S.EVAL_CONSUMED_DIR, "part"), file_name_suffix=".jsonl"
    )
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


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def clear_outputs(output: str) -> None:
    """Remove the shards and dead letters of a previous run (their count may differ)."""
    patterns = [os.path.join(output, split, "part-*") for split in (*S.SPLITS, S.EVAL_CONSUMED_DIR)]
    patterns.append(os.path.join(output, DEAD_LETTER_DIR, "*.jsonl"))
    stale = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    if stale:
        FileSystems.delete(stale)


def finalize_metadata(output: str, totals: Mapping[str, int]) -> dict:
    """Add the run's counts (examples per split, dead letters, rows) to the metadata file."""
    path = os.path.join(output, S.METADATA_FILE)
    with FileSystems.open(path) as f:
        metadata = json.loads(f.read())
    metadata["counts"] = {split: totals.get(f"examples_{split}", 0) for split in S.SPLITS}
    metadata["train_sequence_targets"] = totals.get("train_sequence_targets", 0)
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
