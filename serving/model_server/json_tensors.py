"""TF Serving's REST JSON <-> tensors (the rules of ``tensorflow_serving/util/json_tensor.cc``).

Requests: ``{"signature_name": ..., "instances": [...]}`` (row format: one item per batch row, a
list of objects when the signature has several inputs) or ``{"inputs": ...}`` (columnar: one value
per input, or a bare value when it has one). Values are checked against the signature's input
dtypes as the binary does (a float takes any JSON number, an int only an integral number in range,
a string a JSON string or ``{"b64": "..."}``, a bool only true/false); a tensor's shape is that of
its nested lists, which must be dense. Responses: ``{"predictions": [...]}`` (row format) or
``{"outputs": ...}`` (columnar); a single output is written without its name; a DT_STRING output
whose alias ends in ``_bytes`` is written as ``{"b64": ...}``, other strings as JSON strings of
their raw bytes; floats as the shortest decimal that reads back as the same float32/float64, with
``NaN`` / ``Infinity`` / ``-Infinity`` as in the binary. Errors are :class:`ServingError` with the
binary's codes (INVALID_ARGUMENT; UNIMPLEMENTED for dtypes JSON has no conversion for).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.model_server.servable import ServingError
from serving.tensor_codec import fill_tensor_proto

ROW, COLUMNAR = "row", "columnar"
B64 = "b64"
BYTES_SUFFIX = "_bytes"
_DEBUG_BYTES = 256  # the binary truncates JSON values quoted in errors to 256 bytes

# DataTypeString(): the names the binary's JSON errors use.
_TYPE_STRING = {
    types_pb2.DT_FLOAT: "float",
    types_pb2.DT_DOUBLE: "double",
    types_pb2.DT_INT32: "int32",
    types_pb2.DT_UINT8: "uint8",
    types_pb2.DT_INT16: "int16",
    types_pb2.DT_INT8: "int8",
    types_pb2.DT_STRING: "string",
    types_pb2.DT_COMPLEX64: "complex64",
    types_pb2.DT_INT64: "int64",
    types_pb2.DT_BOOL: "bool",
    types_pb2.DT_BFLOAT16: "bfloat16",
    types_pb2.DT_UINT16: "uint16",
    types_pb2.DT_COMPLEX128: "complex128",
    types_pb2.DT_HALF: "half",
    types_pb2.DT_UINT32: "uint32",
    types_pb2.DT_UINT64: "uint64",
}
_INT_RANGE = {  # JSON integer ranges the binary accepts (rapidjson IsInt / IsInt64 / IsUint / IsUint64)
    types_pb2.DT_INT32: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT16: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT8: (-(2**31), 2**31 - 1),
    types_pb2.DT_UINT8: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT64: (-(2**63), 2**63 - 1),
    types_pb2.DT_UINT32: (0, 2**32 - 1),
    types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_NUMPY = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT16: np.int16,
    types_pb2.DT_INT8: np.int8,
    types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_INT64: np.int64,
    types_pb2.DT_UINT32: np.uint32,
    types_pb2.DT_UINT64: np.uint64,
    types_pb2.DT_BOOL: np.bool_,
    types_pb2.DT_STRING: object,
}


def type_string(dtype: int) -> str:
    return _TYPE_STRING.get(dtype) or types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _status_string(error: ServingError) -> str:
    return f"{error.code.name}: {error.message}"


def debug_string(value) -> str:
    """A JSON value quoted in an error message (truncated like the binary's)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text.encode()) <= _DEBUG_BYTES else text.encode()[:_DEBUG_BYTES].decode(errors="ignore")


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True or value is False:
        return str(value)
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "String" if isinstance(value, str) else "Number"


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64), str)


def _type_error(value, dtype: int) -> ServingError:
    return _invalid(
        f"JSON Value: {debug_string(value)} Type: {_json_type(value)} is not of expected type: {type_string(dtype)}"
    )


def _to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # the request's raw bytes (see parse_json)


