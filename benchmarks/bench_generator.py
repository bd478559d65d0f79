"""Synthetic-generator throughput and memory: ``python -m benchmarks.bench_generator --users 1000000``.

Runs ``tfrs_ctx.sources.synthetic`` in a child process writing into a temporary directory, then
prints one JSON line: conversion events written per second (the generator's own clock, and
wall clock including interpreter start-up) and the child's peak resident set size
(``ru_maxrss`` of the waited-for child, so the benchmark's own memory is not counted).
Extra arguments after ``--`` go to the generator (e.g. ``-- --chunk-users 20000``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

TARGET_EVENTS_PER_SECOND = 200_000
TARGET_PEAK_RSS_BYTES = 2 * 1024**3


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(users: int, seed: int = 0, extra: list[str] | None = None, keep: str | None = None) -> dict:
    """Generate ``users`` users in a child process; returns the measurements."""
    out = keep or tempfile.mkdtemp(prefix="bench_generator_")
    cmd = [sys.executable, "-m", "tfrs_ctx.sources.synthetic", "--out", out, "--users", str(users), "--seed", str(seed)]
    cmd += [*(extra or []), "--quiet"]
    try:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        with open(os.path.join(out, "source.json")) as f:
            summary = json.load(f)
        disk = _dir_bytes(out)
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
    events = summary["rows"]["conversions"]
    result = {
        "benchmark": "generator",
        "users": users,
        "rows": summary["rows"],
        "events": events,
        "generator_seconds": summary["seconds"],
        "wall_seconds": round(wall, 3),
        "events_per_second": round(events / summary["seconds"]),
        "events_per_second_wall": round(events / wall),
        "peak_rss_bytes": peak_rss,
        "peak_rss_gib": round(peak_rss / 1024**3, 3),
        "output_bytes": disk,
        "chunk_users": summary["config"]["chunk_users"],
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    result["meets_targets"] = {
        "events_per_second": result["events_per_second_wall"] >= TARGET_EVENTS_PER_SECOND,
        "peak_rss": peak_rss <= TARGET_PEAK_RSS_BYTES,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generator", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the JSON result to this path")
    parser.add_argument("--keep", help="generate into this directory and keep it (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    result = run(args.users, args.seed, extra, args.keep)
    line = json.dumps(result)
    print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
