"""The client's online feature reads, backed by the Feast online store (SQLite or Redis).

With Redis, the reader bounds how long one read may take: redis-py's default retry policy
(3 retries, jittered exponential backoff with a 1 s base and a 10 s cap) can hold a read for
about 14 s while Redis is down, and without socket timeouts a Redis that accepts connections
but never answers holds it forever. The reader sets ``redis_retries`` quick retries (enough to
replace a pooled connection a Redis restart broke) and socket timeouts where the connection
string sets none; the client retries whole reads on top (``CandidateClient(store_retries=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from serving.client.candidates import UserState
from tfrs_ctx import feature_store as fs
from tfrs_ctx import schema

# A subject item's online features: (categories, confidences, ad_id); ad_id None: not an ad
SubjectEntry = tuple[list[int], list[float], int | None]

log = logging.getLogger("tfrs_ctx.features")


class FeastFeatureReader:
    """:class:`serving.client.FeatureReader` over a Feast ``FeatureStore``."""

    def __init__(self, store: Any, *, redis_retries: int = 1, redis_timeout_s: float = 1.0):
        self.store = store
        bound_redis_client(store, redis_retries, redis_timeout_s)

    @classmethod
    def open(
        cls, store_dir: str, repo: str | None = None, fs_yaml: str | None = None, **bounds: Any
    ) -> FeastFeatureReader:
        """Open the store of ``store_dir`` (``fs_yaml``: e.g. the repo's Redis yaml; ``bounds``: see ``__init__``)."""
        return cls(fs.open_store(store_dir, repo, fs_yaml), **bounds)

    def users(self, user_ids: Sequence[int]) -> dict[int, UserState]:
        return _users(user_ids, fs.read_user_features(self.store, user_ids))

    def subject_items(self, item_ids: Sequence[int]) -> dict[int, SubjectEntry | None]:
        return _subjects(item_ids, fs.read_subject_items(self.store, item_ids))

    def request_features(
        self, user_ids: Sequence[int], item_ids: Sequence[int]
    ) -> tuple[dict[int, UserState], dict[int, SubjectEntry | None]]:
        """``users(user_ids)`` and ``subject_items(item_ids)`` in one Feast online read."""
        users, subjects = fs.read_request_features(self.store, user_ids, item_ids)
        return _users(user_ids, users), _subjects(item_ids, subjects)


def _users(user_ids: Sequence[int], rows: list) -> dict[int, UserState]:
    out = {}
    for user_id, row in zip(user_ids, rows, strict=True):
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


def _subjects(item_ids: Sequence[int], rows: list) -> dict[int, SubjectEntry | None]:
    """Per subject item: ``(categories, confidences, ad_id)`` (``ad_id`` ``None``: not an ad), or ``None``."""
    return {
        int(i): None
        if row is None
        else (list(row[schema.CATEGORIES]), list(row[schema.CONFIDENCES]), row.get(schema.AD_ID))
        for i, row in zip(item_ids, rows, strict=True)
    }


def bound_redis_client(store: Any, retries: int, timeout_s: float) -> bool:
    """Bound the Redis client of a Feast store with a Redis online store: ``retries`` retries with a
    short backoff, and ``timeout_s`` socket timeouts unless the connection string sets them.

    Applies to the connections the client opens from now on. Returns whether a Redis client was
    bounded (``False`` for other online stores).
    """
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig

    config = getattr(getattr(store, "config", None), "online_store", None)
    if not isinstance(config, RedisOnlineStoreConfig) or config.redis_type != "redis":
        return False
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry

    try:  # Feast builds the client lazily and exposes no option for this
        client = store._get_provider().online_store._get_client(config)
    except AttributeError as e:
        log.warning("cannot bound the Feast Redis client (Feast internals changed?): %s", e)
        return False
    kwargs = client.connection_pool.connection_kwargs
    for key in ("socket_timeout", "socket_connect_timeout"):
        if kwargs.get(key) is None:
            kwargs[key] = timeout_s
    client.set_retry(
        Retry(
            ExponentialBackoff(cap=0.2, base=0.05), retries, supported_errors=(RedisConnectionError, RedisTimeoutError)
        )
    )
    return True
