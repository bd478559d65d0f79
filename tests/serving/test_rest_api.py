"""The REST API of the tfrs-ctx protocol-compatible model server (``--rest_api_port``).

One server process on loopback (gRPC and REST, started by ``serving.launcher.start_server``), spoken
to with ``requests``; the models are the half_plus_two-style ones of ``tf_serving_models`` plus one
with string + int64 + float inputs. Expected answers follow TF Serving's REST API
(``http_rest_api_handler.cc``, ``json_tensor.cc``, the binary's own REST tests): every route, both
request formats, b64, the error JSON and HTTP codes, and the same answers as gRPC.
"""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tf_serving_models as tsm
from conftest import predict_request
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from serving.launcher import start_server
from tfrs_ctx.testing import free_port

CONFIG = """
model_config_list {
  config {
    name: "half" base_path: "half" model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 123 }
    version_labels { key: "canary" value: 124 }
  }
  config { name: "half_tf2" base_path: "half_tf2" model_platform: "tensorflow" }
  config { name: "mixed" base_path: "mixed" model_platform: "tensorflow" }
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest_models")
    tsm.write_half_plus_two(root / "half" / "123", b=1.0)  # y = x/2 + 1
    tsm.write_half_plus_two(root / "half" / "124", b=2.0)  # the latest: y = x/2 + 2, as TF Serving's model
    tsm.write_half_plus_two_tf2(root / "half_tf2" / "1")
    tsm.write_mixed_inputs(root / "mixed" / "1")
    (root / "models.config").write_text(CONFIG)
    with start_server(
        root, config=root / "models.config", server="python", rest_api_port=free_port(), poll_seconds=0
    ) as handle:
        handle.wait_ready(120)
        yield handle


@pytest.fixture(scope="module")
def grpc_predict(server):
    with grpc.insecure_channel(server.address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def post(server, path: str, body=None, *, data: bytes | None = None) -> requests.Response:
    response = requests.post(server.rest_url + path, json=body, data=data, timeout=30)
    assert response.headers["Content-Type"] == "application/json"
    return response


def get(server, path: str) -> requests.Response:
    return requests.get(server.rest_url + path, timeout=30)


def error(response: requests.Response, status: int, text: str = "") -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert text in message, message
    return message


# ---- predict -------------------------------------------------------------------------------


def test_predict_row_and_columnar_as_tf_serving(server):
    """TF Serving's testPredictREST / testPredictColumnarREST: a [3] tensor into a [-1,1] input runs."""
    row = post(server, "/v1/models/half:predict", {"instances": [2.0, 3.0, 4.0]})
    assert row.status_code == 200 and row.json() == {"predictions": [3.0, 3.5, 4.0]}
    columnar = post(server, "/v1/models/half:predict", {"inputs": [2.0, 3.0, 4.0]})
    assert columnar.json() == {"outputs": [3.0, 3.5, 4.0]}
    nested = post(server, "/v1/models/half:predict", {"instances": [[2.0], [3.0]], "signature_name": "serving_default"})
    assert nested.json() == {"predictions": [[3.0], [3.5]]}
    assert post(server, "/v1/models/half_tf2:predict", {"instances": [2.0]}).json() == {"predictions": [3.0]}
    assert post(server, "/v1/models/half:predict", {"inputs": [1, 2]}).json() == {"outputs": [2.5, 3.0]}  # ints: float


def test_versions_and_labels(server):
    for path, want in (
        ("/v1/models/half/versions/123:predict", 2.0),
        ("/v1/models/half/versions/124:predict", 3.0),
        ("/v1/models/half/labels/stable:predict", 2.0),
        ("/v1/models/half/labels/canary:predict", 3.0),
        ("/V1/MODELS/half/Labels/canary:predict", 3.0),  # the path is matched case-insensitively
    ):
        assert post(server, path, {"instances": [2.0]}).json() == {"predictions": [want]}, path
    error(post(server, "/v1/models/half/versions/7:predict", {"instances": [1.0]}), 404, "Specific(half, 7)")
    error(post(server, "/v1/models/half/labels/nope:predict", {"instances": [1.0]}), 400, "Unrecognized servable")


