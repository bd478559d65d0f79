"""Model-server latency and throughput: ``python -m benchmarks.bench_serving [--requests N] [--json PATH]``.

(a) Predict p50/p99 at batch 1 on a context-head-shaped SavedModel built here (encoded history
    float[1,64], 5 category ids + 5 weights, 3 int64 scalars; a small MLP, a matmul against a
    [10000,64] ad corpus and top_k 100) against a bare gRPC echo server (a generic handler that
    returns the request bytes) on the same loopback, in the same run (target: Predict p50 <= 2x
    echo p50). The model alone is also timed in-process, so Predict = echo + model + the
    server's own overhead (decode, checks, Session call, encode) can be read off.
(b) Requests/s at 8 and 32 client threads, with and without ``--enable_batching``
    (``serving/batching_parameters.txt``).

Servers run as separate processes (the tfrs-ctx protocol-compatible model server unless
``--server binary``); the clients are Python threads in this process, so on a small machine
they compete with the server for cores: compare rows of one run, not across machines.
``compare_models(models_dir, names)`` measures real exported models the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from serving.launcher import DEFAULT_BATCHING_PARAMETERS, DEFAULT_CONFIG, LOOPBACK, ServerHandle, start_server

ECHO_METHOD = "/tfrs_ctx.bench.Echo/Echo"
CORPUS, DIM, TOP_K, CATEGORIES = 10_000, 64, 100, 5
TARGET_RATIO = 2.0
# One intra-op thread: batch-1 requests gain nothing from splitting a matmul, and idle Eigen
# threads spinning for work steal the cores that gRPC needs (measured: p50 -25% on 2 cores).
DEFAULT_SERVER_ARGS = ("--tensorflow_intra_op_parallelism=1",)


# ---- the benchmark model --------------------------------------------------------------------


def write_context_head_like(base_path: str | Path, version: int = 1, noop: bool = False) -> Path:
    """A SavedModel shaped like the exported context head, at ``base_path/<version>``.

    ``noop``: same inputs and outputs, next to no compute (isolates the server's own cost).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class Head(tf.Module):
        def __init__(self):
            super().__init__()
            self.categories = tf.Variable(rng.normal(size=(1000, DIM)).astype(np.float32))
            self.dense = tf.Variable(rng.normal(size=(2 * DIM + 3, DIM)).astype(np.float32) * 0.1)
            self.corpus = tf.Variable(rng.normal(size=(CORPUS, DIM)).astype(np.float32))
            self.ids = tf.Variable(np.arange(CORPUS, dtype=np.int64) + 10_000)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, DIM], tf.float32, name="encoded_history"),
                tf.TensorSpec([None, CATEGORIES], tf.int64, name="context_categories"),
                tf.TensorSpec([None, CATEGORIES], tf.float32, name="context_weights"),
                tf.TensorSpec([None], tf.int64, name="history_length"),
                tf.TensorSpec([None], tf.int64, name="age_bucket"),
                tf.TensorSpec([None], tf.int64, name="country"),
            ]
        )
        def serve(self, encoded_history, context_categories, context_weights, history_length, age_bucket, country):
            if noop:
                user, shape = encoded_history, tf.stack([tf.shape(encoded_history)[0], TOP_K])
                scores, rows = tf.zeros(shape), tf.zeros(shape, tf.int32)
            else:
                weights = context_weights / (tf.reduce_sum(context_weights, axis=1, keepdims=True) + 1e-6)
                context = tf.gather(self.categories, context_categories % 1000) * weights[..., None]
                scalars = tf.cast(tf.stack([history_length, age_bucket, country], axis=1), tf.float32)
                features = tf.concat([encoded_history, tf.reduce_sum(context, axis=1), scalars], 1)
                user = tf.nn.l2_normalize(tf.matmul(features, self.dense), -1)
                scores, rows = tf.math.top_k(tf.matmul(user, self.corpus, transpose_b=True), k=TOP_K)
            versions = tf.fill(tf.shape(history_length), tf.constant(version, tf.int64))
            return {
                "user_embedding": user,
                "top_k_ids": tf.gather(self.ids, rows),
                "top_k_scores": scores,
                "model_version": versions,
            }

    head = Head()
    path = Path(base_path) / str(version)
    tf.saved_model.save(head, str(path), signatures={"serving_default": head.serve})
    return path


