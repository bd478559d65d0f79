"""The one schema: raw tables, vocabularies, TFRecord features, shapes and padding.

Every other module (Beam pipelines, tf.data parser, model, exported signatures, Feast
views, serving client) imports names and shapes from here. No feature name is spelled
anywhere else.

Conventions
-----------
* Raw ids (users, items, advertisers, interest categories) are int64; demographic fields
  and event types are strings; timestamps are int64 unix seconds (UTC).
* Vocabulary indices: ``PAD_ID`` (0) is padding *and* "missing", ``OOV_ID`` (1) is
  out-of-vocabulary, known values start at ``NUM_RESERVED_IDS`` (2). A vocabulary file
  holds one raw value per line; line ``i`` maps to index ``i + NUM_RESERVED_IDS``.
* Histories are left-padded (``PAD_SIDE = "left"``): the most recent event sits at the
  last position, so the last valid hidden state of an encoder is position ``-1``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

SCHEMA_VERSION = 2  # 2: HISTORY_NEXT_GAP, the train_sequences split (SEQUENCE_FEATURES), eval_consumed
# The online store's layout of ENCODED_HISTORY (encode_state.json, model_info.json "store_schema_version"):
# 1: the last hidden state, [d]. 2: a flat row-major [N, d] (N = model_info "fusion_states", 1 row = [d] for
# concat models, so every version-1 row is a valid version-2 row), rows before the history's first event zero.
STORE_SCHEMA_VERSION = 2

# --------------------------------------------------------------------------------------
# Shapes and padding
# --------------------------------------------------------------------------------------
MAX_HISTORY = 50  # L: events kept per history
MAX_CATEGORIES = 5  # C: interest categories kept per item / context
PAD_SIDE = "left"
PAD_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2
MISSING_STRING = ""  # how a missing demographic value is written in vocab lookups

# Upper edges (seconds) of the time-gap buckets of a history event (see TIME_GAP_* below).
# Bucket 0 is padding; a gap g falls in bucket 1 + (number of edges < g).
TIME_GAP_EDGES = (60, 600, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 90 * 86400)
NUM_TIME_GAP_BUCKETS = len(TIME_GAP_EDGES) + 2

MIN_TIMESTAMP = 631_152_000  # 1990-01-01
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01

EVENT_CHECKOUT = "checkout"
EVENT_ADD_TO_CART = "add_to_cart"
EVENT_SIGNUP = "signup"
EVENT_LEAD = "lead"
EVENT_PAGE_VISIT = "page_visit"
EVENT_TYPES = (EVENT_CHECKOUT, EVENT_ADD_TO_CART, EVENT_SIGNUP, EVENT_LEAD, EVENT_PAGE_VISIT)


# What a history event's time gap measures (``model_info.json`` "time_gap"; ``model.time_gap``):
# * TIME_GAP_TO_TARGET: the gap from the event to the target / request time (``as_of`` when encoding).
# * TIME_GAP_NEXT_EVENT: the gap from the event to the *next* event of the history, the last event's
#   to the target / request time. A causal pass over a sequence needs this one: a position's inputs
#   must not depend on which later position is the target. Dense training uses it.
TIME_GAP_TO_TARGET = "to_target"
TIME_GAP_NEXT_EVENT = "next_event"
TIME_GAP_SEMANTICS = (TIME_GAP_TO_TARGET, TIME_GAP_NEXT_EVENT)


def time_gap_bucket(gap_seconds: int) -> int:
    """Bucket of the gap between a history event and its target (1..NUM_TIME_GAP_BUCKETS-1)."""
    import bisect

    return 1 + bisect.bisect_left(TIME_GAP_EDGES, max(int(gap_seconds), 0))


# --------------------------------------------------------------------------------------
# Raw tables
# --------------------------------------------------------------------------------------
# Column names (each spelled once).
USER_ID = "user_id"
ITEM_ID = "item_id"
ADVERTISER_ID = "advertiser_id"
TIMESTAMP = "timestamp"
QUERY = "query"
CATEGORY_ID = "category_id"
NAME = "name"
EVENT_TYPE = "event_type"
CATEGORIES = "categories"
CONFIDENCES = "confidences"
AGE_BUCKET = "age_bucket"
COUNTRY = "country"
GENDER = "gender"
REQUEST_ID = "request_id"
SUBJECT_ITEM_ID = "subject_item_id"
AD_ID = "ad_id"  # subject_items: the ad (items.item_id) this subject item is; null: not an ad

DEMOGRAPHIC_COLUMNS = (AGE_BUCKET, COUNTRY, GENDER)


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int64" | "float32" | "string" | "list_int64" | "list_float32"
    nullable: bool = False
    # May be absent from a raw table altogether (data written before the column existed): absent
    # reads as null in every row. Only nullable columns can be optional.
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # columns that must be unique together (empty: no key)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def arrow_schema(self) -> pa.Schema:
        import pyarrow as pa

        types = {
            "int64": pa.int64(),
            "float32": pa.float32(),
            "string": pa.string(),
            "list_int64": pa.list_(pa.int64()),
            "list_float32": pa.list_(pa.float32()),
        }
        return pa.schema([pa.field(c.name, types[c.kind], nullable=c.nullable) for c in self.columns])


CONVERSIONS = Table(
    "conversions",
    (
        Column(USER_ID, "int64"),
        Column(TIMESTAMP, "int64"),
        Column(ITEM_ID, "int64"),
        Column(ADVERTISER_ID, "int64"),
        Column(EVENT_TYPE, "string"),
    ),
    key=(),
)
ITEMS = Table(  # the ad corpus
    "items",
    (
        Column(ITEM_ID, "int64"),
        Column(ADVERTISER_ID, "int64"),
        Column(CATEGORIES, "list_int64"),
        Column(CONFIDENCES, "list_float32"),
    ),
    key=(ITEM_ID,),
)
USERS = Table(
    "users",
    (
        Column(USER_ID, "int64"),
        Column(AGE_BUCKET, "string", nullable=True),
        Column(COUNTRY, "string", nullable=True),
        Column(GENDER, "string", nullable=True),
    ),
    key=(USER_ID,),
)
SUBJECT_ITEMS = Table(  # what a user can be looking at on a related-items surface
    "subject_items",
    (
        Column(ITEM_ID, "int64"),
        Column(CATEGORIES, "list_int64"),
        Column(CONFIDENCES, "list_float32"),
        # "Subject items are ads" is stated here, never inferred from ids: the ad this subject item
        # is (an items.item_id), null when it is not an ad. A subject id equal to some ad id with a
        # null ad_id is NOT that ad. Raw data without the column (older data): no subject item is an
        # ad (the validation report and the training-data pipeline say so). An ad_id absent from the
        # items table reads as "not an ad" too (counted, see SUBJECT_ITEM below).
        Column(AD_ID, "int64", nullable=True, optional=True),
    ),
    key=(ITEM_ID,),
)
REQUESTS = Table(  # related-items request log: the real context of each request
    "requests",
    (
        Column(REQUEST_ID, "int64"),
        Column(USER_ID, "int64"),
        Column(TIMESTAMP, "int64"),
        Column(SUBJECT_ITEM_ID, "int64"),
        Column(ITEM_ID, "int64"),  # the ad delivered and converted
    ),
    key=(REQUEST_ID,),
)
SEARCH_REQUESTS = Table(  # search surface request log: the query the user typed is the context
    "search_requests",
    (
        Column(REQUEST_ID, "int64"),
        Column(USER_ID, "int64"),
        Column(TIMESTAMP, "int64"),
        Column(QUERY, "string"),  # as typed (the model normalises it in the graph)
        Column(ITEM_ID, "int64"),  # the ad delivered and converted
    ),
    key=(REQUEST_ID,),
)
CATEGORY_NAMES = Table(  # the interest taxonomy's names: what synthetic search context is made of
    "category_names",
    (Column(CATEGORY_ID, "int64"), Column(NAME, "string")),
    key=(CATEGORY_ID,),
)
RAW_TABLES: dict[str, Table] = {t.name: t for t in (CONVERSIONS, ITEMS, USERS, SUBJECT_ITEMS, REQUESTS)}
# Tables a dataset holds only where it has the surface they describe (MovieLens has no search).
OPTIONAL_RAW_TABLES: dict[str, Table] = {t.name: t for t in (SEARCH_REQUESTS, CATEGORY_NAMES)}


def raw_table_path(raw_dir: str, table: Table | str) -> str:
    """Where a raw table lives: ``RAW_DIR/<table>/`` holding one or more Parquet files."""
    import os

    name = table if isinstance(table, str) else table.name
    return os.path.join(raw_dir, name)


# --------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------
VOCAB_ITEM = "item"
VOCAB_ADVERTISER = "advertiser"
VOCAB_CATEGORY = "category"
VOCAB_COUNTRY = "country"
VOCAB_AGE_BUCKET = "age_bucket"
VOCAB_GENDER = "gender"
VOCAB_EVENT_TYPE = "event_type"
VOCABULARIES = (
    VOCAB_ITEM,
    VOCAB_ADVERTISER,
    VOCAB_CATEGORY,
    VOCAB_COUNTRY,
    VOCAB_AGE_BUCKET,
    VOCAB_GENDER,
    VOCAB_EVENT_TYPE,
)
DEMOGRAPHIC_VOCAB = {AGE_BUCKET: VOCAB_AGE_BUCKET, COUNTRY: VOCAB_COUNTRY, GENDER: VOCAB_GENDER}
VOCAB_DIR = "vocab"
ITEM_COUNTS_FILE = "item_counts.tsv"  # item_id <tab> count, training targets only
METADATA_FILE = "metadata.json"


def vocab_filename(name: str) -> str:
    return f"{name}.txt"


def vocab_size(num_values: int) -> int:
    """Embedding rows needed for a vocabulary of ``num_values`` known values."""
    return num_values + NUM_RESERVED_IDS


# --------------------------------------------------------------------------------------
# TFRecord example features
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    dtype: str  # "int64" | "float32" | "string"
    shape: tuple[int, ...]  # per example, without the batch dimension
    default: float | int | str = 0


# Identity / bookkeeping
EX_USER_ID = "user_id"
EX_TIMESTAMP = "timestamp"
EX_REQUEST_ID = "request_id"  # -1 for training examples
# History (left-padded, length MAX_HISTORY)
HISTORY_ITEM = "history_item"
HISTORY_ADVERTISER = "history_advertiser"
HISTORY_EVENT_TYPE = "history_event_type"
HISTORY_TIME_GAP = "history_time_gap"  # TIME_GAP_TO_TARGET in the example splits
HISTORY_NEXT_GAP = "history_next_gap"  # the same events' TIME_GAP_NEXT_EVENT buckets
HISTORY_LENGTH = "history_length"
# Context: interest categories of what the user is looking at, with confidence weights
CONTEXT_CATEGORIES = "context_categories"
CONTEXT_WEIGHTS = "context_weights"
# Search surface context: the query text as the user typed it ("" = no query). Request examples of
# the search log carry the real query; training examples (where the data has the taxonomy's names,
# CATEGORY_NAMES) a synthetic one written from the label ad's category names
# (:mod:`tfrs_ctx.data.search_context`). Not in FEATURES: only search-capable data and models read it
# (:func:`with_query`); a parser that asks for it gets "" where an example lacks it.
CONTEXT_QUERY = "context_query"
# Demographics (vocab indices; PAD_ID means missing)
USER_AGE_BUCKET = "user_age_bucket"
USER_COUNTRY = "user_country"
USER_GENDER = "user_gender"
# Label: the converted ad
LABEL_ITEM = "label_item"
LABEL_ADVERTISER = "label_advertiser"
LABEL_CATEGORIES = "label_categories"
LABEL_CONFIDENCES = "label_confidences"
LABEL_SAMPLING_PROB = "label_sampling_prob"
# Request examples (train_requests, eval): the request's subject item as an ad, an ad-vocabulary
# index from the subject_items table's AD_ID (never from the subject item's own id). PAD_ID: no
# subject ad (no request, or the subject item is not an ad: null AD_ID, or older data without the
# column); OOV_ID: an AD_ID outside the ad vocabulary. The model (model.subject_embedding) reads
# both as "absent" (its subject vector masked to zero); evaluation feeds a subject ad as a fresh
# history event. Training examples (train, train_sequences) carry PAD_ID: dense training derives the
# subject from the previous event where the data defines it (train.context_is_previous_event).
SUBJECT_ITEM = "subject_item"

HISTORY_FEATURES = (HISTORY_ITEM, HISTORY_ADVERTISER, HISTORY_EVENT_TYPE, HISTORY_TIME_GAP)
CONTEXT_FEATURES = (CONTEXT_CATEGORIES, CONTEXT_WEIGHTS)
DEMOGRAPHIC_FEATURES = (USER_AGE_BUCKET, USER_COUNTRY, USER_GENDER)
DEMOGRAPHIC_FEATURE_OF_COLUMN = dict(zip(DEMOGRAPHIC_COLUMNS, DEMOGRAPHIC_FEATURES, strict=True))
LABEL_FEATURES = (LABEL_ITEM, LABEL_ADVERTISER, LABEL_CATEGORIES, LABEL_CONFIDENCES)
# The candidate (ad) tower reads the label features; the ad corpus file uses the same
# names, plus the raw ITEM_ID, one row per item-vocabulary entry (sorted by index).
CANDIDATE_FEATURES = LABEL_FEATURES
CORPUS_FILE = "corpus.parquet"

FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(EX_USER_ID, "int64", ()),
        Feature(EX_TIMESTAMP, "int64", ()),
        Feature(EX_REQUEST_ID, "int64", (), -1),
        *(Feature(n, "int64", (MAX_HISTORY,)) for n in HISTORY_FEATURES),
        Feature(HISTORY_NEXT_GAP, "int64", (MAX_HISTORY,)),
        Feature(HISTORY_LENGTH, "int64", ()),
        Feature(CONTEXT_CATEGORIES, "int64", (MAX_CATEGORIES,)),
        Feature(CONTEXT_WEIGHTS, "float32", (MAX_CATEGORIES,)),
        *(Feature(n, "int64", ()) for n in DEMOGRAPHIC_FEATURES),
        Feature(LABEL_ITEM, "int64", ()),
        Feature(LABEL_ADVERTISER, "int64", ()),
        Feature(LABEL_CATEGORIES, "int64", (MAX_CATEGORIES,)),
        Feature(LABEL_CONFIDENCES, "float32", (MAX_CATEGORIES,)),
        Feature(LABEL_SAMPLING_PROB, "float32", (), 0.0),
        Feature(SUBJECT_ITEM, "int64", ()),
    )
}

QUERY_FEATURE = Feature(CONTEXT_QUERY, "string", (), "")


def with_query(features: dict[str, Feature]) -> dict[str, Feature]:
    """A feature set plus the search query (:data:`CONTEXT_QUERY`)."""
    return {**features, CONTEXT_QUERY: QUERY_FEATURE}


# Sequence examples (dense training: every position of a history is a target in one pass).
# One example = a window of one user's conversions before the cutoff. The inputs are the
# HISTORY_* features above (left-padded, HISTORY_TIME_GAP in TIME_GAP_NEXT_EVENT semantics);
# position q's target is the event after input q (the input at q + 1), with its label features
# and its synthetic context. A position without a target has SEQ_LABEL_ITEM == PAD_ID and
# zeros everywhere else; the position just before the first input may hold a target with an
# empty history (a user's first conversion). Every conversion before the cutoff is the target
# of exactly one position of one window (windows end every SEQUENCE_STRIDE targets; a target
# of a later window sees at least MAX_HISTORY - stride earlier events, or all the user has).
SEQ_LABEL_ITEM = "seq_label_item"
SEQ_LABEL_ADVERTISER = "seq_label_advertiser"
SEQ_LABEL_CATEGORIES = "seq_label_categories"
SEQ_LABEL_CONFIDENCES = "seq_label_confidences"
SEQ_LABEL_SAMPLING_PROB = "seq_label_sampling_prob"
SEQ_LABEL_TIMESTAMP = "seq_label_timestamp"  # read by train.dense_strict_history (input pipeline), not the model
SEQ_CONTEXT_CATEGORIES = "seq_context_categories"
SEQ_CONTEXT_WEIGHTS = "seq_context_weights"
SEQUENCE_STRIDE = MAX_HISTORY // 2  # default stride between window ends (build_training_data --sequence_stride)
# Per-position feature -> the per-target feature it becomes once a position is a target.
SEQ_TARGET_FEATURES = {
    SEQ_LABEL_ITEM: LABEL_ITEM,
    SEQ_LABEL_ADVERTISER: LABEL_ADVERTISER,
    SEQ_LABEL_CATEGORIES: LABEL_CATEGORIES,
    SEQ_LABEL_CONFIDENCES: LABEL_CONFIDENCES,
    SEQ_LABEL_SAMPLING_PROB: LABEL_SAMPLING_PROB,
    SEQ_CONTEXT_CATEGORIES: CONTEXT_CATEGORIES,
    SEQ_CONTEXT_WEIGHTS: CONTEXT_WEIGHTS,
}


def _per_position(name: str) -> Feature:
    f = FEATURES[SEQ_TARGET_FEATURES[name]]
    return Feature(name, f.dtype, (MAX_HISTORY, *f.shape), f.default if name != SEQ_LABEL_ITEM else PAD_ID)


SEQUENCE_FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(EX_USER_ID, "int64", ()),
        Feature(EX_TIMESTAMP, "int64", ()),  # the window's last target
        *(Feature(n, "int64", (MAX_HISTORY,)) for n in HISTORY_FEATURES),
        Feature(HISTORY_LENGTH, "int64", ()),
        *(Feature(n, "int64", ()) for n in DEMOGRAPHIC_FEATURES),
        *(_per_position(n) for n in SEQ_TARGET_FEATURES),
        Feature(SEQ_LABEL_TIMESTAMP, "int64", (MAX_HISTORY,)),
    )
}

# Splits written by the training-data pipeline.
SPLIT_TRAIN = "train"  # conversions before the cutoff, synthetic context from the label
SPLIT_TRAIN_REQUESTS = "train_requests"  # requests before the cutoff, their real context
SPLIT_EVAL = "eval"  # requests at/after the cutoff, their real context
SPLIT_TRAIN_SEQUENCES = "train_sequences"  # SEQUENCE_FEATURES: windows of conversions before the cutoff
SPLITS = (SPLIT_TRAIN, SPLIT_TRAIN_REQUESTS, SPLIT_EVAL, SPLIT_TRAIN_SEQUENCES)
# Search surface splits, written only where the raw data has a SEARCH_REQUESTS table: its requests
# before / at-or-after the same cutoff, with their real query (with_query(FEATURES)).
SPLIT_TRAIN_SEARCH = "train_search_requests"
SPLIT_EVAL_SEARCH = "eval_search"
SEARCH_SPLITS = (SPLIT_TRAIN_SEARCH, SPLIT_EVAL_SEARCH)
TFRECORD_SUFFIX = ".tfrecord.gz"
# Beside the eval split: every ad each eval request's user converted on strictly before the
# request (JSON lines {REQUEST_ID: id, "items": [item-vocab indices]}), for evaluation's
# exclude_history rule (the examples' histories keep only the last MAX_HISTORY events).
EVAL_CONSUMED_DIR = "eval_consumed"
EVAL_SEARCH_CONSUMED_DIR = "eval_search_consumed"  # the same for the eval_search split
CONSUMED_ITEMS = "items"


def split_features(split: str) -> dict[str, Feature]:
    """The feature set a split's examples carry (the search splits: with the query)."""
    if split in SEARCH_SPLITS:
        return with_query(FEATURES)
    return SEQUENCE_FEATURES if split == SPLIT_TRAIN_SEQUENCES else FEATURES


