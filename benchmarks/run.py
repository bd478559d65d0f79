"""Every benchmark in one run: ``python -m benchmarks.run [--quick] [--out DIR] [--only name,name]``.

Runs each ``benchmarks/bench_*.py`` in its own subprocess (``--json PATH``; stdout and stderr
to ``OUT/<name>.log``), so a crash or a leak in one does not touch the others; a failed bench
is recorded with the tail of its log and the run goes on (exit status 1 at the end). Head vs
full and end-to-end recommend share one small demo work directory (``tfrs-ctx demo``),
prepared once here unless ``--demo DIR`` names a finished one.

Writes ``OUT/results.json`` (every bench's raw JSON, wall time and log, the machine, load
averages, date, commit, the sizing) and ``OUT/results.md`` (headline figures, the ratios
measured within this run, the sizing note for 100M users / 10M ads). ``--quick`` takes
under 10 minutes on 2 cores; the default uses each script's own default sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
BENCHES = (
    "generator",
    "beam",
    "training",
    "multi_worker",
    "feast",
    "redis",
    "serving",
    "head_vs_full",
    "recommend",
    "retrieval",
)
NEEDS_DEMO = ("head_vs_full", "recommend")
DEMO = "demo"  # the preparation step's name in results.json

# Arguments of each bench (and of the demo) per mode; "full" leaves each script's defaults.
SIZES: dict[str, dict[str, list[str]]] = {
    "quick": {
        "generator": ["--users", "100000"],
        "beam": ["--events", "100000", "--workers", "2"],
        "training": ["--users", "1500", "--steps", "15", "--dense_steps", "6", "--warmup", "3"],
        "multi_worker": ["--users", "600", "--steps", "15"],
        "feast": ["--users", "2000", "--repeats", "100"],
        "redis": ["--users", "100000", "--repeats", "200"],
        "serving": ["--requests", "400", "--seconds", "1.5"],
        "head_vs_full": ["--requests", "200"],
        "recommend": ["--requests", "200", "--seconds", "2"],
        "retrieval": [  # a smoke run: bench_retrieval's default trains a representative model (~10 min)
            *("--ads", "100000", "--users", "1500", "--steps", "60", "--model", "tiny"),
            *("--queries", "300", "--reps", "200", "--requests", "200"),
        ],
        DEMO: ["--users", "400", "--epochs", "1", "--bootstrap", "100"],
    },
    "full": {name: [] for name in BENCHES}
    | {"retrieval": ["--ads", "1000000"]}
    | {DEMO: ["--users", "8000", "--epochs", "1", "--bootstrap", "100"]},
}
TIMEOUT_S = {"quick": 420, "full": 3600}  # per bench

# Sizing assumptions (stated in results.md; change them here).
ASSUMPTIONS: dict[str, float] = {
    "users": 100e6,
    "ads": 10e6,
    "daily_active_fraction": 0.2,  # users with new events re-encoded by the daily job
    "events_per_user": 30,  # conversions per user in the training window (the synthetic world: ~28)
    "vector_dim": 64,  # encoded history (model.embedding_dim of configs/synthetic.yaml)
    "output_dim": 64,  # ad / user embedding (model.output_dim)
    "versions_kept": 2,  # encoded-history versions online during a model rollout
    "row_overhead_bytes": 100,  # per user row beyond the vector when the store was not measured
    "qps": 10_000,
    "cores_per_replica": 8,
    "target_utilization": 0.6,
    # Training (multi-worker): examples = users x events_per_user per epoch.
    "training_epochs": 8,  # train.epochs of configs/synthetic.yaml (early stopping may stop sooner)
    "training_hours": 12,  # wall-clock target of one full training run
    "cores_per_training_worker": 16,
    "mwms_scaling_efficiency": 0.7,  # per-worker throughput kept by N workers (ring all-reduce); stated, not measured
    "embedding_dim": 64,  # item-embedding table width (model.embedding_dim)
    "adam_slots": 2,  # Adam keeps two slot variables per weight (m, v)
    "corpus_bytes_per_ad": 8 + 8 + 5 * 12,  # the corpus features the model holds: ids + MAX_CATEGORIES ids/weights
    "training_worker_ram_gib": 64,
    "mirrored_state_max_fraction": 0.5,  # above this share of a worker's RAM: shard the embeddings (PS / TPU)
    # Redis online store.
    "redis_node_gib": 64,  # memory of one Redis node (shard)
    "redis_fill": 0.7,  # used_memory / node memory kept (fragmentation, fork for snapshots, growth)
    "materialize_window_hours": 2,  # the daily materialization must fit in this
    "materialize_process_ram_gib": 16,  # memory of one Feast materialization process
}


# ---- running the benches ----------------------------------------------------------------------


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file ('' when missing)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_step(name: str, cmd: list[str], out: Path, timeout_s: float, json_path: Path | None) -> dict[str, Any]:
    """Run one command in its own session, output to ``out/<name>.log``; its record for results.json."""
    log = out / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each bench imports benchmarks, which sets TF's environment
    record: dict[str, Any] = {"command": cmd, "log": str(log), "load_average_before": _load()}
    start, cpu = time.perf_counter(), children_cpu_s()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # also on Ctrl-C: the bench's session does not get the terminal's signals
            record["leftover_processes_killed"] = kill_session(proc.pid)
            proc.wait()
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["cpu_s"] = round(children_cpu_s() - cpu, 1)  # the bench and the processes it waited for
    record["returncode"] = returncode
    record["result"] = None
    if json_path is not None and returncode == 0:
        try:
            record["result"] = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            record["error"] = f"no JSON result: {e}"
    record["ok"] = returncode == 0 and (json_path is None or record["result"] is not None)
    if returncode is None:
        record["error"] = f"timed out after {timeout_s:g} s"
    elif returncode:
        record["error"] = f"exit status {returncode}"
    if not record["ok"]:
        record["log_tail"] = log_tail(log)
    return record


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's waited-for children (a load-independent cost)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_session(pid: int) -> bool:
    """SIGKILL what is left of the process group ``pid`` (the bench, its servers and workers); any left?"""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def bench_command(name: str, args: Sequence[str], json_path: Path, demo: Path | None) -> list[str]:
    """``python -m benchmarks.bench_<name> ... --json PATH`` (with the demo's paths where needed)."""
    extra: list[str] = []
    if name == "head_vs_full":
        extra = ["--run", str(demo / "runs" / "contextual"), "--data", str(demo / "data")]
    elif name == "recommend":
        extra = ["--workdir", str(demo)]
    return [sys.executable, "-m", f"benchmarks.bench_{name}", *extra, *args, "--json", str(json_path)]


def demo_command(workdir: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "tfrs_ctx.apps.demo", "--workdir", str(workdir), *args]


def store_row_bytes(store: Path) -> dict[str, Any] | None:
    """Bytes per user of the encoded-history view in a SQLite online store.

    Per feature row: entity key, feature name, serialized value, 16 B of timestamps (SQLite's
    own page and index overhead not included).
    """
    db = store / "online_store.db"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            table = next((t for t in tables if t.endswith("user_sequence_encoding")), None)
            if table is None:
                return None
            users, payload = con.execute(
                "SELECT COUNT(DISTINCT entity_key), "
                f'SUM(LENGTH(entity_key) + LENGTH(feature_name) + LENGTH(value) + 16) FROM "{table}"'
            ).fetchone()
    except sqlite3.Error:
        return None
    if not users:
        return None
    return {"table": table, "users": users, "bytes_per_user": round(payload / users), "file_bytes": db.stat().st_size}


# ---- the machine ------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD's commit (``None`` outside a git checkout or without git); ``+dirty`` with local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    cpu_max = Path("/sys/fs/cgroup/cpu.max")
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cgroup_cpu_max": cpu_max.read_text().strip() if cpu_max.exists() else None,
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "apache_beam": _version("apache-beam"),
        "feast": _version("feast"),
    }


