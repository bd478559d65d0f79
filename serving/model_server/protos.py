"""Standard proto messages that the installed packages do not ship, built from their descriptors.

* ``grpc.health.v1`` (``HealthCheckRequest``/``HealthCheckResponse``): the standard gRPC health
  protocol, wire-identical to ``grpcio-health-checking`` (which is not a dependency).
* ``tensorflow.serving.BatchingParameters``: the text proto ``tensorflow_model_server`` reads
  from ``--batching_parameters_file`` (``session_bundle_config.proto``).

The descriptors live in a private pool, so they never clash with the real packages if installed.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto
_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> _F:
    field = _F(name=name, number=number, type=kind, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:  # an unset type_name must stay unset (proto2 presence)
        field.type_name = type_name
    return field


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    f.message_type.add(name="HealthCheckRequest", field=[_field("service", 1, _F.TYPE_STRING)])
    response = f.message_type.add(name="HealthCheckResponse")
    response.field.append(_field("status", 1, _F.TYPE_ENUM, ".grpc.health.v1.HealthCheckResponse.ServingStatus"))
    enum = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        enum.value.add(name=name, number=number)
    service = f.service.add(name="Health")
    for method, streaming in (("Check", False), ("Watch", True)):
        service.method.add(
            name=method,
            input_type=".grpc.health.v1.HealthCheckRequest",
            output_type=".grpc.health.v1.HealthCheckResponse",
            server_streaming=streaming,
        )
    return f


def _batching_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="tfrs_ctx/serving/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    int64, string = ".google.protobuf.Int64Value", ".google.protobuf.StringValue"
    f.message_type.add(
        name="BatchingParameters",
        field=[
            _field("max_batch_size", 1, _F.TYPE_MESSAGE, int64),
            _field("batch_timeout_micros", 2, _F.TYPE_MESSAGE, int64),
            _field("max_enqueued_batches", 3, _F.TYPE_MESSAGE, int64),
            _field("num_batch_threads", 4, _F.TYPE_MESSAGE, int64),
            _field("thread_pool_name", 5, _F.TYPE_MESSAGE, string),
            _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
            _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
        ],
    )
    return f


_POOL.Add(_health_file())
_POOL.Add(_batching_file())

HealthCheckRequest = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
HealthCheckResponse = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
BatchingParameters = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
)

SERVING_STATUS = {v.name: v.number for v in HealthCheckResponse.DESCRIPTOR.enum_types_by_name["ServingStatus"].values}
