"""A bounded fault-injection load test of the online path: Feast (Redis) read + gRPC Predict.

    python -m benchmarks.load_test --workdir DEMO_WORKDIR [--requests 1000] [--clients 8]
        [--time-limit 300] [--rate R] [--redis-down 3] [--seed 0] [--coalesce] [--json PATH]

Uses a finished demo work directory (``tfrs-ctx demo --workdir DIR``: models, store, raw, and
runs/data for the new model version) and never writes into it. On loopback it starts the model
server on a copy of the models, a private Redis online store materialized from a copy of the
store's sources (``benchmarks.redis_store``), then ``clients`` threads, each with its own
``CandidateClient``, send a fixed, seeded mix of ``requests`` single-request recommend calls
(known / unknown users; a subject item, none, or an unknown one), paced at ``rate`` per second
(default: the requests spread over half the time limit). No request starts after the time limit.
With ``--coalesce`` the threads share one ``CoalescingClient`` instead (their requests merged
into shared reads and Predicts; a call whose deadline passes fails with ``DeadlineExceeded``).

Faults, one after the other, each when the issued-request count reaches a fraction of the total
and at least 5% of the requests after the previous fault ended:

1. 20%: the model server is stopped (SIGTERM, graceful) and restarted on the same port;
2. 45%: a new model version (the trained run's query MLP perturbed, exported before the load
   with ``tfrs_ctx.export.export_all`` into a staging directory) is renamed into the served
   models directory, one atomic rename per model, like ``tfrs-ctx export``. Stored vectors keep
   their old ``model_version``: the client pins Predict to it, and the server keeps two head
   versions, so known users stay on the old head; cold-start users move to the new one;
3. 70%: Redis is killed (SIGKILL) and restarted ``redis_down`` seconds later on the same port,
   its data restored from the RDB snapshot taken right after materialization.

Every successful answer is checked against a reference computed without the server: the
``context_head`` SavedModel of the version that served it, loaded in-process, run on the stored
vector and demographics read from the workdir's SQLite online store and the subject item's
context; scores must match within 1e-5 per rank and ids exactly, but for the order of ads whose
scores tie within 1e-5 (counted as ``tie_reorders``: a batched Predict runs another matmul kernel,
and ads 6e-8 apart can swap). A known user served by another version than their vector's is a
wrong answer too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import emit
from tfrs_ctx import schema

FAULT_AT = {"server_restart": 0.20, "hot_swap": 0.45, "redis_outage": 0.70}
FAULT_GAP = 0.05  # at least this share of the requests between the end of one fault and the next
SCORE_TOLERANCE = 1e-5
CALL_BOUND_S = 15.0  # no single recommend call may take longer (deadlines, retries, socket timeouts)
UNKNOWN_SUBJECT = 999_999_999
RETRY_KINDS = {"Predict attempt": "predict_retries", "feature store read attempt": "store_retries"}  # log prefixes


# ---- the request mix ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Planned:
    """One planned request and what kind of user / subject it has."""

    user_id: int
    subject_item_id: int | None
    user_kind: str  # known | unknown
    subject_kind: str  # known | none | unknown


def plan_requests(workdir: str, n: int, seed: int = 0) -> list[Planned]:
    """A fixed random mix: 80% known users, 20% unknown; subjects 70% known, 15% none, 15% unknown."""
    users = pd.read_parquet(os.path.join(workdir, "raw", schema.USERS.name))[schema.USER_ID].to_numpy()
    subjects = pd.read_parquet(os.path.join(workdir, "raw", schema.SUBJECT_ITEMS.name))[schema.ITEM_ID].to_numpy()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.8:
            user, user_kind = int(rng.choice(users)), "known"
        else:
            user, user_kind = int(users.max()) + 1 + int(rng.integers(1000)), "unknown"
        draw = rng.random()
        if draw < 0.7:
            subject, subject_kind = int(rng.choice(subjects)), "known"
        elif draw < 0.85:
            subject, subject_kind = None, "none"
        else:
            subject, subject_kind = UNKNOWN_SUBJECT + int(rng.integers(1000)), "unknown"
        out.append(Planned(user, subject, user_kind, subject_kind))
    return out


# ---- outcomes ----------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    index: int
    start: float  # seconds since the load started
    end: float
    version: int | None = None
    item_ids: list[int] | None = None
    scores: list[float] | None = None
    history_used: bool = False
    error: str | None = None  # error class, None on success
    message: str = ""  # the error's message


def classify(error: BaseException) -> str:
    """A short error class: the client's exception type and its cause's (a gRPC code, the store's error type).

    Anything that is not one of the client's typed errors with a message is ``unclassified: ...``.
    """
    import grpc

    from serving.client.candidates import ClientError

    if not isinstance(error, ClientError) or not str(error):
        return f"unclassified: {type(error).__name__}: {str(error)[:120]}"
    name, cause = type(error).__name__, error.__cause__
    if cause is None:
        return name
    return f"{name}/{cause.code().name if isinstance(cause, grpc.RpcError) else type(cause).__name__}"


# ---- the new model version ---------------------------------------------------------------
def served_versions(models_dir: str, name: str = schema.MODEL_CONTEXT_HEAD) -> list[int]:
    from serving.model_server.model_store import version_dirs

    return sorted(version_dirs(os.path.join(models_dir, name)))


def stage_new_version(workdir: str, models_dir: str, staging: str, seed: int = 0) -> tuple[int, str]:
    """Export version ``latest + 1`` of every model into ``staging``; returns (version, how).

    With the workdir's trained run the query MLP is perturbed (so the versions' answers differ);
    without it the latest version's files are copied under the new number.
    """
    from tfrs_ctx.export import MODEL_NAMES, export_all

    old = served_versions(models_dir)[-1]
    new = old + 1
    run, data = os.path.join(workdir, "runs", "contextual"), os.path.join(workdir, "data")
    if os.path.isdir(run) and os.path.isdir(data):
        import tensorflow as tf

        from tfrs_ctx.training.run_dir import load_trained

        model, _ = load_trained(run, data)
        rng = np.random.default_rng(seed)
        for var in model.user_mlp.trainable_variables:
            var.assign(var.numpy() * (1.0 + 0.3 * rng.standard_normal(var.shape)).astype(np.float32))
        info = _model_info(models_dir, old)
        export_all(model, data, staging, version=new, top_k=int(info.get("top_k", 100)))
        tf.keras.backend.clear_session()
        return new, "perturbed query MLP, exported"
    for name in MODEL_NAMES:
        shutil.copytree(os.path.join(models_dir, name, str(old)), os.path.join(staging, name, str(new)))
    return new, "copy of the latest version"


def _model_info(models_dir: str, version: int) -> dict:
    import json

    path = os.path.join(models_dir, schema.MODEL_CONTEXT_HEAD, str(version), "assets.extra", schema.MODEL_INFO_FILE)
    with open(path) as f:
        return json.load(f)


def publish(staging: str, models_dir: str, version: int) -> None:
    """Rename each staged ``<name>/<version>`` into the models directory (atomic per model)."""
    from tfrs_ctx.export import MODEL_NAMES

    for name in MODEL_NAMES:
        os.rename(os.path.join(staging, name, str(version)), os.path.join(models_dir, name, str(version)))


def version_available(address: str, version: int, name: str = schema.MODEL_CONTEXT_HEAD) -> bool:
    import grpc

    from serving.launcher import model_available

    with grpc.insecure_channel(address) as channel:
        return model_available(channel, name, version)


# ---- the faults --------------------------------------------------------------------------
class Faults:
    """Runs the faults in order, each when the issued-request count reaches its threshold."""

    def __init__(self, env: dict[str, Any], total: int):
        self.env, self.total = env, total
        self.events: list[tuple[float, str]] = [(0.0, "steady")]  # (seconds since start, phase from then on)
        self.log: list[dict[str, Any]] = []
        self.error: str | None = None

    def phase(self, t0: float, name: str) -> float:
        now = time.monotonic() - t0
        self.events.append((now, name))
        return now

    def run(self, issued: Callable[[], int], t0: float, stop: threading.Event) -> None:
        steps = [("server_restart", self._server_restart), ("hot_swap", self._hot_swap), ("redis_outage", self._redis)]
        gap = max(5, int(FAULT_GAP * self.total))
        ready = 0  # the issued count from which the next fault may start
        for name, action in steps:
            at = max(int(FAULT_AT[name] * self.total), ready)
            while issued() < at and not stop.is_set():
                time.sleep(0.02)
            if stop.is_set():
                return
            record = {"fault": name, "at_request": at}
            try:
                record.update(action(t0))
            except Exception as e:  # reported, never swallowed: the test asserts every fault completed
                self.error = f"{name}: {type(e).__name__}: {e}"
                record["error"] = self.error
                self.log.append(record)
                return
            self.log.append(record)
            ready = issued() + gap

    def _server_restart(self, t0: float) -> dict:
        from serving.launcher import start_server

        old = self.env["server"]
        down = self.phase(t0, "server_restart")
        old.close()
        server = start_server(self.env["models"], port=old.port, server=old.kind)
        self.env["server"] = server
        server.wait_ready(120)
        up = self.phase(t0, "after_restart")
        return {"started_s": round(down, 2), "ended_s": round(up, 2), "downtime_s": round(up - down, 2)}

    def _hot_swap(self, t0: float) -> dict:
        version, server = self.env["new_version"], self.env["server"]
        start = self.phase(t0, "hot_swap")
        publish(self.env["staging"], self.env["models"], version)
        deadline = time.monotonic() + 120
        while not version_available(server.address, version):
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} not available 120 s after the swap")
            time.sleep(0.1)
        end = self.phase(t0, "after_swap")
        return {"started_s": round(start, 2), "ended_s": round(end, 2), "new_version": version}

    def _redis(self, t0: float) -> dict:
        redis = self.env["redis"]
        start = self.phase(t0, "redis_outage")
        redis.server.crash()
        time.sleep(self.env["redis_down_s"])
        redis.server.start()
        keys = redis.server.dbsize()
        end = self.phase(t0, "after_redis")
        return {
            "started_s": round(start, 2),
            "ended_s": round(end, 2),
            "keys_before": redis.keys,
            "keys_after_restart": keys,
        }


# ---- the load ----------------------------------------------------------------------------
class RetryLog(logging.Handler):
    """Collects the client's retry warnings (time, what) instead of printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix, kind in RETRY_KINDS.items():
            if message.startswith(prefix):
                self.records.append((time.monotonic(), kind))

    @contextlib.contextmanager
    def capture(self, name: str = "tfrs_ctx.client"):
        logger = logging.getLogger(name)
        propagate = logger.propagate
        logger.addHandler(self)
        logger.propagate = False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate


