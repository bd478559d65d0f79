"""``tfrs-ctx daily``: encode the users with new activity, then refresh the Feast online store.

    tfrs-ctx daily --raw RAW --models models --store STORE [--full] [--as-of TS]
        [--repo feature_repo] [--online sqlite|redis] [--feature-store-yaml PATH] [--no-materialize]
        [Beam options, e.g. --direct_running_mode=multi_processing --direct_num_workers=2]

1. ``python -m beam_pipelines.encode_users --raw RAW --model models/encoder --output STORE``
   (``--full``: every user; otherwise users with conversions newer than the last run's).
2. ``feast apply`` of ``feature_repo/`` for ``STORE``, only when its registry does not exist
   yet (the first run); later definition changes are applied with ``feast apply``.
3. ``materialize-incremental`` up to now; a feature view never materialized before (a fresh
   online store) is materialized from the beginning instead of from ``now - ttl``.

``--online redis`` uses ``feature_repo/feature_store.redis.yaml`` and needs
``REDIS_CONNECTION_STRING`` (e.g. ``127.0.0.1:6379``) in the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tfrs_ctx import feature_store
from tfrs_ctx import schema as S


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This command's flags, and the rest (Beam pipeline options)."""
    parser = argparse.ArgumentParser(prog="tfrs-ctx daily", description=__doc__.split("\n")[0])
    parser.add_argument("--raw", required=True, help="raw-table directory")
    parser.add_argument("--models", required=True, help="models directory (TF Serving layout; uses its encoder)")
    parser.add_argument("--store", required=True, help="store directory (Parquet sources, state, SQLite files)")
    parser.add_argument("--full", action="store_true", help="re-encode every user")
    parser.add_argument("--as-of", type=int, help="reference time of the histories (default: newest conversion)")
    parser.add_argument("--repo", help="Feast repo (default: the project's feature_repo/)")
    parser.add_argument("--online", choices=("sqlite", "redis"), default="sqlite", help="online store")
    parser.add_argument("--feature-store-yaml", help="explicit Feast yaml (overrides --online)")
    parser.add_argument("--no-materialize", action="store_true", help="encode only")
    return parser.parse_known_args(list(argv))


def encode(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    from beam_pipelines import encode_users

    argv = ["--raw", args.raw, "--model", os.path.join(args.models, S.MODEL_ENCODER), "--output", args.store]
    argv += ["--full"] if args.full else []
    argv += ["--as_of", str(args.as_of)] if args.as_of is not None else []
    return encode_users.run([*argv, *beam_args])


def refresh_online(args: argparse.Namespace, end: dt.datetime) -> dict[str, Any]:
    """Apply on the first run, then materialize up to ``end``."""
    fs_yaml = args.feature_store_yaml or feature_store.repo_yaml(args.repo, args.online)
    store = feature_store.open_store(args.store, args.repo, fs_yaml)
    applied = not feature_store.registry_exists(store)
    if applied:
        store = feature_store.apply(args.store, args.repo, fs_yaml)
    start = time.perf_counter()
    views = feature_store.materialize(store, end)
    return {
        "applied": applied,
        "materialized": views,
        "materialize_end": end.isoformat(),
        "materialize_seconds": round(time.perf_counter() - start, 2),
    }


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Encode, then (unless ``--no-materialize``) apply if needed and materialize; returns both summaries."""
    args, beam_args = parse_args(argv)
    summary: dict[str, Any] = {"encode": encode(args, beam_args)}
    if not args.no_materialize:
        # The rows' timestamp may be bumped past the clock (several runs in one second).
        written = dt.datetime.fromtimestamp(summary["encode"]["event_timestamp"] + 1, dt.UTC)
        summary["online"] = refresh_online(args, max(dt.datetime.now(dt.UTC), written))
        print(json.dumps(summary["online"], indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