def _decode_b64(value) -> bytes:
    if not _is_b64(value):
        raise _invalid(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value[B64]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _invalid("Unable to base64 decode") from e


def _leaf(value, dtype: int):
    """One JSON leaf as a Python value of ``dtype`` (the binary's AddValueToTensor)."""
    is_bool = value is True or value is False
    if dtype == types_pb2.DT_STRING:
        if isinstance(value, dict):
            return _decode_b64(value)
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return _to_bytes(value)
    if isinstance(value, dict):
        raise _type_error(value, dtype)
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if is_bool or not isinstance(value, int | float):
            raise _type_error(value, dtype)
        return float(value)
    if dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        if is_bool or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_BOOL:
        if not is_bool:
            raise _type_error(value, dtype)
        return value
    raise ServingError(
        grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {debug_string(value)} to type: {type_string(dtype)}"
    )


def _dense_shape(value) -> list[int]:
    """The shape the nesting of ``value`` implies, following first elements (GetDenseTensorShape)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: int, out: list) -> None:
    """Append the leaves of ``value`` to ``out``, checking the tensor is dense (FillTensorProto)."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise _invalid(
                f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                f"Expected at level: {rank}"
            )
        out.append(_leaf(value, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise _invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


class _Tensor:
    """Values and shape of one input as it is read from JSON."""

    def __init__(self, dtype: int):
        self.dtype, self.values, self.shape = dtype, [], None

    def add(self, value) -> tuple[list[int], int]:
        shape, values = _dense_shape(value), []
        _fill(value, 0, shape, self.dtype, values)
        self.values += values
        return shape, len(values)

    def proto(self, shape: list[int]) -> tensor_pb2.TensorProto:
        np_dtype = _NUMPY.get(self.dtype)
        if np_dtype is None:  # no JSON leaf converts to it, so there are no values: an empty tensor
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON to type: {type_string(self.dtype)}")
        if np_dtype is object:
            proto = tensor_pb2.TensorProto(dtype=self.dtype, string_val=self.values)
            for size in shape:
                proto.tensor_shape.dim.add(size=size)
            return proto
        if np.issubdtype(np_dtype, np.integer):
            array = np.array(self.values, np.int64 if np_dtype != np.uint64 else np.uint64).astype(np_dtype)
        else:
            array = np.array(self.values, np_dtype)
        proto = tensor_pb2.TensorProto()
        fill_tensor_proto(proto, array.reshape(shape))
        proto.dtype = self.dtype
        return proto


def parse_json(body: bytes) -> dict:
    """The request document (an object); trailing bytes after it are ignored, as by the binary."""
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    text = body.decode("utf-8", "surrogateescape")
    try:
        doc, _ = json.JSONDecoder().raw_decode(text.lstrip(" \t\r\n"))
    except json.JSONDecodeError as e:
        raise _invalid(f"JSON Parse error: {e.msg} at offset: {e.pos}") from e
    except RecursionError as e:
        raise _invalid("JSON Parse error: the document is nested too deeply") from e
    if not isinstance(doc, dict):
        raise _invalid(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


def signature_name(doc: dict) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise _invalid(
            f"JSON Value: {debug_string(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


def request_tensors(
    doc: dict, input_dtypes: Mapping[str, int], signature: str
) -> tuple[dict[str, tensor_pb2.TensorProto], str]:
    """(inputs as TensorProtos, ROW | COLUMNAR) from a Predict request document.

    ``input_dtypes``: the signature's inputs, alias -> DataType (in the signature's order).
    """
    if not input_dtypes:
        raise _invalid(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    if "instances" in doc and "inputs" in doc:
        raise _invalid(
            f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise _invalid(f"JSON Value: {debug_string(doc)} Expecting 'instances' to be an list/array")
        if not instances:
            raise _invalid(f"JSON Value: {debug_string(doc)} No values in 'instances' array")
        return _from_instances(instances, input_dtypes), ROW
    if "inputs" in doc:
        return _from_inputs(doc["inputs"], input_dtypes), COLUMNAR
    raise _invalid("Missing 'inputs' or 'instances' key")


def _from_instances(instances: list, input_dtypes: Mapping[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    names = list(input_dtypes)
    if not isinstance(instances[0], dict) and len(names) > 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per "
            "tensorinfo_map"
        )

    def is_object(value) -> bool:
        return isinstance(value, dict) and not _is_b64(value)

    objects = is_object(instances[0])
    tensors: dict[str, _Tensor] = {}
    first: dict[str, tuple[list[int], int]] = {}

    def add(name: str, value) -> None:
        if name not in input_dtypes:
            raise _invalid(f"JSON object: does not have named input: {name}")
        tensor = tensors.setdefault(name, _Tensor(input_dtypes[name]))
        shape, size = tensor.add(value)
        if name not in first:
            first[name] = (shape, size)
        elif first[name][1] != size:
            raise _invalid(f"Expecting tensor size: {first[name][1]} but got: {size}")
        elif first[name][0] != shape:
            raise _invalid(f"Expecting shape {_shape_string(first[name][0])} but got: {_shape_string(shape)}")

    for index, item in enumerate(instances):
        if objects:
            if not is_object(item):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for name, value in item.items():
                try:
                    add(name, value)
                except ServingError as e:
                    raise _invalid(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: {_status_string(e)}"
                    ) from e
            if set(item) != set(names):
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {debug_string(item)} "
                    f"keys must be equal to: {','.join(sorted(names))}"
                )
        else:
            if is_object(item):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(names[0], item)
            except ServingError as e:
                raise _invalid(
                    f"Failed to process element: {index} of 'instances' list. Error: {_status_string(e)}"
                ) from e
    return {name: t.proto([len(instances), *first[name][0]]) for name, t in tensors.items()}


def _from_inputs(value, input_dtypes: Mapping[str, int]) -> dict[str, tensor_pb2.TensorProto]:
    names = list(input_dtypes)
    if not isinstance(value, dict) or _is_b64(value):
        if len(names) > 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                "tensorinfo_map"
            )
        items = {names[0]: value}
    else:
        items = {}
        for name in names:  # keys the signature does not have are ignored, as by the binary
            if name not in value:
                raise _invalid(f"Missing named input: {name} in 'inputs' object.")
            items[name] = value[name]
    out = {}
    for name, item in items.items():
        tensor = _Tensor(input_dtypes[name])
        shape, _ = tensor.add(item)
        out[name] = tensor.proto(shape)
    return out


def _shape_string(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# ---- responses -----------------------------------------------------------------------------


class _Raw(str):
    """A number already written as JSON."""


def _decimal(value: float, single: bool) -> _Raw:
    """The binary's WriteDecimal: 6 significant digits if they read back exactly, else max_digits10."""
    if math.isnan(value):
        return _Raw("NaN")
    if math.isinf(value):
        return _Raw("-Infinity" if value < 0 else "Infinity")
    text = f"{value:.6g}"
    back = np.float32(float(text)) if single else float(text)
    if back != value:
        text = f"{value:.9g}" if single else f"{value:.17g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return _Raw(text)


def _leaves(array: np.ndarray, as_b64: bool) -> list:
    flat = array.reshape(-1)
    kind = array.dtype
    if kind == np.float32 or kind == np.float64:
        single = kind == np.float32
        return [_decimal(v, single) for v in flat.tolist()]
    if kind.kind in "OS":
        values = [v if isinstance(v, bytes) else str(v).encode() for v in flat.tolist()]
        if as_b64:
            return [{B64: base64.b64encode(v).decode("ascii")} for v in values]
        return [v.decode("utf-8", "surrogateescape") for v in values]  # written back as the raw bytes
    if kind == np.bool_ or np.issubdtype(kind, np.integer):
        return flat.tolist()
    raise _invalid(f"Failed to write JSON value for tensor type: {_numpy_type_string(kind)}")


def _numpy_type_string(kind: np.dtype) -> str:
    names = {"float16": "half", "complex64": "complex64", "complex128": "complex128", "uint16": "uint16"}
    return names.get(kind.name, kind.name)


def _nest(leaves: list, shape: tuple[int, ...]):
    if not shape:
        return leaves[0]
    if len(shape) == 1:
        return leaves
    step = math.prod(shape[1:])
    return [_nest(leaves[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _value(name: str, array: np.ndarray):
    array = np.asarray(array)
    if array.dtype == np.uint16 or array.dtype == np.float16 or np.iscomplexobj(array):
        raise _invalid(f"Failed to write JSON value for tensor type: {_numpy_type_string(array.dtype)}")
    return _nest(_leaves(array, name.endswith(BYTES_SUFFIX)), array.shape)


def response_document(outputs: Mapping[str, np.ndarray], format: str) -> dict:
    """The ``{"predictions": ...}`` / ``{"outputs": ...}`` document of a Predict result."""
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    if format == COLUMNAR:
        values = {name: _value(name, array) for name, array in outputs.items()}
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    batch = None
    for name, array in outputs.items():
        if np.ndim(array) == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and batch != np.shape(array)[0]:
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: {np.shape(array)[0]} expecting: {batch}")
        batch = np.shape(array)[0]
    rows = {name: _value(name, array) for name, array in outputs.items()}
    if len(rows) == 1:
        return {"predictions": next(iter(rows.values()))}
    return {"predictions": [{name: values[i] for name, values in rows.items()} for i in range(batch)]}


def dumps(document) -> bytes:
    """JSON bytes of a document built here (numbers of :class:`_Raw` written as they are)."""
    return _encode(document).encode("utf-8", "surrogateescape")


def _encode(value) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_encode(str(k))}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    if isinstance(value, float):
        return str(_decimal(value, False))
    return json.dumps(value, ensure_ascii=False)
