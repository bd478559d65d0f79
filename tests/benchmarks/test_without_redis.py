"""``benchmarks.run --quick`` without ``redis-server`` on PATH: the Redis rows are skipped with a reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_recommend_bench_skips_redis_rows_when_redis_server_is_missing(demo_work, tmp_path):
    bin_dir = os.path.dirname(sys.executable)  # the venv's tools only: no redis-server
    env = {**os.environ, "PATH": bin_dir}
    assert shutil.which("redis-server", path=bin_dir) is None
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "recommend", "--demo", str(demo_work)]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((out / "results.json").read_text())["benches"]["recommend"]
    assert bench["ok"]
    result = bench["result"]
    assert result["redis"] is None and "redis-server is not on PATH" in result["redis_skipped"]
    assert result["sqlite"]["throughput"]["requests_per_s"] > 0  # the SQLite rows were measured
    text = (out / "results.md").read_text()
    assert "**Skipped**: the Redis rows of recommend: redis-server is not on PATH" in text
    assert "recommend end to end" in text and "SQLite" in text
