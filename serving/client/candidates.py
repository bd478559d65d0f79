"""The online candidate-generation client: stored user state + live context -> one Predict call.

For each ad request the client reads, from the feature store, the user's encoded history,
its model version and demographics, and the subject item's interest categories; it builds
one ``PredictRequest`` for the ``context_head`` model with the ``tensorflow-serving-api``
protos (numpy -> TensorProto by hand: no TensorFlow call on the request path) and calls
``PredictionService.Predict`` on one reused channel with a deadline and bounded retries.
It cannot tell TF Serving from the protocol-compatible server, and does not need to.

Defined behaviour for the odd cases (each logged, and reported on the result):

* user with no stored vector, or one with NaN/inf or of the wrong length -> cold start: the
  no-history path the model was trained for;
* stored vector of another model version than any served head -> ``version_policy``:
  ``"refuse"`` raises :class:`ModelVersionMismatch`; ``"cold_start"`` drops the vector and
  serves the no-history path on the latest head (never a silent mix);
* unknown subject item, or a NaN/inf explicit context weight -> no-context path (context
  weights all zero);
* explicit context category the vocabulary does not know (only with ``known_categories``) ->
  sent as is (the model maps it to the OOV id), logged and noted;
* model server down or slow -> per-call deadline, bounded retries with backoff, then
  :class:`ModelServerUnavailable`; the channel reconnects at most 1 s after the server is back;
* feature store unreachable -> bounded retries with backoff (``store_retries``), then
  :class:`FeatureStoreUnavailable`.

Requests of one batch are grouped by the stored vector's model version: each group is one
Predict call pinned to that version (``model_spec.version``), so a vector only ever meets
the head it was encoded for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfrs_ctx import schema

log = logging.getLogger("tfrs_ctx.client")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # gRPC's default reconnect backoff grows to 120 s: after a server restart, a channel that saw it
    # down would keep failing fast for seconds after the server is back. Reconnect within ~1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ClientError(RuntimeError):
    """Base class of the client's defined failures."""


class ModelServerUnavailable(ClientError):
    pass


class FeatureStoreUnavailable(ClientError):
    pass


class ModelVersionMismatch(ClientError):
    pass


@dataclasses.dataclass(frozen=True)
class UserState:
    """What the feature store holds for one user (any part may be missing)."""

    encoded_history: np.ndarray | None = None  # [d] float32
    history_length: int = 0
    model_version: int | None = None
    demographics: Mapping[str, str | None] = dataclasses.field(default_factory=dict)  # raw column -> value


class FeatureReader(Protocol):
    """Online feature reads the client needs (a Feast-backed one is in ``serving.client.features``)."""

    def users(self, user_ids: Sequence[int]) -> dict[int, UserState]: ...

    def subject_items(self, item_ids: Sequence[int]) -> dict[int, tuple[list[int], list[float]] | None]: ...


@dataclasses.dataclass(frozen=True)
class AdRequest:
    """One ad request: a user and what they are looking at (a subject item, or explicit context)."""

    user_id: int
    subject_item_id: int | None = None
    context_categories: Sequence[int] | None = None  # raw category ids, instead of a subject item
    context_weights: Sequence[float] | None = None


@dataclasses.dataclass
class Recommendation:
    user_id: int
    item_ids: list[int]
    scores: list[float]
    model_version: int
    history_used: bool
    context_used: bool
    notes: list[str] = dataclasses.field(default_factory=list)


# ---- numpy -> TensorProto without TensorFlow --------------------------------------------
_DT = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.int64): types_pb2.DT_INT64}


def tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel())
    else:
        proto.dtype = _DT[array.dtype]
        proto.tensor_content = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return proto


def ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in proto.tensor_shape.dim]
    dtype = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_INT64: np.int64}[proto.dtype]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    values = proto.float_val if proto.dtype == types_pb2.DT_FLOAT else proto.int64_val
    return np.asarray(values, dtype=dtype).reshape(shape)


