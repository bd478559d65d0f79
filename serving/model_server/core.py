"""What gRPC and REST share: Predict, GetModelMetadata and GetModelStatus on one ModelStore.

Both front ends call these functions with the same request protos, so the same request gets the
same answer (and the same batching scheduler) whichever way it arrives. Errors are ServingError.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from serving.model_server.batching import BatchingOptions, BatchScheduler, check_batch_size
from serving.model_server.model_store import ModelStore
from serving.model_server.servable import PreparedRequest, Servable, ServingError
from serving.tensor_codec import fill_tensor_proto

MAX_BATCH_SIZE = BatchingOptions().max_batch_size  # rows per Predict request without --enable_batching


def require_name(spec: model_pb2.ModelSpec) -> None:
    if not spec.name:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec name")


@dataclasses.dataclass
class PredictResult:
    servable: Servable
    prepared: PreparedRequest
    outputs: dict[str, np.ndarray]  # in the order of prepared.outputs

    def response(self) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.servable.name
        response.model_spec.version.value = self.servable.version
        response.model_spec.signature_name = self.prepared.signature.name
        for name in self.prepared.outputs:
            fill_tensor_proto(response.outputs[name], self.outputs[name])
        return response


class ServingCore:
    """The model store and the (optional) batching scheduler behind both APIs."""

    def __init__(self, store: ModelStore, scheduler: BatchScheduler | None = None):
        self.store, self.scheduler = store, scheduler

    def predict(self, request: predict_pb2.PredictRequest) -> PredictResult:
        require_name(request.model_spec)
        servable = self.store.get(request.model_spec)
        prepared = servable.prepare(request.model_spec.signature_name, request.inputs, request.output_filter)
        if self.scheduler is not None:
            outputs = self.scheduler.run(servable, prepared)
        else:
            rows = max((array.shape[0] for array in prepared.inputs.values() if array.ndim), default=0)
            check_batch_size(rows, MAX_BATCH_SIZE)  # scalars have no rows: batch_size_of refuses them
            outputs = servable.run(prepared.signature, prepared.inputs, prepared.outputs)
        return PredictResult(servable, prepared, {k: outputs[k] for k in prepared.outputs})

    def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        require_name(request.model_spec)
        if not request.metadata_field:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        servable = self.store.get(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signature_def_map)
        return response

    def status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        require_name(spec)
        choice = spec.WhichOneof("version_choice")
        version = self.store.get(spec).version if choice == "version_label" else None
        if choice == "version":
            version = spec.version.value
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, status in sorted(self.store.status(spec.name, version).items()):
            entry = response.model_version_status.add(version=v, state=status.state)
            entry.status.error_code = status.error_code.value[0]
            entry.status.error_message = status.error_message
        return response