def tfrecord_pattern(data_dir: str, split: str) -> str:
    import os

    return os.path.join(data_dir, split, f"part*{TFRECORD_SUFFIX}")


# --------------------------------------------------------------------------------------
# Serving signatures (exported SavedModels; inputs reuse the feature names above)
# --------------------------------------------------------------------------------------
MODEL_ENCODER = "encoder"
MODEL_CONTEXT_HEAD = "context_head"
MODEL_FULL = "full"
ENCODED_HISTORY = "encoded_history"  # encoder output / head input, [B, d] ([B, N, d]: cross-attention)
MODEL_VERSION = "model_version"  # every model's output, [B]: the integer version directory
USER_EMBEDDING = "user_embedding"
TOP_K_IDS = "top_k_ids"  # raw ad ids, [B, K], best first
TOP_K_SCORES = "top_k_scores"
REQUEST_K = "k"  # optional head input, [B] or [1] int64: results wanted, 1..exported top_k
# Optional head input, [B] int64: the request's subject ad as a raw ad id (the subject item's AD_ID,
# from the Feast subject-item view), mapped in the graph like every raw id; NO_SUBJECT_AD (the
# default) or an id outside the ad vocabulary: no subject ad (a raw ad id of -1 cannot be a subject).
SUBJECT_AD = "subject_ad_id"
NO_SUBJECT_AD = -1
# Optional head input of a search-capable model (model.search_query), [B] string: CONTEXT_QUERY, the
# raw query text (tokenised and hashed in the graph); "" (the default) = no query.


