"""The exported models' serving signatures in one place: their input specs, and the head's inputs.

Every exported model has one ``serving_default`` signature (batch dimension first) whose
inputs are *raw* values: vocabularies are looked up inside the graph, so no client needs
them. The specs are plain (dtype, shape, vocabulary) triples, numpy only, so the online
client builds requests without importing TensorFlow; export turns them into ``tf.TensorSpec``.

* ``encoder``: :data:`ENCODER_INPUTS` (the history) -> ``encoded_history``, ``model_version``;
* ``context_head``: :func:`head_inputs_spec` (the stored ``encoded_history``, ``[d]`` or ``[N, d]``
  with cross-attention fusion, and
  ``history_length``, the live context, demographics) and the optional ``k``
  (:data:`OPTIONAL_HEAD_INPUTS`) -> user embedding, top-k, version;
* ``full``: :func:`full_inputs_spec` (the encoder's and the head's inputs minus
  ``encoded_history``), ``k`` optional too -> the head's outputs.

:func:`head_inputs` builds the head's input arrays from one :class:`HeadRow` per request (stored
user state + live context + demographics): the client, the load test's reference, the
benchmarks and export's warm-up requests all go through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from tfrs_ctx import schema as S


@dataclasses.dataclass(frozen=True)
class Input:
    """One signature input: dtype (``int64`` | ``float32`` | ``string``), shape after the batch dim,
    and the vocabulary the graph looks it up in (``None``: used as is)."""

    dtype: str
    shape: tuple[int, ...]
    vocab: str | None = None

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "string" else np.dtype(self.dtype)


ENCODER_INPUTS: dict[str, Input] = {
    S.HISTORY_ITEM: Input("int64", (S.MAX_HISTORY,), S.VOCAB_ITEM),
    S.HISTORY_ADVERTISER: Input("int64", (S.MAX_HISTORY,), S.VOCAB_ADVERTISER),
    S.HISTORY_EVENT_TYPE: Input("string", (S.MAX_HISTORY,), S.VOCAB_EVENT_TYPE),
    S.HISTORY_TIME_GAP: Input("int64", (S.MAX_HISTORY,)),
    S.HISTORY_LENGTH: Input("int64", ()),
}
# The head's inputs other than the stored vector (whose width is the model's).
HEAD_INPUTS: dict[str, Input] = {
    S.HISTORY_LENGTH: Input("int64", ()),
    S.CONTEXT_CATEGORIES: Input("int64", (S.MAX_CATEGORIES,), S.VOCAB_CATEGORY),
    S.CONTEXT_WEIGHTS: Input("float32", (S.MAX_CATEGORIES,)),
    **{
        feature: Input("string", (), S.DEMOGRAPHIC_VOCAB[column])
        for column, feature in S.DEMOGRAPHIC_FEATURE_OF_COLUMN.items()
    },
}


# Inputs a request may leave out: the signature's ``defaults`` fill them (SignatureDef.defaults,
# honoured by tensorflow_model_server and the compatible server). ``k``: results per row, [B] or
# [1] (one k for every row), 1 <= k <= the exported top_k; default: the exported top_k.
# ``subject_ad_id`` (only models with model.subject_embedding take it): the request's subject ad, a raw
# ad id (the subject item's ``ad_id`` from the Feast subject-item view), [B] or [1]; default
# NO_SUBJECT_AD (none).
# ``context_query`` (only models with model.search_query take it): the search request's query text as
# typed, [B] or [1]; default "" (no query).
OPTIONAL_HEAD_INPUTS: dict[str, Input] = {
    S.REQUEST_K: Input("int64", ()),
    S.SUBJECT_AD: Input("int64", (), S.VOCAB_ITEM),
    S.CONTEXT_QUERY: Input("string", ()),
}


def encoder_inputs_spec() -> dict[str, Input]:
    return dict(ENCODER_INPUTS)


def encoded_shape(dim: int, states: int = 0) -> tuple[int, ...]:
    """One user's ``encoded_history``: ``(d,)`` (concat fusion) or ``(N, d)`` (cross-attention, ``states`` = N)."""
    return (states, dim) if states else (dim,)


