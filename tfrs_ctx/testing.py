"""Test and benchmark infrastructure: a private ``redis-server`` and free loopback ports.

The tests, the benchmarks and the load test start real services with these (a private Redis
server; model servers on a free port: ``serving.launcher.start_server(port=0)``); no serving or
training path depends on them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (another process may still take it before you bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` child process on one loopback port and data directory, no
    automatic persistence. :meth:`snapshot` writes an RDB dump into the directory, :meth:`crash`
    kills the server (SIGKILL, no save) and :meth:`start` brings it back on the same port,
    loading that dump. Raises ``FileNotFoundError`` when the binary is missing.
    """

    def __init__(self, data_dir: str, port: int | None = None):
        binary = shutil.which("redis-server")
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


@contextlib.contextmanager
def local_redis_server() -> Iterator[str]:
    """A private :class:`RedisServer` in a temporary directory for the block; yields ``host:port``."""
    with tempfile.TemporaryDirectory(prefix="redis-") as workdir:
        server = RedisServer(workdir).start()
        try:
            yield server.address
        finally:
            server.stop()
