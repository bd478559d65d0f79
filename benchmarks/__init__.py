"""Benchmark scripts (``python -m benchmarks.bench_*``): figures for the issue notes and README."""

from __future__ import annotations

import json
from typing import Any

import tfrs_ctx  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)


def emit(result: dict[str, Any], json_path: str | None) -> None:
    """Print a benchmark's result as JSON, and also write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
