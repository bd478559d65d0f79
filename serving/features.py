"""The client's online feature reads, backed by the Feast online store (SQLite or Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.client import UserState
from tfrs_ctx import feature_store as fs
from tfrs_ctx import schema


class FeastFeatureReader:
    """:class:`serving.client.FeatureReader` over a Feast ``FeatureStore``."""

    def __init__(self, store: Any):
        self.store = store

    @classmethod
    def open(cls, store_dir: str, repo: str | None = None, fs_yaml: str | None = None) -> FeastFeatureReader:
        """Open the store of ``store_dir`` (``fs_yaml``: e.g. the repo's Redis yaml)."""
        return cls(fs.open_store(store_dir, repo, fs_yaml))

    def users(self, user_ids: Sequence[int]) -> dict[int, UserState]:
        out = {}
        for user_id, row in zip(user_ids, fs.read_user_features(self.store, user_ids), strict=True):
            if row is None:
                continue
            version = row.get(schema.MODEL_VERSION)
            out[int(user_id)] = UserState(
                encoded_history=row.get(schema.ENCODED_HISTORY),
                history_length=int(row.get(schema.HISTORY_LENGTH) or 0),
                model_version=None if version is None else int(version),
                demographics={c: row.get(c) for c in schema.DEMOGRAPHIC_COLUMNS},
            )
        return out

    def subject_items(self, item_ids: Sequence[int]) -> dict[int, tuple[list[int], list[float]] | None]:
        rows = fs.read_subject_items(self.store, item_ids)
        return {
            int(i): None if row is None else (list(row[schema.CATEGORIES]), list(row[schema.CONFIDENCES]))
            for i, row in zip(item_ids, rows, strict=True)
        }