def test_named_inputs_and_outputs(server):
    multi = "/v1/models/half:predict"
    row = post(
        server, multi, {"signature_name": "multi", "instances": [{"x": [2.0], "x2": [4.0]}, {"x": [0], "x2": [0]}]}
    )
    assert row.json() == {
        "predictions": [{"y": [3.0], "y2": [4.0], "y3": [5.0]}, {"y": [2.0], "y2": [3.0], "y3": [3.0]}]
    }
    columnar = post(server, multi, {"signature_name": "multi", "inputs": {"x": [[2.0]], "x2": [[4.0]], "extra": 1}})
    assert columnar.json() == {"outputs": {"y": [[3.0]], "y2": [[4.0]], "y3": [[5.0]]}}  # unknown keys ignored
    default = post(server, multi, {"signature_name": "multi_with_default", "inputs": {"x": [[2.0]]}})
    assert default.status_code == 400  # columnar needs every named input (json_tensor.cc), defaults or not


def test_mixed_inputs_b64_and_bytes_outputs(server):
    raw = b"\xff\x00bin"
    body = {
        "instances": [
            {"text": {"b64": base64.b64encode(raw).decode()}, "count": 2, "score": [0.5, 0.25]},
            {"text": "héllo", "count": -1, "score": [1, 2]},
        ]
    }
    out = post(server, "/v1/models/mixed:predict", body).json()["predictions"]
    assert out[0] == {"text_bytes": {"b64": base64.b64encode(raw).decode()}, "length": 5, "total": 2.75}
    assert out[1] == {"text_bytes": {"b64": base64.b64encode("héllo".encode()).decode()}, "length": 6, "total": 2.0}
    columnar = {"inputs": {"text": ["a", "bc"], "count": [1, 2], "score": [[0, 0], [0, 1]]}}
    assert post(server, "/v1/models/mixed:predict", columnar).json()["outputs"] == {
        "text_bytes": [{"b64": "YQ=="}, {"b64": "YmM="}],
        "length": [1, 2],
        "total": [1.0, 3.0],
    }
    scalar = post(server, "/v1/models/mixed:predict", {"signature_name": "echo_scalar", "inputs": 1.5})
    assert scalar.json() == {"outputs": 3.0}
    no_b64_padding = {"inputs": {"text": [{"b64": "YQ"}], "count": [1], "score": [[0, 0]]}}
    assert post(server, "/v1/models/mixed:predict", no_b64_padding).json()["outputs"]["length"] == [1]


def test_floats_are_written_as_the_binary_writes_them(server):
    response = post(server, "/v1/models/half:predict", data=b'{"inputs": [0.2, NaN, Infinity], "x": 0}')
    assert response.text.replace(" ", "").replace("\n", "") == '{"outputs":[2.1,NaN,Infinity]}'
    assert post(server, "/v1/models/half:predict", data=b'{"inputs": [-Infinity]} trailing').json() == {
        "outputs": [float("-inf")]
    }


def test_rest_and_grpc_give_the_same_answers(server, grpc_predict):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 1)).astype(np.float32)
    x2 = rng.normal(size=(5, 1)).astype(np.float32)
    cases = [
        ("half", "", {"x": x}),
        ("half", "multi", {"x": x, "x2": x2}),
        ("half_tf2", "", {"x": x[:, 0]}),
        (
            "mixed",
            "",
            {
                "text": np.array([b"a", b"\xfe\xff", b"ccc", b"", b"e"], object),
                "count": rng.integers(-9, 9, 5).astype(np.int64),
                "score": rng.normal(size=(5, 2)).astype(np.float32),
            },
        ),
    ]
    for model, signature, inputs in cases:
        grpc_out = {
            k: tf.make_ndarray(v)
            for k, v in grpc_predict.Predict(
                predict_request(model, inputs, signature=signature), timeout=30
            ).outputs.items()
        }

        def to_json(v):
            if v.dtype == object:
                return [{"b64": base64.b64encode(s).decode()} for s in v]
            return v.tolist()

        body = {"signature_name": signature, "inputs": {k: to_json(v) for k, v in inputs.items()}}
        rest_out = post(server, f"/v1/models/{model}:predict", body).json()["outputs"]
        rest_out = rest_out if isinstance(rest_out, dict) and len(grpc_out) > 1 else {next(iter(grpc_out)): rest_out}
        assert rest_out.keys() == grpc_out.keys()
        for name, want in grpc_out.items():
            got = rest_out[name]
            if want.dtype == object:
                assert [base64.b64decode(g["b64"]) for g in got] == want.tolist()
            else:
                np.testing.assert_array_equal(np.array(got, want.dtype), want)


