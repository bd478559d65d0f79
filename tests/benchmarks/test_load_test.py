"""The fault-injection load test, short form: server restart, hot swap and Redis outage under load,
through a client per thread and through one shared coalescing client."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server not installed (Debian package redis-server; .ci/run installs it)",
    ),
]

TYPED_ERRORS = (
    "ModelServerUnavailable",
    "FeatureStoreUnavailable",
    "ModelVersionMismatch",
    "DeadlineExceeded",
    "ClientError",
)
REQUESTS = 200
STEADY_PHASES = ("steady", "after_restart", "after_swap", "after_redis")


@pytest.fixture(scope="module", params=[False, True], ids=["client_per_thread", "coalescing"])
def result(demo_work, request) -> dict:
    from benchmarks.load_test import run_load_test

    # 200 requests over ~53 s (the faults are placed by request count): room for a slow server restart
    summary = run_load_test(
        str(demo_work), requests=REQUESTS, clients=4, time_limit=150, rate=3.75, coalesce=request.param
    )
    print(json.dumps(summary, indent=2))  # shown by pytest when a test fails
    return summary


def test_every_request_is_accounted_for_and_no_answer_is_wrong(result):
    assert result["not_sent"] == 0 and result["hung"] == 0
    assert result["sent"] == result["succeeded"] + result["failed"] == REQUESTS
    assert result["wrong"] == 0, result["wrong_examples"]
    assert result["unclassified"] == 0, result["error_examples"]
    assert all(error.split("/")[0] in TYPED_ERRORS for error in result["errors"]), result["errors"]
    assert result["succeeded"] >= 0.4 * result["sent"]


def test_all_three_faults_happened(result):
    assert result["fault_error"] is None
    faults = {f["fault"]: f for f in result["faults"]}
    assert list(faults) == ["server_restart", "hot_swap", "redis_outage"]
    assert faults["redis_outage"]["keys_after_restart"] == faults["redis_outage"]["keys_before"] > 0
    phases = result["phases"]
    # the server restart: requests in the window fail with a clear error after bounded retries
    assert phases["server_restart"]["errors"].get("ModelServerUnavailable/UNAVAILABLE", 0) > 0
    assert phases["server_restart"]["predict_retries"] > 0
    # no version mismatch anywhere: a restarted server binds only after loading its versions, and after
    # the hot swap it keeps two head versions, so stored vectors stay on theirs (wrong == 0)
    assert not [e for ph in phases.values() for e in ph["errors"] if e.startswith("ModelVersionMismatch")], phases
    # the hot swap: cold-start users move to the new version
    new = f"unknown users, v{result['versions']['new']}"
    assert result["served"].get(new, 0) > 0
    assert phases["after_swap"]["by_new_version"] + phases["after_redis"]["by_new_version"] > 0
    # the Redis outage: reads retried, then failed fast; the data came back with the restart
    assert phases["redis_outage"]["store_retries"] > 0
    assert phases["after_redis"]["succeeded"] > 0


def test_requests_outside_the_fault_windows_succeed(result):
    phases = result["phases"]
    sent = sum(phases[p]["sent"] for p in STEADY_PHASES)
    succeeded = sum(phases[p]["succeeded"] for p in STEADY_PHASES)
    assert sent > 0 and succeeded >= 0.9 * sent, {p: phases[p] for p in STEADY_PHASES}
