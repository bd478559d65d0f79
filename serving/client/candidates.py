"""The online candidate-generation client: stored user state + live context -> one Predict call.

For each ad request the client reads, from the feature store, the user's encoded history,
its model version and demographics, and the subject item's interest categories; it builds
one ``PredictRequest`` for the ``context_head`` model (its inputs from
:func:`tfrs_ctx.signatures.head_inputs`, encoded by :mod:`serving.tensor_codec` with no
TensorFlow call on the request path) and calls
``PredictionService.Predict`` on one reused channel with a deadline and bounded retries.
It cannot tell TF Serving from the protocol-compatible server, and does not need to.

Defined behaviour for the odd cases (each logged, and reported on the result):

* user with no stored vector, or one with NaN/inf or of the wrong length (not the served head's
  ``N * d``: another store layout, see ``feature_repo/README.md``) -> cold start: the no-history
  path the model was trained for;
* stored vector of another model version than any served head -> ``version_policy``:
  ``"refuse"`` raises :class:`ModelVersionMismatch`; ``"cold_start"`` drops the vector and
  serves the no-history path on the latest head (never a silent mix);
* unknown subject item, or a NaN/inf explicit context weight -> no-context path (context
  weights all zero);
* explicit context category the vocabulary does not know (only with ``known_categories``) ->
  sent as is (the model maps it to the OOV id), logged and noted;
* model server down or slow -> per-call deadline, bounded retries with backoff, then
  :class:`ModelServerUnavailable`; the channel reconnects at most 1 s after the server is back,
  and a retry after ``UNAVAILABLE`` waits for that reconnection (within its deadline) rather
  than failing fast while the channel is still backing off;
* feature store unreachable -> bounded retries with backoff (``store_retries``), then
  :class:`FeatureStoreUnavailable`.

Many threads' calls can share one feature-store read and one Predict per model version through
:class:`serving.client.coalescing.CoalescingClient`, which keeps every behaviour above per request
and adds a per-call deadline (:class:`DeadlineExceeded`).

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
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.tensor_codec import to_ndarray, to_tensor_proto
from tfrs_ctx import schema
from tfrs_ctx.signatures import HeadRow, head_inputs

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


class DeadlineExceeded(ClientError):
    """A call's own deadline passed before its answer came (``CoalescingClient``: the batch it joined was slow)."""


class InvalidK(ClientError, ValueError):
    """A requested k outside 1..the served head's exported maximum (checked before sending)."""


@dataclasses.dataclass(frozen=True)
class UserState:
    """What the feature store holds for one user (any part may be missing)."""

    encoded_history: np.ndarray | None = None  # [d] float32
    history_length: int = 0
    model_version: int | None = None
    demographics: Mapping[str, str | None] = dataclasses.field(default_factory=dict)  # raw column -> value


class FeatureReader(Protocol):
    """Online feature reads the client needs (a Feast-backed one is in ``serving.client.features``).

    A reader may also offer ``request_features(user_ids, item_ids) -> (users, subject_items)``, the
    two in one read; the client uses it when present. A subject item's entry is ``(categories,
    confidences)`` or ``(categories, confidences, ad_id)`` (``ad_id`` ``None``: not an ad).
    """

    def users(self, user_ids: Sequence[int]) -> dict[int, UserState]: ...

    def subject_items(self, item_ids: Sequence[int]) -> dict[int, tuple | None]: ...


@dataclasses.dataclass(frozen=True)
class AdRequest:
    """One ad request: a user and what they are looking at (a subject item, or explicit context), or,
    on the search surface, what they typed (``query``; a model without the search input ignores it,
    noted)."""

    user_id: int
    subject_item_id: int | None = None
    context_categories: Sequence[int] | None = None  # raw category ids, instead of a subject item
    context_weights: Sequence[float] | None = None
    k: int | None = None  # results wanted (1..the exported top_k); None: the client's k
    query: str | None = None  # a search request's query text as typed


@dataclasses.dataclass
class Recommendation:
    user_id: int
    item_ids: list[int]
    scores: list[float]
    model_version: int
    history_used: bool
    context_used: bool
    notes: list[str] = dataclasses.field(default_factory=list)


# ---- the client ------------------------------------------------------------------------
def encoded_layout(shape) -> tuple[int, int]:
    """``(d, N)`` of a signature's ``encoded_history`` ``TensorShapeProto``: ``[B, d]`` -> N = 0, ``[B, N, d]``."""
    dims = [int(d.size) for d in shape.dim]
    return dims[-1], (dims[1] if len(dims) == 3 else 0)


