"""Training examples from raw events, with numpy: histories, synthetic context, labels, per split.

No Beam and no TensorFlow in here: the training-data pipeline's DoFns call these functions,
and the user-encoding pipeline reuses them (:func:`history_at`: a user's left-padded history
arrays at a target time). Everything works on one user or a batch of users, vectorised over
their events, and is deterministic: randomness comes from a stable hash of
``(seed, user_id, timestamp, item)`` (:func:`stable_keys`), never from process state.

Examples are returned column-wise (``{feature: array [N, *shape]}``) and serialised by
:func:`tfrs_ctx.data.tf_example_wire.serialize_examples` straight into the ``tf.train.Example``
wire format.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfrs_ctx import schema
from tfrs_ctx.data.rawio import ItemColumns
from tfrs_ctx.data.search_context import category_name_table, synthetic_queries
from tfrs_ctx.data.stable_random import stable_keys, stable_uniform
from tfrs_ctx.data.vocab import IntVocabulary, Vocabulary

S = schema
log = logging.getLogger(__name__)
Block = dict[str, np.ndarray]  # one user's rows of a table, column-wise
Columns = dict[str, np.ndarray]  # examples, feature-wise: name -> [N, *shape]

CONVERSION_COLUMNS = (S.TIMESTAMP, S.ITEM_ID, S.ADVERTISER_ID, S.EVENT_TYPE)
REQUEST_COLUMNS = (S.REQUEST_ID, S.TIMESTAMP, S.SUBJECT_ITEM_ID, S.ITEM_ID)
SEARCH_COLUMNS = (S.REQUEST_ID, S.TIMESTAMP, S.QUERY, S.ITEM_ID)
QUERY_FEATURES = S.with_query(S.FEATURES)  # one object, so the wire writer's layout cache holds it
INT_VOCABULARIES = (S.VOCAB_ITEM, S.VOCAB_ADVERTISER, S.VOCAB_CATEGORY)  # held as int64 arrays
_GAP_EDGES = np.asarray(S.TIME_GAP_EDGES, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Rows -> per-user blocks
# --------------------------------------------------------------------------------------
def column_values(rows: Sequence[Mapping[str, Any]], column: schema.Column) -> np.ndarray:
    """One column of valid rows as a numpy array (int64, or str for string columns)."""
    if column.kind == "string":
        return np.asarray([str(r[column.name]) for r in rows], dtype=str)
    return np.fromiter((int(r[column.name]) for r in rows), dtype=np.int64, count=len(rows))


def columns_to_user_blocks(users: np.ndarray, data: Mapping[str, np.ndarray]) -> list[tuple[int, Block]]:
    """Split column-wise rows of an event table into one block per user."""
    if not len(users):
        return []
    order = np.argsort(users, kind="stable")
    users = users[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    return [
        (int(users[a]), {name: values[order[a:b]] for name, values in data.items()})
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def rows_to_user_blocks(table: schema.Table, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, Block]]:
    """Group valid rows of an event table (conversions, requests) by user, column-wise."""
    if not rows:
        return []
    data = {c.name: column_values(rows, c) for c in table.columns if c.name != S.USER_ID}
    return columns_to_user_blocks(column_values(rows, table.column(S.USER_ID)), data)


def pack_block(block: Block) -> tuple:
    """A compact, pickle-free form of a block for Beam's coders: int columns as raw bytes."""
    return tuple(
        (name, values.astype("<i8").tobytes() if values.dtype.kind in "iu" else values.tolist())
        for name, values in block.items()
    )


def unpack_block(packed: tuple) -> Block:
    """Inverse of :func:`pack_block`."""
    return {
        name: np.frombuffer(data, dtype="<i8").astype(np.int64) if isinstance(data, bytes) else np.asarray(data, str)
        for name, data in packed
    }


def _concat(blocks: Sequence[Block], columns: Sequence[str], string_columns: Sequence[str] = ()) -> Block:
    if not blocks:
        return {c: np.zeros(0, dtype=str if c in string_columns else np.int64) for c in columns}
    return {c: np.concatenate([b[c] for b in blocks]) for c in columns}


@dataclasses.dataclass
class UserEvents:
    """One user's conversions sorted by (timestamp, item_id) (then advertiser, event type)."""

    timestamp: np.ndarray
    item: np.ndarray
    advertiser: np.ndarray
    event_type: np.ndarray

    @classmethod
    def from_blocks(cls, blocks: Sequence[Block]) -> UserEvents:
        b = _concat(blocks, CONVERSION_COLUMNS, string_columns=(S.EVENT_TYPE,))
        order = np.lexsort((b[S.EVENT_TYPE], b[S.ADVERTISER_ID], b[S.ITEM_ID], b[S.TIMESTAMP]))
        return cls(b[S.TIMESTAMP][order], b[S.ITEM_ID][order], b[S.ADVERTISER_ID][order], b[S.EVENT_TYPE][order])

    def __len__(self) -> int:
        return len(self.timestamp)


