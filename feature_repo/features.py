"""Feast definitions of tfrs-ctx: entities, Parquet sources and feature views.

Names come from :mod:`tfrs_ctx.schema` (never spelled here); source paths from the store
directory in ``$TFRS_CTX_STORE`` (see ``README.md`` in this folder). The sources are
written by ``python -m beam_pipelines.encode_users`` (or ``tfrs-ctx daily``).

* ``user_sequence_encoding`` (entity ``user``): the offline encoder's output, a flat
  ``Array(Float32)`` (row-major ``[N, d]``; ``N = 1`` for concat fusion, the last N states for
  cross-attention; tag ``store_schema_version``), the history length and the
  model version the vector belongs to (the online head must be of the same version).
  TTL 2 days: the job runs daily, and a re-encoded user's newest row wins.
* ``user_demographics`` (entity ``user``): raw strings, null when missing. TTL 30 days.
* ``subject_item_context`` (entity ``subject_item``): a subject item's top categories
  (raw ids) and their confidences, the live context of a related-items request, and ``ad_id``: the
  ad the subject item is (null: not an ad; the head's ``subject_ad_id``). TTL 30 days.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

from tfrs_ctx import schema as S
from tfrs_ctx.feature_store import store_dir_from_env, store_paths

PATHS = store_paths(store_dir_from_env())

user = Entity(name=S.FS_USER, join_keys=[S.USER_ID], value_type=ValueType.INT64, description="a user (raw user id)")
subject_item = Entity(
    name=S.FS_SUBJECT_ITEM,
    join_keys=[S.SUBJECT_ITEM_ID],
    value_type=ValueType.INT64,
    description="what a user looks at on a related-items surface (raw subject item id)",
)

user_encodings_source = FileSource(
    name=f"{S.FV_USER_SEQUENCE}_source", path=PATHS.encodings, timestamp_field=S.EVENT_TIMESTAMP
)
user_demographics_source = FileSource(
    name=f"{S.FV_USER_DEMOGRAPHICS}_source", path=PATHS.demographics, timestamp_field=S.EVENT_TIMESTAMP
)
subject_items_source = FileSource(
    name=f"{S.FV_SUBJECT_ITEM_CONTEXT}_source", path=PATHS.subject_items, timestamp_field=S.EVENT_TIMESTAMP
)

user_sequence_encoding = FeatureView(
    name=S.FV_USER_SEQUENCE,
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name=S.ENCODED_HISTORY, dtype=Array(Float32)),
        Field(name=S.HISTORY_LENGTH, dtype=Int64),
        Field(name=S.MODEL_VERSION, dtype=Int64),
    ],
    source=user_encodings_source,
    online=True,
    description="offline Transformer encoding of the user's conversion history (flat row-major [N, d])",
    tags={"store_schema_version": str(S.STORE_SCHEMA_VERSION)},  # the rows' layout: tfrs_ctx.schema
)

user_demographics = FeatureView(
    name=S.FV_USER_DEMOGRAPHICS,
    entities=[user],
    ttl=timedelta(days=30),
    schema=[Field(name=column, dtype=String) for column in S.DEMOGRAPHIC_COLUMNS],
    source=user_demographics_source,
    online=True,
    description="raw demographic strings (null: missing)",
)

subject_item_context = FeatureView(
    name=S.FV_SUBJECT_ITEM_CONTEXT,
    entities=[subject_item],
    ttl=timedelta(days=30),
    schema=[
        Field(name=S.CATEGORIES, dtype=Array(Int64)),
        Field(name=S.CONFIDENCES, dtype=Array(Float32)),
        Field(name=S.AD_ID, dtype=Int64),  # the ad this subject item is; null: not an ad
    ],
    source=subject_items_source,
    online=True,
    description=f"top {S.MAX_CATEGORIES} interest categories (raw ids) by confidence, with the confidences, "
    "and the ad the subject item is (null: not an ad)",
)