# ---- reading results --------------------------------------------------------------------------


def get(results: dict[str, Any], bench: str, *keys: Any) -> Any:
    """``results['benches'][bench]['result'][k1][k2]...``; None when any part is missing."""
    value = (results.get("benches", {}).get(bench) or {}).get("result")
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def _pick(rows: list[dict] | None, **match: Any) -> dict | None:
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers the table and the sizing use (None where a bench is missing)."""
    handler = get(results, "feast", "encoder", "handler")
    pipeline = get(results, "feast", "encoder", "pipeline_in_memory")
    beam = get(results, "beam", "runs")
    beam_mem, beam_mp = _pick(beam, mode="in_memory"), _pick(beam, mode="multi_processing")
    throughput = get(results, "serving", "throughput") or []
    rec_rps = [get(results, "recommend", s, "throughput", "requests_per_s") for s in ("sqlite", "redis")]
    rec_rps = [r for r in rec_rps if r is not None]
    return {
        "encoder": {x: _pick(handler, xla=x) for x in (False, True)},
        "encoder_pipeline": {x: _pick(pipeline, xla=x) for x in (False, True)},
        "beam_in_memory": beam_mem,
        "beam_multi": beam_mp,
        "serving_best": max(throughput, key=lambda r: r["requests_per_s"], default=None),
        "serving_cpus": get(results, "serving", "cpus"),
        "recommend_rps": max(rec_rps, default=None),
        "recommend_cpus": (results.get("machine") or {}).get("cpu_count"),
    }


# ---- sizing -----------------------------------------------------------------------------------


def sizing(results: dict[str, Any], assumptions: dict[str, float] | None = None) -> dict[str, Any]:
    """Resources for ``users`` users and ``ads`` ads from this run's per-core figures (pure arithmetic).

    Keys are None where the bench they need is missing.
    """
    a = {**ASSUMPTIONS, **(assumptions or {})}
    f = figures(results)
    out: dict[str, Any] = {"assumptions": a}

    # Daily encoder job: the encoder alone (best of XLA / not) and the whole Beam pipeline per worker.
    rates = [r["users_per_cpu_second"] for r in f["encoder"].values() if r]
    active = a["users"] * a["daily_active_fraction"]
    out["encoder_users_per_core_s"] = max(rates, default=None)
    out["encoder_core_hours"] = _hours(active, out["encoder_users_per_core_s"])
    pipe = f["encoder_pipeline"][False]
    out["encoder_pipeline_users_per_worker_s"] = pipe["users_per_second_per_worker"] if pipe else None
    out["encoder_pipeline_users_measured"] = pipe.get("users") if pipe else None
    out["encoder_pipeline_core_hours"] = _hours(active, out["encoder_pipeline_users_per_worker_s"])

    # Beam training-data build over the whole window, from CPU seconds of the in-process run.
    mem = f["beam_in_memory"]
    out["beam_events"] = a["users"] * a["events_per_user"]
    out["beam_events_per_core_s"] = mem["events_per_cpu_second"] if mem else None
    out["beam_core_hours"] = _hours(out["beam_events"], out["beam_events_per_core_s"])

    # Online store: users x versions x bytes per user row (measured in the demo's SQLite store, else stated).
    measured = (results.get("store") or {}).get("bytes_per_user")
    out["store_row_bytes_measured"] = measured is not None
    out["store_row_bytes"] = measured or a["vector_dim"] * 4 + a["row_overhead_bytes"]
    out["store_bytes"] = a["users"] * a["versions_kept"] * out["store_row_bytes"]

    # Ad corpus matrix in every context-head replica; brute-force top-K cost scaled from the head's compute.
    out["corpus_bytes"] = a["ads"] * a["output_dim"] * 4
    head_ms, corpus = (
        get(results, "head_vs_full", "compute_context_head", "p50_ms"),
        get(results, "head_vs_full", "corpus"),
    )
    out["head_compute_ms"], out["head_corpus"] = head_ms, corpus
    out["bruteforce_ms_per_request"] = head_ms * a["ads"] / corpus if head_ms and corpus else None
    bf = out["bruteforce_ms_per_request"]
    out["bruteforce_cores"] = a["qps"] * bf / 1000 if bf is not None else None

    # Model-server replicas for the stated QPS from per-core requests/s (clients on the same cores).
    best, cpus = f["serving_best"], f["serving_cpus"]
    out["serving_rps_per_core"] = best["requests_per_s"] / cpus if best and cpus else None
    out["serving_cores"] = _cores(a, out["serving_rps_per_core"])
    out["serving_replicas"] = math.ceil(out["serving_cores"] / a["cores_per_replica"]) if out["serving_cores"] else None
    rec, rec_cpus = f["recommend_rps"], f["recommend_cpus"]
    out["recommend_rps_per_core"] = rec / rec_cpus if rec and rec_cpus else None
    out["recommend_cores"] = _cores(a, out["recommend_rps_per_core"])
    out.update(_training_sizing(results, a))
    out.update(_redis_sizing(results, a))
    return out


def _training_sizing(results: dict[str, Any], a: dict[str, float]) -> dict[str, Any]:
    """Training workers and hours from one process's examples/s per core, and each worker's memory.

    MultiWorkerMirroredStrategy mirrors every variable on every worker: the item-embedding table and
    Adam's two slots of it are the whole model at 10M ads, so per-worker memory does not fall as
    workers are added (only the examples per worker do).
    """
    out: dict[str, Any] = {}
    eps = get(results, "training", "contextual", "examples_per_second")
    cpus = get(results, "training", "cpus") or (results.get("machine") or {}).get("cpu_count")
    out["training_examples_per_core_s"] = eps / cpus if eps and cpus else None
    out["training_examples"] = a["users"] * a["events_per_user"] * a["training_epochs"]
    out["training_core_hours"] = _hours(out["training_examples"], out["training_examples_per_core_s"])
    per_worker = a["cores_per_training_worker"] * a["mwms_scaling_efficiency"]
    hours = out["training_core_hours"]
    out["training_workers"] = math.ceil(hours / (a["training_hours"] * per_worker)) if hours else None
    out["training_mwms_measured"] = {
        k: get(results, "multi_worker", k) for k in ("workers_1", "workers_2", "two_over_one_examples_per_second")
    }
    table = a["ads"] * a["embedding_dim"] * 4
    out["item_table_bytes"] = table
    out["item_table_with_adam_bytes"] = table * (1 + a["adam_slots"])
    out["corpus_feature_bytes"] = a["ads"] * a["corpus_bytes_per_ad"]
    out["training_worker_state_bytes"] = out["item_table_with_adam_bytes"] + out["corpus_feature_bytes"]
    limit = a["training_worker_ram_gib"] * 2**30 * a["mirrored_state_max_fraction"]
    out["mirrored_state_fits"] = out["training_worker_state_bytes"] <= limit
    out["ads_at_mirrored_limit"] = limit / (a["embedding_dim"] * 4 * (1 + a["adam_slots"]) + a["corpus_bytes_per_ad"])
    return out


def _redis_sizing(results: dict[str, Any], a: dict[str, float]) -> dict[str, Any]:
    """Redis memory and nodes from the measured bytes per user; materialization hours from rows/s."""
    out: dict[str, Any] = {}
    per_user = get(results, "redis", "memory", "bytes_per_user")
    out["redis_users_measured"] = get(results, "redis", "users")
    out["redis_bytes_per_user"] = per_user
    out["redis_bytes"] = a["users"] * a["versions_kept"] * per_user if per_user else None
    node = a["redis_node_gib"] * 2**30 * a["redis_fill"]
    out["redis_nodes"] = math.ceil(out["redis_bytes"] / node) if out["redis_bytes"] else None
    # One Feast process: per CPU-second where measured (other load on a shared machine left out).
    rps = get(results, "redis", "materialize", "rows_per_cpu_second") or get(
        results, "redis", "materialize", "rows_per_second"
    )
    out["redis_materialize_rows_per_s"] = rps
    out["redis_full_materialize_hours"] = _hours(a["users"], rps)
    daily = _hours(a["users"] * a["daily_active_fraction"], rps)
    out["redis_daily_materialize_core_hours"] = daily
    out["redis_daily_materialize_processes"] = math.ceil(daily / a["materialize_window_hours"]) if daily else None
    out["redis_delta"] = get(results, "redis", "delta")
    out["redis_delta_pushed"] = get(results, "redis", "delta_pushed")
    out["redis_read"] = get(results, "redis", "online_read")
    # Feast's local materialization holds a whole date range in memory: rows per process are bounded.
    peak, rows = get(results, "redis", "memory", "bench_process_peak_rss_mib"), get(results, "redis", "users")
    per_row = peak * 2**20 / rows if peak and rows else None
    out["materialize_rss_bytes_per_row"] = per_row
    out["materialize_rows_per_process"] = a["materialize_process_ram_gib"] * 2**30 / per_row if per_row else None
    rows_daily = a["users"] * a["daily_active_fraction"]
    chunks = out["materialize_rows_per_process"]
    out["materialize_daily_chunks"] = math.ceil(rows_daily / chunks) if chunks else None
    return out


def _hours(items: float, per_core_s: float | None) -> float | None:
    return items / per_core_s / 3600 if per_core_s else None


def _cores(a: dict[str, float], per_core: float | None) -> float | None:
    return a["qps"] / per_core / a["target_utilization"] if per_core else None


# ---- Markdown ---------------------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ms(d: dict | None) -> str:
    return "n/a" if not d else f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f} ms"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def headline_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, figure, bench) rows for the benches that ran."""
    f, g = figures(results), lambda *k: get(results, *k)
    rows: list[tuple[str, str, str]] = []
    if g("generator", "events"):
        rows.append(
            (
                f"synthetic generator, {_n(g('generator', 'users'))} users",
                f"{_n(g('generator', 'events_per_second_wall'))} events/s, "
                f"{g('generator', 'peak_rss_gib')} GiB peak RSS",
                "generator",
            )
        )
    if f["beam_in_memory"]:
        mem, mp = f["beam_in_memory"], f["beam_multi"]
        text = f"{_n(mem['events_per_second'])} events/s in-process ({_n(mem['events_per_cpu_second'])}/CPU-s)"
        if mp:
            text += f"; {_n(mp['events_per_second_per_worker'])}/worker with {mp['workers']} processes"
        rows.append((f"Beam training data, {_n(g('beam', 'conversions'))} events", text, "beam"))
    if g("training", "contextual"):
        rows.append(
            (
                f"training, batch {g('training', 'contextual', 'batch_size')}",
                f"{_n(g('training', 'contextual', 'examples_per_second'))} examples/s "
                f"(baseline {_n(g('training', 'baseline', 'examples_per_second'))})",
                "training",
            )
        )
    if g("training", "dense_targets_per_s"):
        dense, per_target = g("training", "dense_targets_per_s"), g("training", "per_target_targets_per_s")
        in_batch = g("training", "dense_in_batch_targets_per_s")
        text = f"{_n(dense)} targets/s vs {_n(per_target)} per target ({_n(in_batch)} with in-batch negatives)"
        rows.append((f"dense training, {g('training', 'dense', 'batch_size')} windows/step", text, "training"))
    for n in (1, 2):
        w = g("multi_worker", f"workers_{n}")
        if w:
            rows.append(
                (
                    f"training, {n} MWMS worker{'s' if n > 1 else ''} on this machine"
                    if n > 1
                    else "training, 1 process (multi-worker bench)",
                    f"{_n(w['last_epoch_examples_per_second'])} examples/s (last epoch), "
                    f"validation Recall@100 {w['final_val_recall']:.3f}",
                    "multi_worker",
                )
            )
    enc, pipe = f["encoder"], f["encoder_pipeline"]
    if enc[False]:
        xla = f" ({_n(enc[True]['users_per_second'])} with XLA)" if enc[True] else ""
        text = f"{_n(enc[False]['users_per_second'])} users/s{xla} per worker"
        if pipe[False]:
            text += f"; whole pipeline {_n(pipe[False]['users_per_second_per_worker'])}/worker with start-up"
        rows.append(("encoder, 50-event histories", text, "feast"))
    views = g("feast", "materialize", "sqlite") or {}
    if "user_sequence_encoding" in views:
        redis = (g("feast", "materialize", "redis") or {}).get("user_sequence_encoding")
        text = f"{_n(views['user_sequence_encoding']['rows_per_second'])} rows/s SQLite"
        text += f", {_n(redis['rows_per_second'])} Redis" if redis else ""
        rows.append(("materialize user encodings", text, "feast"))
    for size, label in (("one_user", "1 user"), ("batch_100_users", "100 users")):
        sqlite = g("feast", "online_read", "sqlite", size)
        if sqlite:
            redis = g("feast", "online_read", "redis", size)
            text = f"p50/p99 {_ms(sqlite)} SQLite" + (f", {_ms(redis)} Redis" if redis else "")
            rows.append((f"Feast online read, {label}", text, "feast"))
    if g("redis", "materialize"):
        users = _n(g("redis", "users"))
        rows.append(
            (
                f"Redis at {users} users: materialize, memory",
                f"{_n(g('redis', 'materialize', 'rows_per_second'))} rows/s; "
                f"{_n(g('redis', 'memory', 'bytes_per_user'))} B/user (used_memory); "
                f"{_n(g('redis', 'delta', 'rows'))}-user delta in {g('redis', 'delta', 'seconds')} s",
                "redis",
            )
        )
        rows.append(
            (
                f"Redis at {users} users: online read",
                f"p50/p99 {_ms(g('redis', 'online_read', 'one_user'))} 1 user, "
                f"{_ms(g('redis', 'online_read', 'batch_100_users'))} 100 users",
                "redis",
            )
        )
    if g("serving", "predict"):
        text = f"p50/p99 {_ms(g('serving', 'predict'))} vs {_ms(g('serving', 'echo'))}"
        text += f"; model alone p50 {g('serving', 'model_compute', 'p50_ms'):.2f} ms"
        rows.append(("Predict vs bare gRPC echo, batch 1", text, "serving"))
    if f["serving_best"]:
        best = f["serving_best"]
        mode = "with" if best["server_batching"] else "without"
        text = f"{_n(best['requests_per_s'])} req/s at {best['threads']} client threads, {mode} server batching"
        rows.append(("model server throughput (best)", text, "serving"))
    if g("head_vs_full", "compute_context_head"):
        text = f"compute p50/p99 {_ms(g('head_vs_full', 'compute_context_head'))} vs "
        text += f"{_ms(g('head_vs_full', 'compute_full'))}; Predict p50 "
        text += f"{g('head_vs_full', 'predict_context_head', 'p50_ms'):.2f} vs "
        text += f"{g('head_vs_full', 'predict_full', 'p50_ms'):.2f} ms"
        rows.append((f"context_head vs full, {_n(g('head_vs_full', 'corpus'))} ads", text, "head_vs_full"))
    if g("retrieval", "index_p50_ms"):
        text = f"head p50 {g('retrieval', 'exact_p50_ms'):.2f} ms exact vs {g('retrieval', 'index_p50_ms'):.2f} ms "
        text += f"index ({g('retrieval', 'speedup_p50'):.1f}x); overlap@100 {g('retrieval', 'overlap_at_100'):.3f}; "
        text += f"Recall@100 {g('retrieval', 'recall_at_100_exact'):.3f} exact vs "
        text += f"{g('retrieval', 'recall_at_100_index'):.3f} index; "
        text += f"server RSS {g('retrieval', 'server_rss_gib'):.2f} GiB"
        rows.append((f"served corpus index, {_n(g('retrieval', 'ads'))} ads", text, "retrieval"))
    if g("recommend", "sqlite"):
        text = f"p50/p99 {_ms(g('recommend', 'sqlite', 'latency'))} SQLite"
        if g("recommend", "redis"):
            text += f", {_ms(g('recommend', 'redis', 'latency'))} Redis"
        store = "redis" if g("recommend", "redis") else "sqlite"
        best = g("recommend", store, "throughput") or {}
        text += f"; {_n(best.get('requests_per_s'))} req/s from {best.get('threads')} clients"
        plain = [r for r in g("recommend", store, "plain") or [] if r.get("threads") == best.get("threads")]
        if best.get("p99_ms") is not None:  # measured through the coalescing client
            text += f" through one CoalescingClient (p99 {best['p99_ms']:.2f} ms)"
            if plain:
                text += f", {_n(plain[0]['requests_per_s'])} with a client per thread"
            text += f", {'Redis' if store == 'redis' else 'SQLite'}"
        rows.append(("recommend end to end (Feast read + Predict)", text, "recommend"))
    return rows