@dataclasses.dataclass
class UserRequests:
    """One user's related-items requests sorted by (timestamp, request_id)."""

    request_id: np.ndarray
    timestamp: np.ndarray
    subject_item: np.ndarray
    item: np.ndarray

    @classmethod
    def from_blocks(cls, blocks: Sequence[Block]) -> UserRequests:
        b = _concat(blocks, REQUEST_COLUMNS)
        order = np.lexsort((b[S.REQUEST_ID], b[S.TIMESTAMP]))
        return cls(*(b[c][order] for c in REQUEST_COLUMNS))

    def __len__(self) -> int:
        return len(self.timestamp)

    def select(self, mask: np.ndarray) -> UserRequests:
        return UserRequests(self.request_id[mask], self.timestamp[mask], self.subject_item[mask], self.item[mask])


@dataclasses.dataclass
class UserSearches:
    """One user's search requests sorted by (timestamp, request_id); ``query`` as typed."""

    request_id: np.ndarray
    timestamp: np.ndarray
    query: np.ndarray  # str
    item: np.ndarray

    @classmethod
    def from_blocks(cls, blocks: Sequence[Block]) -> UserSearches:
        b = _concat(blocks, SEARCH_COLUMNS, string_columns=(S.QUERY,))
        order = np.lexsort((b[S.REQUEST_ID], b[S.TIMESTAMP]))
        return cls(*(b[c][order] for c in SEARCH_COLUMNS))

    @classmethod
    def empty(cls) -> UserSearches:
        return cls.from_blocks([])

    def __len__(self) -> int:
        return len(self.timestamp)

    def select(self, mask: np.ndarray) -> UserSearches:
        return UserSearches(self.request_id[mask], self.timestamp[mask], self.query[mask], self.item[mask])


