"""Benchmark the Redis online store at a million users (Feast materialize, memory, reads, delta, TTL).

    python -m benchmarks.bench_redis [--users 1000000] [--delta 0.01] [--key-ttl-days 7] [--json PATH]

Setup: **synthetic encodings**, not the encoder: random unit vectors of ``--dim`` float32 (64,
the production ``embedding_dim``) per user, written in the store's offline-source layout
(``STORE/user_encodings/*.parquet`` with ``beam_pipelines.encode_users.encoding_schema``, what the
encoder job writes), stamped one day ago; a few demographics and subject-item rows so every
feature view has its source. A private ``redis-server`` (:class:`tfrs_ctx.testing.RedisServer`),
the repo's Redis feature store yaml with ``key_ttl_seconds`` added
(:func:`tfrs_ctx.feature_store.redis_yaml_with_ttl`). The Feast code path is the product's:
``feature_store.apply``, ``feature_store.materialize``, ``feature_store.read_user_features``.

Reports (JSON):
* ``materialize``: the first (full) materialization of every user: seconds, rows/s, rows per CPU
  second of this process (Feast; the Redis server's CPU is not counted);
* ``memory``: Redis ``used_memory`` before and after, bytes per user; ``used_memory_rss``; this
  process's peak RSS (Feast materializes a whole date range in memory);
* ``key_ttl``: the configured TTL and the TTL Redis reports on sampled keys;
* ``online_read``: p50 / p99 ms of ``read_user_features`` for one user and for 100 users;
* ``delta``: ``--delta`` of the users re-encoded (a new Parquet file, stamped 30 minutes after the
  first materialization) and ``materialize-incremental``: seconds, rows/s (Feast reads the whole
  source and filters by time);
* ``delta_pushed``: another ``--delta`` of the users written with ``write_to_online_store`` from
  the new rows alone (what a daily job that knows its new rows can do instead).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import emit, scratch_dir
from benchmarks.bench_feast import bench_reads
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.testing import RedisServer

VERSION = 1
CHUNK = 100_000  # users per Parquet file (the encoder job writes several files per run too)


def write_encodings(
    store_dir: str, user_ids: np.ndarray, dim: int, at: dt.datetime, name: str, seed: int = 0
) -> list[str]:
    """Random unit vectors for ``user_ids`` into ``STORE/user_encodings/<name>-NNNNN.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_pipelines.store_rows import encoding_schema

    paths = F.store_paths(store_dir)
    os.makedirs(paths.encodings, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for n, start in enumerate(range(0, len(user_ids), CHUNK)):
        ids = np.asarray(user_ids[start : start + CHUNK], dtype=np.int64)
        vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        values = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim).cast(pa.list_(pa.float32()))
        table = pa.table(
            {
                S.USER_ID: ids,
                S.EVENT_TIMESTAMP: pa.array(np.full(len(ids), int(at.timestamp() * 1e6)), pa.timestamp("us", "UTC")),
                S.ENCODED_HISTORY: values,
                S.HISTORY_LENGTH: np.full(len(ids), S.MAX_HISTORY, np.int64),
                S.MODEL_VERSION: np.full(len(ids), VERSION, np.int64),
            },
            schema=encoding_schema(),
        )
        files.append(os.path.join(paths.encodings, f"{name}-{n:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files


def write_side_sources(store_dir: str, user_ids: np.ndarray, at: dt.datetime) -> None:
    """A few demographics and subject-item rows: every feature view has a source to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_pipelines.store_rows import demographics_schema, subject_items_schema

    paths, ts = F.store_paths(store_dir), pa.array([at] * len(user_ids), pa.timestamp("us", "UTC"))
    demo = {S.USER_ID: pa.array(user_ids, pa.int64()), S.EVENT_TIMESTAMP: ts}
    demo.update({c: pa.array(["x"] * len(user_ids)) for c in S.DEMOGRAPHIC_COLUMNS})
    pq.write_table(pa.table(demo).select(demographics_schema().names).cast(demographics_schema()), paths.demographics)
    subjects = {
        S.SUBJECT_ITEM_ID: pa.array([1, 2], pa.int64()),
        S.CATEGORIES: pa.array([[1, 2], [3]], pa.list_(pa.int64())),
        S.CONFIDENCES: pa.array([[0.5, 0.5], [1.0]], pa.list_(pa.float32())),
        S.AD_ID: pa.array([None, None], pa.int64()),  # not ads
        S.EVENT_TIMESTAMP: pa.array([at, at], pa.timestamp("us", "UTC")),
    }
    schema = subject_items_schema()
    pq.write_table(pa.table(subjects).select(schema.names).cast(schema), paths.subject_items)


def redis_memory(server: RedisServer) -> dict[str, int]:
    with contextlib.closing(server.client()) as client:
        info = client.info("memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info["used_memory_rss"])}


def sampled_ttls(server: RedisServer, samples: int = 20) -> list[int]:
    with contextlib.closing(server.client()) as client:
        return [int(client.ttl(client.randomkey())) for _ in range(samples)]


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench_push(store: Any, store_dir: str, user_ids: np.ndarray, dim: int, at: dt.datetime) -> dict[str, Any]:
    """The same delta written straight to Redis (``FeatureStore.write_to_online_store``) from the
    new rows alone, instead of ``materialize-incremental``'s scan of the whole offline source."""
    import pandas as pd
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        files = write_encodings(tmp, user_ids, dim, at, "push", seed=2)
        frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    start, cpu = time.perf_counter(), time.process_time()
    store.write_to_online_store(S.FV_USER_SEQUENCE, frame)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    back = F.read_user_features(store, [int(user_ids[0])])[0]
    return {
        "rows": len(user_ids),
        "seconds": round(seconds, 2),
        "rows_per_second": round(len(user_ids) / seconds),
        "cpu_seconds": round(cpu, 2),
        "read_back_timestamp_is_pushed": back[S.EVENT_TIMESTAMP] == int(at.timestamp()),
    }


def run_all(args: argparse.Namespace, workdir: str, report: dict[str, Any]) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    store_dir = os.path.join(workdir, "store")
    users = np.arange(1, args.users + 1, dtype=np.int64) * 7 + 1_000_000  # raw ids, not dense from 0
    start = time.perf_counter()
    write_encodings(store_dir, users, args.dim, now - dt.timedelta(days=1), "base")
    write_side_sources(store_dir, users[:100], now - dt.timedelta(days=1))
    report["write_parquet_seconds"] = round(time.perf_counter() - start, 1)

    redis_dir = os.path.join(workdir, "redis")
    os.makedirs(redis_dir)
    server = RedisServer(redis_dir).start()
    try:
        ttl = int(args.key_ttl_days * 86400)
        fs_yaml = F.redis_yaml_with_ttl(ttl, workdir)
        with F.store_env(store_dir, REDIS_CONNECTION_STRING=server.address):
            store = F.apply(store_dir, fs_yaml=fs_yaml)
            before = redis_memory(server)
            start, cpu = time.perf_counter(), time.process_time()
            assert set(F.materialize(store, now).values()) == {"full"}
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            after = redis_memory(server)
            report["materialize"] = {
                "rows": args.users,
                "seconds": round(seconds, 1),
                "rows_per_second": round(args.users / seconds),
                "cpu_seconds": round(cpu, 1),  # this process (Feast, its threads), not redis-server
                "rows_per_cpu_second": round(args.users / cpu),
            }
            report["memory"] = {
                "redis_used_memory_before_mib": round(before["used_memory"] / 2**20, 1),
                "redis_used_memory_after_mib": round(after["used_memory"] / 2**20, 1),
                "redis_used_memory_rss_after_mib": round(after["used_memory_rss"] / 2**20, 1),
                "bytes_per_user": round((after["used_memory"] - before["used_memory"]) / args.users, 1),
                "vector_bytes_per_user": args.dim * 4,
                "bench_process_peak_rss_mib": peak_rss_mib(),
            }
            ttls = sampled_ttls(server)
            report["key_ttl"] = {"configured_seconds": ttl, "sampled_min": min(ttls), "sampled_max": max(ttls)}
            report["online_read"] = bench_reads(store, users.tolist(), args.repeats)

            rng = np.random.default_rng(1)
            deltas = rng.choice(users, (2, max(1, int(args.users * args.delta))), replace=False)
            delta = np.sort(deltas[0])
            write_encodings(store_dir, delta, args.dim, now + dt.timedelta(minutes=30), "delta", seed=1)
            later = now + dt.timedelta(hours=1)
            start, cpu = time.perf_counter(), time.process_time()
            assert set(F.materialize(store, later).values()) == {"incremental"}
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            report["delta"] = {
                "rows": len(delta),
                "seconds": round(seconds, 1),
                "rows_per_second": round(len(delta) / seconds),
                "cpu_seconds": round(cpu, 1),
            }
            report["delta_pushed"] = bench_push(store, store_dir, np.sort(deltas[1]), args.dim, later)
            report["memory"]["redis_used_memory_after_delta_mib"] = round(
                redis_memory(server)["used_memory"] / 2**20, 1
            )
            report["memory"]["bench_process_peak_rss_mib"] = peak_rss_mib()
            fresh = F.read_user_features(store, [int(delta[0])])[0]
            report["delta"]["read_back_timestamp_is_delta"] = fresh[S.EVENT_TIMESTAMP] == int(
                (now + dt.timedelta(minutes=30)).timestamp()
            )
    finally:
        server.stop()
    report["load_average_1min"] = round(os.getloadavg()[0], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64, help="floats per encoding (production embedding_dim)")
    parser.add_argument("--delta", type=float, default=0.01, help="share of users re-encoded by the daily run")
    parser.add_argument("--key-ttl-days", type=float, default=7.0, help="Redis key TTL (Feast key_ttl_seconds)")
    parser.add_argument("--repeats", type=int, default=500, help="online reads per latency measurement")
    parser.add_argument("--workdir", default=None, help="keep the store here (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "users": args.users,
        "dim": args.dim,
        "encodings": "synthetic",
        "cpu_count": os.cpu_count(),
    }
    with scratch_dir(args.workdir, "bench_redis_") as work, contextlib.redirect_stdout(sys.stderr):
        run_all(args, work, report)  # (stdout: Feast's progress output)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
