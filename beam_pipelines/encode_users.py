"""Beam: raw conversions + the encoder SavedModel -> per-user encoded histories for Feast.

    python -m beam_pipelines.encode_users --raw RAW_DIR --model models/encoder --output STORE_DIR \\
        [--full] [--as_of TS] [--event_timestamp TS] [--min_batch_size 64] [--max_batch_size 512] \\
        [--output_shards 1] [--xla] [Beam options, e.g. --direct_running_mode=multi_processing --direct_num_workers=2
        | --runner DaskRunner [--dask_workers 2 | --dask_client_address tcp://HOST:8786]]

What it does
------------
1. Picks the encoder: ``--model`` is a TF Serving base path (``models/encoder``: its highest
   integer version) or one version directory; the version comes from
   ``assets.extra/model_info.json``.
2. Selects users: on the first run, with ``--full``, when the model version changed since
   the last run or when the store's layout (``encode_state.json`` ``store_schema_version``,
   absent = 1) is not :data:`tfrs_ctx.schema.STORE_SCHEMA_VERSION` (the migration), every user
   with a conversion; otherwise only users with a conversion newer than the *watermark* (the
   newest conversion timestamp a previous run processed, kept in ``STORE_DIR/encode_state.json``).
   Conversions are validated like the training pipeline's: bad rows go to
   ``STORE_DIR/dead_letter/run-<event_ts>-<table>-*.jsonl`` (with the reason; only non-empty
   files are kept) and are counted in the summary's ``dead_letter``; for every table read, the
   rows read equal ``rows`` (kept) plus ``dead_letter``.
3. Builds each selected user's latest history with the training examples' functions: their
   last ``MAX_HISTORY`` conversions at or before the reference time ``--as_of`` (default: the
   newest conversion in the data), time gaps bucketed relative to it, left-padded; raw ids and
   event-type strings, as the encoder signature takes them.
4. Runs the encoder with Beam ``RunInference`` (:class:`EncoderModelHandler`: the multi-input
   SavedModel signature loaded once per worker process) on batches of up to
   ``--max_batch_size`` user dicts, formed per join group (``with_no_batching``: no
   ``BatchElements``, which loses batches on the DaskRunner).
5. Writes Parquet a Feast ``FileSource`` reads (names from :mod:`tfrs_ctx.schema`):
   ``STORE_DIR/user_encodings/run-<event_ts>-v<version>-part-*.parquet`` (``user_id``,
   ``event_timestamp``, ``encoded_history`` list<float32> (row-major ``[N, d]``: ``N`` = 1 for concat
   fusion, ``model.fusion_states`` for cross-attention), ``history_length``,
   ``model_version``); every run *adds* files, and Feast serves the newest row per user.
   Snapshots of the ``users`` (raw demographic strings, null when missing) and
   ``subject_items`` (top ``MAX_CATEGORIES`` categories by confidence) tables go to
   ``user_demographics.parquet`` / ``subject_items.parquet``, re-exported when their raw
   files changed (or with ``--full``).

Every output row is stamped ``event_timestamp`` = the run's ``--event_timestamp`` (default:
now; always later than the previous run's), so ``feast materialize-incremental <now>``
picks up exactly what a run wrote. Outputs are staged under ``STORE_DIR/.staging/`` and
moved into place only after the pipeline succeeded; the state file is updated last. A user
with no conversions gets no row. Users encoded / skipped, rows and dead letters are counted in
the pipeline itself (its last step writes them to the run's summary), printed at the end.

Runs on the DirectRunner by default (in-process, or ``multi_processing`` workers) without
Beam's switch to the Prism runner; ``--runner DaskRunner`` runs it on a ``dask.distributed``
cluster (:mod:`beam_pipelines.runner`) with the same output; ``--runner`` picks any other Beam
runner.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m` runs this file as __main__: hand over to the importable module, so the
    # classes Beam pickles (options, DoFns, the model handler) exist once, under their name.
    from beam_pipelines.encode_users import main

    sys.exit(main())

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from beam_pipelines.combiners import StatsFn
from beam_pipelines.encoder_inference import EncoderModelHandler
from beam_pipelines.item_table import item_table
from beam_pipelines.portable import (
    COUNT,
    DEAD,
    JOIN_GROUPS,
    MAIN,
    Sink,
    chunked,
    combine_globally,
    count,
    finish,
    group_key,
    out,
    split,
    with_context,
    write_shards,
)
from beam_pipelines.runner import OutputOptions, cli_main, run_pipeline, silence_beam_resource_noise
from beam_pipelines.store_rows import (
    demographics_row,
    demographics_schema,
    encoding_row,
    encoding_schema,
    subject_item_row,
    subject_items_schema,
)
from beam_pipelines.tables import (
    DEAD_LETTER_DIR,
    STATS,
    USER_BATCH,
    known_ids,
    small_table,
    validated_events,
    write_bytes,
    write_dead_letters,
)
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.data import examples as T
from tfrs_ctx.data import rawio

SUMMARY_FILE = "summary.json"  # in the run's staging directory: as_of and the newest conversion
STAGED_ENCODINGS = "encodings"  # staging prefix of the encoding shards
SNAPSHOT_TABLES = (S.USERS, S.SUBJECT_ITEMS)
USER_COUNTERS = ("users_encoded", "users_skipped_no_new_activity", "users_without_history")

silence_beam_resource_noise()  # at import: in this process and in every Beam worker that loads the pipeline


class EncodeUsersOptions(OutputOptions):
    """The pipeline's own flags."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add = parser.add_argument
        add("--raw", help="raw-table directory (RAW_DIR/<table>/*.parquet|*.jsonl)")
        add("--model", help="encoder SavedModel: base path (highest integer version) or a version directory")
        add("--full", action="store_true", default=False, help="encode every user, not only users with new events")
        add("--as_of", type=int, default=None, help="reference time (unix s); default: the newest conversion")
        add("--event_timestamp", type=int, default=None, help="timestamp of the rows written (unix s); default now")
        add("--min_batch_size", type=int, default=64, help="unused (batches: up to --max_batch_size)")
        add("--max_batch_size", type=int, default=512, help="RunInference: largest batch of users")
        add("--output_shards", type=int, default=0, help="encoding files per run (0: 1)")
        add("--xla", action="store_true", default=False, help="encoder with XLA auto-clustering (fresh workers)")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Validated pipeline flags."""

    raw: str
    model: str
    output: str
    full: bool
    as_of: int | None
    event_timestamp: int | None
    min_batch_size: int
    max_batch_size: int
    output_shards: int
    xla: bool

    @classmethod
    def from_options(cls, options: PipelineOptions) -> EncodeConfig:
        o = options.view_as(EncodeUsersOptions)
        if not (o.raw and o.model and o.output):
            raise ValueError("--raw, --model and --output are required")
        if not 1 <= o.min_batch_size <= o.max_batch_size:
            raise ValueError("need 1 <= --min_batch_size <= --max_batch_size")
        if o.output_shards < 0:
            raise ValueError("--output_shards must be >= 0")
        return cls(**{f.name: getattr(o, f.name) for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------
# Model, state and the run plan
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncoderModel:
    path: str  # the version directory
    version: int
    time_gap: str = S.TIME_GAP_TO_TARGET  # the history gap semantics it was trained with (model_info.json)


def resolve_model(path: str) -> EncoderModel:
    """The encoder version directory ``path`` names (a base path: its highest integer version)."""
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        versions = [
            d for d in os.listdir(path) if d.isdigit() and os.path.isfile(os.path.join(path, d, "saved_model.pb"))
        ]
        if not versions:
            raise FileNotFoundError(f"no SavedModel under {path} (expected <path>/<integer version>/saved_model.pb)")
        path = os.path.join(path, max(versions, key=int))
    info_path = os.path.join(path, "assets.extra", S.MODEL_INFO_FILE)
    with open(info_path) as f:
        info = json.load(f)
    # Exports before the time_gap entry all trained on gaps to the target.
    return EncoderModel(os.path.abspath(path), int(info[S.MODEL_VERSION]), info.get("time_gap", S.TIME_GAP_TO_TARGET))


@dataclasses.dataclass
class EncodeState:
    """What the previous runs left: ``STORE_DIR/encode_state.json``."""

    watermark: int | None = None  # newest conversion timestamp processed
    model_version: int | None = None
    event_timestamp: int | None = None  # of the last run's rows
    as_of: int | None = None
    snapshots: dict[str, str] = dataclasses.field(default_factory=dict)  # raw table -> fingerprint
    last_run: dict[str, Any] = dataclasses.field(default_factory=dict)
    store_schema_version: int | None = None  # the rows' layout (S.STORE_SCHEMA_VERSION); absent: 1

    @property
    def store_layout(self) -> int:
        return 1 if self.store_schema_version is None else int(self.store_schema_version)

    @classmethod
    def load(cls, path: str) -> EncodeState:
        if not FileSystems.exists(path):
            return cls()
        with FileSystems.open(path) as f:
            return cls(**json.loads(f.read()))

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        write_bytes(tmp, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode())
        FileSystems.rename([tmp], [path])


def snapshot_has_ad_id(path: str) -> bool:
    """Whether a ``subject_items`` snapshot has the AD_ID column the Feast view reads (older stores do not)."""
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        return S.AD_ID in pq.read_schema(f).names


def table_fingerprint(raw_dir: str, table: S.Table) -> str:
    """A hash of a raw table's file names, sizes and modification times."""
    stats = {os.path.basename(p): os.stat(p) for p in rawio.table_files(raw_dir, table)}
    files = [(name, st.st_size, st.st_mtime_ns) for name, st in sorted(stats.items())]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run does, decided before the pipeline is built."""

    full: bool
    reason: str
    watermark: int | None  # users with a conversion after it are encoded (None: everyone)
    event_timestamp: int
    snapshots: dict[str, str]  # raw table -> fingerprint now
    export_snapshots: bool
    staging: str

    @property
    def tag(self) -> str:
        return f"run-{self.event_timestamp}"


def plan_run(config: EncodeConfig, model: EncoderModel, state: EncodeState, paths: F.StorePaths) -> RunPlan:
    """Full or incremental, the rows' timestamp, whether the snapshots are re-exported."""
    if config.full:
        full, reason = True, "--full"
    elif state.watermark is None:
        full, reason = True, "first run"
    elif state.model_version != model.version:
        full, reason = True, f"model version changed ({state.model_version} -> {model.version})"
    elif state.store_layout != S.STORE_SCHEMA_VERSION:  # the migration: one full run rewrites every row
        full, reason = True, f"store schema version changed ({state.store_layout} -> {S.STORE_SCHEMA_VERSION})"
    else:
        full, reason = False, f"incremental (conversions after {state.watermark})"
    last = state.event_timestamp or 0
    if config.event_timestamp is not None and config.event_timestamp <= last:
        raise ValueError(f"--event_timestamp {config.event_timestamp} must be after the last run's ({last})")
    event_ts = config.event_timestamp if config.event_timestamp is not None else max(int(time.time()), last + 1)
    snapshots = {t.name: table_fingerprint(config.raw, t) for t in SNAPSHOT_TABLES}
    present = all(FileSystems.exists(p) for p in (paths.demographics, paths.subject_items))
    present = present and snapshot_has_ad_id(paths.subject_items)  # a store from before ad_id: re-export
    return RunPlan(
        full=full,
        reason=reason,
        watermark=None if full else state.watermark,
        event_timestamp=event_ts,
        snapshots=snapshots,
        export_snapshots=full or not present or snapshots != state.snapshots,
        staging=os.path.join(paths.staging, f"run-{event_ts}"),
    )