class CandidateClient:
    """Joins stored user state and live context in one Predict call per model version.

    ``known_categories``: the raw category ids the model knows, e.g. the training data's category
    vocabulary (``tfrs_ctx.data.vocab.load_vocab(data_dir, schema.VOCAB_CATEGORY)``, as ints). With it,
    an unknown id in explicit context is logged and noted; without it the client cannot tell.

    ``k``: results per request (an :class:`AdRequest` may ask its own); ``None``: the exported
    maximum. It must lie in 1..the head's exported top_k (``max_k``, read from the served
    signature's ``defaults``), else :class:`InvalidK` before anything is sent. ``k`` is always sent
    as ``[B]`` (batch-first, so server-side batching can merge requests); results are truncated to
    each request's k, and padding (id -1, score -inf: fewer ads than k) is dropped. Caveat: with
    ``embedding_dim`` given and no k asked, the client never reads the metadata and leaves k to the
    signature's ``[1]`` default, which server-side batching only merges for one-row calls; against a
    batching server, give ``k`` (or let the client read ``embedding_dim``).
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
        k: int | None = None,
        fusion_states: int | None = None,
    ):
        if version_policy not in ("refuse", "cold_start"):
            raise ValueError(f"version_policy must be 'refuse' or 'cold_start', got {version_policy!r}")
        self.features, self._dim, self.model_name = features, embedding_dim, model_name
        # N of a cross-attention head's [N, d] input (0: [d]); read with the width unless both are given
        self._states = fusion_states if fusion_states is not None else (0 if embedding_dim is not None else None)
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
        self._max_k: int | None = None
        self._has_k = False
        self._has_subject: bool | None = None  # the served signature takes subject_ad_id (None: not asked yet)
        self._has_query: bool | None = None  # ... and context_query (a search model)
        self.k = k
        if k is not None:
            self._check_k(k)

    def _metadata(self) -> None:
        """The served signature's ``encoded_history`` width and exported max k (its ``k`` default)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        try:
            response = self.stub.GetModelMetadata(request, timeout=self.deadline_s * (self.retries + 1))
        except grpc.RpcError as e:
            raise ModelServerUnavailable(f"GetModelMetadata failed: {e.code().name}: {e.details()}") from e
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        sig = signatures.signature_def["serving_default"]
        if self._dim is None or self._states is None:
            self._dim, self._states = encoded_layout(sig.inputs[schema.ENCODED_HISTORY].tensor_shape)
        self._has_k = schema.REQUEST_K in sig.inputs
        self._has_subject = schema.SUBJECT_AD in sig.inputs
        self._has_query = schema.CONTEXT_QUERY in sig.inputs
        if self._has_k and schema.REQUEST_K in sig.defaults:
            self._max_k = int(to_ndarray(sig.defaults[schema.REQUEST_K]).reshape(-1)[0])
        else:  # an export without a k input: its output width is the only k
            self._max_k = int(sig.outputs[schema.TOP_K_IDS].tensor_shape.dim[-1].size)

    def _takes_subject(self) -> bool:
        """Whether the served signature has the optional ``subject_ad_id`` input (asked once)."""
        if self._has_subject is None:
            self._metadata()
        return bool(self._has_subject)

    def takes_query(self) -> bool:
        """Whether the served model reads a search query (the optional ``context_query`` input; asked once)."""
        if self._has_query is None:
            self._metadata()
        return bool(self._has_query)

    @property
    def embedding_dim(self) -> int:
        """Width of ``encoded_history``, from the served signature unless given."""
        if self._dim is None:
            self._metadata()
        return self._dim

    @property
    def fusion_states(self) -> int:
        """``N`` of the served head's ``[N, d]`` ``encoded_history`` (cross-attention); 0: ``[d]``."""
        if self._states is None:
            self._metadata()
        return self._states

    @property
    def stored_width(self) -> int:
        """The floats a stored vector must hold for the served head: ``N * d`` (``d`` for concat)."""
        return self.embedding_dim * max(1, self.fusion_states)

    @property
    def max_k(self) -> int:
        """The served head's exported maximum k (its ``k`` input's default)."""
        if self._max_k is None:
            self._metadata()
        return self._max_k

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise InvalidK(f"k must be an int, got {k!r}")
        if k < 1 or k > self.max_k:
            raise InvalidK(f"k must be in 1..{self.max_k} (the served {self.model_name}'s exported top_k), got {k}")
        return int(k)

    def _k_of(self, request: AdRequest) -> int | None:
        """The request's k, validated; ``None`` (no k asked) is the exported max when the metadata is
        known, else left to the signature's default (no metadata call just for that)."""
        k = request.k if request.k is not None else self.k
        return self._max_k if k is None else self._check_k(k)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CandidateClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API
    def recommend(self, requests: Sequence[AdRequest]) -> list[Recommendation]:
        """Ranked candidate ads for each request (same order as ``requests``).

        Raises the first failure (of the first model-version group that failed) if any request failed.
        """
        outcomes = self.recommend_each(requests)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def recommend_each(self, requests: Sequence[AdRequest]) -> list[Recommendation | ClientError]:
        """Like :meth:`recommend`, but a failure is returned in the place of each request it hit.

        One feature-store read for every user and subject item of ``requests``, then one Predict per
        model version. A failed read fails every request (:class:`FeatureStoreUnavailable`); a failed
        Predict fails only the requests of its version group, exactly the requests that would have
        failed had each been sent alone. :class:`serving.client.coalescing.CoalescingClient` relies on this to
        merge the requests of many callers into one read and one Predict per version.
        """
        if not requests:
            return []
        try:
            ks = [self._k_of(r) for r in requests]  # bad k: InvalidK before any read or call
        except ClientError as e:
            return [e] * len(requests)
        try:
            users, subjects = self._read_features(requests)
        except ClientError as e:
            return [e] * len(requests)
        notes: list[list[str]] = [[] for _ in requests]
        rows = [self._row(r, users.get(r.user_id), subjects, n) for r, n in zip(requests, notes, strict=True)]
        if self._max_k is not None:  # known now (embedding_dim read the metadata): send k as [B]
            ks = [self._max_k if k is None else k for k in ks]
        groups: dict[int | None, list[int]] = {}
        for i, (_, version) in enumerate(rows):
            groups.setdefault(version, []).append(i)
        results: list[Recommendation | ClientError | None] = [None] * len(requests)
        for version, idx in groups.items():
            try:
                response = self._predict_group(rows, notes, idx, version, [ks[i] for i in idx])
            except ClientError as e:
                for i in idx:
                    results[i] = e
                continue
            ids, scores = (
                to_ndarray(response.outputs[schema.TOP_K_IDS]).tolist(),
                to_ndarray(response.outputs[schema.TOP_K_SCORES]).tolist(),
            )
            served = int(response.model_spec.version.value)
            for j, i in enumerate(idx):
                row = rows[i][0]
                row_ids, row_scores = ids[j][: ks[i]], scores[j][: ks[i]]  # [: None] keeps all
                keep = [n for n, item in enumerate(row_ids) if item != -1]  # padding: fewer ads than k
                results[i] = Recommendation(
                    requests[i].user_id,
                    [row_ids[n] for n in keep],
                    [row_scores[n] for n in keep],
                    served,
                    history_used=row.has_history,
                    context_used=row.has_context,
                    notes=notes[i],
                )
        return results  # type: ignore[return-value]

    def _predict_group(
        self,
        rows: list[tuple[HeadRow, int | None]],
        notes: list[list[str]],
        idx: list[int],
        version: int | None,
        ks: Sequence[int | None],
    ) -> predict_pb2.PredictResponse:
        """One Predict for the rows ``idx`` pinned to ``version``; ``version_policy`` on a mismatch."""
        try:
            return self._predict([rows[i][0] for i in idx], version, ks)
        except ModelVersionMismatch:
            if self.version_policy == "refuse":
                raise
            log.warning("model version %s not served: cold-start path for %d requests", version, len(idx))
            for i in idx:
                rows[i] = (self._cold(rows[i][0]), None)
                notes[i].append(f"stored vector of model version {version} is not served: cold start")
            return self._predict([rows[i][0] for i in idx], None, ks)

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
                both = getattr(self.features, "request_features", None)  # one read for both, where offered
                if both is not None and wanted:
                    return both(user_ids, wanted)
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

    def _row(
        self, request: AdRequest, user: UserState | None, subjects: Mapping, notes: list[str]
    ) -> tuple[HeadRow, int | None]:
        """The request's head inputs and the model version its stored vector needs (``None``: any)."""
        c = schema.MAX_CATEGORIES
        cats: list[int] = []
        weights: list[float] = []
        subject_ad: int | None = None
        if request.context_categories is not None:
            values = list(request.context_categories)[:c]
            w = list(request.context_weights or [1.0] * len(values))[:c]
            if not np.all(np.isfinite(np.asarray(w, np.float64))):
                log.warning(
                    "user %s: explicit context weights %s are not all finite: no-context path", request.user_id, w
                )
                notes.append("context weight is not finite: no context")
            else:
                cats, weights = [int(v) for v in values], [float(v) for v in w]
                self._note_unknown_categories(np.asarray(cats[: len(weights)])[np.asarray(weights) != 0], notes)
        elif request.subject_item_id is not None:
            subject = subjects.get(request.subject_item_id)
            if subject is None:
                log.info("unknown subject item %s: no-context path", request.subject_item_id)
                notes.append(f"unknown subject item {request.subject_item_id}: no context")
            else:
                cats, weights = list(subject[0])[:c], list(subject[1])[:c]
                subject_ad = subject_ad_of(subject)
        query = request.query or None
        if query is not None and not self.takes_query():
            log.info("user %s: the served model has no search input: query ignored", request.user_id)
            notes.append("the served model reads no query: no search context")
            query = None
        user = user or UserState()
        vector, length, version = user.encoded_history, int(user.history_length), user.model_version
        if vector is not None and np.size(vector) != self.stored_width:  # another layout (store schema)
            log.warning(
                "user %s: stored vector has length %d, the model expects %d: cold start",
                request.user_id,
                np.size(vector),
                self.stored_width,
            )
            notes.append(f"stored vector has length {np.size(vector)}, not {self.stored_width}: cold start")
            vector, length, version = None, 0, None
        elif vector is None or length <= 0 or not np.all(np.isfinite(vector)):
            if vector is not None and not np.all(np.isfinite(vector)):
                log.warning("user %s: stored vector has NaN/inf: cold start", request.user_id)
                notes.append("stored vector is not finite: cold start")
            else:
                log.info("user %s: no stored history vector: cold start", request.user_id)
                notes.append("no stored history: cold start")
            vector, length, version = None, 0, None
        return HeadRow(vector, length, cats, weights, user.demographics, subject_ad, query), version

    def _note_unknown_categories(self, categories: np.ndarray, notes: list[str]) -> None:
        """Log and note each explicit context category outside ``known_categories`` (when given)."""
        if self.known_categories is None:
            return
        for category in dict.fromkeys(int(c) for c in categories):
            if category not in self.known_categories:
                log.info("unknown context category %d: the model's OOV id", category)
                notes.append(f"unknown context category {category}: out of vocabulary")

    @staticmethod
    def _cold(row: HeadRow) -> HeadRow:
        return dataclasses.replace(row, encoded_history=None, history_length=0)

    def _build(
        self, rows: list[HeadRow], version: int | None, ks: Sequence[int | None] | None = None
    ) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = int(version)
        for name, value in head_inputs(rows, self.embedding_dim, self.fusion_states).items():
            if name == schema.SUBJECT_AD and not self._takes_subject():
                continue  # an export from before the subject ad input
            request.inputs[name].CopyFrom(to_tensor_proto(value))
        if ks is not None and self._has_k and None not in ks:
            request.inputs[schema.REQUEST_K].CopyFrom(to_tensor_proto(np.asarray(ks, np.int64)))
        request.output_filter.extend([schema.TOP_K_IDS, schema.TOP_K_SCORES])
        return request

    def _predict(
        self, rows: list[HeadRow], version: int | None, ks: Sequence[int | None] | None = None
    ) -> predict_pb2.PredictResponse:
        request = self._build(rows, version, ks)
        last: grpc.RpcError | None = None
        for attempt in range(self.retries + 1):
            # After UNAVAILABLE the channel may sit in its reconnect backoff (up to 1 s) though the server
            # is back: a retry waits for it to reconnect, within its own deadline, instead of failing fast.
            wait = last is not None and last.code() == grpc.StatusCode.UNAVAILABLE
            try:
                return self.stub.Predict(request, timeout=self.deadline_s, wait_for_ready=wait)
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


def subject_ad_of(subject: Sequence) -> int | None:
    """A feature reader's subject-item entry ``(categories, confidences[, ad_id])`` -> its ad id, or ``None``."""
    ad = subject[2] if len(subject) > 2 else None
    return None if ad is None else int(ad)