def run_load(
    clients: list, planned: list[Planned], rate: float, time_limit: float, faults: Faults
) -> tuple[list[Outcome], int, float, float]:
    """Paced requests from one thread per client; returns (outcomes, requests still in flight, wall, start)."""
    from serving.client.candidates import AdRequest

    counter, lock = itertools.count(), threading.Lock()
    issued, outcomes, inflight = [0], [], {}
    stop = threading.Event()
    t0 = time.monotonic()
    limit = t0 + time_limit

    def worker(client) -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= len(planned):
                return
            start = t0 + i / rate
            if start > limit:
                return
            time.sleep(max(0.0, start - time.monotonic()))
            if time.monotonic() > limit:
                return
            with lock:
                issued[0] += 1
            p, began = planned[i], time.monotonic()
            inflight[i] = began
            try:
                rec = client.recommend([AdRequest(p.user_id, p.subject_item_id)])[0]
                out = Outcome(i, began - t0, time.monotonic() - t0, rec.model_version, rec.item_ids, rec.scores)
                out.history_used = rec.history_used
            except Exception as e:  # classified; unclassified ones fail the test
                out = Outcome(i, began - t0, time.monotonic() - t0, error=classify(e), message=str(e)[:300])
            del inflight[i]
            outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    fault_thread = threading.Thread(target=faults.run, args=(lambda: issued[0], t0, stop), daemon=True)
    fault_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, limit + CALL_BOUND_S - time.monotonic()))
    stop.set()
    fault_thread.join(180)  # a fault under way restores what it broke before returning
    return sorted(outcomes, key=lambda o: o.index), len(inflight), time.monotonic() - t0, t0


