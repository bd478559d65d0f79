"""Benchmark the offline encoder job and the Feast online stores.

    python -m benchmarks.bench_feast [--users 20000] [--json PATH]

Setup: synthetic raw tables with about ``--events-per-user`` conversions per user (so
histories are full: ``MAX_HISTORY`` = 50 events), and an encoder of the production size
(``tfrs_ctx/configs/synthetic.yaml``) exported untrained (throughput does not depend on the
weights; vocabularies come from a small training-data build of the same synthetic world).

Reports (JSON):
* ``encoder``: users/s of the encoder alone (RunInference's handler on batches of 512 full
  50-event histories, one fresh process), and of the whole Beam pipeline in one DirectRunner
  worker (``in_memory``: reading, validation, grouping, histories, inference, Parquet, the
  process start included); each without and with ``--xla``. ``users_per_cpu_second``
  discounts other load on a shared machine.
* ``materialize``: rows/s per feature view into SQLite and into Redis (a local
  ``redis-server``; ``null`` when the binary is missing).
* ``online_read``: p50 / p99 latency (ms) of ``read_user_features`` for one user and for
  a batch of 100 users, from each store.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from beam_pipelines import build_training_data, encode_users
from benchmarks import emit, scratch_dir
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.data import rawio
from tfrs_ctx.sources.synthetic import SyntheticConfig, generate
from tfrs_ctx.testing import local_redis_server

REDIS_MISSING = "redis-server is not on PATH (Debian package redis-server)"

VERSION = 1
SEED = 3


def world(users: int, events_per_user: float) -> SyntheticConfig:
    return SyntheticConfig(users=users, seed=SEED, events_per_user=events_per_user)


def export_encoder(workdir: str) -> str:
    """An untrained production-size model, exported; returns the models directory."""
    from tfrs_ctx import export
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training.run_dir import build_model, dummy_batch

    raw, data, models = (os.path.join(workdir, d) for d in ("vocab_raw", "vocab_data", "models"))
    generate(raw, world(500, 10.0), progress=False)
    build_training_data.run(["--input", raw, "--output", data], save_main_session=False)
    cfg = load_config("synthetic")
    cfg.train.data_dir = data
    model = build_model(cfg)
    model(dummy_batch(1), training=False)
    export.export_all(model, data, models, version=VERSION, top_k=100)
    return models


def user_batches(raw_dir: str, batch: int, full_only: bool) -> list[list[dict]]:
    """Users' encoder inputs as RunInference sees them (per-user dicts), in batches.

    ``full_only``: only users whose history is full (``MAX_HISTORY`` events).
    """
    conv = rawio.read_table(raw_dir, S.CONVERSIONS)
    as_of = int(conv[S.TIMESTAMP].max())
    events = []
    for _, g in conv.groupby(S.USER_ID):
        block = {c: g[c].to_numpy() for c in (S.TIMESTAMP, S.ITEM_ID, S.ADVERTISER_ID)}
        block[S.EVENT_TYPE] = g[S.EVENT_TYPE].to_numpy(dtype=str)
        events.append(encode_users.T.UserEvents.from_blocks([block]))
    inputs = encode_users.raw_histories(events, as_of)
    keep = np.flatnonzero(inputs[S.HISTORY_LENGTH] == S.MAX_HISTORY) if full_only else np.arange(len(events))
    examples = [{k: v[i] for k, v in inputs.items()} for i in keep]
    return [examples[i : i + batch] for i in range(0, len(examples) - batch + 1, batch)]


def bench_handler(model_dir: str, raw_dir: str, batch_size: int, xla: bool) -> dict[str, Any]:
    """The RunInference handler alone, one process, full 50-event histories."""
    batches = user_batches(raw_dir, batch_size, full_only=True)
    handler = encode_users.EncoderModelHandler(model_dir, batch_size, batch_size, xla=xla)
    handler.set_environment_vars()
    model = handler.load_model()
    for _ in range(2):
        list(handler.run_inference(batches[0], model))  # warm-up (tracing, XLA compilation)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        list(handler.run_inference(batch, model))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    users = sum(len(b) for b in batches)
    return {
        "xla": xla,
        "users": users,
        "batch_size": batch_size,
        "history_length": S.MAX_HISTORY,
        "users_per_second": round(users / seconds),
        "users_per_cpu_second": round(users / cpu),
    }


def child(args: list[str]) -> dict[str, Any]:
    """Run ``python -m benchmarks.bench_feast --child ...`` in a fresh process (XLA needs one)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_feast", "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_pipeline(raw: str, models: str, store: str, xla: bool) -> dict[str, Any]:
    """``python -m beam_pipelines.encode_users --full`` in one in-process DirectRunner worker."""
    argv = [
        "--raw",
        raw,
        "--model",
        os.path.join(models, "encoder"),
        "--output",
        store,
        "--full",
        "--direct_running_mode=in_memory",
        *(["--xla"] if xla else []),
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.encode_users", *argv], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    lengths = np.concatenate(
        [
            pq.read_table(f, columns=[S.HISTORY_LENGTH])[S.HISTORY_LENGTH].to_numpy()
            for f in summary["files"]
            if S.USER_ENCODINGS_DIR in f
        ]
    )
    return {
        "xla": xla,
        "users": summary["users_encoded"],
        "mean_history_length": round(float(lengths.mean()), 1),
        "seconds_with_startup": round(seconds, 2),
        "users_per_second_per_worker": round(summary["users_encoded"] / seconds),
    }


