"""The standard gRPC health service (``grpc.health.v1.Health``): server side and a client check.

Service names: ``""`` (the whole server), ``tensorflow.serving.PredictionService``,
``tensorflow.serving.ModelService``, and every configured model name (SERVING once that model
has a loaded version). Unknown names answer NOT_FOUND, as the standard service does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc

from serving.model_server.protos import SERVING_STATUS, HealthCheckRequest, HealthCheckResponse

SERVICE_NAME = "grpc.health.v1.Health"
SERVING, NOT_SERVING = SERVING_STATUS["SERVING"], SERVING_STATUS["NOT_SERVING"]
SERVICE_UNKNOWN = SERVING_STATUS["SERVICE_UNKNOWN"]
WATCH_INTERVAL_S = 0.5


class HealthServicer:
    """Answers Check/Watch from fixed service states plus a dynamic per-model lookup."""

    def __init__(self, model_status: Callable[[str], int | None] | None = None):
        self._lock = threading.Lock()
        self._statuses: dict[str, int] = {}
        self._model_status = model_status

    def set(self, service: str, status: int) -> None:
        with self._lock:
            self._statuses[service] = status

    def set_all(self, status: int) -> None:
        with self._lock:
            self._statuses = dict.fromkeys(self._statuses, status)

    def status_of(self, service: str) -> int | None:
        with self._lock:
            status = self._statuses.get(service)
        if status is None and self._model_status is not None:
            status = self._model_status(service)
            if status == SERVING and self.status_of("") != SERVING:
                status = NOT_SERVING  # shutting down or not started
        return status

    def Check(self, request: HealthCheckRequest, context: grpc.ServicerContext) -> HealthCheckResponse:
        status = self.status_of(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return HealthCheckResponse(status=status)

    def Watch(self, request: HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[HealthCheckResponse]:
        last = None
        while context.is_active():
            status = self.status_of(request.service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            time.sleep(WATCH_INTERVAL_S)


def add_health_servicer(servicer: HealthServicer, server: grpc.Server) -> None:
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """Client side: the status name (``SERVING``...) of ``service``; raises grpc.RpcError."""
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/Check",
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    response = call(HealthCheckRequest(service=service), timeout=timeout)
    return HealthCheckResponse.ServingStatus.Name(response.status)