def context_head_request(model: str = "context_head", rows: int = 1, seed: int = 0):
    """A PredictRequest for ``write_context_head_like`` (tensor_content encoding, like tf.make_tensor_proto)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    rng = np.random.default_rng(seed)
    inputs = {
        "encoded_history": rng.normal(size=(rows, DIM)).astype(np.float32),
        "context_categories": rng.integers(0, 1000, (rows, CATEGORIES)).astype(np.int64),
        "context_weights": rng.random((rows, CATEGORIES)).astype(np.float32),
        "history_length": rng.integers(1, 50, rows).astype(np.int64),
        "age_bucket": rng.integers(0, 7, rows).astype(np.int64),
        "country": rng.integers(0, 50, rows).astype(np.int64),
    }
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


# ---- the echo server ------------------------------------------------------------------------


def run_echo_server(port_file: str, threads: int) -> int:
    """A bare gRPC server answering ECHO_METHOD with the request bytes (no (de)serialisation)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    service, method = ECHO_METHOD.strip("/").split("/")
    server = grpc.server(futures.ThreadPoolExecutor(threads))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    Path(port_file).write_text(str(port))
    while not stop.wait(0.5):
        pass
    server.stop(grace=2).wait()
    return 0


class EchoServer:
    """The echo server as a child process (so it does not share this process's GIL)."""

    def __init__(self, threads: int = 64):
        self._port_file = tempfile.mktemp(prefix="tfrs-ctx-echo-port-")
        cmd = [sys.executable, "-m", "benchmarks.bench_serving", "--echo_server", self._port_file]
        cmd.append(f"--echo_threads={threads}")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self._port_file):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("echo server did not start")
            time.sleep(0.05)
        self.address = f"{LOOPBACK}:{Path(self._port_file).read_text()}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        os.remove(self._port_file)


# ---- measurements ---------------------------------------------------------------------------


def _summary(latencies_s: Sequence[float]) -> dict:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def measure_latency(call: Callable, request, requests: int, warmup: int = 200) -> dict:
    """Sequential calls (one in flight): latency percentiles."""
    for _ in range(warmup):
        call(request, timeout=10)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        call(request, timeout=10)
        latencies.append(time.perf_counter() - start)
    return _summary(latencies)


def measure_throughput(call: Callable, requests: Sequence, threads: int, seconds: float) -> dict:
    """``threads`` closed-loop clients for ``seconds``: requests/s, latency percentiles, errors."""
    stop, lock = threading.Event(), threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def client(i: int) -> None:
        mine, request = [], requests[i % len(requests)]
        while not stop.is_set():
            start = time.perf_counter()
            try:
                call(request, timeout=30)
                mine.append(time.perf_counter() - start)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return {
        "threads": threads,
        "requests_per_s": round(len(latencies) / seconds, 1),
        **_summary(latencies),
        "errors": errors,
    }


def measure_compute(model_path: str | Path, request, requests: int) -> dict:
    """The model alone: the signature run in this process (session runtime, one intra-op thread)."""
    from serving.model_server.servable import Servable, session_config

    servable = Servable("bench", 1, str(model_path), session_config=session_config(intra_op_threads=1))
    prepared = servable.prepare("", request.inputs)
    return measure_latency(
        lambda _, timeout: servable.run(prepared.signature, prepared.inputs, prepared.outputs), None, requests
    )


def _predict_call(handle: ServerHandle) -> tuple[grpc.Channel, Callable]:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(handle.address)
    return channel, prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict


