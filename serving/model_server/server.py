"""tfrs-ctx protocol-compatible model server: TF Serving's gRPC and REST APIs for machines without the binary.

``python -m serving.model_server --port 8500 [--rest_api_port 8501] --model_config_file serving/models.config
[--models_dir DIR] [--enable_batching --batching_parameters_file serving/batching_parameters.txt]
[--file_system_poll_wait_seconds 1] [--host 127.0.0.1]``
or the single-model form ``--model_name NAME --model_base_path PATH``.

Serves ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata),
``tensorflow.serving.ModelService`` (GetModelStatus, HandleReloadConfigRequest) and
``grpc.health.v1.Health`` with the messages and status codes of ``tensorflow_model_server``, so
one client works against either; with ``--rest_api_port`` also the binary's REST API (see
:mod:`serving.model_server.rest`: ``/v1/models/NAME[...]:predict``, model status, metadata), in
the same process, on the same models and batching scheduler. It is not TF Serving: no
Classify/Regress/MultiInference (UNIMPLEMENTED over gRPC, 501 over REST), only the ops of the
installed TensorFlow. Binds 127.0.0.1 unless ``--host`` says otherwise (REST too). As
``tensorflow_model_server``, it binds its ports only after the initial model load (until then
connections are refused: UNAVAILABLE, retryable), so a version on disk is never NOT_FOUND just
after a start. SIGTERM/SIGINT: stop accepting, finish in-flight
requests, exit 0.

Without ``--enable_batching`` a Predict request may hold at most :data:`MAX_BATCH_SIZE` rows
(TF Serving's batching default; with batching, ``max_batch_size`` applies): larger ones are
INVALID_ARGUMENT, with the batching limit's message, before anything runs, so no request can
make the server allocate without bound. ``tensorflow_model_server`` has no such limit.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from functools import wraps

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_server import server_config
from serving.model_server.batching import BatchingOptions, BatchScheduler
from serving.model_server.core import MAX_BATCH_SIZE, ServingCore
from serving.model_server.health import NOT_SERVING, SERVING, HealthServicer, add_health_servicer
from serving.model_server.model_store import ModelConfig, ModelStore, configs_from_proto, single_model_config
from serving.model_server.rest import RestServer
from serving.model_server.servable import Servable, ServingError, session_config

log = logging.getLogger("tfrs_ctx.serving")

SERVER_NAME = "tfrs-ctx protocol-compatible model server"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
__all__ = ["MAX_BATCH_SIZE", "main", "serve"]


def _grpc_errors(method):
    """Answer ServingError with its status code, anything unexpected with INTERNAL; never crash."""

    @wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as e:
            context.abort(e.code, e.message)
        except Exception as e:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata (Classify/Regress/MultiInference stay UNIMPLEMENTED)."""

    def __init__(self, core: ServingCore):
        self.core = core

    @_grpc_errors
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        return self.core.predict(request).response()

    @_grpc_errors
    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        return self.core.metadata(request)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, core: ServingCore, models_dir: str | None):
        self.core, self.store, self.models_dir = core, core.store, models_dir

    @_grpc_errors
    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        return self.core.status(request)

    @_grpc_errors
    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        try:
            configs = configs_from_proto(request.config, self.models_dir)
        except ValueError as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        self.store.reload(configs)
        return model_management_pb2.ReloadConfigResponse()


def load_configs(args: argparse.Namespace) -> list[ModelConfig]:
    """The model list from ``--model_config_file`` or ``--model_name/--model_base_path``."""
    if args.model_config_file:
        return configs_from_proto(server_config.read_model_server_config(args.model_config_file), args.models_dir)
    return single_model_config(args.model_name, args.model_base_path, args.models_dir)


def _watch_config_file(args: argparse.Namespace, store: ModelStore, stop: threading.Event) -> None:
    """``--model_config_file_poll_wait_seconds``: re-apply the config file when it changes."""
    last = os.stat(args.model_config_file).st_mtime_ns

    def loop() -> None:
        nonlocal last
        while not stop.wait(args.model_config_file_poll_wait_seconds):
            try:
                mtime = os.stat(args.model_config_file).st_mtime_ns
                if mtime != last:
                    last = mtime
                    log.info("model config file changed; reloading %s", args.model_config_file)
                    store.reload(load_configs(args))
            except Exception:
                log.exception("model config reload failed; keeping the current models")

    threading.Thread(target=loop, name="config-poll", daemon=True).start()


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


