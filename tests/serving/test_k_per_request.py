"""k per request on a real model server (loopback): the signature's default, a bad k is
INVALID_ARGUMENT, and the client checks k before sending, truncates and drops padding."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import predict_request
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.client.candidates import AdRequest, CandidateClient, InvalidK, UserState
from serving.tensor_codec import to_ndarray
from tfrs_ctx import export, schema, signatures

pytestmark = pytest.mark.slow

CONFIG = """model_config_list {{
  config {{ name: "context_head" base_path: "{head}" model_platform: "tensorflow" }}
  config {{ name: "tiny_head" base_path: "{tiny}" model_platform: "tensorflow" }}
}}
"""


class _NoFeatures:
    """Every user unknown (cold start), no subject items: the head's inputs are all padding."""

    def users(self, user_ids):
        return {u: UserState() for u in user_ids}

    def subject_items(self, item_ids):
        return {}


@pytest.fixture(scope="module")
def served(tiny_runs, small_data, tmp_path_factory):
    from serving.launcher import start_server
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    n = int(model.corpus_item_ids.shape[0])
    root = tmp_path_factory.mktemp("k_models")
    export.export_all(model, str(small_data), str(root / "normal"), version=3, top_k=20)
    export.export_all(model, str(small_data), str(root / "tiny"), version=3, top_k=n + 5)  # fewer ads than k
    config = root / "models.config"
    config.write_text(CONFIG.format(head=root / "normal" / "context_head", tiny=root / "tiny" / "context_head"))
    with start_server(None, config=config, server="python") as server:
        server.wait_ready(300)
        yield {"server": server, "n": n, "dim": model.cfg.embedding_dim}


def _predict(served, k, model="context_head", batch=3):
    inputs = signatures.example_inputs(signatures.head_inputs_spec(served["dim"]), batch)
    if k is not None:
        inputs[schema.REQUEST_K] = np.asarray(k, np.int64)
    with grpc.insecure_channel(served["server"].address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(predict_request(model, inputs), timeout=60)
    return {name: to_ndarray(t) for name, t in response.outputs.items()}


def test_k_left_out_is_the_exported_default(served):
    out = _predict(served, None)
    assert out[schema.TOP_K_IDS].shape == (3, 20)
    assert _predict(served, [4])[schema.TOP_K_IDS].shape == (3, 4)
    per_row = _predict(served, [1, 5, 2])
    assert per_row[schema.TOP_K_IDS].shape == (3, 5)
    assert (per_row[schema.TOP_K_IDS][0, 1:] == -1).all() and (per_row[schema.TOP_K_IDS][1] >= 0).all()
    np.testing.assert_array_equal(per_row[schema.TOP_K_IDS][1], out[schema.TOP_K_IDS][1, :5])


@pytest.mark.parametrize("k", [[0], [21], [-1], [1, 2]])
def test_bad_k_is_invalid_argument(served, k):
    with pytest.raises(grpc.RpcError) as e:
        _predict(served, k)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_client_checks_k_before_sending_and_truncates(served):
    address = served["server"].address
    with CandidateClient(address, _NoFeatures()) as client:
        assert client.max_k == 20
        default, three = client.recommend([AdRequest(1), AdRequest(1, k=3)])
        assert len(default.item_ids) == 20 and three.item_ids == default.item_ids[:3]
        for bad in (0, 21, -2, 2.5):
            with pytest.raises(InvalidK, match="k must"):
                client.recommend([AdRequest(1, k=bad)])
    with pytest.raises(InvalidK, match=r"1\.\.20"):
        CandidateClient(address, _NoFeatures(), k=50)
    with CandidateClient(address, _NoFeatures(), k=7) as client:
        assert [len(r.item_ids) for r in client.recommend([AdRequest(1), AdRequest(2, k=2)])] == [7, 2]


def test_client_drops_padding_when_the_corpus_is_smaller_than_k(served):
    n = served["n"]
    with CandidateClient(served["server"].address, _NoFeatures(), model_name="tiny_head") as client:
        assert client.max_k == n + 5
        (rec,) = client.recommend([AdRequest(1)])
    assert len(rec.item_ids) == n and -1 not in rec.item_ids and np.isfinite(rec.scores).all()
    raw = _predict(served, None, model="tiny_head", batch=1)[schema.TOP_K_IDS]
    assert raw.shape == (1, n + 5) and (raw[0, n:] == -1).all()