def compare_models(
    models_dir: str | Path,
    names: Sequence[str] = ("context_head", "full"),
    requests: int = 1000,
    config: str | Path = DEFAULT_CONFIG,
    inputs: dict[str, dict[str, np.ndarray]] | None = None,
    server: str = "auto",
    server_args: Sequence[str] = DEFAULT_SERVER_ARGS,
) -> dict[str, dict]:
    """Batch-1 Predict latency of each model in ``names`` served from ``models_dir``.

    ``inputs[name]`` gives a model's request inputs; by default they are built from its
    signature (zeros, empty strings: the padding / missing values), batch 1.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

    results = {}
    with start_server(models_dir, config=config, server=server, extra_args=server_args) as handle:
        handle.wait_ready(300)
        channel, predict = _predict_call(handle)
        stub_metadata = channel.unary_unary(
            "/tensorflow.serving.PredictionService/GetModelMetadata",
            request_serializer=get_model_metadata_pb2.GetModelMetadataRequest.SerializeToString,
            response_deserializer=get_model_metadata_pb2.GetModelMetadataResponse.FromString,
        )
        for name in names:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            values = (inputs or {}).get(name) or _default_inputs(stub_metadata, name)
            for key, value in values.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            results[name] = measure_latency(predict, request, requests)
        channel.close()
    return results


def _default_inputs(metadata_call: Callable, name: str) -> dict[str, np.ndarray]:
    import tensorflow as tf
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata_call(request, timeout=30).metadata["signature_def"].Unpack(signatures)
    values = {}
    for key, info in signatures.signature_def["serving_default"].inputs.items():
        shape = [1 if d.size < 0 else d.size for d in info.tensor_shape.dim]
        dtype = tf.dtypes.as_dtype(info.dtype)
        values[key] = np.full(shape, b"", object) if dtype == tf.string else np.zeros(shape, dtype.as_numpy_dtype)
    return values


# ---- the run --------------------------------------------------------------------------------


def run(
    requests: int = 2000,
    seconds: float = 5.0,
    concurrency: Sequence[int] = (8, 32),
    server: str = "python",
    server_args: Sequence[str] = DEFAULT_SERVER_ARGS,
) -> dict:
    """(a) latency vs echo and (b) throughput with/without batching; returns the figures."""
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    write_context_head_like(work / "context_head")
    write_context_head_like(work / "noop_head", noop=True)
    config = work / "models.config"
    entry = 'config {{ name: "{0}" base_path: "{0}" model_platform: "tensorflow" }}'
    config.write_text(f"model_config_list {{ {entry.format('context_head')} {entry.format('noop_head')} }}")
    request = context_head_request()
    result: dict = {"benchmark": "serving", "cpus": os.cpu_count(), "requests": requests, "server": server}
    result["server_args"] = list(server_args)

    echo = EchoServer()
    plain = start_server(work, config=config, server=server, poll_seconds=0, extra_args=server_args)
    batching = start_server(
        work,
        config=config,
        server=server,
        poll_seconds=0,
        batching=True,
        batching_parameters=DEFAULT_BATCHING_PARAMETERS,
        extra_args=server_args,
    )
    try:
        plain.wait_ready(300)
        batching.wait_ready(300)
        result["server_kind"] = plain.kind
        echo_channel = grpc.insecure_channel(echo.address)
        echo_call = echo_channel.unary_unary(
            ECHO_METHOD,
            request_serializer=type(request).SerializeToString,
            response_deserializer=type(request).FromString,
        )
        channel, predict = _predict_call(plain)
        # Interleave rounds so that machine noise hits both sides alike.
        noop_request = context_head_request("noop_head")
        rounds = [
            (
                measure_latency(echo_call, request, requests // 4),
                measure_latency(predict, request, requests // 4),
                measure_latency(predict, noop_request, requests // 4),
            )
            for _ in range(4)
        ]
        result["echo"] = _merge([r[0] for r in rounds])
        result["predict"] = _merge([r[1] for r in rounds])
        result["predict_noop_model"] = _merge([r[2] for r in rounds])
        result["noop_predict_over_echo_p50"] = round(
            result["predict_noop_model"]["p50_ms"] / result["echo"]["p50_ms"], 2
        )
        result["predict_over_echo_p50"] = round(result["predict"]["p50_ms"] / result["echo"]["p50_ms"], 2)
        result["predict_over_echo_p99"] = round(result["predict"]["p99_ms"] / result["echo"]["p99_ms"], 2)
        result["target_p50_ratio"] = TARGET_RATIO
        result["request_bytes"] = request.ByteSize()
        result["response_bytes"] = predict(request).ByteSize()
        result["model_compute"] = measure_compute(work / "context_head" / "1", request, requests // 2)
        result["server_overhead_p50_ms"] = round(
            result["predict"]["p50_ms"] - result["echo"]["p50_ms"] - result["model_compute"]["p50_ms"], 3
        )

        requests_pool = [context_head_request(seed=i) for i in range(64)]
        batching_channel, predict_batched = _predict_call(batching)
        result["throughput"] = []
        for threads in concurrency:
            for label, call in (("no_batching", predict), ("batching", predict_batched)):
                row = measure_throughput(call, requests_pool, threads, seconds)
                result["throughput"].append({"server_batching": label == "batching", **row})
        echo_channel.close()
        channel.close()
        batching_channel.close()
    finally:
        echo.stop()
        plain.close()
        batching.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def _merge(rounds: list[dict]) -> dict:
    """Rounds of equal size: median of the per-round percentiles (robust to one noisy round)."""
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
    return {"n": sum(r["n"] for r in rounds), **{k: round(float(np.median([r[k] for r in rounds])), 3) for k in keys}}


def _print_table(result: dict) -> None:
    e, p = result["echo"], result["predict"]
    print(f"(a) batch-1 latency, {result['requests']} requests each ({result['server_kind']} server)")
    print(f"    echo     p50 {e['p50_ms']:.3f} ms  p99 {e['p99_ms']:.3f} ms")
    print(f"    Predict  p50 {p['p50_ms']:.3f} ms  p99 {p['p99_ms']:.3f} ms")
    n = result["predict_noop_model"]
    print(f"    Predict, no-op model with the same inputs/outputs  p50 {n['p50_ms']:.3f} ms  p99 {n['p99_ms']:.3f} ms")
    print(
        f"    Predict/echo p50 {result['predict_over_echo_p50']}x (target <= {TARGET_RATIO}x), "
        f"p99 {result['predict_over_echo_p99']}x; no-op model/echo p50 {result['noop_predict_over_echo_p50']}x"
    )
    print(
        f"    model compute alone (in-process) p50 {result['model_compute']['p50_ms']:.3f} ms; "
        f"server overhead beyond echo + compute p50 {result['server_overhead_p50_ms']:.3f} ms"
    )
    print("(b) throughput")
    for row in result["throughput"]:
        mode = "batching   " if row["server_batching"] else "no batching"
        print(
            f"    {row['threads']:>3} threads, {mode}: {row['requests_per_s']:>8.1f} req/s  "
            f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  errors {row['errors'] or 0}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per side for (a)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run for (b)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="client threads for (b)")
    parser.add_argument("--server", choices=("python", "binary", "auto"), default="python")
    parser.add_argument(
        "--server_args",
        nargs="*",
        default=list(DEFAULT_SERVER_ARGS),
        help="server flags (default: %(default)s; e.g. --runtime=function)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--echo_server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--echo_threads", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        return run_echo_server(args.echo_server, args.echo_threads)
    result = run(args.requests, args.seconds, args.concurrency, args.server, args.server_args)
    _print_table(result)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
