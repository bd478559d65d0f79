"""Benchmark scripts (``python -m benchmarks.bench_*``): figures for the issue notes and README."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import tfrs_ctx  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)


def emit(result: dict[str, Any], json_path: str | None) -> None:
    """Print a benchmark's result as JSON, and also write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")


@contextlib.contextmanager
def scratch_dir(path: str | None, prefix: str) -> Iterator[str]:
    """``path`` as given (kept), or a fresh temporary directory removed afterwards."""
    if path:
        yield path
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
