"""The HTTP/REST API of ``tensorflow_model_server`` (``--rest_api_port``), on the standard library's HTTP server.

Routes (paths matched case-insensitively, as the binary's)::

    POST /v1/models/NAME[/versions/V | /labels/L]:predict     {"instances": [...]} or {"inputs": ...}
    GET  /v1/models/NAME[/versions/V | /labels/L]             model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata    {"model_spec": ..., "metadata": {"signature_def": ...}}

Requests run through :class:`serving.model_server.core.ServingCore`, the code gRPC Predict runs
(same ModelStore, same Servable, same batching scheduler), so REST and gRPC give the same
answers. JSON conventions: :mod:`serving.model_server.json_tensors`. Errors are
``{"error": "message"}`` with the binary's HTTP status for the error's code (http_server.cc):
INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE -> 400; NOT_FOUND -> 404; UNIMPLEMENTED -> 501;
UNAVAILABLE -> 503; DEADLINE_EXCEEDED -> 504; RESOURCE_EXHAUSTED -> 429; ALREADY_EXISTS, ABORTED ->
409; PERMISSION_DENIED -> 403; UNAUTHENTICATED -> 401; CANCELLED -> 499; UNKNOWN, INTERNAL, DATA_LOSS
-> 500. As in the binary, a predict naming an unknown signature is 400 (INVALID_ARGUMENT: the REST
handler looks the signature up itself before predicting), where gRPC says FAILED_PRECONDITION.

Differences from the binary (deliberate): ``:classify`` and ``:regress`` are 501 (UNIMPLEMENTED,
as Classify/Regress over gRPC); ``--rest_api_timeout_in_ms`` answers 504 when a predict takes
longer, but the computation is not cancelled (it finishes in the background); a body larger than
``--max_message_bytes`` is refused (429, RESOURCE_EXHAUSTED); no Prometheus endpoint and no CORS
option.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import urllib.parse
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from serving.model_server import json_tensors
from serving.model_server.core import ServingCore
from serving.model_server.servable import DEFAULT_SIGNATURE, ServingError

log = logging.getLogger("tfrs_ctx.serving")

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_MODEL_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_INT64_MAX = 2**63 - 1
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


class _BareError(ServingError):
    """An error the binary answers with its HTTP status but an empty body (URL parse errors)."""


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    """ModelSpec from the URL parts (percent-decoded like the binary's curl_easy_unescape)."""
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name or ""))
    if version:
        if int(version) > _INT64_MAX:
            raise _BareError(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to convert version: {version} to numeric.")
        spec.version.value = int(version)
    if label:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def _message_json(message, **options) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True, **options)


class RestApi:
    """Request path + body -> (HTTP status, JSON body); no networking (see :class:`RestServer`)."""

    def __init__(self, core: ServingCore, timeout_ms: int = 0, threads: int = 0):
        self.core = core
        self.timeout_s = timeout_ms / 1000 if timeout_ms > 0 else None
        self._pool = futures.ThreadPoolExecutor(threads or 64, "rest-predict")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            document = self._dispatch(method, path, body)
            return 200, json_tensors.dumps(document)
        except _BareError as e:
            return HTTP_STATUS.get(e.code, 500), b""
        except ServingError as e:
            return HTTP_STATUS.get(e.code, 500), json_tensors.dumps({"error": e.message})
        except Exception as e:  # never let one request kill the server
            log.exception("REST %s %s failed", method, path)
            return 500, json_tensors.dumps({"error": f"{type(e).__name__}: {e}"})

    def _dispatch(self, method: str, path: str, body: bytes):
        malformed = _invalid(f"Malformed request: {method} {path}")
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
            if match is None:
                raise malformed
            name, version, label, verb = match.groups()
            spec = _model_spec(name, version, label)
            if version and label:
                raise _invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
            if verb == "predict":
                return self._predict(spec, body)
            if verb in ("classify", "regress"):
                raise ServingError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{verb} is not implemented by this server (the tfrs-ctx protocol-compatible model server); "
                    "use :predict with the signature",
                )
            raise malformed  # e.g. ":PREDICT": the path matches, the method name does not
        if method == "GET":
            match = _MODEL_PATH.fullmatch(path)
            if match is None:
                raise malformed
            name, version, label, subresource = match.groups()
            spec = _model_spec(name, version, label)
            if version and label:
                raise _invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
            if not spec.name:
                raise _invalid("Missing model name in request.")
            if subresource and subresource == "metadata":
                return self._metadata(spec)
            return self._status(spec)
        raise malformed

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> dict:
        doc = json_tensors.parse_json(body)
        request = predict_pb2.PredictRequest(model_spec=spec)
        request.model_spec.signature_name = json_tensors.signature_name(doc)
        servable = self.core.store.get(request.model_spec)
        sig_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        sig_def = servable.signature_def_map.signature_def.get(sig_name) if sig_name in servable.signatures else None
        if sig_def is None:
            raise _invalid(f'Serving signature name: "{sig_name}" not found in signature def')
        dtypes = {k: sig_def.inputs[k].dtype for k in sorted(sig_def.inputs)}
        inputs, format = json_tensors.request_tensors(doc, dtypes, request.model_spec.signature_name)
        for name, proto in inputs.items():
            request.inputs[name].CopyFrom(proto)
        future = self._pool.submit(self.core.predict, request)
        try:
            result = future.result(timeout=self.timeout_s)
        except futures.TimeoutError as e:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from e
        return json_tensors.response_document(result.outputs, format)

    def _status(self, spec: model_pb2.ModelSpec) -> dict:
        response = self.core.status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return _message_json(response)

    def _metadata(self, spec: model_pb2.ModelSpec) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        response = self.core.metadata(request)
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        return {
            "model_spec": _message_json(response.model_spec, preserving_proto_field_name=True),
            "metadata": {"signature_def": _message_json(signature_defs, preserving_proto_field_name=True)},
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tfrs-ctx-model-server"
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:
        log.debug("REST %s: " + format, self.address_string(), *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > self.server.max_body_bytes:
                    raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body_bytes:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body of {length} bytes is larger than the limit of {self.server.max_body_bytes} "
                "(--max_message_bytes)",
            )
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self._read_body()
        except (ServingError, ValueError) as e:
            self.close_connection = True
            code = e.code if isinstance(e, ServingError) else grpc.StatusCode.INVALID_ARGUMENT
            self._reply(HTTP_STATUS[code], json_tensors.dumps({"error": str(e)}))
            return
        if not _API_PATH.fullmatch(path):
            self._reply(HTTPStatus.NOT_FOUND, b"")  # the binary has no handler outside /v1/
            return
        if self.command == "OPTIONS":  # CORS preflight, as the binary answers it
            origin = self.headers.get("Origin", "")
            if re.search(r"https?://", origin):
                self._reply(200, b"")
            else:
                self._reply(400, json_tensors.dumps({"error": "Origin header is missing in CORS preflight"}))
            return
        status, payload = self.server.api.handle(self.command, path, body)
        self._reply(status, payload)

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    api: RestApi
    max_body_bytes: int


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class RestServer:
    """The REST API on ``host:port`` (port 0: a free one, see :attr:`port`), served from a background thread."""

    def __init__(
        self,
        core: ServingCore,
        host: str,
        port: int,
        *,
        timeout_ms: int = 0,
        max_body_bytes: int = 64 * 1024 * 1024,
        threads: int = 0,
    ):
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self._httpd = server_class((host, port), _Handler)
        self._httpd.api = RestApi(core, timeout_ms, threads)
        self._httpd.max_body_bytes = max_body_bytes
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; requests already running finish (their predict calls complete)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.api.close()
