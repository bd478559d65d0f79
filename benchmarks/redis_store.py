"""A private Redis online store for benchmarks and load tests, materialized from a store directory.

:func:`redis_online_store` starts a ``redis-server`` on a free loopback port in a temporary
directory, copies the store directory's offline sources (never its registries or SQLite online
store) into a private store directory, applies the Redis feature repo there and materializes
everything into the fresh server. The copy matters: the Redis registry records how far it has
materialized, so a second run on the same store directory would only materialize
incrementally into an empty server.

The server has no automatic persistence, but :meth:`RedisServer.snapshot` writes an RDB dump
into its directory; :meth:`RedisServer.crash` kills it (SIGKILL, no save) and
:meth:`RedisServer.start` brings it back on the same port, loading that dump.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

from serving.launcher import free_port
from tfrs_ctx import schema

# Per-socket-operation bounds for the Feast Redis client (Feast json-decodes ``key=value`` extras
# of the connection string into redis-py arguments): without them a Redis that accepts
# connections but never answers blocks a read forever.
SOCKET_TIMEOUTS = "socket_timeout=1.0,socket_connect_timeout=1.0"


def redis_binary() -> str | None:
    """Path of ``redis-server``, or ``None`` when it is not installed."""
    return shutil.which("redis-server")


class RedisServer:
    """A ``redis-server`` child process on one fixed loopback port and data directory."""

    def __init__(self, data_dir: str, port: int | None = None):
        binary = redis_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install -y redis-server)")
        self.binary, self.data_dir, self.port = binary, data_dir, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start (or restart) the server; it loads ``dump.rdb`` from its directory if there is one."""
        import redis

        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.data_dir, "--dbfilename", "dump.rdb"]
        self.process = subprocess.Popen([self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with contextlib.closing(self.client()) as client:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def snapshot(self) -> int:
        """``SAVE`` an RDB dump into the data directory; returns the number of keys saved."""
        with contextlib.closing(self.client()) as client:
            client.save()
            return int(client.dbsize())

    def dbsize(self) -> int:
        with contextlib.closing(self.client()) as client:
            return int(client.dbsize())

    def crash(self) -> None:
        """SIGKILL: no shutdown save, connections drop at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclasses.dataclass
class RedisOnlineStore:
    """What :func:`redis_online_store` yields."""

    server: RedisServer
    store_dir: str  # the private copy of the store directory (its own Redis registry)
    fs_yaml: str  # the feature repo's Redis yaml
    connection_string: str  # REDIS_CONNECTION_STRING, socket timeouts included
    keys: int  # keys materialized (and snapshotted)

    def reader(self):
        """A fresh :class:`serving.features.FeastFeatureReader` on this Redis (one per client thread)."""
        from serving.features import FeastFeatureReader

        return FeastFeatureReader.open(self.store_dir, fs_yaml=self.fs_yaml)


def copy_store_sources(store_dir: str, dest: str) -> str:
    """Copy a store directory's offline sources and state (not registries or online stores) to ``dest``."""
    os.makedirs(dest, exist_ok=True)
    shutil.copytree(os.path.join(store_dir, schema.USER_ENCODINGS_DIR), os.path.join(dest, schema.USER_ENCODINGS_DIR))
    for name in (schema.USER_DEMOGRAPHICS_FILE, schema.SUBJECT_ITEMS_FILE, schema.ENCODE_STATE_FILE):
        if os.path.exists(os.path.join(store_dir, name)):
            shutil.copy2(os.path.join(store_dir, name), os.path.join(dest, name))
    return dest


@contextlib.contextmanager
def redis_online_store(store_dir: str, timeouts: bool = True) -> Iterator[RedisOnlineStore]:
    """A private Redis server holding everything of ``store_dir`` (materialized, then snapshotted).

    Sets ``REDIS_CONNECTION_STRING`` (with socket timeouts unless ``timeouts=False``) for the
    duration of the block; stops the server and deletes its directory and the store copy after.
    """
    from tfrs_ctx import feature_store as fs

    with tempfile.TemporaryDirectory(prefix="tfrs-ctx-redis-") as tmp:
        store_copy = copy_store_sources(os.path.abspath(store_dir), os.path.join(tmp, "store"))
        data_dir = os.path.join(tmp, "redis")
        os.makedirs(data_dir)
        server = RedisServer(data_dir).start()
        connection = f"{server.address},{SOCKET_TIMEOUTS}" if timeouts else server.address
        yaml = str(fs.repo_yaml(online="redis"))
        try:
            with fs.store_env(store_copy, REDIS_CONNECTION_STRING=connection):
                fs.materialize(fs.apply(store_copy, fs_yaml=yaml), dt.datetime.now(dt.UTC))
                keys = server.snapshot()
                yield RedisOnlineStore(server, store_copy, yaml, connection, keys)
        finally:
            server.stop()
