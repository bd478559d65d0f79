"""The model-server behaviours TF Serving's own tests assert, checked against the compatible server.

Modelled on ``tensorflow_serving/model_servers/tensorflow_model_server_test.py`` (and its test base)
and on what ``predict_util.cc`` accepts and refuses, with our own half_plus_two-style models
(``tf_serving_models``). One server process (gRPC) for the module, started by
``serving.launcher.start_server(..., server="python")``.

Deliberate differences, asserted as such: Classify, Regress and MultiInference are UNIMPLEMENTED
here (the binary runs them); a Predict request holds at most 1,000 rows without batching (the
binary has no limit).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tf_serving_models as tsm
from conftest import predict_request
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving.launcher import start_server

CONFIG = """
model_config_list {
  config { name: "default" base_path: "default" model_platform: "tensorflow" }
  config { name: "tf2" base_path: "tf2" model_platform: "tensorflow" }
  config { name: "saved" base_path: "saved" model_platform: "tensorflow" }
  config { name: "multi_sig" base_path: "multi_sig" model_platform: "tensorflow" }
  config {
    name: "two_versions" base_path: "two_versions" model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 123 }
    version_labels { key: "canary" value: 124 }
  }
}
"""
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_serving_models")
    tsm.write_half_plus_two(root / "default" / "123")
    tsm.write_half_plus_two_tf2(root / "tf2" / "123")
    tsm.write_saved_model_save(root / "saved" / "123")
    tsm.write_saved_model_save(root / "multi_sig" / "123", {"serving_default": 1.0, "custom_signature_key": 2.0})
    tsm.write_half_plus_two(root / "two_versions" / "123", b=2.0)
    tsm.write_half_plus_two(root / "two_versions" / "124", b=3.0)
    (root / "models.config").write_text(CONFIG)
    with start_server(root, config=root / "models.config", server="python", poll_seconds=0) as server:
        server.wait_ready(120)
        with grpc.insecure_channel(server.address) as channel:
            yield (
                prediction_service_pb2_grpc.PredictionServiceStub(channel),
                model_service_pb2_grpc.ModelServiceStub(channel),
            )


def half_plus_two_request(model="default", *, signature="serving_default", output_filter=True, batch_input=False):
    """TF Serving's VerifyPredictRequest: x = float_val [2.0] of shape [1] (or [1, 1] with batch_input)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    x = request.inputs["x"]
    x.dtype = types_pb2.DT_FLOAT
    x.float_val.append(2.0)
    x.tensor_shape.dim.add().size = 1
    if batch_input:
        x.tensor_shape.dim.add().size = 1
    if output_filter:
        request.output_filter.append("y")
    return request


def verify_predict(predict, expected: float, version: int, **kwargs) -> predict_pb2.PredictResponse:
    request = half_plus_two_request(**kwargs)
    result = predict.Predict(request, timeout=10)
    assert "y" in result.outputs
    y = result.outputs["y"]
    assert y.dtype == types_pb2.DT_FLOAT
    assert tf.make_ndarray(y).reshape(-1).tolist() == [expected]
    spec = result.model_spec
    want_signature = request.model_spec.signature_name or "serving_default"
    assert (spec.name, spec.signature_name, spec.version.value) == (request.model_spec.name, want_signature, version)
    return result


def expect(call, request, code, text=""):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def test_get_model_status(stubs):
    _, models = stubs
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    result = models.GetModelStatus(request, timeout=10)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == 123
    assert result.model_version_status[0].status.error_code == 0
    assert result.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_get_model_metadata(stubs):
    predict, _ = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "default"
    result = predict.GetModelMetadata(request, timeout=10)
    assert result.model_spec.name == "default" and result.model_spec.version.value == 123
    assert list(result.metadata) == ["signature_def"]
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    result.metadata["signature_def"].Unpack(sig_map)
    assert {"serving_default", "regress_x_to_y", "regress_x_to_y2", "regress_x2_to_y3", "classify_x_to_y"} <= set(
        sig_map.signature_def
    )
    assert sig_map.signature_def["classify_x_to_y"].method_name == "tensorflow/serving/classify"
    request.metadata_field[:] = ["nope"]
    expect(predict.GetModelMetadata, request, INVALID, "Metadata field nope is not supported")


def test_predict_saved_model(stubs):
    """testPredictSavedModel: with and without output_filter; x of shape [1] into a [-1,1] input."""
    predict, _ = stubs
    verify_predict(predict, 3.0, 123)
    verify_predict(predict, 3.0, 123, output_filter=False)
    verify_predict(predict, 3.0, 123, batch_input=True)
    verify_predict(predict, 3.0, 123, signature="")  # the default signature


def test_predict_tf2_saved_model(stubs):
    predict, _ = stubs
    verify_predict(predict, 3.0, 123, model="tf2")
    verify_predict(predict, 3.0, 123, model="tf2", output_filter=False)


def test_tf_saved_model_save(stubs):
    """test_tf_saved_model_save / _multiple_signatures: unknown-rank inputs, a custom signature key."""
    predict, _ = stubs
    verify_predict(predict, 12.0, 123, model="saved", output_filter=False)
    verify_predict(predict, 2.0, 123, model="multi_sig", signature="custom_signature_key")
    verify_predict(predict, 1.0, 123, model="multi_sig")


def _example(x: float) -> bytes:
    feature = tf.train.Feature(float_list=tf.train.FloatList(value=[x]))
    return tf.train.Example(features=tf.train.Features(feature={"x": feature})).SerializeToString()


