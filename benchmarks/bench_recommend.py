"""End-to-end ``recommend`` latency and throughput: Feast online read + gRPC Predict.

    python -m benchmarks.bench_recommend --workdir DEMO_WORKDIR [--requests 1000] [--threads 8] [--json PATH]

Uses a finished demo work directory (``tfrs-ctx demo --workdir DIR``: models, store, raw),
starts the model server on its models, and measures one request at a time (p50/p99) and
requests/s from concurrent clients, with the SQLite online store and with a private Redis
server materialized from the same store (``benchmarks.redis_store``: from a copy of the store's
sources, so a second run does not find the Redis registry already materialized and leave the
fresh server empty).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import pandas as pd

from benchmarks import emit


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
    ms = np.asarray(times) * 1e3
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def _throughput(make_client, requests, threads: int, seconds: float) -> dict:
    clients = [make_client() for _ in range(threads)]  # opened here: one channel and store handle each
    done, errors, stop = [0] * threads, [0] * threads, time.monotonic() + seconds

    def worker(i: int) -> None:
        client = clients[i]
        j = i
        while time.monotonic() < stop:
            try:
                client.recommend([requests[j % len(requests)]])
                done[i] += 1
            except Exception:
                errors[i] += 1
            j += threads
        client.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - start
    return {"threads": threads, "requests_per_s": round(sum(done) / wall, 1), "errors": sum(errors)}


def measure(target: str, reader_factory, requests, threads: int, seconds: float) -> dict:
    from serving.client.candidates import CandidateClient

    with CandidateClient(target, reader_factory()) as client:
        latency = _latency(client, requests)
    throughput = _throughput(lambda: CandidateClient(target, reader_factory()), requests, threads, seconds)
    return {"latency": latency, "throughput": throughput}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
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
        result["sqlite"] = measure(target, lambda: FeastFeatureReader.open(store), requests, args.threads, args.seconds)
        with redis_online_store(store) as redis:
            result["redis"] = measure(target, redis.reader, requests, args.threads, args.seconds)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
