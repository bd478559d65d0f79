"""Redis key TTL through Feast's ``key_ttl_seconds`` (``feature_store.redis_yaml_with_ttl``): keys expire."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import time

import numpy as np
import pytest

from benchmarks.bench_redis import write_encodings, write_side_sources
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.testing import RedisServer

TTL_S = 3  # short, yet above the time to read the keys back on a loaded machine


@pytest.mark.redis
def test_redis_keys_expire_after_the_key_ttl(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    store_dir, users = str(tmp_path / "store"), np.array([11, 12, 13, 14, 15], dtype=np.int64)
    write_encodings(store_dir, users, 8, now - dt.timedelta(hours=1), "part")
    write_side_sources(store_dir, users[:2], now - dt.timedelta(hours=1))
    (tmp_path / "redis").mkdir()
    server = RedisServer(str(tmp_path / "redis")).start()
    try:
        yaml = F.redis_yaml_with_ttl(TTL_S, tmp_path)
        assert f"key_ttl_seconds: {TTL_S}" in yaml.read_text()
        with F.store_env(store_dir, REDIS_CONNECTION_STRING=server.address):
            store = F.apply(store_dir, fs_yaml=yaml)
            assert store.config.online_store.key_ttl_seconds == TTL_S
            start = F.FIRST_MATERIALIZE_START
            store.materialize(start_date=start, end_date=now, feature_views=[S.FV_USER_SEQUENCE])
            written = time.monotonic()
            rows = F.read_user_features(store, users.tolist())
            assert all(r is not None and r[S.ENCODED_HISTORY].shape == (8,) for r in rows)
            with contextlib.closing(server.client()) as client:
                keys = client.keys("*")
                assert len(keys) == len(users)
                assert all(0 < client.ttl(k) <= TTL_S for k in keys)
                time.sleep(max(0.0, written + TTL_S + 0.5 - time.monotonic()))
                assert client.dbsize() == 0
            assert F.read_user_features(store, users.tolist()) == [None] * len(users)
    finally:
        server.stop()


def test_ttl_yaml_refuses_a_ttl_that_is_not_positive(tmp_path):
    with pytest.raises(ValueError, match="key_ttl_seconds"):
        F.redis_yaml_with_ttl(0, tmp_path)