# ---- status and metadata -------------------------------------------------------------------


def test_model_status(server):
    ok = {"error_code": "OK", "error_message": ""}
    assert get(server, "/v1/models/half").json() == {
        "model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": ok},
            {"version": "124", "state": "AVAILABLE", "status": ok},
        ]
    }
    one = {"model_version_status": [{"version": "123", "state": "AVAILABLE", "status": ok}]}
    assert get(server, "/v1/models/half/versions/123").json() == one
    assert get(server, "/v1/models/half/labels/stable").json() == one
    error(get(server, "/v1/models/half/versions/9"), 404, "Could not find version 9 of model half")
    error(get(server, "/v1/models/nope"), 404, "nope")
    error(get(server, "/v1/models"), 400, "Missing model name in request.")


def test_metadata_is_the_json_of_the_grpc_protos(server, grpc_predict):
    doc = get(server, "/v1/models/half/metadata").json()
    assert doc["model_spec"] == {"name": "half", "signature_name": "", "version": "124"}
    sig_map = doc["metadata"]["signature_def"]["signature_def"]
    assert set(sig_map) >= {"serving_default", "regress_x_to_y", "classify_x_to_y", "multi"}
    x = sig_map["serving_default"]["inputs"]["x"]
    assert x == {
        "dtype": "DT_FLOAT",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}], "unknown_rank": False},
        "name": "x:0",
    }
    assert sig_map["serving_default"]["method_name"] == "tensorflow/serving/predict"
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half"
    request.model_spec.version.value = 123
    response = grpc_predict.GetModelMetadata(request, timeout=30)
    sig_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_defs)
    want = json_format.MessageToDict(
        sig_defs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    rest = get(server, "/v1/models/half/versions/123/metadata").json()
    assert rest["metadata"]["signature_def"] == want and rest["model_spec"]["version"] == "123"
    assert get(server, "/v1/models/half/labels/canary/metadata").json()["model_spec"]["version"] == "124"
    error(get(server, "/v1/models/nope/metadata"), 404, "Servable not found")


# ---- errors --------------------------------------------------------------------------------


def test_request_errors_and_http_codes(server):
    half, mixed = "/v1/models/half:predict", "/v1/models/mixed:predict"
    cases = [
        (half, b"", 400, "JSON Parse error: The document is empty"),
        (half, b"{nope", 400, "JSON Parse error"),
        (half, b"[1, 2]", 400, "Is not object"),
        (half, b'{"instances": [1], "inputs": [1]}', 400, "expecting only one of 'inputs' or 'instances'"),
        (half, b'{"signature_name": 3, "instances": [1]}', 400, "'signature_name' key must be a string value"),
        (half, b'{"foo": 1}', 400, "Missing 'inputs' or 'instances' key"),
        (half, b'{"instances": 1}', 400, "Expecting 'instances' to be an list/array"),
        (half, b'{"instances": []}', 400, "No values in 'instances' array"),
        (half, b'{"instances": [[1], [1, 2]]}', 400, "Expecting tensor size: 1 but got: 2"),
        (half, b'{"instances": [[1], 2]}', 400, "Expecting shape [1] but got: []"),
        (half, b'{"inputs": [[1, 2], [3]]}', 400, "Encountered list at unexpected size: 1"),
        (half, b'{"inputs": [[1], 2]}', 400, "found at incorrect level"),
        (half, b'{"inputs": ["a"]}', 400, 'JSON Value: "a" Type: String is not of expected type: float'),
        (half, b'{"inputs": [true]}', 400, "Type: True is not of expected type: float"),
        (half, b'{"inputs": [{"b64": "AA=="}]}', 400, "is not of expected type: float"),
        (half, b'{"signature_name": "nope", "inputs": [1]}', 400, 'Serving signature name: "nope" not found'),
        (half, b'{"signature_name": "multi", "inputs": [1]}', 400, "inputs is a plain value/list"),
        (half, b'{"signature_name": "multi", "instances": [1]}', 400, "instances is a plain list"),
        (half, b'{"signature_name": "multi", "inputs": {"x": [[1]]}}', 400, "Missing named input: x2"),
        (half, b'{"signature_name": "multi", "instances": [{"x": [1]}]}', 400, "keys must be equal to: x,x2"),
        (half, b'{"signature_name": "multi", "instances": [{"x": [1], "z": 1}]}', 400, "does not have named input: z"),
        (half, b'{"signature_name": "multi", "instances": [{"x": [1], "x2": [1]}, [1]]}', 400, "Expecting object"),
        (half, b'{"inputs": [[[1]]]}', 200, None),  # [1,1,1] into [-1,1]: the Session runs it, as the binary
        (mixed, b'{"inputs": {"text": ["a"], "count": [1.5], "score": [[0, 0]]}}', 400, "expected type: int64"),
        (mixed, b'{"inputs": {"text": ["a"], "count": [1], "score": [[0, 0]], "x": 1}}', 200, None),
        (mixed, b'{"inputs": {"text": [{"b64": "!!"}], "count": [1], "score": [[0, 0]]}}', 400, "Unable to base64"),
        (mixed, b'{"inputs": {"text": [{"b64": 1}], "count": [1], "score": [[0, 0]]}}', 400, "base64 data"),
        (mixed, b'{"inputs": {"text": [1], "count": [1], "score": [[0, 0]]}}', 400, "expected type: string"),
        (
            mixed,
            b'{"inputs": {"text": ["a"], "count": [1, 2, 3], "score": [[0, 0], [0, 0]]}}',
            400,
            "Incompatible shapes",
        ),
        ("/v1/models/nope:predict", b'{"inputs": [1]}', 404, "Servable not found for request: Latest(nope)"),
        ("/v1/models/half:classify", b'{"examples": []}', 501, "not implemented"),
        ("/v1/models/half:regress", b'{"examples": []}', 501, "not implemented"),
        ("/v1/models/half:explain", b"{}", 400, "Malformed request: POST /v1/models/half:explain"),
        ("/v1/models/half", b"{}", 400, "Malformed request: POST /v1/models/half"),
    ]
    for path, data, status, text in cases:
        response = post(server, path, data=data)
        if text is None:
            assert response.status_code == status, (path, data, response.text)
        else:
            message = error(response, status, text)
            assert message, (path, data)
    big = {"instances": [1.0] * 1001}  # this server's 1,000-row cap without batching (the binary has none)
    error(post(server, half, big), 400, "larger than maximum input batch size 1000")
    assert get(server, "/not/v1").status_code == 404 and get(server, "/not/v1").content == b""
    assert get(server, "/v1/models/half:predict").status_code == 400  # GET on a predict path: malformed
    assert requests.delete(server.rest_url + "/v1/models/half", timeout=10).status_code == 400
    assert post(server, "/v1/models/half:predict", {"instances": [1.0]}).status_code == 200  # still serving


# ---- no server: the timeout and the launcher's flags ----------------------------------------


def test_rest_timeout_is_deadline_exceeded_504():
    import time
    from types import SimpleNamespace

    from tensorflow.core.protobuf import meta_graph_pb2

    from serving.model_server.rest import RestApi

    sig = meta_graph_pb2.SignatureDef()
    sig.inputs["x"].dtype = 1  # DT_FLOAT
    servable = SimpleNamespace(signatures={"serving_default": None}, signature_def_map=SimpleNamespace())
    servable.signature_def_map.signature_def = {"serving_default": sig}

    class SlowCore:
        store = SimpleNamespace(get=lambda spec: servable)

        def predict(self, request):
            time.sleep(0.5)

    api = RestApi(SlowCore(), timeout_ms=50)
    try:
        status, body = api.handle("POST", "/v1/models/m:predict", b'{"instances": [1.0]}')
    finally:
        api.close()
    assert status == 504 and b"Deadline Exceeded" in body


def test_launcher_passes_rest_flags_to_either_server():
    from serving.launcher import build_command, build_parser

    args = build_parser().parse_args(
        ["--model_name=m", "--model_base_path=/m", "--rest_api_port=8501", "--rest_api_timeout_in_ms=500"]
    )
    python, kind = build_command(args, "python")
    assert kind == "python" and {"--rest_api_port=8501", "--rest_api_timeout_in_ms=500"} <= set(python)
    args.dry_run = True
    binary, kind = build_command(args, "binary")
    assert kind == "binary" and {"--rest_api_port=8501", "--rest_api_timeout_in_ms=500"} <= set(binary)