# ---- the reference -----------------------------------------------------------------------
class Reference:
    """Expected top-K per (request, version), from the exported heads loaded in-process."""

    def __init__(self, workdir: str, models_dir: str, planned: list[Planned]):
        import tensorflow as tf

        from tfrs_ctx import feature_store as fs

        self.tf = tf
        store = fs.open_store(os.path.join(workdir, "store"))  # the workdir's SQLite online store
        users = sorted({p.user_id for p in planned})
        subjects = sorted({p.subject_item_id for p in planned if p.subject_item_id is not None})
        self.users = dict(zip(users, fs.read_user_features(store, users), strict=True))
        self.subjects = dict(zip(subjects, fs.read_subject_items(store, subjects), strict=True))
        self.heads = {}
        self.top_k = {}  # the exported max k: a loaded signature cannot leave ``k`` to its default
        for version in served_versions(models_dir):
            path = os.path.join(models_dir, schema.MODEL_CONTEXT_HEAD, str(version))
            self.heads[version] = tf.saved_model.load(path).signatures["serving_default"]
            with open(os.path.join(path, "assets.extra", schema.MODEL_INFO_FILE)) as f:
                self.top_k[version] = int(json.load(f)["top_k"])
        spec = next(iter(self.heads.values())).structured_input_signature[1][schema.ENCODED_HISTORY]
        self.dim = int(spec.shape[-1])
        self.states = int(spec.shape[1]) if spec.shape.rank == 3 else 0  # cross-attention's [N, d]
        self.cache: dict[tuple[int, int | None, int], tuple[list[int], np.ndarray]] = {}
        self.tie_reorders = 0  # right answers whose tied ads came in another order than the reference's

    def stored_version(self, user_id: int) -> int | None:
        """The model version of the user's stored vector (None: cold start)."""
        row = self.users.get(user_id)
        if row is None or row[schema.ENCODED_HISTORY] is None or not row[schema.HISTORY_LENGTH]:
            return None
        return int(row[schema.MODEL_VERSION])

    def inputs(self, p: Planned) -> dict[str, np.ndarray]:
        """The head's inputs for a request, from the SQLite store's rows (not the Redis under test)."""
        from tfrs_ctx.signatures import HeadRow, head_inputs

        row = self.users.get(p.user_id) or {}
        vector, length = None, 0
        if self.stored_version(p.user_id) is not None:
            vector, length = np.asarray(row[schema.ENCODED_HISTORY], np.float32), int(row[schema.HISTORY_LENGTH])
        subject = self.subjects.get(p.subject_item_id) if p.subject_item_id is not None else None
        cats = list(subject[schema.CATEGORIES]) if subject else []
        weights = list(subject[schema.CONFIDENCES]) if subject else []
        demographics = {column: row.get(column) for column in schema.DEMOGRAPHIC_COLUMNS}
        ad = subject.get(schema.AD_ID) if subject else None  # the subject ad, as the client sends it
        return head_inputs([HeadRow(vector, length, cats, weights, demographics, ad)], self.dim, self.states)

    def expected(self, p: Planned, version: int) -> tuple[list[int], np.ndarray]:
        key = (p.user_id, p.subject_item_id, version)
        if key not in self.cache:
            tf = self.tf
            inputs = self.inputs(p)
            if schema.REQUEST_K in self.heads[version].structured_input_signature[1]:
                inputs[schema.REQUEST_K] = np.asarray([self.top_k[version]], np.int64)
            if schema.SUBJECT_AD not in self.heads[version].structured_input_signature[1]:
                inputs.pop(schema.SUBJECT_AD, None)
            else:  # in process no signature default fills it: none
                inputs.setdefault(schema.SUBJECT_AD, np.asarray([schema.NO_SUBJECT_AD], np.int64))
            out = self.heads[version](**{k: tf.constant(v) for k, v in inputs.items()})
            self.cache[key] = (out[schema.TOP_K_IDS].numpy()[0].tolist(), out[schema.TOP_K_SCORES].numpy()[0])
        return self.cache[key]

    def check(self, p: Planned, o: Outcome) -> str | None:
        """Why the answer is wrong, or None when it is right."""
        stored = self.stored_version(p.user_id)
        if stored is not None and o.version != stored:
            return f"user {p.user_id}: vector of version {stored} served by version {o.version}"
        if o.version not in self.heads:
            return f"served by version {o.version}, which was never exported"
        if o.history_used != (stored is not None):
            return f"user {p.user_id}: history_used={o.history_used} but stored version is {stored}"
        ids, scores = self.expected(p, o.version)
        if len(o.scores) != len(scores) or not np.allclose(o.scores, scores, atol=SCORE_TOLERANCE, rtol=0):
            return f"user {p.user_id} subject {p.subject_item_id} v{o.version}: scores differ from the reference"
        if o.item_ids != ids:
            if not same_up_to_ties(o.item_ids, ids, scores):
                return f"user {p.user_id} subject {p.subject_item_id} v{o.version}: ids differ from the reference"
            self.tie_reorders += 1
        return None


