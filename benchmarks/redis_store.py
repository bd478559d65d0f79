"""A private Redis online store for benchmarks and load tests, materialized from a store directory.

:func:`redis_online_store` starts a :class:`tfrs_ctx.testing.RedisServer` on a free
loopback port in a temporary directory, copies the store directory's offline sources (never its
registries or SQLite online store) into a private store directory, applies the Redis feature
repo there, materializes everything into the fresh server and snapshots it, so the server can
be crashed and restarted with its data. The copy matters: the Redis registry records how far it
has materialized, so a second run on the same store directory would only materialize
incrementally into an empty server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import tempfile
from collections.abc import Iterator

from tfrs_ctx import feature_store as fs
from tfrs_ctx.testing import RedisServer


@dataclasses.dataclass
class RedisOnlineStore:
    """What :func:`redis_online_store` yields."""

    server: RedisServer
    store_dir: str  # the private copy of the store directory (its own Redis registry)
    fs_yaml: str  # the feature repo's Redis yaml
    keys: int  # keys materialized (and snapshotted)

    def reader(self):
        """A fresh :class:`serving.client.features.FeastFeatureReader` on this Redis (one per client thread)."""
        from serving.client.features import FeastFeatureReader

        return FeastFeatureReader.open(self.store_dir, fs_yaml=self.fs_yaml)


@contextlib.contextmanager
def redis_online_store(store_dir: str) -> Iterator[RedisOnlineStore]:
    """A private Redis server holding everything of ``store_dir`` (materialized, then snapshotted).

    Sets ``REDIS_CONNECTION_STRING`` for the duration of the block (the reader bounds its socket
    operations itself); stops the server and deletes its directory and the store copy after.
    """
    with tempfile.TemporaryDirectory(prefix="tfrs-ctx-redis-") as tmp:
        store_copy = fs.copy_sources(store_dir, os.path.join(tmp, "store"))
        data_dir = os.path.join(tmp, "redis")
        os.makedirs(data_dir)
        server = RedisServer(data_dir).start()
        yaml = str(fs.repo_yaml(online="redis"))
        try:
            with fs.store_env(store_copy, REDIS_CONNECTION_STRING=server.address):
                fs.materialize(fs.apply(store_copy, fs_yaml=yaml), dt.datetime.now(dt.UTC))
                yield RedisOnlineStore(server, store_copy, yaml, server.snapshot())
        finally:
            server.stop()