# ---- the client ------------------------------------------------------------------------
class CandidateClient:
    """Joins stored user state and live context in one Predict call per model version.

    ``known_categories``: the raw category ids the model knows, e.g. the training data's category
    vocabulary (``tfrs_ctx.data.vocab.load_vocab(data_dir, schema.VOCAB_CATEGORY)``, as ints). With it,
    an unknown id in explicit context is logged and noted; without it the client cannot tell.
    """

    def __init__(
        self,
        target: str,
        features: FeatureReader,
        embedding_dim: int | None = None,
        *,
        model_name: str = schema.MODEL_CONTEXT_HEAD,
        deadline_s: float = 1.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        version_policy: str = "refuse",
        channel: grpc.Channel | None = None,
        store_retries: int = 1,
        known_categories: Collection[int] | None = None,
    ):
        if version_policy not in ("refuse", "cold_start"):
            raise ValueError(f"version_policy must be 'refuse' or 'cold_start', got {version_policy!r}")
        self.features, self._dim, self.model_name = features, embedding_dim, model_name
        self.deadline_s, self.retries, self.backoff_s, self.version_policy = (
            deadline_s,
            retries,
            backoff_s,
            version_policy,
        )
        self.store_retries = store_retries
        self.known_categories = None if known_categories is None else frozenset(int(c) for c in known_categories)
        self.channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def embedding_dim(self) -> int:
        """Width of ``encoded_history``, from the served signature unless given."""
        if self._dim is None:
            from tensorflow_serving.apis import get_model_metadata_pb2

            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            request.model_spec.name = self.model_name
            try:
                response = self.stub.GetModelMetadata(request, timeout=self.deadline_s * (self.retries + 1))
            except grpc.RpcError as e:
                raise ModelServerUnavailable(f"GetModelMetadata failed: {e.code().name}: {e.details()}") from e
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            shape = signatures.signature_def["serving_default"].inputs[schema.ENCODED_HISTORY].tensor_shape
            self._dim = int(shape.dim[-1].size)
        return self._dim

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CandidateClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API
    def recommend(self, requests: Sequence[AdRequest]) -> list[Recommendation]:
        """Ranked candidate ads for each request (same order as ``requests``)."""
        if not requests:
            return []
        users, subjects = self._read_features(requests)
        notes: list[list[str]] = [[] for _ in requests]
        rows = [self._row(r, users.get(r.user_id), subjects, n) for r, n in zip(requests, notes, strict=True)]
        groups: dict[int | None, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row["version"], []).append(i)
        results: list[Recommendation | None] = [None] * len(requests)
        for version, idx in groups.items():
            try:
                response = self._predict([rows[i] for i in idx], version)
            except ModelVersionMismatch:
                if self.version_policy == "refuse":
                    raise
                log.warning("model version %s not served: cold-start path for %d requests", version, len(idx))
                for i in idx:
                    rows[i] = self._cold(rows[i])
                    notes[i].append(f"stored vector of model version {version} is not served: cold start")
                response = self._predict([rows[i] for i in idx], None)
            ids, scores = ndarray(response.outputs[schema.TOP_K_IDS]), ndarray(response.outputs[schema.TOP_K_SCORES])
            served = int(response.model_spec.version.value)
            for j, i in enumerate(idx):
                results[i] = Recommendation(
                    requests[i].user_id,
                    ids[j].tolist(),
                    scores[j].tolist(),
                    served,
                    history_used=rows[i]["length"] > 0,
                    context_used=bool(np.any(rows[i]["weights"] > 0)),
                    notes=notes[i],
                )
        return results  # type: ignore[return-value]

    # -- steps
    def _read_features(self, requests: Sequence[AdRequest]):
        """User and subject-item features; a failed read is retried ``store_retries`` times with backoff."""
        user_ids = sorted({r.user_id for r in requests})
        wanted = sorted(
            {r.subject_item_id for r in requests if r.subject_item_id is not None and r.context_categories is None}
        )
        last: Exception | None = None
        for attempt in range(self.store_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            try:
                return self.features.users(user_ids), self.features.subject_items(wanted) if wanted else {}
            except ClientError:
                raise
            except Exception as e:  # the store's own errors (connection refused, timeouts, ...)
                last = e
                log.warning(
                    "feature store read attempt %d/%d: %s: %s", attempt + 1, self.store_retries + 1, type(e).__name__, e
                )
        raise FeatureStoreUnavailable(
            f"online feature store read failed after {self.store_retries + 1} attempts: {type(last).__name__}: {last}"
        ) from last

    def _row(self, request: AdRequest, user: UserState | None, subjects: Mapping, notes: list[str]) -> dict:
        c = schema.MAX_CATEGORIES
        cats, weights = np.zeros(c, np.int64), np.zeros(c, np.float32)
        if request.context_categories is not None:
            values = list(request.context_categories)[:c]
            w = list(request.context_weights or [1.0] * len(values))[:c]
            if not np.all(np.isfinite(np.asarray(w, np.float64))):
                log.warning(
                    "user %s: explicit context weights %s are not all finite: no-context path", request.user_id, w
                )
                notes.append("context weight is not finite: no context")
            else:
                cats[: len(values)], weights[: len(w)] = values, w
                self._note_unknown_categories(cats[weights != 0], notes)  # weight 0 is padding
        elif request.subject_item_id is not None:
            subject = subjects.get(request.subject_item_id)
            if subject is None:
                log.info("unknown subject item %s: no-context path", request.subject_item_id)
                notes.append(f"unknown subject item {request.subject_item_id}: no context")
            else:
                sc, sw = list(subject[0])[:c], list(subject[1])[:c]
                cats[: len(sc)], weights[: len(sw)] = sc, sw
        user = user or UserState()
        demo = {
            feature: (user.demographics.get(column) or schema.MISSING_STRING)
            for column, feature in schema.DEMOGRAPHIC_FEATURE_OF_COLUMN.items()
        }
        vector, length, version = user.encoded_history, int(user.history_length), user.model_version
        if vector is not None and np.size(vector) != self.embedding_dim:
            log.warning(
                "user %s: stored vector has length %d, the model expects %d: cold start",
                request.user_id,
                np.size(vector),
                self.embedding_dim,
            )
            notes.append(f"stored vector has length {np.size(vector)}, not {self.embedding_dim}: cold start")
            vector, length, version = None, 0, None
        elif vector is None or length <= 0 or not np.all(np.isfinite(vector)):
            if vector is not None and not np.all(np.isfinite(vector)):
                log.warning("user %s: stored vector has NaN/inf: cold start", request.user_id)
                notes.append("stored vector is not finite: cold start")
            else:
                log.info("user %s: no stored history vector: cold start", request.user_id)
                notes.append("no stored history: cold start")
            vector, length, version = None, 0, None
        return {
            "vector": np.zeros(self.embedding_dim, np.float32) if vector is None else np.asarray(vector, np.float32),
            "length": length,
            "version": version,
            "categories": cats,
            "weights": weights,
            "demographics": demo,
        }

    def _note_unknown_categories(self, categories: np.ndarray, notes: list[str]) -> None:
        """Log and note each explicit context category outside ``known_categories`` (when given)."""
        if self.known_categories is None:
            return
        for category in dict.fromkeys(int(c) for c in categories):
            if category not in self.known_categories:
                log.info("unknown context category %d: the model's OOV id", category)
                notes.append(f"unknown context category {category}: out of vocabulary")

    @staticmethod
    def _cold(row: dict) -> dict:
        return {**row, "vector": np.zeros_like(row["vector"]), "length": 0, "version": None}

    def _build(self, rows: list[dict], version: int | None) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = int(version)
        inputs = {
            schema.ENCODED_HISTORY: np.stack([r["vector"] for r in rows]).astype(np.float32),
            schema.HISTORY_LENGTH: np.asarray([r["length"] for r in rows], np.int64),
            schema.CONTEXT_CATEGORIES: np.stack([r["categories"] for r in rows]).astype(np.int64),
            schema.CONTEXT_WEIGHTS: np.stack([r["weights"] for r in rows]).astype(np.float32),
        }
        for feature in schema.DEMOGRAPHIC_FEATURES:
            inputs[feature] = np.asarray([r["demographics"][feature].encode() for r in rows], object)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tensor_proto(value))
        request.output_filter.extend([schema.TOP_K_IDS, schema.TOP_K_SCORES])
        return request

    def _predict(self, rows: list[dict], version: int | None) -> predict_pb2.PredictResponse:
        request = self._build(rows, version)
        last: grpc.RpcError | None = None
        for attempt in range(self.retries + 1):
            try:
                return self.stub.Predict(request, timeout=self.deadline_s)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.NOT_FOUND and version is not None:
                    raise ModelVersionMismatch(
                        f"stored vectors were encoded by model version {version}, which the server does not "
                        f"serve ({e.details()}); re-encode users or set version_policy='cold_start'"
                    ) from e
                if code not in RETRYABLE:
                    raise ClientError(f"Predict failed: {code.name}: {e.details()}") from e
                last = e
                log.warning("Predict attempt %d/%d: %s", attempt + 1, self.retries + 1, code.name)
                if attempt < self.retries:  # no pointless sleep before giving up
                    time.sleep(self.backoff_s * (2**attempt))
        raise ModelServerUnavailable(
            f"model server did not answer within {self.deadline_s}s after {self.retries + 1} attempts: "
            f"{last.code().name if last else 'unknown'}"
        ) from last
