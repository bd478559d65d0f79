"""TensorProto <-> numpy conversion: the one codec of the client and the model server.

Dense numeric tensors take a fast path (``tensor_content`` bytes, the form ``tf.make_tensor_proto``
writes for numpy arrays), strings another (``string_val``); everything else (typed ``*_val``
fields with scalar broadcast, bfloat16, ...) goes through ``tf.make_ndarray`` /
``tf.make_tensor_proto``. The fast paths call no TensorFlow function, so the client's request
path does not either.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

_NUMPY_OF_DTYPE: dict[int, np.dtype] = {
    types_pb2.DT_FLOAT: np.dtype(np.float32),
    types_pb2.DT_DOUBLE: np.dtype(np.float64),
    types_pb2.DT_HALF: np.dtype(np.float16),
    types_pb2.DT_INT8: np.dtype(np.int8),
    types_pb2.DT_INT16: np.dtype(np.int16),
    types_pb2.DT_INT32: np.dtype(np.int32),
    types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_UINT8: np.dtype(np.uint8),
    types_pb2.DT_UINT16: np.dtype(np.uint16),
    types_pb2.DT_UINT32: np.dtype(np.uint32),
    types_pb2.DT_UINT64: np.dtype(np.uint64),
    types_pb2.DT_BOOL: np.dtype(np.bool_),
}
_DTYPE_OF_NUMPY = {v: k for k, v in _NUMPY_OF_DTYPE.items()}
# The repeated field tf.make_tensor_proto fills for small arrays (it uses tensor_content otherwise).
_VALUE_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
}
_FAST = sys.byteorder == "little"  # tensor_content is little-endian


class TensorCodecError(ValueError):
    """A TensorProto that cannot be turned into an array (malformed shape, content size...)."""


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` for ``types_pb2.DT_FLOAT`` (the names TF Serving uses in messages)."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"DT_<{dtype}>"


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """Decode a request tensor; raises TensorCodecError on malformed protos."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise TensorCodecError(f"tensor shape {dims} must be fully defined")
    if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == math.prod(dims):
        return np.array(list(proto.string_val), dtype=object).reshape(dims)
    np_dtype = _NUMPY_OF_DTYPE.get(proto.dtype)
    if _FAST and np_dtype is not None:
        count, content = math.prod(dims), proto.tensor_content
        if content:
            if len(content) != count * np_dtype.itemsize:
                raise TensorCodecError(
                    f"tensor_content has {len(content)} bytes, shape {dims} of "
                    f"{dtype_name(proto.dtype)} needs {count * np_dtype.itemsize}"
                )
            return np.frombuffer(content, np_dtype).reshape(dims)
        values = getattr(proto, _VALUE_FIELD[proto.dtype])
        if count and len(values) == count:
            return np.array(values, np_dtype).reshape(dims)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise TensorCodecError(f"cannot decode {dtype_name(proto.dtype)} tensor of shape {dims}: {e}") from e


def fill_tensor_proto(target: tensor_pb2.TensorProto, value: np.ndarray | tf.Tensor) -> None:
    """Encode ``value`` into ``target`` in place (e.g. ``response.outputs[name]``)."""
    array = value.numpy() if isinstance(value, tf.Tensor) else np.asarray(value)
    if array.dtype.kind in "OSU":
        target.dtype = types_pb2.DT_STRING
        for size in array.shape:
            target.tensor_shape.dim.add(size=size)
        target.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel())
        return
    dtype = _DTYPE_OF_NUMPY.get(array.dtype)
    if _FAST and dtype is not None:
        target.dtype = dtype
        for size in array.shape:
            target.tensor_shape.dim.add(size=size)
        target.tensor_content = np.ascontiguousarray(array).tobytes()
        return
    target.CopyFrom(tf.make_tensor_proto(array))


def to_tensor_proto(value: np.ndarray | tf.Tensor) -> tensor_pb2.TensorProto:
    """Encode an array into a new TensorProto."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value)
    return proto
