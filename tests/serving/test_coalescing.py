"""The coalescing client: many threads' calls merged into shared reads and Predicts, each answered as if alone.

A real model server on loopback (``demo_server``), the demo's real Feast store, no mocks.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from benchmarks.load_test import same_up_to_ties
from serving.client.candidates import AdRequest, CandidateClient, DeadlineExceeded, ModelVersionMismatch
from serving.client.coalescing import CoalescingClient
from serving.client.features import FeastFeatureReader

pytestmark = pytest.mark.slow


def _mix(known) -> list[AdRequest]:
    """Known and unknown users; a known subject item, none, an unknown one, explicit context."""
    users, subjects = known
    unknown_user = max(users) + 1000
    out = [AdRequest(u, subjects[i]) for i, u in enumerate(users[:12])]
    out += [AdRequest(u, None) for u in users[12:16]]
    out += [AdRequest(u, 999_999_999) for u in users[16:18]]
    out += [AdRequest(unknown_user + i, subjects[i]) for i in range(3)]
    out += [AdRequest(users[0], subjects[5]), AdRequest(users[0], subjects[5])]  # one user twice
    return out


def _same(a, b) -> None:
    """The same answer: scores per rank within 1e-5, ids equal but for the order of tied ads (a batch of
    another size runs another matmul kernel; ads whose scores agree to the last bits may swap)."""
    assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert same_up_to_ties(a.item_ids, b.item_ids, b.scores)
    assert (a.user_id, a.model_version, a.history_used, a.context_used, a.notes) == (
        b.user_id,
        b.model_version,
        b.history_used,
        b.context_used,
        b.notes,
    )


def _concurrently(fn, n: int) -> list:
    """``fn(i)`` from ``n`` threads released together; results (or the exceptions raised) by ``i``."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_callers_get_exactly_what_each_gets_alone(demo_server, demo_work, known):
    target, store = f"127.0.0.1:{demo_server.port}", str(demo_work / "store")
    requests = _mix(known)
    with CandidateClient(target, FeastFeatureReader.open(store)) as plain:
        alone = [plain.recommend([r])[0] for r in requests]
    make = lambda: CandidateClient(target, FeastFeatureReader.open(store))  # noqa: E731
    with CoalescingClient(make, max_delay_s=0.2, max_batch=64) as client:
        merged = _concurrently(lambda i: client.recommend([requests[i]]), len(requests))
        stats = client.stats
    assert stats.calls == len(requests) and stats.batches < len(requests)  # the calls were merged
    assert stats.largest_batch > 1
    for got, want in zip(merged, alone, strict=True):
        assert not isinstance(got, Exception), got
        _same(got[0], want)


def test_a_call_of_many_requests_and_the_batch_limit(demo_server, demo_work, known):
    target, store = f"127.0.0.1:{demo_server.port}", str(demo_work / "store")
    requests = _mix(known)
    make = lambda: CandidateClient(target, FeastFeatureReader.open(store))  # noqa: E731
    with CandidateClient(target, FeastFeatureReader.open(store)) as plain:
        want = plain.recommend(requests)
    with CoalescingClient(make, max_delay_s=0.2, max_batch=4) as client:
        halves = _concurrently(lambda i: client.recommend(requests[i::2]), 2)
        singles = _concurrently(lambda i: client.recommend([requests[i]]), 8)
        assert client.stats.largest_batch == len(requests[0::2])  # a call larger than max_batch goes alone
    for got, expected in zip(halves[0] + halves[1], want[0::2] + want[1::2], strict=True):
        _same(got, expected)
    for i, got in enumerate(singles):
        _same(got[0], want[i])


def test_a_failed_version_group_fails_only_its_callers(other_version_server, reader, known):
    """Stored vectors of a version the server lacks: refused for those users only, in the same batch."""
    target = f"127.0.0.1:{other_version_server.port}"
    users, subjects = known
    requests = [AdRequest(users[0], subjects[0]), AdRequest(max(users) + 1, subjects[1])] * 3
    with CoalescingClient(lambda: CandidateClient(target, reader), max_delay_s=0.2) as client:
        out = _concurrently(lambda i: client.recommend([requests[i]]), len(requests))
        assert client.stats.batches < len(requests)
    for i, got in enumerate(out):
        if i % 2 == 0:
            assert isinstance(got, ModelVersionMismatch), got
        else:
            assert not isinstance(got, Exception), got
            assert got[0].model_version == 1 and not got[0].history_used


def test_a_calls_deadline_holds_when_its_batch_is_slow(reader, known):
    """A server that takes 2 s: the caller gets DeadlineExceeded at its own deadline, and a call that
    gave up while queued behind the slow batch is never sent."""
    calls = []

    def slow(request, context):
        calls.append(time.monotonic())
        time.sleep(2.0)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {"Predict": grpc.unary_unary_rpc_method_handler(slow, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    users, subjects = known
    make = lambda: CandidateClient(f"127.0.0.1:{port}", reader, embedding_dim=16, deadline_s=5, retries=0)  # noqa: E731
    try:
        with CoalescingClient(make, timeout_s=0.3) as client:
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.300s"):
                client.recommend([AdRequest(users[0], subjects[0])])
            first = time.monotonic() - start
            start = time.monotonic()  # queued behind the batch still in flight
            with pytest.raises(DeadlineExceeded):
                client.recommend([AdRequest(users[1], subjects[1])])
            second = time.monotonic() - start
            time.sleep(2.5)  # the slow batch has ended: the abandoned call was dropped, not sent
            assert len(calls) == 1
            assert client.stats.abandoned == 2 and client.stats.batches == 1
        assert 0.25 < first < 1.0 and 0.25 < second < 1.0
    finally:
        threading.Thread(target=server.stop, args=(0,)).start()
