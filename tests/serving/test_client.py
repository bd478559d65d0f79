"""The online client's defined behaviour for every odd case, on a real server and Feast repo."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent import futures

import grpc
import pytest

from serving.client.candidates import (
    AdRequest,
    CandidateClient,
    FeatureStoreUnavailable,
    ModelServerUnavailable,
    ModelVersionMismatch,
)
from tfrs_ctx.testing import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(demo_server, reader):
    with CandidateClient(f"127.0.0.1:{demo_server.port}", reader) as c:
        yield c


def test_cold_start_user_gets_the_no_history_path(client, known):
    unknown_user = max(known[0]) + 1000
    rec = client.recommend([AdRequest(unknown_user, known[1][0])])[0]
    assert not rec.history_used and rec.context_used
    assert any("cold start" in n for n in rec.notes)
    assert len(rec.item_ids) == len(set(rec.item_ids)) > 0


def test_unknown_subject_item_gets_the_no_context_path(client, known):
    user = known[0][0]
    unknown = client.recommend([AdRequest(user, 999_999_999)])[0]
    assert not unknown.context_used and any("unknown subject item" in n for n in unknown.notes)
    no_context = client.recommend([AdRequest(user, None)])[0]
    assert unknown.item_ids == no_context.item_ids


def test_batch_and_explicit_context(client, known, reader):
    user, subject = known[0][1], known[1][2]
    cats, weights, _ = reader.subject_items([subject])[subject]  # (categories, confidences, ad_id)
    via_subject, explicit = client.recommend([AdRequest(user, subject), AdRequest(user, None, cats, weights)])
    assert via_subject.item_ids == explicit.item_ids
    assert via_subject.scores == pytest.approx(explicit.scores, abs=1e-6)


def test_version_mismatch_refuses_or_cold_starts(other_version_server, reader, known):
    target = f"127.0.0.1:{other_version_server.port}"
    with CandidateClient(target, reader) as strict, pytest.raises(ModelVersionMismatch, match="model version"):
        strict.recommend([AdRequest(known[0][0], known[1][0])])
    with CandidateClient(target, reader, version_policy="cold_start") as lenient:
        rec = lenient.recommend([AdRequest(known[0][0], known[1][0])])[0]
    assert rec.model_version == 1 and not rec.history_used
    assert any("not served" in n for n in rec.notes)


def test_server_down_fails_fast_with_a_clear_error(reader, known):
    client = CandidateClient(f"127.0.0.1:{free_port()}", reader, embedding_dim=16, deadline_s=0.3, retries=2)
    start = time.monotonic()
    with pytest.raises(ModelServerUnavailable, match="3 attempts"):
        client.recommend([AdRequest(known[0][0], known[1][0])])
    assert time.monotonic() - start < 3.0


def test_slow_server_hits_the_deadline_then_retries(reader, known):
    calls = []

    def slow(request, context):
        calls.append(1)
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
    try:
        client = CandidateClient(f"127.0.0.1:{port}", reader, embedding_dim=16, deadline_s=0.2, retries=1)
        start = time.monotonic()
        with pytest.raises(ModelServerUnavailable, match="DEADLINE_EXCEEDED"):
            client.recommend([AdRequest(known[0][0], known[1][0])])
        assert time.monotonic() - start < 1.5 and len(calls) == 2
    finally:
        threading.Thread(target=server.stop, args=(0,)).start()


@pytest.mark.redis
def test_online_store_unreachable(demo_work, demo_server, known):
    """Materialized into a real Redis that then dies: a clear FeatureStoreUnavailable, no hang."""
    from benchmarks.redis_store import redis_online_store

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (Debian package redis-server; .ci/run installs it)")
    with redis_online_store(str(demo_work / "store")) as redis:
        reader = redis.reader()
        with CandidateClient(f"127.0.0.1:{demo_server.port}", reader) as client:
            assert client.recommend([AdRequest(known[0][0], known[1][0])])[0].history_used
        redis.server.crash()
        start = time.monotonic()
        client = CandidateClient(f"127.0.0.1:{demo_server.port}", reader)
        with client, pytest.raises(FeatureStoreUnavailable):
            client.recommend([AdRequest(known[0][0], known[1][0])])
        assert time.monotonic() - start < 30


def test_one_read_for_users_and_subject_items_equals_two(reader, known):
    """The client's single Feast read of both entities (either id list the longer) gives the two reads' rows."""
    import numpy as np

    users, subjects = known
    unknown_user, unknown_subject = max(users) + 1000, 999_999_999
    for u, s in (
        ([*users[:9], unknown_user], [*subjects[:3], unknown_subject]),
        (users[:2], [*subjects[:7], unknown_subject]),
    ):
        got_users, got_subjects = reader.request_features(u, s)
        want_users, want_subjects = reader.users(u), reader.subject_items(s)
        assert got_subjects == want_subjects and got_subjects[unknown_subject] is None
        assert got_users.keys() == want_users.keys() and unknown_user not in got_users
        for user, state in want_users.items():
            other = got_users[user]
            assert (other.history_length, other.model_version, other.demographics) == (
                state.history_length,
                state.model_version,
                state.demographics,
            )
            if state.encoded_history is None:
                assert other.encoded_history is None
            else:
                np.testing.assert_array_equal(other.encoded_history, state.encoded_history)


def test_the_subject_ad_from_the_feature_view_is_sent_only_to_a_head_that_takes_it():
    """The subject item's ad_id (the Feast view's third field) becomes ``subject_ad_id``; a subject
    that is not an ad sends nothing, and a head exported without the input never receives it."""
    from serving.client.candidates import AdRequest, CandidateClient
    from serving.tensor_codec import to_ndarray
    from tfrs_ctx import schema

    client = CandidateClient(f"127.0.0.1:{free_port()}", None, embedding_dim=4)
    subjects = {5: ([1, 2], [0.6, 0.4], 77), 6: ([3], [1.0], None), 7: ([3], [1.0])}  # 7: an older reader
    rows = [client._row(AdRequest(1, s), None, subjects, [])[0] for s in (5, 6, 7)]
    assert [r.subject_ad_id for r in rows] == [77, None, None]
    client._has_subject = True
    sent = client._build(rows, None).inputs[schema.SUBJECT_AD]
    assert to_ndarray(sent).tolist() == [77, schema.NO_SUBJECT_AD, schema.NO_SUBJECT_AD]
    assert schema.SUBJECT_AD not in client._build(rows[1:], None).inputs  # no subject ad: the default
    client._has_subject = False
    assert schema.SUBJECT_AD not in client._build(rows, None).inputs
    client.close()


def test_a_search_query_is_sent_only_to_a_head_that_takes_it():
    """``AdRequest.query`` becomes ``context_query``; requests without one send the default, and a head
    exported without the search input never receives it (the request is noted: no search context)."""
    from serving.client.candidates import AdRequest, CandidateClient
    from serving.tensor_codec import to_ndarray
    from tfrs_ctx import schema

    client = CandidateClient(f"127.0.0.1:{free_port()}", None, embedding_dim=4)
    client._has_query = True
    requests = [AdRequest(1, query="Red Shoes?"), AdRequest(2), AdRequest(3, query="")]
    rows = [client._row(r, None, {}, [])[0] for r in requests]
    assert [r.query for r in rows] == ["Red Shoes?", None, None] and rows[0].has_context and not rows[1].has_context
    sent = client._build(rows, None).inputs[schema.CONTEXT_QUERY]
    assert to_ndarray(sent).tolist() == [b"Red Shoes?", b"", b""]
    assert schema.CONTEXT_QUERY not in client._build(rows[1:], None).inputs  # no query: the default
    client._has_query = False
    notes: list[str] = []
    row = client._row(requests[0], None, {}, notes)[0]
    assert row.query is None and any("no search context" in n for n in notes)
    client.close()
