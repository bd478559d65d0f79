"""The feature store's offline-source rows the user-encoding pipeline writes (Parquet a Feast FileSource reads).

``user_encodings`` (user_id, event_timestamp, encoded_history, history_length, model_version),
``user_demographics`` (raw strings, null when missing) and ``subject_items`` (the top
``MAX_CATEGORIES`` categories by confidence); names from :mod:`tfrs_ctx.schema`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from tfrs_ctx import schema as S
from tfrs_ctx.data.vocab import is_missing


def _timestamp_type() -> Any:
    import pyarrow as pa

    return pa.timestamp("us", tz="UTC")


def encoding_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            (S.USER_ID, pa.int64()),
            (S.EVENT_TIMESTAMP, _timestamp_type()),
            (S.ENCODED_HISTORY, pa.list_(pa.float32())),
            (S.HISTORY_LENGTH, pa.int64()),
            (S.MODEL_VERSION, pa.int64()),
        ]
    )


def demographics_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            (S.USER_ID, pa.int64()),
            *((c, pa.string()) for c in S.DEMOGRAPHIC_COLUMNS),
            (S.EVENT_TIMESTAMP, _timestamp_type()),
        ]
    )


def subject_items_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            (S.SUBJECT_ITEM_ID, pa.int64()),
            (S.CATEGORIES, pa.list_(pa.int64())),
            (S.CONFIDENCES, pa.list_(pa.float32())),
            (S.AD_ID, pa.int64()),  # null: not an ad (schema.SUBJECT_ITEMS)
            (S.EVENT_TIMESTAMP, _timestamp_type()),
        ]
    )


def encoding_row(keyed: tuple[int, PredictionResult], event_us: int) -> dict[str, Any]:
    """One Parquet row of ``user_encodings``."""
    user_id, result = keyed
    vector, version = result.inference
    return {
        S.USER_ID: user_id,
        S.EVENT_TIMESTAMP: event_us,
        S.ENCODED_HISTORY: vector.astype(np.float32).reshape(-1).tolist(),
        S.HISTORY_LENGTH: int(result.example[S.HISTORY_LENGTH]),
        S.MODEL_VERSION: version,
    }


def demographics_row(row: Mapping[str, Any], event_us: int) -> dict[str, Any]:
    """One Parquet row of ``user_demographics``: raw strings, ``None`` when missing."""
    values = {c: None if is_missing(row.get(c)) else str(row[c]) for c in S.DEMOGRAPHIC_COLUMNS}
    return {S.USER_ID: int(row[S.USER_ID]), **values, S.EVENT_TIMESTAMP: event_us}


def top_raw_categories(categories: Sequence[int], confidences: Sequence[float]) -> tuple[list[int], list[float]]:
    """The top ``MAX_CATEGORIES`` categories by confidence (ties: listed order), as raw ids.

    The order of :func:`tfrs_ctx.data.examples.top_categories` (what the training examples hold).
    """
    order = sorted(range(len(categories)), key=lambda i: -float(confidences[i]))[: S.MAX_CATEGORIES]
    return [int(categories[i]) for i in order], [float(confidences[i]) for i in order]


def subject_item_row(row: Mapping[str, Any], event_us: int) -> dict[str, Any]:
    """One Parquet row of ``subject_items`` (keyed by ``subject_item_id``)."""
    categories, confidences = top_raw_categories(row[S.CATEGORIES], row[S.CONFIDENCES])
    return {
        S.SUBJECT_ITEM_ID: int(row[S.ITEM_ID]),
        S.CATEGORIES: categories,
        S.CONFIDENCES: confidences,
        S.AD_ID: subject_ad_id(row),
        S.EVENT_TIMESTAMP: event_us,
    }


def subject_ad_id(row: Mapping[str, Any]) -> int | None:
    """The subject item's AD_ID (``None``: not an ad, also for raw data without the column)."""
    value = row.get(S.AD_ID)
    return None if is_missing(value) else int(value)
