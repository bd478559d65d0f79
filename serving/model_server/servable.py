"""One loaded version of one model: its SavedModel, signatures, request checks and warm-up.

Two runtimes run a signature:

* ``session`` (default): what ``tensorflow_model_server`` does. The ``serve`` MetaGraph is loaded
  into a ``tf.compat.v1.Session`` and run by the SignatureDef's tensor names (on the calling
  thread: no inter-op hand-off for these small graphs). A model that loads and runs here loads
  the same way in the real binary.
* ``function``: ``tf.saved_model.load`` and the signature's concrete function (TF2 eager).

Checks and status codes follow ``tensorflow_model_server`` (``predict_util.cc``): unknown signature ->
FAILED_PRECONDITION; inputs are matched to the signature by alias (an input left out is taken from
the signature's ``defaults`` if it has one); missing/unknown input, an unparsable tensor, a dtype
other than the fed tensor's, unknown or duplicate output alias -> INVALID_ARGUMENT. The method_name
of the signature is not checked (the binary's default), so Predict can run a classify/regress
signature. Shapes are NOT checked against the signature's static shapes up front: the binary feeds
the tensor to ``Session::Run``, which does not compare a fed tensor with a placeholder's shape, so a
``[3]`` tensor fed to a ``[-1,1]`` input runs if the graph's ops accept it. Errors raised while
running the graph keep their TensorFlow code; when an input's shape was incompatible with the
signature, the message says so. (The ``function`` runtime calls the loaded concrete function,
which may refuse an incompatible tensor itself: INVALID_ARGUMENT.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import message, text_format
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from serving.tensor_codec import TensorCodecError, dtype_name, to_ndarray

log = logging.getLogger("tfrs_ctx.serving")

DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # listed in the metadata, never callable
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # tensorflow_model_server's limit
RUNTIMES = ("session", "function")
_CODE_OF_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """An error with the gRPC status code the server answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_tf(cls, error: tf.errors.OpError) -> ServingError:
        return cls(_CODE_OF_VALUE.get(error.error_code, grpc.StatusCode.UNKNOWN), error.message)


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _names(names: Iterable[str]) -> str:
    return "{" + ",".join(sorted(names)) + "}"


@dataclasses.dataclass(frozen=True)
class _InputSpec:
    dtype: int
    shape: tuple[int, ...] | None  # -1: any size; None: unknown rank

    def describe(self) -> str:
        return "[" + ",".join("?" if d < 0 else str(d) for d in self.shape or ()) + "]"

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        want = self.shape
        return want is None or (
            len(want) == len(shape) and all(w < 0 or w == got for w, got in zip(want, shape, strict=True))
        )


@dataclasses.dataclass(frozen=True)
class Signature:
    """A signature's name and its input/output specs (from the SignatureDef)."""

    name: str
    inputs: Mapping[str, _InputSpec]
    outputs: tuple[str, ...]
    defaults: Mapping[str, tensor_pb2.TensorProto] = dataclasses.field(default_factory=dict)
    method_name: str = ""

    @classmethod
    def from_def(cls, name: str, sig_def: meta_graph_pb2.SignatureDef) -> Signature:
        inputs = {
            k: _InputSpec(v.dtype, None if v.tensor_shape.unknown_rank else tuple(d.size for d in v.tensor_shape.dim))
            for k, v in sorted(sig_def.inputs.items())
        }
        defaults = {k: v for k, v in sig_def.defaults.items() if k in inputs}
        return cls(name, inputs, tuple(sorted(sig_def.outputs)), defaults, sig_def.method_name)

    def check_input(self, name: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
        """Decode one request tensor and check its dtype (not its shape: the Session decides, as in the binary)."""
        spec = self.inputs[name]
        if proto.dtype != spec.dtype:  # Session::Run's own check: "Expects arg[i] to be float but double ..."
            raise _invalid(
                f"input '{name}': expects {dtype_name(spec.dtype)} but {dtype_name(proto.dtype)} is provided"
            )
        try:
            return to_ndarray(proto)
        except TensorCodecError as e:
            raise _invalid(f"tensor parsing error: {name} ({e})") from e

    def shape_notes(self, inputs: Mapping[str, np.ndarray]) -> str:
        """Which inputs have a shape the signature's static shape does not allow ("" if none)."""
        notes = [
            f"input '{k}': shape {list(v.shape)} is incompatible with the signature's {self.inputs[k].describe()}"
            for k, v in inputs.items()
            if k in self.inputs and not self.inputs[k].accepts_shape(v.shape)
        ]
        return "; ".join(notes)

    def check_outputs(self, output_filter: Sequence[str]) -> tuple[str, ...]:
        """The outputs to return: ``output_filter`` if given (checked), else all of them."""
        if not output_filter:
            return self.outputs
        seen: set[str] = set()
        for name in output_filter:
            if name not in self.outputs:
                raise _invalid(
                    f"output tensor alias not found in signature: {name} "
                    f"Outputs expected to be in the set {_names(self.outputs)}."
                )
            if name in seen:
                raise _invalid(f"duplicate output tensor alias: {name}")
            seen.add(name)
        return tuple(output_filter)


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A checked Predict request: decoded inputs (in signature order) and the outputs to return."""

    signature: Signature
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]


def read_meta_graph(path: str) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef tagged ``serve`` of the SavedModel at ``path``."""
    saved_model = saved_model_pb2.SavedModel()
    pb, pbtxt = os.path.join(path, "saved_model.pb"), os.path.join(path, "saved_model.pbtxt")
    try:
        if os.path.exists(pb):
            with open(pb, "rb") as f:
                saved_model.ParseFromString(f.read())
        elif os.path.exists(pbtxt):
            with open(pbtxt) as f:
                text_format.Parse(f.read(), saved_model)
        else:
            raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {path}")
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise ValueError(f"{pb if os.path.exists(pb) else pbtxt} is not a valid SavedModel: {e}") from e
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError(f"no MetaGraph tagged '{SERVE_TAG}' in {path}")


class _SessionRuntime:
    """The ``serve`` MetaGraph in a v1 Session; one cached callable per (signature, outputs)."""

    def __init__(self, path: str, meta_graph: meta_graph_pb2.MetaGraphDef, config: tf.compat.v1.ConfigProto | None):
        self._session = tf.compat.v1.Session(graph=tf.Graph(), config=config)
        tf_logger = tf.get_logger()
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)  # the v1 loader's deprecation notice
        try:
            tf.compat.v1.saved_model.load(self._session, [SERVE_TAG], path)
        finally:
            tf_logger.setLevel(level)
        self._defs = meta_graph.signature_def
        self._callables: dict[tuple, Callable] = {}
        self._lock = threading.Lock()

    def _callable(self, signature: Signature, outputs: tuple[str, ...]) -> Callable:
        key = (signature.name, outputs)
        call = self._callables.get(key)
        if call is None:
            sig_def = self._defs[signature.name]
            options = config_pb2.CallableOptions(
                feed=[sig_def.inputs[k].name for k in signature.inputs],
                fetch=[sig_def.outputs[k].name for k in outputs],
            )
            options.run_options.inter_op_thread_pool = -1  # run on the calling thread: no hand-off
            # Session.make_callable with feeds falls back to the slow generic Session.run; this
            # is its feed-capable fast path (TF_SessionMakeCallable), as tf.keras v1 used it.
            with self._lock:
                call = self._callables[key] = self._session._make_callable_from_options(options)
        return call

    def run(self, signature: Signature, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]):
        values = self._callable(signature, outputs)(*(inputs[k] for k in signature.inputs))
        return dict(zip(outputs, values, strict=True))