def test_classify_regress_multi_inference_are_unimplemented_but_predict_runs_their_signatures(stubs):
    """A deliberate difference: the binary runs Classify/Regress/MultiInference; here they are UNIMPLEMENTED.
    Predict on the same signatures works (the binary does not check method_name by default)."""
    predict, _ = stubs
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name, classify.model_spec.signature_name = "default", "classify_x_to_y"
    classify.input.example_list.examples.add().features.feature["x"].float_list.value.extend([2.0])
    expect(predict.Classify, classify, grpc.StatusCode.UNIMPLEMENTED)
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name, regress.model_spec.signature_name = "default", "regress_x_to_y"
    expect(predict.Regress, regress, grpc.StatusCode.UNIMPLEMENTED)
    expect(predict.MultiInference, inference_pb2.MultiInferenceRequest(), grpc.StatusCode.UNIMPLEMENTED)
    for signature, output, want in (("classify_x_to_y", "scores", 3.0), ("regress_x_to_y2", "outputs", 4.0)):
        req = predict_request("default", {"inputs": np.array([_example(2.0)], object)}, signature=signature)
        out = tf.make_ndarray(predict.Predict(req, timeout=10).outputs[output])
        assert out.reshape(-1).tolist() == [want]


def test_shapes_are_left_to_the_session(stubs):
    """predict_util.cc does not check shapes; Session::Run does not compare a fed tensor with the input's shape."""
    predict, _ = stubs
    for value in (np.array([2.0, 3.0, 4.0], np.float32), np.full((2, 3), 2.0, np.float32), np.float32(2.0)):
        out = tf.make_ndarray(predict.Predict(predict_request("default", {"x": value}), timeout=10).outputs["y"])
        np.testing.assert_array_equal(out, value * 0.5 + 2)
    req = predict_request("default", {"x": np.ones((2, 1), np.float32), "x2": np.ones((3, 1), np.float32)})
    req.model_spec.signature_name = "multi"
    out = predict.Predict(req, timeout=10).outputs  # x and x2 are independent: different batch sizes run
    assert tf.make_ndarray(out["y"]).shape == (2, 1) and tf.make_ndarray(out["y3"]).shape == (3, 1)


def test_signature_defaults_fill_missing_inputs(stubs):
    predict, _ = stubs
    req = predict_request("default", {"x": np.array([[2.0]], np.float32)}, signature="multi_with_default")
    out = predict.Predict(req, timeout=10).outputs
    assert tf.make_ndarray(out["y"]).tolist() == [[3.0]] and tf.make_ndarray(out["y3"]).tolist() == [[3.5]]
    req = predict_request("default", {"x": np.array([[2.0]], np.float32)}, signature="multi")  # no defaults
    expect(predict.Predict, req, INVALID, "Missing but required: {x2}")


def test_version_labels_and_pinned_versions(stubs):
    predict, _ = stubs
    for kwargs, version, want in (
        ({}, 124, 4.0),
        ({"version": 123}, 123, 3.0),
        ({"label": "stable"}, 123, 3.0),
        ({"label": "canary"}, 124, 4.0),
    ):
        response = predict.Predict(predict_request("two_versions", {"x": np.array([2.0], np.float32)}, **kwargs))
        assert response.model_spec.version.value == version
        assert tf.make_ndarray(response.outputs["y"]).tolist() == [want]
    request = predict_request("two_versions", {"x": np.array([2.0], np.float32)}, label="nope")
    expect(predict.Predict, request, INVALID, "Unrecognized servable version label: nope")
    request = predict_request("two_versions", {"x": np.array([2.0], np.float32)}, version=125)
    expect(predict.Predict, request, NOT_FOUND, "Specific(two_versions, 125)")


def test_request_errors_have_the_binary_codes(stubs):
    predict, _ = stubs
    x = np.array([2.0], np.float32)
    bad_filter = half_plus_two_request()
    bad_filter.output_filter.append("nope")
    dup_filter = half_plus_two_request()
    dup_filter.output_filter.append("y")
    cases = [
        (half_plus_two_request(model="nope"), NOT_FOUND, "Servable not found for request: Latest(nope)"),
        (half_plus_two_request(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION, 'key "nope" not found'),
        (predict_request("default", {"z": x}), INVALID, "Sent extra: {z}. Missing but required: {x}"),
        (predict_request("default", {"x": x, "z": x}), INVALID, "input size does not match signature: 2!=1"),
        (predict_request("default", {"x": x.astype(np.float64)}), INVALID, "expects DT_FLOAT but DT_DOUBLE"),
        (predict_request("default", {"x": np.array([b"a"], object)}), INVALID, "DT_STRING"),
        (bad_filter, INVALID, "output tensor alias not found in signature: nope"),
        (dup_filter, INVALID, "duplicate output tensor alias: y"),
        (predict_request("default", {"x": np.zeros((1001, 1), np.float32)}), INVALID, "maximum input batch size"),
    ]
    for request, code, text in cases:
        expect(predict.Predict, request, code, text)
    graph_error = predict_request(
        "default", {"inputs": np.array([b"not an Example"], object)}, signature="regress_x_to_y"
    )
    expect(predict.Predict, graph_error, INVALID)  # ParseExample's own error, with its TensorFlow code
    verify_predict(predict, 3.0, 123)  # still serving
