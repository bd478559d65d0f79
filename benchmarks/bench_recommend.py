"""End-to-end ``recommend`` latency and throughput: Feast online read + gRPC Predict.

    python -m benchmarks.bench_recommend --workdir DEMO_WORKDIR [--requests 1000] [--threads 8]
        [--concurrency 1 8 32] [--workers 1] [--seconds 10] [--json PATH]

Uses a finished demo work directory (``tfrs-ctx demo --workdir DIR``: models, store, raw),
starts the model server on its models, and measures one request at a time (p50/p99), then
requests/s and p50/p99 under load from each number of concurrent client threads, through plain
clients (one ``CandidateClient`` per thread) and through one shared ``CoalescingClient``
(``serving.client.coalescing``), with the SQLite online store and with a private Redis
server materialized from the same store (``benchmarks.redis_store``: from a copy of the store's
sources, so a second run does not find the Redis registry already materialized and leave the
fresh server empty). Without ``redis-server`` on PATH the Redis rows are skipped, with the
reason in ``redis_skipped``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import threading
import time

import numpy as np
import pandas as pd

from benchmarks import emit

REDIS_MISSING = "redis-server is not on PATH (Debian package redis-server)"


def _requests(workdir: str, n: int, seed: int = 0):
    from serving.client.candidates import AdRequest
    from tfrs_ctx import schema

    users = pd.read_parquet(os.path.join(workdir, "raw", schema.USERS.name))[schema.USER_ID].to_numpy()
    subjects = pd.read_parquet(os.path.join(workdir, "raw", schema.SUBJECT_ITEMS.name))[schema.ITEM_ID].to_numpy()
    rng = np.random.default_rng(seed)
    return [AdRequest(int(u), int(s)) for u, s in zip(rng.choice(users, n), rng.choice(subjects, n), strict=True)]


def _latency(client, requests, warmup: int = 50) -> dict:
    for r in requests[:warmup]:
        client.recommend([r])
    times = []
    for r in requests:
        start = time.perf_counter()
        client.recommend([r])
        times.append(time.perf_counter() - start)
    return _percentiles(times)


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    if not len(ms):
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def _throughput(clients: list, requests, seconds: float) -> dict:
    """One thread per entry of ``clients`` (the same object may repeat), single-request calls for ``seconds``."""
    threads = len(clients)
    done, errors, stop = [0] * threads, [0] * threads, time.monotonic() + seconds
    times: list[list[float]] = [[] for _ in range(threads)]

    def worker(i: int) -> None:
        client, j = clients[i], i
        while time.monotonic() < stop:
            began = time.perf_counter()
            try:
                client.recommend([requests[j % len(requests)]])
                times[i].append(time.perf_counter() - began)
                done[i] += 1
            except Exception:
                errors[i] += 1
            j += threads

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - start
    return {
        "threads": threads,
        "requests_per_s": round(sum(done) / wall, 1),
        "errors": sum(errors),
        **_percentiles([t for ts in times for t in ts]),
    }


def measure(
    target: str, reader_factory, requests, threads: int, seconds: float, concurrency=(1, 8, 32), workers: int = 1
) -> dict:
    """One-at-a-time latency, then req/s and latency under load per client count, plain and coalescing.

    ``plain``: one ``CandidateClient`` per client thread (its own channel and store handle);
    ``coalescing``: every client thread calls one shared ``CoalescingClient`` of ``workers`` workers.
    ``throughput`` is the coalescing client's at ``threads`` clients.
    """
    from serving.client.candidates import CandidateClient
    from serving.client.coalescing import CoalescingClient

    def make():
        return CandidateClient(target, reader_factory())

    with make() as client:
        latency = _latency(client, requests)
    out: dict = {"latency": latency, "plain": [], "coalescing": []}
    for n in sorted(set(concurrency) | {threads}):
        plain = [make() for _ in range(n)]
        out["plain"].append(_throughput(plain, requests, seconds))
        for client in plain:
            client.close()
        with CoalescingClient(make, workers=workers) as coalescing:
            _throughput([coalescing] * n, requests[:50], 0.2)  # warm-up
            before = dataclasses.replace(coalescing.stats)
            row = _throughput([coalescing] * n, requests, seconds)
            stats = coalescing.stats
            batches = stats.batches - before.batches
            row["mean_batch"] = round((stats.requests - before.requests) / batches, 2) if batches else None
            row["largest_batch"] = stats.largest_batch
        out["coalescing"].append(row)
    out["throughput"] = next(r for r in out["coalescing"] if r["threads"] == threads)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per client count and client kind")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client thread counts to measure"
    )
    parser.add_argument("--workers", type=int, default=1, help="CoalescingClient workers")
    parser.add_argument("--no-sqlite", action="store_true", help="Redis only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from benchmarks.redis_store import redis_online_store
    from serving.client.features import FeastFeatureReader
    from serving.launcher import start_server

    store = os.path.join(args.workdir, "store")
    requests = _requests(args.workdir, args.requests)
    result: dict = {"machine": f"{os.cpu_count()} CPUs", "requests": args.requests}
    with start_server(os.path.join(args.workdir, "models")) as server:
        server.wait_ready(300)
        target = f"127.0.0.1:{server.port}"
        result["server"] = server.kind
        run = dict(threads=args.threads, seconds=args.seconds, concurrency=args.concurrency, workers=args.workers)
        if not args.no_sqlite:
            result["sqlite"] = measure(target, lambda: FeastFeatureReader.open(store), requests, **run)
        if shutil.which("redis-server") is None:
            result["redis"] = None
            result["redis_skipped"] = REDIS_MISSING
            print(f"Redis rows skipped: {result['redis_skipped']}", file=sys.stderr)
        else:
            with redis_online_store(store) as redis:
                result["redis"] = measure(target, redis.reader, requests, **run)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
