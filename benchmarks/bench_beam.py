"""Benchmark the training-data Beam pipeline in each DirectRunner mode.

    python -m benchmarks.bench_beam --events 1000000 [--workers 2] [--json PATH]

Generates synthetic raw tables with about ``--events`` conversions (users = events / 30),
then runs the pipeline in-process (``in_memory``) and with ``--workers`` worker processes
(``multi_processing``); reports conversions per second overall and per worker as JSON, and
per CPU second (all processes), which other load on the machine does not distort.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from beam_pipelines import build_training_data
from benchmarks import emit
from tfrs_ctx import schema
from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

EVENTS_PER_USER = 30  # synthetic conversions per user, requests' conversions included
INPUT_FILES = 8  # conversions part files, so reading spreads over workers


def mode_options(mode: str, workers: int) -> tuple[list[str], int]:
    """Beam flags of a DirectRunner mode, and its number of workers."""
    if mode == "in_memory":
        return ["--direct_running_mode=in_memory"], 1
    return [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"], workers


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the multi-process workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_mode(raw_dir: str, out_dir: str, mode: str, workers: int, conversions: int) -> dict:
    """One pipeline run; throughput in conversions per wall second (and per CPU second)."""
    flags, n_workers = mode_options(mode, workers)
    start, cpu = time.perf_counter(), cpu_seconds()
    metadata = build_training_data.run(["--input", raw_dir, "--output", out_dir, *flags], save_main_session=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {
        "mode": mode,
        "workers": n_workers,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "events_per_second": round(conversions / seconds),
        "events_per_second_per_worker": round(conversions / seconds / n_workers),
        "events_per_cpu_second": round(conversions / cpu),
        "examples": metadata["counts"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="conversion events to generate (about)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the multi_processing mode")
    parser.add_argument("--modes", default="in_memory,multi_processing", help="comma-separated DirectRunner modes")
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
    report = {
        "conversions": conversions,
        "requests": summary["rows"][schema.REQUESTS.name],
        "users": users,
        "generate_seconds": round(time.perf_counter() - start, 2),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "runs": [],
    }
    try:
        for mode in args.modes.split(","):
            out_dir = os.path.join(workdir, f"data_{mode}")
            report["runs"].append(run_mode(raw_dir, out_dir, mode, args.workers, conversions))
            print(json.dumps(report["runs"][-1]), file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