def ratio_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(ratio, value, how to read it) rows, measured within this run; missing inputs are left out."""
    f, g = figures(results), lambda *k: get(results, *k)
    rows = [
        ("Predict / echo, p50", g("serving", "predict_over_echo_p50"), "server cost over bare gRPC (target <= 2x)"),
        ("Predict / echo, p99", g("serving", "predict_over_echo_p99"), "the same, tail"),
        (
            "full / context_head compute, p50",
            g("head_vs_full", "compute_full_over_head_p50"),
            "what the hybrid split saves online",
        ),
        (
            "full / context_head Predict, p50",
            g("head_vs_full", "predict_full_over_head_p50"),
            "the same, through the server",
        ),
        (
            "contextual / baseline training ex/s",
            _ratio(
                g("training", "contextual", "examples_per_second"), g("training", "baseline", "examples_per_second")
            ),
            "training cost of the context layer (< 1: slower)",
        ),
        (
            "dense / per-target training targets/s",
            _ratio(g("training", "dense_targets_per_s"), g("training", "per_target_targets_per_s")),
            "labels learned per second, same model and corpus, full softmax",
        ),
        (
            "dense (in-batch) / per-target training targets/s",
            _ratio(g("training", "dense_in_batch_targets_per_s"), g("training", "per_target_targets_per_s")),
            "the dense mode with logQ in-batch negatives against the per-target default",
        ),
        (
            "Redis / SQLite online read p50, 1 user",
            _ratio(
                g("feast", "online_read", "redis", "one_user", "p50_ms"),
                g("feast", "online_read", "sqlite", "one_user", "p50_ms"),
            ),
            "> 1: Redis slower (a local socket vs an in-process file)",
        ),
        (
            "Redis / SQLite online read p50, 100 users",
            _ratio(
                g("feast", "online_read", "redis", "batch_100_users", "p50_ms"),
                g("feast", "online_read", "sqlite", "batch_100_users", "p50_ms"),
            ),
            "the same, batched",
        ),
        (
            "Redis / SQLite recommend p50",
            _ratio(g("recommend", "redis", "latency", "p50_ms"), g("recommend", "sqlite", "latency", "p50_ms")),
            "end to end",
        ),
        (
            "Redis / SQLite materialize rows/s, user encodings",
            _ratio(
                g("feast", "materialize", "redis", "user_sequence_encoding", "rows_per_second"),
                g("feast", "materialize", "sqlite", "user_sequence_encoding", "rows_per_second"),
            ),
            "> 1: Redis writes faster",
        ),
        (
            "XLA / no-XLA encoder users/CPU-s",
            _ratio(*(r["users_per_cpu_second"] if r else None for r in (f["encoder"][True], f["encoder"][False]))),
            "> 1: `--xla` pays off",
        ),
        (
            "multi-process / in-process Beam events/s",
            _ratio(*(r["events_per_second"] if r else None for r in (f["beam_multi"], f["beam_in_memory"]))),
            "whole run; < 1 where the workers share few cores",
        ),
        (
            "multi-process / in-process Beam events/CPU-s",
            _ratio(*(r["events_per_cpu_second"] if r else None for r in (f["beam_multi"], f["beam_in_memory"]))),
            "the workers' overhead, independent of free cores",
        ),
    ]
    return [(name, _x(value), note) for name, value, note in rows if value is not None]


def sizing_note(s: dict[str, Any]) -> list[str]:
    """The sizing as Markdown bullets."""
    a = s["assumptions"]
    users, ads, qps = f"{a['users'] / 1e6:g}M", f"{a['ads'] / 1e6:g}M", f"{a['qps']:,.0f}"
    active = f"{a['daily_active_fraction']:.0%}"
    lines = [
        f"Sizing for {users} users and {ads} ads from this run's per-core figures (assumptions stated inline):",
        "",
    ]
    if s["encoder_core_hours"] is not None:
        line = (
            f"- **Daily encoder job**: {active} of users active per day = "
            f"{a['users'] * a['daily_active_fraction'] / 1e6:g}M "
            f"histories: {_n(s['encoder_core_hours'], 1)} core-hours for the encoder alone "
            f"({_n(s['encoder_users_per_core_s'])} users/core-s)"
        )
        if s["encoder_pipeline_core_hours"] is not None:
            line += (
                f", {_n(s['encoder_pipeline_core_hours'], 1)} worker-core-hours for the whole Beam job at this run's "
                f"{_n(s['encoder_pipeline_users_per_worker_s'])} users/worker-s on "
                f"{_n(s['encoder_pipeline_users_measured'])} users (process start-up included: an upper bound, "
                f"lower on more users)"
            )
        lines.append(line + ".")
    if s["beam_core_hours"] is not None:
        lines.append(
            f"- **Beam training-data build**: {users} users x {a['events_per_user']:g} events = "
            f"{s['beam_events'] / 1e9:g}B events at {_n(s['beam_events_per_core_s'])} events/CPU-s: "
            f"{_n(s['beam_core_hours'], 1)} core-hours per full rebuild."
        )
    how = "measured in the demo's SQLite store" if s["store_row_bytes_measured"] else "stated"
    lines.append(
        f"- **Online store**: {users} users x {a['versions_kept']:g} versions x {s['store_row_bytes']:,} B/user "
        f"({how}: a {a['vector_dim']:g}-float vector = {a['vector_dim'] * 4:g} B, plus key, names, encoding) = "
        f"{_bytes(s['store_bytes'])}, before the store's own index and replication overhead."
    )
    line = (
        f"- **Ad corpus per context_head replica**: {ads} x {a['output_dim']:g} x 4 B = {_bytes(s['corpus_bytes'])} "
        f"of float32 in memory."
    )
    if s["bruteforce_ms_per_request"] is not None:
        line += (
            f" Brute-force top-K inside the head, scaled linearly from its measured compute "
            f"({s['head_compute_ms']:.2f} ms p50 at {_n(s['head_corpus'])} ads; an upper bound, fixed costs included), "
            f"would take ~{_n(s['bruteforce_ms_per_request'])} ms of one core per request, "
            f"{_n(s['bruteforce_cores'])} cores at {qps} QPS: at 10M ads the head serves the IVF index "
            f"exported with it (tfrs_ctx.retrieval.ivf, core TF ops; docs/retrieval/ivf_report.md)."
        )
    lines.append(line)
    if s["serving_replicas"] is not None:
        line = (
            f"- **Model server at {qps} QPS** (corpus as benchmarked): {_n(s['serving_rps_per_core'])} req/s per core "
            f"(best throughput / cores, the clients on the same cores) at {a['target_utilization']:.0%} utilization: "
            f"{_n(s['serving_cores'])} cores = {s['serving_replicas']} replicas of {a['cores_per_replica']:g} cores"
        )
        if s["recommend_cores"] is not None:
            line += (
                f"; end to end with the Feast read, {_n(s['recommend_rps_per_core'])} req/s per core: "
                f"{_n(s['recommend_cores'])} cores"
            )
        lines.append(line + ".")
    lines += _training_note(s, ads)
    lines += _redis_note(s, users, active)
    return lines


def _training_note(s: dict[str, Any], ads: str) -> list[str]:
    a, lines = s["assumptions"], []
    if s["training_workers"] is not None:
        lines.append(
            f"- **Training**: {a['users'] / 1e6:g}M users x {a['events_per_user']:g} examples x "
            f"{a['training_epochs']:g} epochs = {s['training_examples'] / 1e9:g}B examples at "
            f"{_n(s['training_examples_per_core_s'])} examples/core-s (one process): "
            f"{_n(s['training_core_hours'])} core-hours; in {a['training_hours']:g} h on workers of "
            f"{a['cores_per_training_worker']:g} cores at {a['mwms_scaling_efficiency']:.0%} MWMS scaling "
            f"efficiency (stated): **{s['training_workers']} workers**."
        )
    m = s.get("training_mwms_measured") or {}
    if m.get("two_over_one_examples_per_second") is not None:
        lines.append(
            f"- **MultiWorkerMirroredStrategy measured here**: 2 workers / 1 worker examples/s = "
            f"{m['two_over_one_examples_per_second']:.2f}x on this machine's shared cores (not a scaling figure)."
        )
    fits = "fits" if s["mirrored_state_fits"] else "does not fit"
    lines.append(
        f"- **Per training worker (mirrored)**: the {ads}-ad item table x {a['embedding_dim']:g} x 4 B = "
        f"{_bytes(s['item_table_bytes'])}, x{1 + a['adam_slots']:g} with Adam's slots = "
        f"{_bytes(s['item_table_with_adam_bytes'])}, + corpus features {_bytes(s['corpus_feature_bytes'])} = "
        f"{_bytes(s['training_worker_state_bytes'])} on **every** worker (activations and tf.data on top); "
        f"{fits} in {a['mirrored_state_max_fraction']:.0%} of {a['training_worker_ram_gib']:g} GiB. "
        f"Mirroring stops fitting at ~{s['ads_at_mirrored_limit'] / 1e6:,.0f}M ads: beyond, "
        f"ParameterServerStrategy or sharded embeddings (TPUEmbedding / a sharded table) hold each row once."
    )
    return lines


def _redis_note(s: dict[str, Any], users: str, active: str) -> list[str]:
    a, lines = s["assumptions"], []
    if s["redis_bytes"] is not None:
        lines.append(
            f"- **Redis online store**: {_n(s['redis_bytes_per_user'])} B/user measured (`used_memory` delta over "
            f"{_n(s['redis_users_measured'])} users, {a['vector_dim']:g}-float encoding) x {users} users x "
            f"{a['versions_kept']:g} versions = {_bytes(s['redis_bytes'])}: {s['redis_nodes']} nodes of "
            f"{a['redis_node_gib']:g} GiB filled to {a['redis_fill']:.0%} (replicas on top)."
        )
    if s["redis_materialize_rows_per_s"]:
        lines.append(
            f"- **Redis materialization**: {_n(s['redis_materialize_rows_per_s'])} rows/s per Feast process: "
            f"{_n(s['redis_full_materialize_hours'], 1)} h for all {users} users from one process; the daily "
            f"{active} = {_n(s['redis_daily_materialize_core_hours'], 1)} process-hours, "
            f"{s['redis_daily_materialize_processes']} process(es) (users split by id) to fit "
            f"{a['materialize_window_hours']:g} h."
        )
    if s["materialize_rows_per_process"]:
        line = (
            f"- **Materialization memory**: Feast's local engine holds a whole range in memory: "
            f"{s['materialize_rss_bytes_per_row'] / 1e3:,.1f} KB of process RSS per row measured, so at most "
            f"{s['materialize_rows_per_process'] / 1e6:,.1f}M rows per {a['materialize_process_ram_gib']:g} GiB "
            f"process: the daily {active} in at least {s['materialize_daily_chunks']} chunks (by user-id range or "
            f"time window)"
        )
        delta, pushed = s["redis_delta"], s["redis_delta_pushed"]
        if delta and pushed:
            line += (
                f". materialize-incremental scans the whole offline source: a {_n(delta['rows'])}-row delta took "
                f"{delta['seconds']:g} s over {_n(s['redis_users_measured'])} users, the same rows pushed with "
                f"`write_to_online_store` {pushed['seconds']:g} s"
            )
        lines.append(line + ".")
    return lines


def command_line(name: str, args: Sequence[str]) -> str:
    """How to rerun one bench by hand at this run's sizes."""
    paths = {"head_vs_full": ["--run", "RUN", "--data", "DATA"], "recommend": ["--workdir", "DEMO_WORKDIR"]}
    return " ".join(["python -m", f"benchmarks.bench_{name}", *paths.get(name, []), *args])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: headline table, ratio table, sizing note, failures."""
    m = results.get("machine") or {}
    ram = f"{m['ram_bytes'] / 1024**3:.0f} GiB RAM" if m.get("ram_bytes") else "RAM n/a"
    lines = [
        f"# Benchmarks ({results.get('mode', '?')})",
        "",
        f"{results.get('date', '?')}, commit `{(results.get('commit') or '?')[:12]}`; {m.get('cpu_model', '?')}, "
        f"{m.get('cpu_count', '?')} CPUs ({m.get('cpu_affinity', '?')} usable), {ram}; Python {m.get('python', '?')}, "
        f"TensorFlow {m.get('tensorflow', '?')}; load average {results.get('load_average_before')} before, "
        f"{results.get('load_average_after')} after; {_n(results.get('wall_s'))} s in all.",
        "",
    ]
    commands = {name: f"`{command_line(name, (results.get('sizes') or {}).get(name, []))}`" for name in BENCHES}
    lines += _table(("what", "figure", "command"), [(w, fig, commands[b]) for w, fig, b in headline_rows(results)])
    lines += ["", "**Ratios** (both sides measured in this run, on this machine):", ""]
    lines += _table(("ratio", "value", "how to read it"), ratio_rows(results))
    lines += ["", *sizing_note(results.get("sizing") or sizing(results))]
    skipped = {n: r["redis_skipped"] for n, r in _results(results).items() if r.get("redis_skipped")}
    if skipped:
        lines += ["", f"**Skipped**: the Redis rows of {', '.join(skipped)}: {next(iter(skipped.values()))}."]
    failed = {n: b for n, b in (results.get("benches") or {}).items() if not b.get("ok")}
    if failed:
        lines += ["", "**Failed**:", ""]
        lines += [f"- {n}: {b.get('error', 'failed')} (log: `{b.get('log')}`)" for n, b in failed.items()]
    benches = (results.get("benches") or {}).items()
    walls = ", ".join(f"{n} {b['wall_s']:.0f} s{_cpu(b)}" for n, b in benches if "wall_s" in b)
    return "\n".join([*lines, "", f"Wall time per bench: {walls}.", ""])


def _results(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each bench's own JSON result, by bench (benches without one left out)."""
    return {n: b["result"] for n, b in (results.get("benches") or {}).items() if isinstance(b.get("result"), dict)}