# --------------------------------------------------------------------------------------
# Histories
# --------------------------------------------------------------------------------------
def raw_histories(
    users: Sequence[T.UserEvents], as_of: int, time_gap: str = S.TIME_GAP_TO_TARGET
) -> dict[str, np.ndarray]:
    """The encoder's raw inputs ``[B, MAX_HISTORY]`` / ``[B]``: each user's last events at or before ``as_of``.

    Left-padded (ids 0, event type ``""``, gap bucket ``PAD_ID``); gap buckets in the model's
    ``time_gap`` semantics (``model_info.json``): ``to_target``: each event's gap to ``as_of``
    (the request time stand-in); ``next_event``: to the next event, the last one's to ``as_of``.
    Same windowing as the training examples
    (:func:`tfrs_ctx.data.examples.window_positions`, :func:`~tfrs_ctx.data.examples.time_gap_buckets`).
    """
    lengths = np.asarray([len(u) for u in users], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    ends = starts + np.asarray([np.searchsorted(u.timestamp, as_of, side="right") for u in users], dtype=np.int64)
    positions = T.window_positions(ends.reshape(-1), starts.reshape(-1))
    valid = positions >= 0
    p = np.where(valid, positions, 0)

    def take(field: str, pad: Any) -> np.ndarray:
        values = np.concatenate([getattr(u, field) for u in users]) if users else np.zeros(0, dtype=np.int64)
        return np.where(valid, values[p], pad) if len(values) else np.full(p.shape, pad)

    event_ts = take("timestamp", as_of)
    if time_gap == S.TIME_GAP_NEXT_EVENT:
        gaps = np.concatenate([event_ts[:, 1:], np.full((len(users), 1), as_of, dtype=np.int64)], axis=1) - event_ts
    elif time_gap == S.TIME_GAP_TO_TARGET:
        gaps = as_of - event_ts
    else:
        raise ValueError(f"unknown time_gap semantics {time_gap!r} (model_info.json)")
    return {
        S.HISTORY_ITEM: take("item", S.PAD_ID).astype(np.int64),
        S.HISTORY_ADVERTISER: take("advertiser", S.PAD_ID).astype(np.int64),
        S.HISTORY_EVENT_TYPE: take("event_type", S.MISSING_STRING).astype(object),
        S.HISTORY_TIME_GAP: np.where(valid, T.time_gap_buckets(gaps), S.PAD_ID).astype(np.int64),
        S.HISTORY_LENGTH: valid.sum(axis=1).astype(np.int64),
    }


def user_events(packed_blocks: Iterable[tuple]) -> T.UserEvents:
    return T.UserEvents.from_blocks([T.unpack_block(b) for b in packed_blocks])


class BuildHistories:
    """A join group's ``(user_id, packed blocks)`` -> batches of ``(user_id, encoder inputs)`` of the selected users.

    Users are taken ``USER_BATCH`` at a time; the selected ones go out in batches of up to
    ``batch_size`` (the group's last batch may be smaller), the batches RunInference runs.
    """

    def __init__(self, watermark: int | None, time_gap: str = S.TIME_GAP_TO_TARGET, batch_size: int = 512):
        self.watermark, self.time_gap, self.batch_size = watermark, time_gap, batch_size

    def __call__(self, window: Mapping[str, Any], users: Iterable[tuple[int, Iterable[tuple]]]) -> Iterator[tuple]:
        as_of = window["as_of"]
        pending: list[tuple[int, dict]] = []
        for chunk in chunked(users, USER_BATCH):
            selected, events, skipped, without = [], [], 0, 0
            for user_id, blocks in chunk:
                e = user_events(blocks)
                n = int(np.searchsorted(e.timestamp, as_of, side="right"))
                if n == 0:
                    without += 1
                elif self.watermark is not None and e.timestamp[n - 1] <= self.watermark:
                    skipped += 1
                else:
                    selected.append(int(user_id))
                    events.append(e)
            tallies = {"users_without_history": without, "users_skipped_no_new_activity": skipped}
            tallies["users_selected"] = len(selected)
            yield from (count(name, k) for name, k in tallies.items() if k)
            if selected:
                inputs = raw_histories(events, as_of, self.time_gap)
                pending += [(u, {name: values[i] for name, values in inputs.items()}) for i, u in enumerate(selected)]
            while len(pending) >= self.batch_size:
                yield out(MAIN, pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if pending:
            yield out(MAIN, pending)


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Output rows
# --------------------------------------------------------------------------------------


def resolve_window(stats: tuple, as_of: int | None) -> dict[str, Any]:
    """The reference time (``--as_of``, else the newest valid conversion) and the newest conversion."""
    if as_of is None and stats[1] is None:
        raise ValueError("no valid conversions: nothing to encode (pass --as_of to run anyway)")
    return {"as_of": int(as_of if as_of is not None else stats[1]), "max_timestamp": stats[1]}


def write_summary(totals: dict[str, int], gathered: dict[str, list], path: str) -> dict:
    """The run's summary in its staging directory: the time window and every count."""
    summary = {**gathered["window"][0], "counts": totals}
    write_bytes(path, json.dumps(summary).encode())
    return summary


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------
def snapshot_sink(path: str, name: str, schema: Any) -> Sink:
    """One Parquet file at exactly ``path``."""
    return Sink(path.removesuffix(".parquet"), ".parquet", 1, "parquet", f"snapshot_{name}", False, schema)


def export_snapshots(p: beam.Pipeline, config: EncodeConfig, plan: RunPlan) -> list[beam.PCollection]:
    """The users and subject_items tables as Feast sources (validated, one row per key); their counts."""
    event_us = plan.event_timestamp * 1_000_000
    users, dead_users, counts = small_table(p, config.raw, S.USERS)
    subjects, dead_subjects, subject_counts = small_table(p, config.raw, S.SUBJECT_ITEMS)
    counts += subject_counts
    counts += write_dead_letters({S.USERS.name: dead_users, S.SUBJECT_ITEMS.name: dead_subjects}, plan.staging)
    staged = {name: os.path.join(plan.staging, name) for name in (S.USER_DEMOGRAPHICS_FILE, S.SUBJECT_ITEMS_FILE)}
    demographics = users | "DemographicsRows" >> beam.Map(demographics_row, event_us)
    sink = snapshot_sink(staged[S.USER_DEMOGRAPHICS_FILE], "demographics", demographics_schema())
    counts.append(write_shards("WriteDemographics", demographics, sink))
    subject_rows = subjects | "SubjectItemRows" >> beam.Map(subject_item_row, event_us)
    sink = snapshot_sink(staged[S.SUBJECT_ITEMS_FILE], "subject_items", subject_items_schema())
    counts.append(write_shards("WriteSubjectItems", subject_rows, sink))
    return counts


def build_pipeline(p: beam.Pipeline, config: EncodeConfig, model: EncoderModel, plan: RunPlan) -> beam.PCollection:
    """Wire the user-encoding pipeline into ``p``; returns its one terminal PCollection."""
    items, dead_items, counts = item_table(p, config.raw)
    checked = validated_events(p, config.raw, S.CONVERSIONS, known_ids({S.ITEMS.name: items}))
    counts.append(checked[COUNT])
    counts += write_dead_letters({S.ITEMS.name: dead_items, S.CONVERSIONS.name: [checked[DEAD]]}, plan.staging)
    stats = combine_globally("Stats", checked[STATS], StatsFn())
    window = stats | "Window" >> beam.Map(resolve_window, config.as_of)
    handler = KeyedModelHandler(
        EncoderModelHandler(model.path, config.min_batch_size, config.max_batch_size, config.xla)
    ).with_no_batching()
    users = (
        checked[MAIN]
        | "GroupByUser" >> beam.GroupByKey()
        | "KeyUsers" >> beam.Map(lambda kv: (group_key(kv[0]), (kv[0], list(kv[1]))))
    )
    histories = with_context(
        "Histories",
        users,
        window,
        range(JOIN_GROUPS),
        BuildHistories(plan.watermark, model.time_gap, config.max_batch_size),
    )
    histories = split(histories, "SplitHistories", (MAIN, COUNT))
    counts.append(histories[COUNT])
    rows = (
        histories[MAIN]
        | "Encode" >> RunInference(handler)
        | "EncodingRows" >> beam.Map(encoding_row, plan.event_timestamp * 1_000_000)
    )
    sink = Sink(
        os.path.join(plan.staging, STAGED_ENCODINGS, "part"),
        ".parquet",
        config.output_shards or 1,
        "parquet",
        "users_encoded",
        schema=encoding_schema(),
        shard_field=S.USER_ID,
        every_shard=False,
    )
    counts.append(write_shards("WriteEncodings", rows, sink))
    if plan.export_snapshots:
        counts += export_snapshots(p, config, plan)
    path = os.path.join(plan.staging, SUMMARY_FILE)
    return finish("Finish", counts, lambda totals, g: write_summary(totals, g, path), {"window": window})


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def _matches(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def publish(plan: RunPlan, paths: F.StorePaths, users_encoded: int) -> list[str]:
    """Move a successful run's staged files into the store; returns the published paths."""
    staged = _matches(os.path.join(plan.staging, STAGED_ENCODINGS, "part-*.parquet"))
    published = []
    if users_encoded and staged:
        if not FileSystems.exists(paths.encodings):
            FileSystems.mkdirs(paths.encodings)
        published = [os.path.join(paths.encodings, f"{plan.tag}-{os.path.basename(s)}") for s in staged]
        FileSystems.rename(staged, published)
    if plan.export_snapshots:
        sources = [os.path.join(plan.staging, name) for name in (S.USER_DEMOGRAPHICS_FILE, S.SUBJECT_ITEMS_FILE)]
        FileSystems.rename(sources, [paths.demographics, paths.subject_items])
        published += [paths.demographics, paths.subject_items]
    return published


def publish_dead_letters(plan: RunPlan, paths: F.StorePaths) -> list[str]:
    """Move a run's non-empty staged dead-letter files to ``STORE_DIR/dead_letter/``; returns their paths."""
    staged = [
        m.path
        for m in FileSystems.match([os.path.join(plan.staging, DEAD_LETTER_DIR, "*.jsonl")])[0].metadata_list
        if m.size_in_bytes > 0
    ]
    if not staged:
        return []
    target = os.path.join(paths.root, DEAD_LETTER_DIR)
    if not FileSystems.exists(target):
        FileSystems.mkdirs(target)
    published = [os.path.join(target, f"{plan.tag}-{os.path.basename(s)}") for s in sorted(staged)]
    FileSystems.rename(sorted(staged), published)
    return published


def next_watermark(plan: RunPlan, state: EncodeState, window: Mapping[str, Any]) -> int | None:
    """The newest conversion this run processed; an incremental run never moves it back."""
    newest = window["max_timestamp"]
    processed = min(window["as_of"], newest) if newest is not None else None
    candidates = [w for w in (processed, None if plan.full else state.watermark) if w is not None]
    return max(candidates) if candidates else None


def _remove(path: str) -> None:
    if FileSystems.exists(path):
        FileSystems.delete([path])


def run(argv: Sequence[str] | None = None, save_main_session: bool = False) -> dict[str, Any]:
    """Encode the selected users into the store; returns (and prints) the run summary."""
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = save_main_session
    config = EncodeConfig.from_options(options)
    paths = F.store_paths(config.output)
    model = resolve_model(config.model)
    state = EncodeState.load(paths.state)
    plan = plan_run(config, model, state, paths)
    _remove(paths.staging)  # leftovers of a failed run
    run_pipeline(options, lambda p: build_pipeline(p, config, model, plan))
    with FileSystems.open(os.path.join(plan.staging, SUMMARY_FILE)) as f:
        window = json.loads(f.read())
    totals = window["counts"]
    counts = {name: totals.get(name, 0) for name in USER_COUNTERS}
    published = publish(plan, paths, counts["users_encoded"])
    dead_letter_files = publish_dead_letters(plan, paths)
    _remove(paths.staging)
    tables = (S.CONVERSIONS, S.ITEMS, *(SNAPSHOT_TABLES if plan.export_snapshots else ()))
    watermark = next_watermark(plan, state, window)
    summary = {
        "mode": plan.reason,
        "model_version": model.version,
        "model_path": model.path,
        "store_schema_version": S.STORE_SCHEMA_VERSION,
        "as_of": window["as_of"],
        "event_timestamp": plan.event_timestamp,
        "watermark": watermark,
        **counts,
        "rows": {t.name: totals.get(f"rows_{t.name}", 0) for t in tables},
        "dead_letter": {t.name: totals.get(f"dead_letter_{t.name}", 0) for t in tables},
        "dead_letter_files": dead_letter_files,
        "snapshots_exported": plan.export_snapshots,
        "files": published,
    }
    EncodeState(
        watermark=summary["watermark"],
        model_version=model.version,
        event_timestamp=plan.event_timestamp,
        as_of=window["as_of"],
        snapshots=plan.snapshots if plan.export_snapshots else state.snapshots,
        last_run={k: summary[k] for k in ("mode", "as_of", *USER_COUNTERS)},
        store_schema_version=S.STORE_SCHEMA_VERSION,
    ).save(paths.state)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``python -m beam_pipelines.encode_users``)."""
    return cli_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