def feature_spec(features: dict[str, Feature] | None = None) -> dict[str, Any]:
    """``tf.io.parse_example`` spec for every feature of a feature set (default: ``FEATURES``)."""
    import tensorflow as tf

    dtypes = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}
    return {
        f.name: tf.io.FixedLenFeature(f.shape, dtypes[f.dtype], default_value=_default(f))
        for f in (FEATURES if features is None else features).values()
    }


def _default(f: Feature) -> Any:
    if not f.shape:
        return f.default
    size = 1
    for d in f.shape:
        size *= d
    return [f.default] * size


def pad_left(values: list, length: int, pad: Any = PAD_ID) -> list:
    """Keep the last ``length`` values and left-pad to exactly ``length``."""
    values = list(values)[-length:] if length else []
    return [pad] * (length - len(values)) + values


def pad_right(values: list, length: int, pad: Any = PAD_ID) -> list:
    """Keep the first ``length`` values and right-pad to exactly ``length`` (categories)."""
    values = list(values)[:length]
    return values + [pad] * (length - len(values))


# --------------------------------------------------------------------------------------
# Feature store
# --------------------------------------------------------------------------------------
# Feast objects (feature_repo/) and the offline-store layout the user-encoding pipeline
# writes under a store directory. Join keys are raw-table column names (USER_ID,
# SUBJECT_ITEM_ID); feature names are the signature / raw-table names they feed.
FS_USER = "user"  # entity, join key USER_ID
FS_SUBJECT_ITEM = "subject_item"  # entity, join key SUBJECT_ITEM_ID
FV_USER_SEQUENCE = "user_sequence_encoding"  # ENCODED_HISTORY, HISTORY_LENGTH, MODEL_VERSION
FV_USER_DEMOGRAPHICS = "user_demographics"  # DEMOGRAPHIC_COLUMNS, raw strings (null: missing)
FV_SUBJECT_ITEM_CONTEXT = "subject_item_context"  # CATEGORIES (raw ids), CONFIDENCES: top MAX_CATEGORIES
# The encoder's output as stored: a flat float32 list, row-major [N, d] (N = 1, the last hidden
# state, for concat fusion; the last N states for cross-attention: N = len / d; STORE_SCHEMA_VERSION).
# ENCODED_HISTORY and MODEL_VERSION (the serving-signature names above) are also the
# stored feature names: the vector and the integer model version it belongs to.
EVENT_TIMESTAMP = "event_timestamp"  # Feast timestamp field of every source (UTC)
STORE_DIR_ENV = "TFRS_CTX_STORE"  # env var: the store directory the Feast repo resolves paths in
USER_ENCODINGS_DIR = "user_encodings"  # STORE/<dir>/*.parquet, one or more files per run
USER_DEMOGRAPHICS_FILE = "user_demographics.parquet"  # STORE/<file>, a snapshot of the users table
SUBJECT_ITEMS_FILE = "subject_items.parquet"  # STORE/<file>, a snapshot of the subject_items table
ENCODE_STATE_FILE = "encode_state.json"  # STORE/<file>: watermark, model version, last run
FEAST_YAML = "feature_store.yaml"  # feature_repo/<file>: SQLite online store (the embedded default)
FEAST_REDIS_YAML = "feature_store.redis.yaml"  # feature_repo/<file>: Redis online store
FEAST_DEFINITIONS = "features.py"  # feature_repo/<file>: entities, sources, feature views
MODEL_INFO_FILE = "model_info.json"  # models/<name>/<version>/assets.extra/<file>: model_version (export writes it)