class _FunctionRuntime:
    """``tf.saved_model.load`` and the signatures' concrete functions."""

    def __init__(self, path: str):
        self._model = tf.saved_model.load(path, tags=[SERVE_TAG])
        self._functions = dict(self._model.signatures)

    def run(self, signature: Signature, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]):
        result = self._functions[signature.name](**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        return {k: result[k].numpy() for k in outputs}


class Servable:
    """A loaded SavedModel version. Thread-safe: signatures may be run concurrently."""

    def __init__(
        self,
        name: str,
        version: int,
        path: str,
        runtime: str = "session",
        session_config: tf.compat.v1.ConfigProto | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        self.name, self.version, self.path = name, version, path
        meta_graph = read_meta_graph(path)
        self.signature_def_map = get_model_metadata_pb2.SignatureDefMap(signature_def=meta_graph.signature_def)
        self.signatures = {
            k: Signature.from_def(k, v) for k, v in meta_graph.signature_def.items() if k != INIT_OP_SIGNATURE
        }
        try:
            if runtime == "session":
                self._runtime = _SessionRuntime(path, meta_graph, session_config)
            else:
                self._runtime = _FunctionRuntime(path)
        except Exception as e:  # missing or truncated variables, ops this TensorFlow lacks, ...
            raise ValueError(f"cannot load the SavedModel at {path}: {type(e).__name__}: {e}") from e

    def signature(self, name: str) -> Signature:
        sig = self.signatures.get(name or DEFAULT_SIGNATURE)
        if sig is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        return sig

    def prepare(
        self, signature_name: str, inputs: Mapping[str, tensor_pb2.TensorProto], output_filter: Sequence[str] = ()
    ) -> PreparedRequest:
        """Check a Predict request against the signature and decode its inputs."""
        sig = self.signature(signature_name)
        sent, expected = set(inputs), set(sig.inputs)
        missing = {k for k in expected - sent if k not in sig.defaults}
        if len(sent) > len(expected) or (len(sent) < len(expected) and not sig.defaults) or missing or sent - expected:
            raise _invalid(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({_names(sent)}) != len({_names(expected)}). Sent extra: {_names(sent - expected)}. "
                f"Missing but required: {_names(missing)}."
            )
        arrays = {
            name: sig.check_input(name, inputs[name] if name in inputs else sig.defaults[name]) for name in sig.inputs
        }
        return PreparedRequest(sig, arrays, sig.check_outputs(output_filter))

    def run(self, sig: Signature, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the signature; returns the requested outputs as numpy arrays."""
        try:
            return self._runtime.run(sig, inputs, tuple(outputs))
        except tf.errors.OpError as e:
            error = ServingError.from_tf(e)
        except (TypeError, ValueError) as e:
            error = _invalid(str(e))
        notes = sig.shape_notes(inputs)
        if notes:
            error = ServingError(error.code, f"{error.message} ({notes})")
        raise error

    def warm_up(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (PredictionLog TFRecords); returns the count."""
        path = os.path.join(self.path, WARMUP_PATH)
        if not os.path.exists(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise ValueError(f"{path}: more than {MAX_WARMUP_RECORDS} warm-up records")
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                log.warning("%s: skipping a %s warm-up record (only predict_log is supported)", path, kind)
                continue
            request = entry.predict_log.request
            try:
                prepared = self.prepare(request.model_spec.signature_name, request.inputs, request.output_filter)
                self.run(prepared.signature, prepared.inputs, prepared.outputs)
            except ServingError as e:
                raise ServingError(e.code, f"warm-up request {count} of {path} failed: {e.message}") from e
        return count


def session_config(intra_op_threads: int = 0, inter_op_threads: int = 0) -> tf.compat.v1.ConfigProto:
    """The Session config of the ``session`` runtime (0: TensorFlow's default)."""
    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
        allow_soft_placement=True,
    )