def same_up_to_ties(ids: list[int], ref_ids: list[int], ref_scores, tolerance: float = SCORE_TOLERANCE) -> bool:
    """Whether ``ids`` is the reference top-K but for the order of ads whose reference scores tie.

    A batch of another size runs another matmul kernel: two ads whose scores agree to a float's last
    bits can swap places (measured: 6e-8 apart). At each rank where the ids differ, the served ad
    must be one the reference scores within ``tolerance`` of that rank's score; where that tie
    reaches rank K, it may be an ad the reference ranked just below K. The scores per rank are
    checked separately.
    """
    ref_scores = np.asarray(ref_scores, np.float64)
    if len(ids) != len(ref_ids) or len(set(ids)) != len(ids):
        return False
    for rank, (got, want) in enumerate(zip(ids, ref_ids, strict=True)):
        if got == want:
            continue
        tied = np.abs(ref_scores - ref_scores[rank]) <= tolerance
        if got not in {ref_ids[j] for j in np.flatnonzero(tied)} and not tied[-1]:
            return False
    return True


# ---- the report --------------------------------------------------------------------------
def percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def phase_of(events: list[tuple[float, str]], t: float) -> str:
    name = events[0][1]
    for at, phase in events:
        if at <= t:
            name = phase
    return name


def summarize(
    planned: list[Planned],
    outcomes: list[Outcome],
    reference: Reference,
    faults: Faults,
    new_version: int,
    retries: list[tuple[float, str]],
) -> dict:
    """Counts, error classes, wrong answers, latency and per-phase figures (``retries``: load-relative times)."""
    wrong = []
    phases: dict[str, dict] = {}
    bounds = [*faults.events, (float("inf"), "")]
    for (at, name), (until, _) in itertools.pairwise(bounds):
        phases[name] = {"from_s": round(at, 2), "to_s": None if until == float("inf") else round(until, 2)}
        phases[name].update(sent=0, succeeded=0, failed=0, errors=collections.Counter(), by_new_version=0)
        phases[name].update(predict_retries=0, store_retries=0)
    for t, kind in retries:
        phases[phase_of(faults.events, t)][kind] += 1
    for o in outcomes:
        ph = phases[phase_of(faults.events, o.start)]
        ph["sent"] += 1
        if o.error is not None:
            ph["failed"] += 1
            ph["errors"][o.error] += 1
            continue
        ph["succeeded"] += 1
        ph["by_new_version"] += o.version == new_version
        why = reference.check(planned[o.index], o)
        if why is not None:
            wrong.append(why)
    for name, ph in phases.items():
        ph["errors"] = dict(ph["errors"])
        ph["latency_ok"] = percentiles(
            [o.end - o.start for o in outcomes if o.error is None and phase_of(faults.events, o.start) == name]
        )
    ok = [o for o in outcomes if o.error is None]
    errors = collections.Counter(o.error for o in outcomes if o.error is not None)
    kinds = collections.Counter((planned[o.index].user_kind, o.version) for o in ok)
    return {
        "sent": len(outcomes),
        "succeeded": len(ok),
        "failed": len(outcomes) - len(ok),
        "wrong": len(wrong),
        "wrong_examples": wrong[:5],
        "tie_reorders": reference.tie_reorders,
        "errors": dict(errors.most_common()),
        "error_examples": {o.error: o.message for o in reversed(outcomes) if o.error is not None},
        "unclassified": sum(n for e, n in errors.items() if e.startswith("unclassified")),
        "latency_ok": percentiles([o.end - o.start for o in ok]),
        "retries": dict(collections.Counter(kind for _, kind in retries)),
        "served": {f"{user} users, v{v}": n for (user, v), n in sorted(kinds.items(), key=str)},
        "phases": phases,
        "faults": faults.log,
        "fault_error": faults.error,
    }