def _bind(server: grpc.Server, host: str, port: int) -> int:
    """Bind host:port; returns the bound port, 0 on failure."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return server.add_insecure_port(address)
    except RuntimeError as e:
        log.error("could not bind %s: %s", address, e)
        return 0


def _start_rest(args: argparse.Namespace, core: ServingCore) -> RestServer | None:
    """``--rest_api_port``: the REST API in this process (0: none). As the binary, a REST port equal to
    ``--port`` or one that cannot be bound is logged as an error and the server goes on with gRPC only."""
    if not args.rest_api_port:
        return None
    if args.rest_api_port == args.port:
        log.error("--rest_api_port cannot be the same as --port (%d); not exporting the REST API", args.port)
        return None
    try:
        rest = RestServer(
            core,
            args.host,
            args.rest_api_port,
            timeout_ms=args.rest_api_timeout_in_ms,
            max_body_bytes=args.max_message_bytes,
            threads=args.rest_api_num_threads,
        )
    except OSError as e:
        log.error("could not bind the REST API on %s:%d: %s; not exporting it", args.host, args.rest_api_port, e)
        return None
    rest.start()
    log.info("%s listening on %s:%d (HTTP/REST)", SERVER_NAME, args.host, rest.port)
    return rest


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)

    configs = load_configs(args)
    for c in configs:
        log.info("model '%s': base path %s, %s, labels %s", c.name, c.base_path, c.policy, c.labels or "none")
    config = session_config(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism)
    load = functools.partial(Servable, runtime=args.runtime, session_config=config)
    store = ModelStore(configs, warmup=args.enable_model_warmup, load=load)
    log.info("runtime: %s", args.runtime)
    scheduler = None
    if args.enable_batching:
        files = args.batching_parameters_file
        scheduler = BatchScheduler(BatchingOptions.from_file(files) if files else BatchingOptions())
        log.info("server-side batching: %s", scheduler.options)

    def model_health(name: str) -> int | None:
        if name not in store.model_names():
            return None
        return SERVING if store.is_available(name) else NOT_SERVING

    health = HealthServicer(model_health)
    for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        health.set(service, NOT_SERVING)
    server = grpc.server(
        futures.ThreadPoolExecutor(args.grpc_max_threads or server_config.DEFAULT_GRPC_THREADS, "grpc"),
        options=list(server_config.channel_arguments(args).items()),
    )
    core = ServingCore(store, scheduler)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core, args.models_dir), server)
    add_health_servicer(health, server)

    # Initial load, synchronous, before the port is even bound (as tensorflow_model_server): meanwhile a
    # client's connection is refused (UNAVAILABLE, retryable), never NOT_FOUND for a version that is on
    # disk but not loaded yet, which a client takes for a version mismatch.
    store.poll_once()
    missing = [name for name in store.model_names() if not store.is_available(name)]
    if missing:
        log.warning("models %s have no loadable version yet; each is served once one appears", missing)
    health.set_all(SERVING)
    rest = _start_rest(args, core)  # before the gRPC port: once gRPC answers, REST is up too
    port = _bind(server, args.host, args.port)
    if not port:
        if rest is not None:
            rest.stop()
        return 1
    server.start()
    log.info("%s listening on %s:%d (gRPC)", SERVER_NAME, args.host, port)
    if args.port_file:
        _write_port_file(args.port_file, port)
    log.info("serving %s", {name: sorted(store.loaded_versions(name)) for name in store.model_names()})
    store.start_polling(args.file_system_poll_wait_seconds)
    if args.model_config_file and args.model_config_file_poll_wait_seconds > 0:
        _watch_config_file(args, store, stop)

    while not stop.wait(0.5):
        pass
    log.info("shutting down: finishing in-flight requests")
    health.set_all(NOT_SERVING)
    if rest is not None:
        rest.stop()  # in-flight REST requests finish first
    server.stop(grace=10).wait()
    store.stop()
    if scheduler is not None:
        scheduler.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.model_server", description=__doc__.split("\n")[0])
    server_config.add_server_flags(parser)
    args = parser.parse_args(argv)
    server_config.check_server_flags(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    log.info("%s starting (pid %d, not TF Serving itself)", SERVER_NAME, os.getpid())
    code = serve(args)
    log.info("%s stopped (exit %d, up %.1fs)", SERVER_NAME, code, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
