"""Test and benchmark infrastructure: a private ``redis-server``, free loopback ports, a
local multi-worker training cluster, and toy corpora and feature batches for model unit tests.

The tests, the benchmarks and the load test start real services with these (a private Redis
server; model servers on a free port: ``serving.launcher.start_server(port=0)``; training workers
on loopback: :func:`run_training_cluster`); no serving or training path depends on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from tfrs_ctx import schema

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


@dataclasses.dataclass
class WorkerResult:
    """One training worker's exit: ``returncode`` (``None``: killed by the launcher) and its output."""

    returncode: int | None
    output: str
    killed: bool = False


PORT_CLASH = ("Address already in use", "Failed to start server")


def run_training_cluster(
    argv: list[str],
    workers: int,
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    grace_s: float = 20.0,
    attempts: int = 3,
    log_dir: str | None = None,
) -> list[WorkerResult]:
    """Run ``tfrs-ctx train ARGV`` as ``workers`` workers of one cluster on loopback; their results.

    Each worker is ``python -m tfrs_ctx.training.train ARGV --worker_hosts ... --task_index i`` in a
    process group of its own, so a hung collective can never outlive the call: when one worker
    fails the others get ``grace_s`` to fail or finish, then their groups are killed (SIGKILL), and
    everything still running at ``timeout_s`` is killed. A start that lost a race for a free port
    (another process took it) is retried with new ports, ``attempts`` times in all.
    """
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base_env.update({"PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, base_env.get("PYTHONPATH", "")) if p)
    deadline = time.monotonic() + timeout_s
    for attempt in range(attempts):
        hosts = ",".join(f"{LOOPBACK}:{free_port()}" for _ in range(workers))
        with tempfile.TemporaryDirectory(prefix="tfrs-ctx-workers-", dir=log_dir) as logs:
            results = _run_workers(argv, hosts, workers, deadline, base_env, grace_s, logs)
        clash = any(r.returncode and any(m in r.output for m in PORT_CLASH) for r in results)
        if not clash or attempt == attempts - 1 or time.monotonic() > deadline:
            return results
    return results


def _run_workers(argv, hosts, workers, deadline, env, grace_s, logs) -> list[WorkerResult]:
    procs, files = [], []
    for i in range(workers):
        out = open(os.path.join(logs, f"worker{i}.log"), "w+")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "tfrs_ctx.training.train", *argv, "--worker_hosts", hosts, "--task_index", str(i)]
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        files.append(out)
    killed = [False] * workers
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                killed[i] = True
    results = []
    for p, out, k in zip(procs, files, killed, strict=True):
        out.seek(0)
        results.append(WorkerResult(None if k else p.returncode, out.read(), k))
        out.close()
    return results


def toy_corpus(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` ads (raw ids 100.., vocabulary indices from ``NUM_RESERVED_IDS``) with random advertisers
    (2..11), categories (2..29) and confidences: the candidate-tower features of a model unit test."""
    return {
        schema.ITEM_ID: np.arange(n) + 100,
        schema.LABEL_ITEM: np.arange(n) + schema.NUM_RESERVED_IDS,
        schema.LABEL_ADVERTISER: rng.integers(2, 12, n),
        schema.LABEL_CATEGORIES: rng.integers(2, 30, (n, schema.MAX_CATEGORIES)),
        schema.LABEL_CONFIDENCES: rng.random((n, schema.MAX_CATEGORIES)).astype("float32"),
    }


def random_features(batch: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every example feature at random (ints 2..11, floats in [0, 1)) with history items among the
    ``n`` ads of :func:`toy_corpus`; tests then set the features they are about."""
    out = {}
    for f in schema.FEATURES.values():
        shape = (batch, *f.shape)
        out[f.name] = rng.integers(2, 12, shape) if f.dtype == "int64" else rng.random(shape).astype("float32")
    out[schema.HISTORY_ITEM] = rng.integers(2, n + 2, (batch, schema.MAX_HISTORY))
    return out


def call_signature(path: str, inputs: dict, k=None) -> dict[str, np.ndarray]:
    """Run a SavedModel's ``serving_default`` in process. A loaded TF2 signature cannot leave an input
    out (model servers fill it from ``SignatureDef.defaults``), so ``k`` defaults to the exported max."""
    import json

    import tensorflow as tf

    fn = tf.saved_model.load(path).signatures["serving_default"]
    inputs = dict(inputs)
    if schema.REQUEST_K in fn.structured_input_signature[1]:
        with open(os.path.join(path, "assets.extra", schema.MODEL_INFO_FILE)) as f:
            top_k = json.load(f)["top_k"]
        inputs[schema.REQUEST_K] = np.asarray([top_k] if k is None else k, np.int64).reshape(-1)
    return {name: v.numpy() for name, v in fn(**{n: tf.constant(v) for n, v in inputs.items()}).items()}