def head_inputs_spec(dim: int, states: int = 0) -> dict[str, Input]:
    return {**HEAD_INPUTS, S.ENCODED_HISTORY: Input("float32", encoded_shape(dim, states))}


def full_inputs_spec() -> dict[str, Input]:
    return {**ENCODER_INPUTS, **HEAD_INPUTS}


@dataclasses.dataclass(frozen=True)
class HeadRow:
    """One request's head inputs: the stored user state and the live context.

    ``encoded_history`` ``None`` (or ``history_length`` 0) is the no-history path; context
    categories are raw ids with their confidence weights (at most ``MAX_CATEGORIES`` are used;
    weight 0 is padding); demographics are raw values by column (``None`` or "" = missing).
    """

    encoded_history: np.ndarray | None = None
    history_length: int = 0
    context_categories: Sequence[int] = ()
    context_weights: Sequence[float] = ()
    demographics: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    subject_ad_id: int | None = None  # raw ad id of the subject item where it is an ad
    query: str | None = None  # a search request's query as typed (search models only)

    @property
    def has_history(self) -> bool:
        return self.encoded_history is not None and self.history_length > 0

    @property
    def has_context(self) -> bool:
        return any(w > 0 for w in self.context_weights[: S.MAX_CATEGORIES]) or bool(self.query)


def head_inputs(rows: Sequence[HeadRow], dim: int, states: int = 0) -> dict[str, np.ndarray]:
    """The ``context_head`` inputs of a batch of requests, in the signature's dtypes and shapes.

    ``states`` > 0 (cross-attention): each stored vector is the flat row-major ``[N, d]`` (or ``[N, d]``).
    """
    n, c = len(rows), S.MAX_CATEGORIES
    shape = encoded_shape(dim, states)
    encoded = np.zeros((n, *shape), np.float32)
    length = np.zeros(n, np.int64)
    categories = np.zeros((n, c), np.int64)
    weights = np.zeros((n, c), np.float32)
    for i, row in enumerate(rows):
        if row.has_history:
            encoded[i], length[i] = np.reshape(row.encoded_history, shape), row.history_length
        cats, ws = list(row.context_categories)[:c], list(row.context_weights)[:c]
        categories[i, : len(cats)], weights[i, : len(ws)] = cats, ws
    out = {
        S.ENCODED_HISTORY: encoded,
        S.HISTORY_LENGTH: length,
        S.CONTEXT_CATEGORIES: categories,
        S.CONTEXT_WEIGHTS: weights,
    }
    for column, feature in S.DEMOGRAPHIC_FEATURE_OF_COLUMN.items():
        out[feature] = np.asarray([(r.demographics.get(column) or S.MISSING_STRING).encode() for r in rows], object)
    out.update(subject_ad_inputs(rows))
    out.update(query_inputs(rows))
    return out


def query_inputs(rows: Sequence[HeadRow]) -> dict[str, np.ndarray]:
    """The optional ``context_query`` input where some row has a query (else nothing: the default "")."""
    if all(not r.query for r in rows):
        return {}
    return {S.CONTEXT_QUERY: np.asarray([(r.query or "").encode() for r in rows], object)}


def subject_ad_inputs(rows: Sequence[HeadRow]) -> dict[str, np.ndarray]:
    """The optional ``subject_ad_id`` input where some row has a subject ad (else nothing: the default)."""
    if all(r.subject_ad_id is None for r in rows):
        return {}
    ids = [S.NO_SUBJECT_AD if r.subject_ad_id is None else int(r.subject_ad_id) for r in rows]
    return {S.SUBJECT_AD: np.asarray(ids, np.int64)}


def example_inputs(specs: Mapping[str, Input], batch: int = 2) -> dict[str, np.ndarray]:
    """All-padding inputs of the right dtypes and shapes (warm-up requests, smoke tests)."""
    return {
        name: (
            np.full((batch, *spec.shape), b"", object)
            if spec.dtype == "string"
            else np.zeros((batch, *spec.shape), spec.numpy_dtype)
        )
        for name, spec in specs.items()
    }