def bench_materialize(store: Any) -> dict[str, Any]:
    """Materialize each view from the beginning (a fresh online store); rows/s per view."""
    end = dt.datetime.now(dt.UTC)
    out = {}
    for view in store.list_feature_views():
        rows = sum(_parquet_rows(p) for p in _parquet_files(view.batch_source.path))
        start = time.perf_counter()
        store.materialize(start_date=F.FIRST_MATERIALIZE_START, end_date=end, feature_views=[view.name])
        seconds = time.perf_counter() - start
        out[view.name] = {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds)}
    return out


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    return [path]


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def latency(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def bench_reads(store: Any, user_ids: list[int], repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    one = rng.choice(user_ids, repeats + 1).tolist()
    hundred = [rng.choice(user_ids, 100, replace=False).tolist() for _ in range(repeats + 1)]
    it1, it100 = iter(one), iter(hundred)
    return {
        "one_user": latency(lambda: F.read_user_features(store, [next(it1)]), repeats),
        "batch_100_users": latency(lambda: F.read_user_features(store, next(it100)), repeats),
    }


def run_all(args: argparse.Namespace, workdir: str, report: dict[str, Any]) -> None:
    """Every measurement, into ``report``."""
    raw = os.path.join(workdir, "raw")
    models = export_encoder(workdir)
    generate(raw, world(args.users, args.events_per_user), progress=False)
    model_dir = encode_users.resolve_model(os.path.join(models, "encoder")).path
    report["encoder"] = {
        "handler": [child([model_dir, raw, args.batch_size, xla]) for xla in (False, True)],
        "pipeline_in_memory": [
            bench_pipeline(raw, models, os.path.join(workdir, f"store_{xla}"), xla) for xla in (False, True)
        ],
    }
    store = os.path.join(workdir, "store_False")
    sqlite = F.apply(store)
    report["materialize"] = {"sqlite": bench_materialize(sqlite)}
    users = sorted(int(u) for u in rawio.read_table(raw, S.USERS)[S.USER_ID])
    report["online_read"] = {"sqlite": bench_reads(sqlite, users, args.repeats)}
    report["materialize"]["redis"] = report["online_read"]["redis"] = None
    if shutil.which("redis-server"):
        with local_redis_server() as redis_url:
            os.environ["REDIS_CONNECTION_STRING"] = redis_url
            redis_store = F.apply(store, fs_yaml=F.repo_yaml(online="redis"))
            report["materialize"]["redis"] = bench_materialize(redis_store)
            report["online_read"]["redis"] = bench_reads(redis_store, users, args.repeats)
    else:
        report["redis_skipped"] = REDIS_MISSING
        print(f"Redis rows skipped: {REDIS_MISSING}", file=sys.stderr)
    report["load_average_1min"] = round(os.getloadavg()[0], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events-per-user", type=float, default=100.0, help="synthetic conversions per user (mean)")
    parser.add_argument("--batch-size", type=int, default=512, help="encoder batch (RunInference's max)")
    parser.add_argument("--repeats", type=int, default=300, help="online reads per latency measurement")
    parser.add_argument("--workdir", default=None, help="keep the data here (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a fresh process for one handler measurement
        model_dir, raw, batch_size, xla = json.loads(args.child)
        print(json.dumps(bench_handler(model_dir, raw, batch_size, xla)))
        return 0

    report: dict[str, Any] = {"users": args.users, "cpu_count": os.cpu_count()}
    with scratch_dir(args.workdir, "bench_feast_") as work, contextlib.redirect_stdout(sys.stderr):
        run_all(args, work, report)  # (stdout: Beam's and Feast's progress output)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