# --------------------------------------------------------------------------------------
# Vocabularies and lookup tables
# --------------------------------------------------------------------------------------
def _by_frequency(counts: Mapping[Any, int]) -> list:
    """Values by count desc, then value."""
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _by_count(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Integer values by count desc, then value (:func:`_by_frequency` for arrays)."""
    return np.asarray(values, dtype=np.int64)[np.lexsort((values, -np.asarray(counts, dtype=np.int64)))]


def _counted(values: np.ndarray) -> np.ndarray:
    uniques, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    return _by_count(uniques, counts)


def count_array(item_counts: Mapping[int, int], ids: np.ndarray) -> np.ndarray:
    """``item_counts[id]`` (0 when absent) for each id, vectorised."""
    if not item_counts:
        return np.zeros(len(ids), dtype=np.int64)
    keys = np.fromiter(item_counts.keys(), dtype=np.int64, count=len(item_counts))
    values = np.fromiter(item_counts.values(), dtype=np.int64, count=len(item_counts))
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    return np.where(keys[pos] == ids, values[pos], 0)


def as_item_columns(items: ItemColumns | Sequence[Mapping[str, Any]], with_advertiser: bool = True) -> ItemColumns:
    return items if isinstance(items, ItemColumns) else ItemColumns.from_rows(items, with_advertiser)


def build_vocabularies(
    items: ItemColumns | Sequence[Mapping[str, Any]],
    subject_items: ItemColumns | Sequence[Mapping[str, Any]],
    item_counts: Mapping[int, int],
    event_type_counts: Mapping[str, int],
    demographic_counts: Mapping[str, Mapping[str, int]],
) -> dict[str, Sequence]:
    """Every schema vocabulary's raw values in index order (int64 arrays for ads, advertisers, categories).

    Items: the whole ad corpus (unique ids), by training-target count desc then id. Every other
    vocabulary: by frequency desc then value (advertisers counted over items, categories
    over items and subject items, event types over conversions, demographics over users).
    """
    items, subjects = as_item_columns(items), as_item_columns(subject_items, with_advertiser=False)
    vocabs: dict[str, Sequence] = {
        S.VOCAB_ITEM: _by_count(items.item_id, count_array(item_counts, items.item_id)),
        S.VOCAB_ADVERTISER: _counted(items.advertiser_id),
        S.VOCAB_CATEGORY: _counted(np.concatenate([items.categories, subjects.categories])),
        S.VOCAB_EVENT_TYPE: _by_frequency(event_type_counts),
    }
    for column, name in S.DEMOGRAPHIC_VOCAB.items():
        vocabs[name] = _by_frequency(demographic_counts.get(column, {}))
    return {name: vocabs[name] for name in S.VOCABULARIES}


def top_categories(categories: Sequence[int], confidences: Sequence[float], vocab: Vocabulary) -> tuple[list, list]:
    """The top ``MAX_CATEGORIES`` categories by confidence (ties: listed order), as indices."""
    order = sorted(range(len(categories)), key=lambda i: -float(confidences[i]))[: S.MAX_CATEGORIES]
    return (
        S.pad_right([vocab.index(int(categories[i])) for i in order], S.MAX_CATEGORIES, S.PAD_ID),
        S.pad_right([float(confidences[i]) for i in order], S.MAX_CATEGORIES, 0.0),
    )


CATEGORY_BLOCK = 262_144  # rows per block of the vectorised top-categories table (bounds its scratch memory)


def category_table(items: ItemColumns, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_categories` of every row, vectorised: ``[N, MAX_CATEGORIES]`` indices and float32 confidences."""
    n, C = len(items), S.MAX_CATEGORIES
    cats = np.zeros((n, C), dtype=np.int64)
    confs = np.zeros((n, C), dtype=np.float32)
    index = vocab.int_indices(items.categories) if len(items.categories) else np.zeros(0, np.int64)
    for a in range(0, n, CATEGORY_BLOCK):
        b = min(n, a + CATEGORY_BLOCK)
        starts, lengths = items.offsets[a:b], np.diff(items.offsets[a : b + 1])
        width = int(lengths.max()) if len(lengths) else 0
        if not width:
            continue
        valid = np.arange(width)[None, :] < lengths[:, None]
        flat = np.where(valid, starts[:, None] + np.arange(width)[None, :], 0)
        keys = np.where(valid, -items.confidences[flat], np.inf)
        order = np.argsort(keys, axis=1, kind="stable")[:, :C]
        picked = np.take_along_axis(flat, order, axis=1)
        kept = np.take_along_axis(valid, order, axis=1)
        k = order.shape[1]
        cats[a:b, :k] = np.where(kept, index[picked], S.PAD_ID)
        confs[a:b, :k] = np.where(kept, items.confidences[picked], 0.0).astype(np.float32)
    return cats, confs


def subject_ad_ids(subjects: ItemColumns) -> np.ndarray:
    """Each subject item's AD_ID (raw; ``NO_SUBJECT_AD`` where null). Without the column: none is an ad."""
    if subjects.ad_id is None:
        if len(subjects):
            log.info("subject_items has no '%s' column (older data): no subject item is an ad", S.AD_ID)
        return np.full(len(subjects), S.NO_SUBJECT_AD, np.int64)
    return subjects.ad_id


def subject_ad_indices(ad_ids: np.ndarray, item_vocab: Vocabulary) -> np.ndarray:
    """:data:`schema.SUBJECT_ITEM` of raw AD_IDs: PAD_ID where not an ad, else the ad-vocab index (OOV_ID: unknown)."""
    is_ad = ad_ids != S.NO_SUBJECT_AD
    out = np.full(len(ad_ids), S.PAD_ID, np.int64)
    if is_ad.any():
        out[is_ad] = item_vocab.int_indices(ad_ids[is_ad])
    return out


def _name_table(categories: IntVocabulary, names: Mapping[int, str]) -> np.ndarray:
    return category_name_table([None] * S.NUM_RESERVED_IDS + categories.ids.tolist(), names)


@dataclasses.dataclass
class Lookups:
    """Vocabularies plus per-item feature tables, built once and shared by every user.

    ``item_*`` arrays are indexed by item-vocabulary index (rows 0 and 1, the reserved
    ids, are zero); ``subject_*`` arrays are aligned with the sorted ``subject_ids``.
    """

    vocabularies: dict[str, Vocabulary]
    item_ids: np.ndarray  # raw id per item index (0 for the reserved rows)
    item_advertiser: np.ndarray
    item_categories: np.ndarray
    item_confidences: np.ndarray
    item_sampling_prob: np.ndarray
    subject_ids: np.ndarray
    subject_categories: np.ndarray
    subject_confidences: np.ndarray
    # The subject items' AD_ID (raw, NO_SUBJECT_AD where not an ad) and its item-vocabulary index
    # (PAD_ID where not an ad, OOV_ID for an ad id outside the vocabulary); aligned with subject_ids.
    subject_ad_ids: np.ndarray | None = None
    subject_ad: np.ndarray | None = None
    # The taxonomy's names aligned with the category vocabulary (index -> lower-case name, "" unknown:
    # search_context.category_name_table) where the raw data has CATEGORY_NAMES; None: no names, and
    # then no synthetic query in the training examples.
    category_names: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        vocab_values: Mapping[str, Sequence],
        items: ItemColumns | Sequence[Mapping[str, Any]],
        subject_items: ItemColumns | Sequence[Mapping[str, Any]],
        item_counts: Mapping[int, int],
        category_names: Mapping[int, str] | None = None,
    ) -> Lookups:
        """The lookups of the valid, key-unique ``items`` / ``subject_items`` (columns or row dicts).

        ``category_names``: category id -> name (the CATEGORY_NAMES table), or ``None`` where the
        data has none.
        """
        items, subjects = as_item_columns(items), as_item_columns(subject_items, with_advertiser=False)
        vocabs = {
            name: IntVocabulary(vocab_values[name]) if name in INT_VOCABULARIES else Vocabulary(vocab_values[name])
            for name in S.VOCABULARIES
        }
        item_vocab, categories = vocabs[S.VOCAB_ITEM], vocabs[S.VOCAB_CATEGORY]
        rows = item_vocab.size
        ids = np.asarray(vocab_values[S.VOCAB_ITEM], dtype=np.int64)
        by_id = np.argsort(items.item_id, kind="stable")
        order = by_id[np.searchsorted(items.item_id[by_id], ids)] if len(ids) else np.zeros(0, np.int64)
        item_ids = np.zeros(rows, dtype=np.int64)
        item_ids[S.NUM_RESERVED_IDS :] = ids
        advertiser = np.zeros(rows, dtype=np.int64)
        advertiser[S.NUM_RESERVED_IDS :] = vocabs[S.VOCAB_ADVERTISER].int_indices(items.advertiser_id[order])
        item_categories = np.zeros((rows, S.MAX_CATEGORIES), dtype=np.int64)
        item_confidences = np.zeros((rows, S.MAX_CATEGORIES), dtype=np.float32)
        cats, confs = category_table(items, categories)
        item_categories[S.NUM_RESERVED_IDS :], item_confidences[S.NUM_RESERVED_IDS :] = cats[order], confs[order]
        del cats, confs
        total = sum(item_counts.values())
        counts = np.r_[np.zeros(S.NUM_RESERVED_IDS), count_array(item_counts, ids)].astype(np.float64)
        s_order = np.argsort(subjects.item_id, kind="stable")
        s_cats, s_confs = category_table(subjects, categories)
        ad_ids = subject_ad_ids(subjects)[s_order]
        return cls(
            vocabularies=vocabs,
            item_ids=item_ids,
            item_advertiser=advertiser,
            item_categories=item_categories,
            item_confidences=item_confidences,
            item_sampling_prob=(counts / total if total else counts).astype(np.float32),
            subject_ids=subjects.item_id[s_order],
            subject_categories=s_cats[s_order],
            subject_confidences=s_confs[s_order],
            subject_ad_ids=ad_ids,
            subject_ad=subject_ad_indices(ad_ids, item_vocab),
            category_names=None if category_names is None else _name_table(categories, category_names),
        )

    def subject_ads(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw AD_ID and its ad-vocabulary index (:data:`schema.SUBJECT_ITEM`) of subject rows ``rows``."""
        if self.subject_ad is None:  # lookups pickled before the column: no subject item is an ad
            return np.full(len(rows), S.NO_SUBJECT_AD, np.int64), np.full(len(rows), S.PAD_ID, np.int64)
        return self.subject_ad_ids[rows], self.subject_ad[rows]

    def subject_rows(self, subject_ids: np.ndarray) -> np.ndarray:
        """Row of each (known) subject item in the ``subject_*`` tables."""
        rows = np.searchsorted(self.subject_ids, subject_ids)
        if len(rows) and (rows.max() >= len(self.subject_ids) or (self.subject_ids[rows] != subject_ids).any()):
            raise KeyError("unknown subject item id")
        return rows

    def demographics(self, user_row: Mapping[str, Any] | None) -> dict[str, int]:
        return encode_demographics(self.vocabularies, user_row)

    def corpus_columns(self) -> dict[str, Any]:
        """The ad corpus: one row per item-vocabulary entry, sorted by index."""
        rows = slice(S.NUM_RESERVED_IDS, None)
        return {
            S.ITEM_ID: self.item_ids[rows],
            S.LABEL_ITEM: np.arange(S.NUM_RESERVED_IDS, len(self.item_ids), dtype=np.int64),
            S.LABEL_ADVERTISER: self.item_advertiser[rows],
            S.LABEL_CATEGORIES: self.item_categories[rows],
            S.LABEL_CONFIDENCES: self.item_confidences[rows],
        }


def encode_demographics(vocabularies: Mapping[str, Vocabulary], user_row: Mapping[str, Any] | None) -> dict[str, int]:
    """Demographic feature -> vocab index (``PAD_ID`` when missing, ``OOV_ID`` when unknown)."""
    out = {}
    for column, feature in S.DEMOGRAPHIC_FEATURE_OF_COLUMN.items():
        value = None if user_row is None else user_row.get(column)
        out[feature] = vocabularies[S.DEMOGRAPHIC_VOCAB[column]].index(value)
    return out


# --------------------------------------------------------------------------------------
# Histories
# --------------------------------------------------------------------------------------
def _sort_key(user_rank: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """(user, timestamp) as one int64 that sorts like the pair (timestamps are range-checked)."""
    return (np.asarray(user_rank, dtype=np.int64) << 32) | (np.asarray(timestamp, dtype=np.int64) - S.MIN_TIMESTAMP)


@dataclasses.dataclass
class EncodedEvents:
    """Sorted events of one or more users (each user's events contiguous), with vocab indices."""

    timestamp: np.ndarray
    item: np.ndarray  # raw ids
    item_index: np.ndarray
    advertiser_index: np.ndarray
    event_type_index: np.ndarray
    user_rank: np.ndarray  # which user (position in the batch) each event belongs to
    user_start: np.ndarray  # per user: index of their first event
    key: np.ndarray  # _sort_key(user_rank, timestamp), non-decreasing

    @classmethod
    def encode(cls, events: UserEvents | Sequence[UserEvents], vocabularies: Mapping[str, Vocabulary]) -> EncodedEvents:
        batch = [events] if isinstance(events, UserEvents) else list(events)
        lengths = np.asarray([len(e) for e in batch], dtype=np.int64)
        fields = ("timestamp", "item", "advertiser", "event_type")
        cat = _concat([{f: getattr(e, f) for f in fields} for e in batch], fields, string_columns=("event_type",))
        v = vocabularies
        rank = np.repeat(np.arange(len(batch)), lengths)
        return cls(
            timestamp=cat["timestamp"],
            item=cat["item"],
            item_index=v[S.VOCAB_ITEM].int_indices(cat["item"]),
            advertiser_index=v[S.VOCAB_ADVERTISER].int_indices(cat["advertiser"]),
            event_type_index=_string_indices(v[S.VOCAB_EVENT_TYPE], cat["event_type"]),
            user_rank=rank,
            user_start=np.cumsum(lengths) - lengths,
            key=_sort_key(rank, cat["timestamp"]),
        )

    def __len__(self) -> int:
        return len(self.timestamp)

    def ends_before(self, user_rank: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
        """Per target: one past the user's last event strictly before ``timestamp``."""
        return np.searchsorted(self.key, _sort_key(user_rank, timestamp), side="left")


def _string_indices(vocab: Vocabulary, values: np.ndarray) -> np.ndarray:
    """Vectorised :meth:`Vocabulary.index` for a (low-cardinality) string array."""
    uniques, inverse = np.unique(values, return_inverse=True)
    return vocab.indices(uniques.tolist())[inverse.reshape(-1)] if len(values) else np.zeros(0, dtype=np.int64)


def time_gap_buckets(gaps: np.ndarray) -> np.ndarray:
    """Vectorised :func:`schema.time_gap_bucket`."""
    return np.searchsorted(_GAP_EDGES, np.maximum(gaps, 0), side="left") + 1


def window_positions(ends: np.ndarray, starts: np.ndarray | int = 0, max_len: int = S.MAX_HISTORY) -> np.ndarray:
    """Left-padded positions of the last ``max_len`` events in ``[start, end)`` (-1: padding)."""
    positions = np.asarray(ends, dtype=np.int64)[:, None] - max_len + np.arange(max_len)
    return np.where(positions >= np.asarray(starts, dtype=np.int64).reshape(-1, 1), positions, -1)


def positions_before(
    events: EncodedEvents,
    target_ts: int,
    exclude_item: int | None = None,
    max_len: int = S.MAX_HISTORY,
    user_rank: int = 0,
) -> np.ndarray:
    """Left-padded positions of a user's last events strictly before ``target_ts``, skipping ``exclude_item``."""
    start = int(events.user_start[user_rank])
    end = int(events.ends_before(np.asarray([user_rank]), np.asarray([target_ts]))[0])
    idx = np.arange(start, end)
    if exclude_item is not None:
        idx = idx[events.item[start:end] != exclude_item]
    idx = idx[len(idx) - max_len :] if len(idx) > max_len else idx
    return np.concatenate([np.full(max_len - len(idx), -1, dtype=np.int64), idx])


def gather_history(events: EncodedEvents, positions: np.ndarray, target_ts: np.ndarray) -> Columns:
    """History features [N, L] (left-padded with ``PAD_ID``) and lengths [N] at given positions."""
    valid = positions >= 0
    if not len(events):
        valid = np.zeros_like(valid)
    p = np.where(valid, positions, 0)

    def take(values: np.ndarray) -> np.ndarray:
        return np.where(valid, values[p], S.PAD_ID) if len(values) else np.zeros(p.shape, dtype=np.int64)

    target_ts = np.asarray(target_ts, dtype=np.int64)[:, None]
    event_ts = events.timestamp[p] if len(events) else np.zeros(p.shape, dtype=np.int64)
    # The next event of the history (valid positions are contiguous at the right), the last one's the target.
    next_ts = np.concatenate([event_ts[:, 1:], target_ts], axis=1)
    return {
        S.HISTORY_ITEM: take(events.item_index),
        S.HISTORY_ADVERTISER: take(events.advertiser_index),
        S.HISTORY_EVENT_TYPE: take(events.event_type_index),
        S.HISTORY_TIME_GAP: np.where(valid, time_gap_buckets(target_ts - event_ts), S.PAD_ID),
        S.HISTORY_NEXT_GAP: np.where(valid, time_gap_buckets(next_ts - event_ts), S.PAD_ID),
        S.HISTORY_LENGTH: valid.sum(axis=1).astype(np.int64),
    }


def history_at(
    events: UserEvents,
    vocabularies: Mapping[str, Vocabulary],
    target_ts: int,
    exclude_item: int | None = None,
    max_len: int = S.MAX_HISTORY,
) -> dict[str, np.ndarray]:
    """One user's history features at ``target_ts`` (events strictly before it), unbatched.

    ``vocabularies``: e.g. :func:`tfrs_ctx.data.vocab.load_vocabularies` of a data directory.
    """
    encoded = EncodedEvents.encode(events, vocabularies)
    positions = positions_before(encoded, target_ts, exclude_item, max_len)[None, :]
    return {name: values[0] for name, values in gather_history(encoded, positions, np.asarray([target_ts])).items()}


# --------------------------------------------------------------------------------------
# Deterministic randomness and synthetic context
# --------------------------------------------------------------------------------------
def synthetic_context(
    categories: np.ndarray, confidences: np.ndarray, keys: np.ndarray, drop_prob: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-context from label categories: drop each with ``drop_prob``, weight *= U(1-j, 1+j).

    Kept categories are re-packed to the left (right-padded with ``PAD_ID`` / 0.0) and
    weights clipped to [0, 1]; with ``drop_prob=0`` and ``jitter=0`` the input comes back.
    """
    n = categories.shape[1]
    keep = categories != S.PAD_ID
    if drop_prob > 0:
        keep &= stable_uniform(keys, 0, n) >= drop_prob
    weights = confidences.astype(np.float32)
    if jitter > 0:
        scale = 1.0 - jitter + 2.0 * jitter * stable_uniform(keys, 1, n)
        weights = np.clip(confidences.astype(np.float64) * scale, 0.0, 1.0).astype(np.float32)
    order = np.argsort(~keep, axis=1, kind="stable")
    keep = np.take_along_axis(keep, order, axis=1)
    cats = np.where(keep, np.take_along_axis(categories, order, axis=1), S.PAD_ID)
    return cats.astype(np.int64), np.where(keep, np.take_along_axis(weights, order, axis=1), np.float32(0.0))


# --------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    """What shapes a user's examples (see the training-data pipeline's flags)."""

    cutoff: int
    context_drop_prob: float = 0.3
    context_weight_jitter: float = 0.2
    max_targets_per_user: int = 0  # per-target examples only; sequence examples hold every target
    seed: int = 0
    sequence_stride: int = S.SEQUENCE_STRIDE
    search: bool = False  # the data has a search log: write the SEARCH_SPLITS too


@dataclasses.dataclass
class UserData:
    """Everything known about one user: sorted events, requests, the users-table row, search requests."""

    user_id: int
    events: UserEvents
    requests: UserRequests
    row: dict | None = None
    searches: UserSearches | None = None  # None: no search log (or none of this user's)


def training_targets(
    timestamp: np.ndarray, cutoff: int, max_targets: int = 0, user_rank: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Positions of the training targets and how many were cut.

    Targets are the events before the cutoff; with ``max_targets``, each user's last ones.
    """
    targets = np.flatnonzero(np.asarray(timestamp) < cutoff)
    if not max_targets or not len(targets):
        return targets, 0
    rank = np.zeros(len(targets), dtype=np.int64) if user_rank is None else np.asarray(user_rank)[targets]
    counts = np.bincount(rank)
    within = np.arange(len(targets)) - (np.cumsum(counts) - counts)[rank]
    keep = within >= counts[rank] - max_targets
    return targets[keep], int((~keep).sum())


def _common(
    user_ids: np.ndarray, timestamps: np.ndarray, demographics: np.ndarray, label_index: np.ndarray, lookups: Lookups
) -> Columns:
    """Identity, demographic and label features (``demographics``: [N, 3] in DEMOGRAPHIC_FEATURES order)."""
    columns: Columns = {
        S.EX_USER_ID: np.asarray(user_ids, dtype=np.int64),
        S.EX_TIMESTAMP: np.asarray(timestamps, dtype=np.int64),
        S.LABEL_ITEM: label_index,
        S.LABEL_ADVERTISER: lookups.item_advertiser[label_index],
        S.LABEL_CATEGORIES: lookups.item_categories[label_index],
        S.LABEL_CONFIDENCES: lookups.item_confidences[label_index],
        S.LABEL_SAMPLING_PROB: lookups.item_sampling_prob[label_index],
    }
    for k, feature in enumerate(S.DEMOGRAPHIC_FEATURES):
        columns[feature] = demographics[:, k].astype(np.int64)
    return columns


def training_examples(
    encoded: EncodedEvents, user_ids: np.ndarray, demographics: np.ndarray, lookups: Lookups, options: ExampleOptions
) -> Columns:
    """One example per training conversion (before the cutoff), context synthesised from its label."""
    targets, _ = training_targets(encoded.timestamp, options.cutoff, options.max_targets_per_user, encoded.user_rank)
    rank, ts = encoded.user_rank[targets], encoded.timestamp[targets]
    label = encoded.item_index[targets]
    columns = _common(user_ids[rank], ts, demographics[rank], label, lookups)
    positions = window_positions(encoded.ends_before(rank, ts), encoded.user_start[rank])
    columns.update(gather_history(encoded, positions, ts))
    columns[S.CONTEXT_CATEGORIES], columns[S.CONTEXT_WEIGHTS] = _target_context(
        options.seed, user_ids[rank], ts, encoded.item[targets], label, lookups, options
    )
    if lookups.category_names is not None:
        keys = stable_keys(options.seed, user_ids[rank], ts, encoded.item[targets])
        columns[S.CONTEXT_QUERY] = synthetic_queries(
            lookups.item_categories[label], lookups.item_confidences[label], lookups.category_names, keys
        )
    columns[S.EX_REQUEST_ID] = np.full(len(targets), -1, dtype=np.int64)
    columns[S.SUBJECT_ITEM] = np.full(len(targets), S.PAD_ID, dtype=np.int64)
    return columns


def _target_context(
    seed: int,
    user_ids: np.ndarray,
    ts: np.ndarray,
    items: np.ndarray,
    label: np.ndarray,
    lookups: Lookups,
    o: ExampleOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic context of training targets from their labels (the same keys in both example kinds)."""
    keys = stable_keys(seed, user_ids, ts, items)
    return synthetic_context(
        lookups.item_categories[label],
        lookups.item_confidences[label],
        keys,
        o.context_drop_prob,
        o.context_weight_jitter,
    )


def sequence_windows(num_targets: np.ndarray, stride: int, max_len: int = S.MAX_HISTORY) -> tuple[np.ndarray, ...]:
    """Windows over each user's first ``num_targets`` events: (user rank, last target, previous window's last).

    Target indices count within a user. Window ``k`` ends at target ``min(n - 1, max_len - 1 + k * stride)``
    and labels the targets after the previous window's end: every target exactly once.
    """
    n = np.asarray(num_targets, dtype=np.int64)
    if stride < 1 or stride > max_len:
        raise ValueError(f"sequence stride must lie in [1, {max_len}], got {stride}")
    windows = np.where(n > 0, 1 + -(-np.maximum(n - max_len, 0) // stride), 0)
    rank = np.repeat(np.arange(len(n)), windows)
    k = np.arange(len(rank)) - np.repeat(np.cumsum(windows) - windows, windows)
    last = np.minimum(n[rank] - 1, max_len - 1 + k * stride)
    previous = np.where(k == 0, -1, np.minimum(n[rank] - 1, max_len - 1 + (k - 1) * stride))
    return rank, last, previous


def sequence_examples(
    encoded: EncodedEvents, user_ids: np.ndarray, demographics: np.ndarray, lookups: Lookups, options: ExampleOptions
) -> Columns:
    """Windows of every user's conversions before the cutoff (:data:`tfrs_ctx.schema.SEQUENCE_FEATURES`).

    Position ``q`` of a window holds the target ``e_t`` (its label and synthetic context, from the
    same keys as the per-target examples) and the input ``e_{t-1}`` (padding for a user's first
    event); input gaps are ``TIME_GAP_NEXT_EVENT`` buckets (the last input's: to the last target).
    """
    L = S.MAX_HISTORY
    counts = np.bincount(encoded.user_rank[encoded.timestamp < options.cutoff], minlength=len(user_ids))
    rank, last, previous = sequence_windows(counts, options.sequence_stride, L)
    start = encoded.user_start[rank]
    targets = window_positions(start + last + 1, start, L)  # [W, L] event index of each position's target
    labelled = targets >= (start + previous + 1)[:, None]
    inputs = np.where(targets - 1 >= start[:, None], targets - 1, -1)
    history = gather_history(encoded, inputs, encoded.timestamp[start + last])
    history[S.HISTORY_TIME_GAP] = history.pop(S.HISTORY_NEXT_GAP)
    columns: Columns = {
        S.EX_USER_ID: user_ids[rank].astype(np.int64),
        S.EX_TIMESTAMP: encoded.timestamp[start + last].astype(np.int64),
        **history,
    }
    for k, feature in enumerate(S.DEMOGRAPHIC_FEATURES):
        columns[feature] = demographics[rank, k].astype(np.int64)
    t = targets[labelled]
    label = encoded.item_index[t]
    context = _target_context(
        options.seed,
        user_ids[np.broadcast_to(rank[:, None], targets.shape)[labelled]],
        encoded.timestamp[t],
        encoded.item[t],
        label,
        lookups,
        options,
    )
    flat = {
        S.SEQ_LABEL_ITEM: label,
        S.SEQ_LABEL_ADVERTISER: lookups.item_advertiser[label],
        S.SEQ_LABEL_CATEGORIES: lookups.item_categories[label],
        S.SEQ_LABEL_CONFIDENCES: lookups.item_confidences[label],
        S.SEQ_LABEL_SAMPLING_PROB: lookups.item_sampling_prob[label],
        S.SEQ_LABEL_TIMESTAMP: encoded.timestamp[t],
        S.SEQ_CONTEXT_CATEGORIES: context[0],
        S.SEQ_CONTEXT_WEIGHTS: context[1],
    }
    for name, values in flat.items():
        f = S.SEQUENCE_FEATURES[name]
        out = np.zeros((len(rank), *f.shape), dtype=np.int64 if f.dtype == "int64" else np.float32)
        out[labelled] = values
        columns[name] = out
    return columns


def request_examples(
    encoded: EncodedEvents,
    requests: UserRequests,
    rank: np.ndarray,
    user_ids: np.ndarray,
    demographics: np.ndarray,
    lookups: Lookups,
) -> Columns:
    """One example per request (``rank``: its user's position): real context, label = the request's ad.

    The history holds conversions strictly before the request, without the user's
    conversions of the subject ad itself (a real previous event used as the subject). Whether the
    subject item is an ad, and which, is the subject_items table's AD_ID, never the subject's own id.
    """
    item_vocab = lookups.vocabularies[S.VOCAB_ITEM]
    rows = lookups.subject_rows(requests.subject_item)
    subject_ad_id, subject_ad = lookups.subject_ads(rows)
    positions = window_positions(encoded.ends_before(rank, requests.timestamp), encoded.user_start[rank])
    for i in np.flatnonzero(subject_ad >= S.NUM_RESERVED_IDS):
        window = positions[i][positions[i] >= 0]
        if (encoded.item[window] == subject_ad_id[i]).any():  # else the window already excludes it
            positions[i] = positions_before(
                encoded, int(requests.timestamp[i]), int(subject_ad_id[i]), user_rank=int(rank[i])
            )
    columns = _common(
        user_ids[rank], requests.timestamp, demographics[rank], item_vocab.int_indices(requests.item), lookups
    )
    columns.update(gather_history(encoded, positions, requests.timestamp))
    columns[S.CONTEXT_CATEGORIES] = lookups.subject_categories[rows]
    columns[S.CONTEXT_WEIGHTS] = lookups.subject_confidences[rows]
    columns[S.EX_REQUEST_ID] = requests.request_id.astype(np.int64)
    columns[S.SUBJECT_ITEM] = subject_ad
    return columns


def search_examples(
    encoded: EncodedEvents,
    searches: UserSearches,
    rank: np.ndarray,
    user_ids: np.ndarray,
    demographics: np.ndarray,
    lookups: Lookups,
) -> Columns:
    """One example per search request (``rank``: its user's position), features ``with_query(FEATURES)``.

    History: the user's conversions strictly before the request; context: the query as typed
    (no subject item, no context categories); label: the converted ad.
    """
    n = len(searches)
    positions = window_positions(encoded.ends_before(rank, searches.timestamp), encoded.user_start[rank])
    label = lookups.vocabularies[S.VOCAB_ITEM].int_indices(searches.item)
    columns = _common(user_ids[rank], searches.timestamp, demographics[rank], label, lookups)
    columns.update(gather_history(encoded, positions, searches.timestamp))
    columns[S.CONTEXT_CATEGORIES] = np.full((n, S.MAX_CATEGORIES), S.PAD_ID, dtype=np.int64)
    columns[S.CONTEXT_WEIGHTS] = np.zeros((n, S.MAX_CATEGORIES), dtype=np.float32)
    columns[S.CONTEXT_QUERY] = np.asarray(searches.query, dtype=object)
    columns[S.EX_REQUEST_ID] = searches.request_id.astype(np.int64)
    columns[S.SUBJECT_ITEM] = np.full(n, S.PAD_ID, dtype=np.int64)
    return columns


def _all_searches(users: Sequence[UserData]) -> tuple[UserSearches, np.ndarray]:
    """The batch's search requests (concatenated) and each one's user position."""
    per_user = [u.searches if u.searches is not None else UserSearches.empty() for u in users]
    joined = UserSearches(
        *(
            np.concatenate([getattr(s, f.name) for s in per_user] or [getattr(UserSearches.empty(), f.name)])
            for f in dataclasses.fields(UserSearches)
        )
    )
    rank = np.repeat(np.arange(len(users)), [len(s) for s in per_user]).astype(np.int64)
    return joined, rank


def batch_examples(users: Sequence[UserData], lookups: Lookups, options: ExampleOptions) -> dict[str, Columns]:
    """Every example of a batch of users, per split (see the pipeline's module docstring)."""
    encoded = EncodedEvents.encode([u.events for u in users], lookups.vocabularies)
    user_ids = np.asarray([u.user_id for u in users], dtype=np.int64)
    demographics = np.asarray(
        [[d[f] for f in S.DEMOGRAPHIC_FEATURES] for d in (lookups.demographics(u.row) for u in users)], dtype=np.int64
    ).reshape(len(users), len(S.DEMOGRAPHIC_FEATURES))
    requests = UserRequests(
        *(
            np.concatenate([getattr(u.requests, f.name) for u in users] or [np.zeros(0, np.int64)])
            for f in dataclasses.fields(UserRequests)
        )
    )
    rank = np.repeat(np.arange(len(users)), [len(u.requests) for u in users]).astype(np.int64)
    by_request = request_examples(encoded, requests, rank, user_ids, demographics, lookups)
    before = requests.timestamp < options.cutoff
    out = {
        S.SPLIT_TRAIN: training_examples(encoded, user_ids, demographics, lookups, options),
        S.SPLIT_TRAIN_REQUESTS: select_examples(by_request, before),
        S.SPLIT_EVAL: select_examples(by_request, ~before),
        S.SPLIT_TRAIN_SEQUENCES: sequence_examples(encoded, user_ids, demographics, lookups, options),
    }
    if options.search:
        searches, s_rank = _all_searches(users)
        by_search = search_examples(encoded, searches, s_rank, user_ids, demographics, lookups)
        s_before = searches.timestamp < options.cutoff
        out[S.SPLIT_TRAIN_SEARCH] = select_examples(by_search, s_before)
        out[S.SPLIT_EVAL_SEARCH] = select_examples(by_search, ~s_before)
    return out


def example_features(split: str, columns: Columns) -> dict[str, S.Feature]:
    """The feature set to write a split's examples with: ``split_features``, plus the query where they hold one."""
    features = S.split_features(split)
    return QUERY_FEATURES if features is S.FEATURES and S.CONTEXT_QUERY in columns else features


def consumed_before(encoded: EncodedEvents, requests: UserRequests, rank: np.ndarray) -> list[np.ndarray]:
    """Per request: the item-vocab indices of every ad its user converted on strictly before it (sorted)."""
    ends = encoded.ends_before(rank, requests.timestamp)
    starts = encoded.user_start[rank]
    return [np.unique(encoded.item_index[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def eval_consumed(
    users: Sequence[UserData], lookups: Lookups, cutoff: int, search: bool = False
) -> list[tuple[int, list[int]]]:
    """``(request_id, consumed item indices)`` of every eval request (at/after ``cutoff``) of a batch of users.

    ``search``: of the search requests instead (the eval_search split).
    """
    encoded = EncodedEvents.encode([u.events for u in users], lookups.vocabularies)
    out = []
    for r, u in enumerate(users):
        log = (u.searches if u.searches is not None else UserSearches.empty()) if search else u.requests
        held_out = log.select(log.timestamp >= cutoff)
        rank = np.full(len(held_out), r, dtype=np.int64)
        for request_id, items in zip(
            held_out.request_id.tolist(), consumed_before(encoded, held_out, rank), strict=True
        ):
            out.append((int(request_id), items.tolist()))
    return out


def user_examples(user: UserData, lookups: Lookups, options: ExampleOptions) -> dict[str, Columns]:
    """Every example of one user, per split."""
    return batch_examples([user], lookups, options)


def select_examples(columns: Columns, mask: np.ndarray) -> Columns:
    return {name: values[mask] for name, values in columns.items()}


def num_examples(columns: Columns) -> int:
    return len(columns[S.EX_TIMESTAMP])


# --------------------------------------------------------------------------------------
# tf.train.Example wire format, vectorised over a user's examples
# --------------------------------------------------------------------------------------
