"""Conformance tests of the tfrs-ctx protocol-compatible model server.

Real server processes on loopback, started by ``serving.launcher.start_server``, spoken to with
the official tensorflow-serving-api stubs. The SavedModels are tiny tf.Modules built here:
``serving_default(x float[B,4], k int64[B], tag string[B]) -> y = x @ W + version,
z = k * version, tag`` and ``probe(x) -> rows`` (how many rows the model saw: > 1 when the
server merged requests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from conftest import predict_request
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.launcher import DEFAULT_BATCHING_PARAMETERS, DEFAULT_CONFIG, start_server
from serving.model_server import health
from serving.model_server.batching import BatchingOptions
from serving.model_server.model_store import VersionPolicy, version_dirs
from serving.model_server.server_config import read_model_server_config, resolve_base_path
from tfrs_ctx.testing import free_port

W = (np.arange(8, dtype=np.float32).reshape(4, 2) * 0.25).astype(np.float32)  # exact in binary
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
POLL_S = 0.2
TEMP_NAMES = (".tmp-7", "7.tmp", "tmp_7")


class TinyModel(tf.Module):
    def __init__(self, version: int):
        super().__init__()
        self.w = tf.Variable(W)
        self.version = tf.constant(float(version))
        self.int_version = tf.constant(version, tf.int64)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 4], tf.float32, name="x"),
            tf.TensorSpec([None], tf.int64, name="k"),
            tf.TensorSpec([None], tf.string, name="tag"),
        ]
    )
    def serve(self, x, k, tag):
        return {"y": tf.matmul(x, self.w) + self.version, "z": k * self.int_version, "tag": tag}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def probe(self, x):
        return {"rows": tf.fill(tf.shape(x)[:1], tf.shape(x, out_type=tf.int64)[0])}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="n")])
    def slow(self, n):
        """max(n) 256x256 matmuls: a request that stays in flight long enough to be interrupted."""
        _, acc = tf.while_loop(
            lambda i, acc: i < tf.reduce_max(n),
            lambda i, acc: (i + 1, tf.matmul(acc, acc)),
            [tf.constant(0, tf.int64), tf.eye(256)],
        )
        return {"trace": tf.fill(tf.shape(n), tf.linalg.trace(acc))}


def _write_warmup(path: Path, input_name: str = "x") -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ignored"
    for name, value in {input_name: np.ones((2, 4), np.float32), "k": np.array([1, 2]), "tag": [b"a", b"b"]}.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())


def save_model(path: Path, version: int, warmup_input: str = "x") -> Path:
    """A TinyModel SavedModel at ``path`` with a warm-up record (TF Serving layout inside)."""
    module = TinyModel(version)
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.serve, "probe": module.probe, "slow": module.slow}
    )
    _write_warmup(path / "assets.extra" / "tf_serving_warmup_requests", warmup_input)
    return path


def corrupt_version(path: Path) -> None:
    """A digit-named version directory whose saved_model.pb is garbage (a non-atomic export)."""
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"\x00not a saved model")


CONFIG = """
model_config_list {
  config { name: "linear" base_path: "linear" model_platform: "tensorflow" }
  config {
    name: "labeled" base_path: "labeled" model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
    version_labels { key: "ghost" value: 9 }
  }
  config { name: "hot" base_path: "hot" model_platform: "tensorflow" }
  config { name: "broken" base_path: "broken" model_platform: "tensorflow" }
}
"""
BATCHING = """
max_batch_size { value: 8 }
batch_timeout_micros { value: 50000 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 100 }
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``linear`` 1,2 (+ valid models under temp names), ``labeled`` 1,2, ``hot`` 1, ``broken`` 1 + bad 2, 3."""
    root = tmp_path_factory.mktemp("models")
    templates = {v: save_model(root / "templates" / str(v), v) for v in (1, 2, 3)}
    for name, versions in {"linear": (1, 2), "labeled": (1, 2), "hot": (1,), "broken": (1,)}.items():
        for v in versions:
            shutil.copytree(templates[v], root / name / str(v))
    for temp in TEMP_NAMES:
        shutil.copytree(templates[3], root / "linear" / temp)
    corrupt_version(root / "broken" / "2")
    bad_warmup = shutil.copytree(templates[3], root / "broken" / "3")
    _write_warmup(bad_warmup / "assets.extra" / "tf_serving_warmup_requests", "no_such_input")
    (root / "models.config").write_text(CONFIG)
    (root / "batching.txt").write_text(BATCHING)
    return root


@pytest.fixture(scope="module")
def servers(models):
    """Three server processes, started together: plain (session runtime), batching (function runtime),
    single-model (1 MiB messages)."""
    config = models / "models.config"
    handles = {
        "plain": start_server(models, config=config, poll_seconds=POLL_S, server="python"),
        "batching": start_server(
            models,
            config=config,
            batching=True,
            batching_parameters=models / "batching.txt",
            server="python",
            extra_args=["--runtime=function"],
        ),
        "solo": start_server(
            None,
            config=None,
            server="python",
            extra_args=["--model_name=solo", f"--model_base_path={models / 'linear'}", "--max_message_bytes=1048576"],
        ),
    }
    try:
        for handle in handles.values():
            handle.wait_ready(120)
        yield handles
    finally:
        for handle in handles.values():
            handle.close()


def _stubs(handle):
    channel = grpc.insecure_channel(handle.address)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def plain(servers):
    return _stubs(servers["plain"])


@pytest.fixture(scope="module")
def batched(servers):
    return _stubs(servers["batching"])


def request(model: str = "linear", rows: int = 2, *, version=None, label=None, signature="", seed=0, **overrides):
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.integers(-8, 8, (rows, 4)).astype(np.float32),
        "k": rng.integers(0, 100, rows).astype(np.int64),
        "tag": np.array([f"r{seed}-{i}".encode() for i in range(rows)], object),
    }
    inputs.update(overrides)
    return predict_request(model, inputs, version=version, label=label, signature=signature), inputs


def outputs(response) -> dict[str, np.ndarray]:
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def expect_code(call, req, code: grpc.StatusCode, text: str = "") -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(req, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    return info.value.details()


# ---- configuration and pure helpers ---------------------------------------------------------


def test_repo_config_files_parse():
    config = read_model_server_config(str(DEFAULT_CONFIG))
    models = {m.name: m for m in config.model_config_list.config}
    assert list(models) == ["encoder", "context_head", "full"]
    assert all(m.base_path == f"models/{m.name}" and m.model_platform == "tensorflow" for m in models.values())
    assert models["encoder"].model_version_policy.latest.num_versions == 1
    options = BatchingOptions.from_file(str(DEFAULT_BATCHING_PARAMETERS))
    assert options.max_batch_size >= 1 and options.num_batch_threads >= 1


def test_version_dirs_policy_and_paths(tmp_path):
    for name in ("1", "12", ".tmp-3", "3.tmp", "tmp_3", "4a"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file, not a version")
    assert sorted(version_dirs(str(tmp_path))) == [1, 12]
    assert VersionPolicy("latest", 2).select([1, 5, 3]) == {3, 5}
    assert VersionPolicy("specific", versions=frozenset({1, 9})).select([1, 5]) == {1}
    assert VersionPolicy("all").select([1, 5]) == {1, 5}
    run = tmp_path / "run"
    assert resolve_base_path("models/encoder", str(run)) == str(run / "models" / "encoder")
    assert resolve_base_path("models/encoder", str(run / "models")) == str(run / "models" / "encoder")
    assert resolve_base_path("/abs/encoder", str(run)) == "/abs/encoder"


def test_launcher_cli_dry_run(tmp_path, models):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    cmd = [sys.executable, "-m", "serving.launcher", "--port=8500", f"--model_config_file={DEFAULT_CONFIG}"]
    cmd += [f"--models_dir={tmp_path}", "--enable_batching", "--dry_run"]
    python = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    assert "tfrs-ctx protocol-compatible model server" in python and "serving.model_server" in python
    binary = subprocess.run([*cmd, "--server=binary"], capture_output=True, text=True, env=env, check=True).stdout
    assert "tensorflow_model_server --port=8500 --model_config_file=/" in binary
    written = binary.split("--model_config_file=")[1].split()[0]
    paths = [m.base_path for m in read_model_server_config(written).model_config_list.config]
    assert paths == [str(tmp_path / "models" / n) for n in ("encoder", "context_head", "full")]
    os.remove(written)


# ---- the protocol ---------------------------------------------------------------------------


def test_predict_latest_by_default(plain):
    predict, _ = plain
    req, inputs = request("linear")
    response = predict.Predict(req, timeout=10)
    out = outputs(response)
    assert (response.model_spec.name, response.model_spec.version.value) == ("linear", 2)
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(out["y"], inputs["x"] @ W + 2)
    np.testing.assert_array_equal(out["z"], inputs["k"] * 2)
    assert out["tag"].tolist() == inputs["tag"].tolist()


def test_predict_by_version_label_filter_and_signature(plain):
    predict, _ = plain
    for kwargs, version in (({"version": 1}, 1), ({"label": "stable"}, 1), ({"label": "canary"}, 2), ({}, 2)):
        req, inputs = request("labeled", **kwargs)
        req.output_filter.append("y")
        response = predict.Predict(req, timeout=10)
        assert response.model_spec.version.value == version
        assert list(response.outputs) == ["y"]
        np.testing.assert_array_equal(outputs(response)["y"], inputs["x"] @ W + version)
    req, _ = request("linear", signature="probe", k=None, tag=None)
    assert outputs(predict.Predict(req, timeout=10))["rows"].tolist() == [2, 2]


def test_predict_accepts_typed_value_tensors(plain):
    """Clients that fill float_val/int64_val instead of tensor_content (other languages)."""
    predict, _ = plain

    def typed(dtype, dims, **values):
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
        return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, **values)

    req, _ = request(
        "linear",
        x=typed(types_pb2.DT_FLOAT, [1, 4], float_val=[1, 2, 3, 4]),
        k=typed(types_pb2.DT_INT64, [1], int64_val=[5]),
        tag=typed(types_pb2.DT_STRING, [1], string_val=[b"s"]),
    )
    out = outputs(predict.Predict(req, timeout=10))
    np.testing.assert_array_equal(out["y"], np.array([[1, 2, 3, 4]], np.float32) @ W + 2)
    assert out["z"].tolist() == [10]


def test_metadata(plain):
    predict, _ = plain
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "linear"
    response = predict.GetModelMetadata(req, timeout=10)
    assert response.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert {"serving_default", "probe"} <= set(sig_map.signature_def)
    assert sig.inputs["x"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in sig.inputs["x"].tensor_shape.dim] == [-1, 4]
    assert set(sig.outputs) == {"y", "z", "tag"} and sig.method_name == "tensorflow/serving/predict"
    expect_code(
        predict.GetModelMetadata,
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec=req.model_spec),
        grpc.StatusCode.INVALID_ARGUMENT,
        "metadata_field",
    )


def test_model_status(plain):
    _, model_service = plain

    def status(name, version=None):
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        if version is not None:
            req.model_spec.version.value = version
        return {s.version: s for s in model_service.GetModelStatus(req, timeout=10).model_version_status}

    assert {v: s.state for v, s in status("linear").items()} == {2: AVAILABLE}
    assert {v: s.state for v, s in status("labeled").items()} == {1: AVAILABLE, 2: AVAILABLE}
    broken = status("broken")
    assert broken[1].state == AVAILABLE and broken[1].status.error_code == 0
    for v in (2, 3):  # corrupt saved_model.pb; warm-up request with an unknown input
        assert broken[v].state == END and broken[v].status.error_code != 0 and broken[v].status.error_message
    assert list(status("broken", 1)) == [1]
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "nope"
    expect_code(model_service.GetModelStatus, req, grpc.StatusCode.NOT_FOUND)


def test_health(servers):
    with grpc.insecure_channel(servers["plain"].address) as channel:
        for service in ("", "tensorflow.serving.PredictionService", "linear", "broken"):
            assert health.check(channel, service) == "SERVING"
        with pytest.raises(grpc.RpcError) as info:
            health.check(channel, "nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_errors_use_tf_serving_codes_and_never_kill_the_server(plain, servers):
    predict, _ = plain
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    bad_content = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\x00" * 7)
    bad_content.tensor_shape.dim.add(size=1)
    bad_content.tensor_shape.dim.add(size=4)
    cases = [
        (request("nope")[0], not_found, "Servable not found for request: Latest(nope)"),
        (request("linear", version=1)[0], not_found, "Specific(linear, 1)"),  # on disk, not loaded (latest 1)
        (request("linear", version=99)[0], not_found, "Specific(linear, 99)"),
        (request("labeled", label="nope")[0], invalid, "Unrecognized servable version label: nope"),
        (request("labeled", label="ghost")[0], not_found, "Specific(labeled, 9)"),
        (request(x=np.zeros((2, 4), np.float64))[0], invalid, "expects DT_FLOAT but DT_DOUBLE"),
        (request(k=np.zeros(2, np.int32))[0], invalid, "expects DT_INT64 but DT_INT32"),
        (request(x=np.zeros((2, 5), np.float32))[0], invalid, "shape [2, 5]"),
        (request(x=np.zeros((2, 4, 1), np.float32))[0], invalid, "shape [2, 4, 1]"),
        (request(k=None)[0], invalid, "Missing but required: {k}"),
        (request(extra=np.zeros(2, np.float32))[0], invalid, "Sent extra: {extra}"),
        (request(x=bad_content)[0], invalid, "tensor_content"),
        (request(signature="nope")[0], grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope" not found'),
    ]
    req, _ = request()
    req.output_filter.extend(["y", "nope"])
    cases.append((req, invalid, "output tensor alias not found"))
    req, _ = request()
    req.model_spec.name = ""
    cases.append((req, invalid, "Missing ModelSpec"))
    for req, code, text in cases:
        expect_code(predict.Predict, req, code, text)
    assert predict.Predict(request()[0], timeout=10).model_spec.version.value == 2
    with grpc.insecure_channel(servers["plain"].address) as channel:
        assert health.check(channel) == "SERVING"


def test_temp_named_exports_are_never_served(plain, models):
    predict, model_service = plain
    time.sleep(3 * POLL_S)  # several polls with the valid temp-named version 7 dirs on disk
    assert predict.Predict(request("linear")[0], timeout=10).model_spec.version.value == 2
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "linear"
    assert [s.version for s in model_service.GetModelStatus(req, timeout=10).model_version_status] == [2]
    expect_code(predict.Predict, request("linear", version=7)[0], grpc.StatusCode.NOT_FOUND)
    assert all((models / "linear" / t / "saved_model.pb").exists() for t in TEMP_NAMES)


def test_hot_swap_under_load_has_zero_failures(plain, models):
    predict, model_service = plain
    stop, results, lock = threading.Event(), [], threading.Lock()

    def client(seed: int) -> None:
        seen = []
        while not stop.is_set():
            req, inputs = request("hot", rows=1, seed=seed)
            try:
                response = predict.Predict(req, timeout=10)
                version = response.model_spec.version.value
                ok = np.array_equal(outputs(response)["y"], inputs["x"] @ W + version)
                seen.append(("ok" if ok else "wrong-output", version))
            except grpc.RpcError as e:
                seen.append((e.code().name, None))
        with lock:
            results.append(seen)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    tmp = models / "hot" / ".tmp-2"
    shutil.copytree(models / "templates" / "2", tmp)  # the atomic export protocol: temp name, then rename
    os.rename(tmp, models / "hot" / "2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if predict.Predict(request("hot")[0], timeout=10).model_spec.version.value == 2:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    flat = [r for seen in results for r in seen]
    assert len(flat) > 100
    assert {status for status, _ in flat} == {"ok"}, "failed or wrong requests during the swap"
    assert {v for _, v in flat} == {1, 2}
    for seen in results:  # once a client sees version 2 it never goes back to 1
        versions = [v for _, v in seen]
        assert versions == sorted(versions)

    corrupt_version(models / "hot" / "3")  # a non-atomic, broken export must not take down version 2
    time.sleep(4 * POLL_S)
    assert predict.Predict(request("hot")[0], timeout=10).model_spec.version.value == 2
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "hot"
    states = {s.version: s.state for s in model_service.GetModelStatus(req, timeout=10).model_version_status}
    assert states == {1: END, 2: AVAILABLE, 3: END}


def test_no_not_found_for_a_version_on_disk_right_after_start(models, tmp_path):
    """A pinned Predict sent as soon as the port accepts connections never gets NOT_FOUND for a version on disk.

    As ``tensorflow_model_server``, the server loads its models before it serves: an early request is
    UNAVAILABLE (retryable) or waits, never NOT_FOUND, which a client takes for a version mismatch.
    """
    names = [f"m{i}" for i in range(4)]  # several models, the pinned one loaded last: a long initial load
    for name in names:
        for v in (1, 2):
            shutil.copytree(models / "templates" / str(v), tmp_path / name / str(v))
    entries = "".join(
        f'config {{ name: "{n}" base_path: "{n}" model_platform: "tensorflow" model_version_policy {{ all {{}} }} }}\n'
        for n in names
    )
    config = tmp_path / "models.config"
    config.write_text(f"model_config_list {{\n{entries}}}\n")
    port = free_port()
    with start_server(tmp_path, port=port, config=config, server="python") as handle:
        deadline = time.monotonic() + 120
        while True:  # poll until the port accepts connections
            assert handle.process.poll() is None, handle.logs()[-4000:]
            assert time.monotonic() < deadline, "the server never accepted connections"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        codes = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while True:
                req, inputs = request(names[-1], version=1)
                try:
                    response = predict.Predict(req, timeout=60)
                    break
                except grpc.RpcError as e:
                    codes.append(e.code())
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                    assert time.monotonic() < deadline, codes
                    time.sleep(0.05)
        assert response.model_spec.version.value == 1, codes
        np.testing.assert_array_equal(outputs(response)["y"], inputs["x"] @ W + 1)


def test_batching_gives_the_same_results_as_no_batching(plain, batched):
    results: dict[int, tuple] = {}

    def client(seed: int) -> None:
        req, _ = request("linear", rows=1 + seed % 3, seed=seed)
        results[seed] = (outputs(batched[0].Predict(req, timeout=20)), outputs(plain[0].Predict(req, timeout=20)))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 24
    for got, want in results.values():
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_batching_merges_concurrent_requests(batched):
    predict, _ = batched
    barrier, rows = threading.Barrier(8), []

    def client() -> None:
        req, _ = request("linear", rows=1, signature="probe", k=None, tag=None)
        barrier.wait()
        rows.append(int(outputs(predict.Predict(req, timeout=20))["rows"][0]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rows) == 8 and max(rows) > 1, rows


def test_batching_limits(batched):
    predict, _ = batched
    expect_code(predict.Predict, request(rows=9)[0], grpc.StatusCode.INVALID_ARGUMENT, "larger than maximum")
    req, _ = request(rows=2, k=np.arange(3))
    expect_code(predict.Predict, req, grpc.StatusCode.INVALID_ARGUMENT, "equal 0th-dimension")
    assert predict.Predict(request(rows=8)[0], timeout=10).model_spec.version.value == 2


def test_reload_config_adds_models_and_labels(batched, models):
    predict, model_service = batched
    config = model_server_config_pb2.ModelServerConfig()
    for name, base in (("linear", "linear"), ("relabeled", "labeled")):
        entry = config.model_config_list.config.add(
            name=name, base_path=str(models / base), model_platform="tensorflow"
        )
        entry.model_version_policy.all.SetInParent()
    config.model_config_list.config[1].version_labels["stable"] = 2
    model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
    assert predict.Predict(request("relabeled", label="stable")[0], timeout=10).model_spec.version.value == 2
    assert predict.Predict(request("linear", version=1)[0], timeout=10).model_spec.version.value == 1  # policy: all
    expect_code(predict.Predict, request("hot")[0], grpc.StatusCode.NOT_FOUND)  # dropped from the config
    bad = model_server_config_pb2.ModelServerConfig()
    bad.model_config_list.config.add(name="x", base_path="y", model_platform="pytorch")
    req = model_management_pb2.ReloadConfigRequest(config=bad)
    expect_code(model_service.HandleReloadConfigRequest, req, grpc.StatusCode.INVALID_ARGUMENT, "model_platform")


def test_single_model_form_message_limit_and_graceful_shutdown(servers):
    handle = servers["solo"]
    predict, _ = _stubs(handle)
    assert predict.Predict(request("solo")[0], timeout=10).model_spec.version.value == 2
    big, _ = request("solo", rows=70_000)  # > 1 MiB
    expect_code(predict.Predict, big, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def slow(n: int) -> float:
        req = predict_request("solo", {"n": np.array([n], np.int64)}, signature="slow")
        start = time.perf_counter()
        assert tf.make_ndarray(predict.Predict(req, timeout=60).outputs["trace"]).tolist() == [256.0]
        return time.perf_counter() - start

    n = max(50, int(50 * 0.6 / slow(50)))  # about 0.6 s per request on this machine
    results: list[str] = []

    def client() -> None:
        try:
            slow(n)
            results.append("OK")
        except grpc.RpcError as e:
            results.append(e.code().name)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.15)  # in flight
    assert handle.stop(timeout=60) == 0
    for t in threads:
        t.join()
    assert results == ["OK"] * 3, results  # SIGTERM let the in-flight requests finish
    expect_code(predict.Predict, request("solo")[0], grpc.StatusCode.UNAVAILABLE)
    assert "stopped (exit 0" in handle.logs()


def test_server_logs_warmup_and_skipped_versions(servers):
    logs = servers["plain"].logs()
    assert "protocol-compatible model server listening on 127.0.0.1:" in logs
    assert "model 'linear': version 2 available" in logs and "1 warm-up requests" in logs
    assert "model 'broken': version 3 at" in logs and "failed to load, skipped" in logs
