"""Benchmark both Beam pipelines on each runner: the DirectRunner's modes and the DaskRunner.

    python -m benchmarks.bench_beam --events 1000000 [--workers 2] \\
        [--runs direct:in_memory,direct:multi_processing(,dask)] [--model models/encoder] [--json PATH]

    # both pipelines on both runners, in one run (the README's DaskRunner figures)
    python -m benchmarks.bench_beam --events 100000 --runs direct:in_memory,dask --model models/encoder

Generates synthetic raw tables with about ``--events`` conversions (users = events / 30), then
runs the training-data pipeline (``build``) and, with ``--model`` (an encoder SavedModel base
path), the user-encoding pipeline (``encode``) on every runner of ``--runs``: the DirectRunner
in-process (``direct:in_memory``) or with ``--workers`` worker processes
(``direct:multi_processing``), and the DaskRunner on a ``LocalCluster`` of ``--workers`` processes
that the pipeline starts and stops itself (``dask``). Reports conversions per wall second (and
per CPU second, all processes), the peak RSS of the driver and of its worker processes (the sum
over the process tree, sampled every 0.1 s with psutil), and whether every runner's outputs
equal the first one's (TFRecord examples and vocabularies; Parquet rows, vectors to 1e-5).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks import emit
from tfrs_ctx import schema

EVENTS_PER_USER = 30  # synthetic conversions per user, requests' conversions included
INPUT_FILES = 8  # conversions part files, so reading spreads over workers
EVENT_TS = 1_800_000_000


def runner_flags(run: str, workers: int) -> tuple[list[str], int]:
    """Beam flags of a ``--runs`` entry, and its number of workers."""
    if run == "direct:in_memory":
        return ["--direct_running_mode=in_memory"], 1
    if run.startswith("direct:"):
        return [f"--direct_running_mode={run.split(':', 1)[1]}", f"--direct_num_workers={workers}"], workers
    if run == "dask":
        return ["--runner=DaskRunner", f"--dask_workers={workers}"], workers
    raise ValueError(f"unknown run {run!r}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PeakMemory:
    """Peak RSS of this process and of the sum of its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.process.memory_info().rss)
                total = 0
                for child in self.process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                self.workers = max(self.workers, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure(fn: Any, argv: list[str], conversions: int, n_workers: int) -> tuple[Any, dict]:
    """``fn(argv)``'s result, and its wall and CPU seconds, throughput and peak memory."""
    start, cpu = time.perf_counter(), cpu_seconds()
    with PeakMemory() as memory:
        result = fn(argv)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return result, {
        "workers": n_workers,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "events_per_second": round(conversions / seconds),
        "events_per_second_per_worker": round(conversions / seconds / n_workers),
        "events_per_cpu_second": round(conversions / cpu) if cpu else None,
        "peak_rss_driver_mb": round(memory.driver / 2**20),
        "peak_rss_workers_mb": round(memory.workers / 2**20),
    }


def training_digest(data_dir: str) -> dict:
    """Order-free content of the training data: sorted records per split, vocabularies."""
    import tensorflow as tf

    out: dict = {}
    for split in schema.SPLITS:
        files = sorted(glob.glob(schema.tfrecord_pattern(data_dir, split)))
        out[split] = sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    for path in sorted(glob.glob(os.path.join(data_dir, schema.VOCAB_DIR, "*"))):
        with open(path) as f:
            out[os.path.basename(path)] = f.read()
    return out


def store_digest(store: str) -> dict:
    """The encodings' rows by user (vectors as arrays) and the snapshots' rows."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = [
        r for p in glob.glob(f"{store}/{schema.USER_ENCODINGS_DIR}/*.parquet") for r in pq.read_table(p).to_pylist()
    ]
    vectors = {r[schema.USER_ID]: np.asarray(r.pop(schema.ENCODED_HISTORY)) for r in rows}
    other = {r[schema.USER_ID]: r for r in rows}
    snapshots = [sorted(map(str, pq.read_table(p).to_pylist())) for p in sorted(glob.glob(f"{store}/*.parquet"))]
    return {"vectors": vectors, "rows": other, "snapshots": snapshots}


def same_store(a: dict, b: dict) -> bool:
    import numpy as np

    if a["rows"] != b["rows"] or a["snapshots"] != b["snapshots"]:
        return False
    return all(np.allclose(a["vectors"][u], b["vectors"][u], rtol=0, atol=1e-5) for u in a["vectors"])


def main(argv: list[str] | None = None) -> int:
    from beam_pipelines import build_training_data, encode_users
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="conversion events to generate (about)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (multi_processing, dask)")
    parser.add_argument(
        "--runs",
        default="direct:in_memory,direct:multi_processing",
        help="comma-separated: direct:in_memory, direct:multi_processing, dask",
    )
    parser.add_argument("--model", default=None, help="encoder SavedModel base path: also run encode_users")
    parser.add_argument("--workdir", default=None, help="where to put raw and output data (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_beam_")
    raw_dir = os.path.join(workdir, "raw")
    users = max(1, args.events // EVENTS_PER_USER)
    start = time.perf_counter()
    config = SyntheticConfig(users=users, seed=args.seed, chunk_users=max(1, -(-users // INPUT_FILES)))
    summary = generate(raw_dir, config, progress=False)
    conversions = summary["rows"][schema.CONVERSIONS.name]
    report: dict = {
        "conversions": conversions,
        "requests": summary["rows"][schema.REQUESTS.name],
        "users": users,
        "generate_seconds": round(time.perf_counter() - start, 2),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "runs": [],
    }
    digests: dict[str, Any] = {}
    try:
        for run in args.runs.split(","):
            flags, n_workers = runner_flags(run, args.workers)
            name = run.replace(":", "_")
            out_dir = os.path.join(workdir, f"data_{name}")
            argv = ["--input", raw_dir, "--output", out_dir, *flags]
            metadata, figures = measure(
                functools.partial(build_training_data.run, save_main_session=False), argv, conversions, n_workers
            )
            digest = training_digest(out_dir)
            digests.setdefault("build", digest)
            mode = run.split(":")[-1]
            entry = {"pipeline": "build", "run": run, "mode": mode, **figures, "examples": metadata["counts"]}
            entry["same_output_as_first"] = digest == digests["build"]
            report["runs"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
            if not args.model:
                continue
            store = os.path.join(workdir, f"store_{name}")
            encode_flags = ["--raw", raw_dir, "--model", args.model, "--output", store, f"--event_timestamp={EVENT_TS}"]
            result, figures = measure(encode_users.run, [*encode_flags, *flags], conversions, n_workers)
            digest = store_digest(store)
            digests.setdefault("encode", digest)
            entry = {
                "pipeline": "encode",
                "run": run,
                "mode": mode,
                **figures,
                "users_encoded": result["users_encoded"],
            }
            entry["same_output_as_first"] = same_store(digest, digests["encode"])
            report["runs"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