# ---- the whole run -----------------------------------------------------------------------
def run_load_test(
    workdir: str,
    requests: int = 1000,
    clients: int = 8,
    time_limit: float = 300.0,
    *,
    rate: float | None = None,
    redis_down_s: float = 3.0,
    seed: int = 0,
    deadline_s: float = 1.0,
    coalesce: bool = False,
) -> dict:
    """Run the load with the three faults; returns the summary (see the module docstring)."""
    from benchmarks.redis_store import redis_online_store
    from serving.client.candidates import CandidateClient
    from serving.launcher import start_server

    began = time.monotonic()
    workdir = os.path.abspath(workdir)
    rate = rate or requests / (0.5 * time_limit)
    planned = plan_requests(workdir, requests, seed)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfrs-ctx-load-"))
        models, staging = os.path.join(tmp, "models"), os.path.join(tmp, "staging")
        shutil.copytree(os.path.join(workdir, "models"), models)
        old_version = served_versions(models)[-1]
        new_version, swap_mode = stage_new_version(workdir, models, staging, seed)
        redis = stack.enter_context(redis_online_store(os.path.join(workdir, "store")))
        env: dict[str, Any] = {"models": models, "staging": staging, "new_version": new_version}
        env.update(redis=redis, redis_down_s=redis_down_s, server=start_server(models))
        stack.callback(lambda: env["server"].close())
        env["server"].wait_ready(300)
        kind, target = env["server"].kind, env["server"].address
        if coalesce:  # every client thread calls one shared CoalescingClient (serving.client.coalescing)
            from serving.client.coalescing import CoalescingClient

            shared = CoalescingClient(lambda: CandidateClient(target, redis.reader(), deadline_s=deadline_s))
            stack.callback(shared.close)
            pool = [shared] * clients
        else:
            pool = [CandidateClient(target, redis.reader(), deadline_s=deadline_s) for _ in range(clients)]
            for client in pool:
                stack.callback(client.close)
        faults = Faults(env, requests)
        setup_s = time.monotonic() - began
        with RetryLog().capture() as retry_log:
            outcomes, hung, load_s, t0 = run_load(pool, planned, rate, time_limit, faults)
        retries = [(t - t0, kind) for t, kind in retry_log.records]
        result = summarize(planned, outcomes, Reference(workdir, models, planned), faults, new_version, retries)
    return {
        "machine": f"{os.cpu_count()} CPUs",
        "server": kind,
        "requests": requests,
        "clients": clients,
        "client": "one CoalescingClient shared by the client threads" if coalesce else "a CandidateClient per thread",
        "rate_per_s": round(rate, 2),
        "time_limit_s": time_limit,
        "not_sent": requests - result["sent"],
        "hung": hung,
        **result,
        "versions": {"old": old_version, "new": new_version, "new_version_is": swap_mode},
        "setup_s": round(setup_s, 1),
        "load_s": round(load_s, 1),
        "total_s": round(time.monotonic() - began, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300.0, help="no request starts after this (seconds)")
    parser.add_argument("--rate", type=float, help="requests/s (default: requests over half the time limit)")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down")
    parser.add_argument("--deadline", type=float, default=1.0, help="client deadline per Predict attempt (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--coalesce", action="store_true", help="the client threads share one CoalescingClient (default: one each)"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = run_load_test(
        args.workdir,
        args.requests,
        args.clients,
        args.time_limit,
        rate=args.rate,
        redis_down_s=args.redis_down,
        seed=args.seed,
        deadline_s=args.deadline,
        coalesce=args.coalesce,
    )
    emit(result, args.json)
    ok = result["wrong"] == 0 and result["unclassified"] == 0 and result["hung"] == 0 and not result["fault_error"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