def _cpu(record: dict[str, Any]) -> str:
    return f" ({record['cpu_s']:.0f} CPU-s)" if record.get("cpu_s") is not None else ""


# ---- the run ----------------------------------------------------------------------------------


def write_outputs(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 10 minutes")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results, logs and the demo go here")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(BENCHES)}")
    parser.add_argument("--demo", default=None, help="a finished demo workdir to use (default: prepare one)")
    parser.add_argument("--keep-demo", action="store_true", help="keep the prepared demo workdir under --out")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench (default: 420 quick, 3600)")
    args = parser.parse_args(argv)
    args.names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(args.names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench(es) {unknown}; choose from {', '.join(BENCHES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    sizes, timeout = SIZES[mode], args.timeout or TIMEOUT_S[mode]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in BENCHES if n in args.names]
    prepare = any(n in NEEDS_DEMO for n in names) and not args.demo
    demo = Path(args.demo).resolve() if args.demo else out / "demo_work"
    steps = (
        [n for n in names if n not in NEEDS_DEMO] + ([DEMO] if prepare else []) + [n for n in names if n in NEEDS_DEMO]
    )
    results: dict[str, Any] = {
        "mode": mode,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "load_average_before": _load(),
        "sizes": {n: sizes[n] for n in steps},
        "benches": {},
    }
    start = time.perf_counter()
    for i, name in enumerate(steps, 1):
        label = f"[{i}/{len(steps)}] {'tfrs-ctx demo' if name == DEMO else 'bench_' + name}"
        print(f"{label} ... (log: {out / (name + '.log')})", file=sys.stderr, flush=True)
        if name in NEEDS_DEMO and DEMO in results["benches"] and not results["benches"][DEMO]["ok"]:
            record: dict[str, Any] = {"ok": False, "error": "skipped: the demo preparation failed", "wall_s": 0.0}
        elif name == DEMO:
            record = run_step(DEMO, demo_command(demo, sizes[DEMO]), out, timeout, None)
        else:
            json_path = out / f"{name}.json"
            json_path.unlink(missing_ok=True)
            record = run_step(name, bench_command(name, sizes[name], json_path, demo), out, timeout, json_path)
        results["benches"][name] = record
        status = "ok" if record["ok"] else f"FAILED ({record.get('error')})"
        print(f"{label} ... {record['wall_s']:.0f} s {status}", file=sys.stderr, flush=True)
        write_outputs(results, out)
    if any(n in NEEDS_DEMO for n in names):
        results["store"] = store_row_bytes(demo / "store")
    if args.demo is None and not args.keep_demo:
        shutil.rmtree(demo, ignore_errors=True)
    results["load_average_after"] = _load()
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["sizing"] = sizing(results)
    write_outputs(results, out)
    failed = [n for n, b in results["benches"].items() if not b["ok"]]
    print(
        f"{len(steps) - len(failed)}/{len(steps)} ok in {results['wall_s']:.0f} s; {out / 'results.md'}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
