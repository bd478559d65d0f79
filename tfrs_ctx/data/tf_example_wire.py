"""``tf.train.Example`` wire format, written with numpy for many examples at once.

:func:`serialize_examples` turns column-wise examples (``{feature: [N, *shape]}``, every feature
of a schema feature set: :data:`tfrs_ctx.schema.FEATURES` by default, or
:data:`tfrs_ctx.schema.SEQUENCE_FEATURES`) into serialised protos byte-identical to
``tf.train.Example.SerializeToString(deterministic=True)`` (features in key order, packed lists),
with no per-example Python and no TensorFlow; a test checks the bytes against the proto library.

String features (the search query, :data:`tfrs_ctx.schema.CONTEXT_QUERY`) are appended after the
numeric part as a second length-delimited ``features`` field (one ``bytes_list`` entry each):
protobuf parsers merge repeated occurrences of a message field, so the example parses as one
(a test checks it with ``tf.io.parse_example`` and the proto library). A feature set without
strings gives exactly the bytes it gave before strings existed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfrs_ctx import schema as S
from tfrs_ctx.data.examples import Columns, num_examples

_U64 = np.uint64


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varints of an int array: (all bytes in row-major order, bytes per value)."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    nbytes = _varint_len(v)
    flat_nb = nbytes.ravel()
    out = np.empty(int(flat_nb.sum()), dtype=np.uint8)
    rest, pos, left = v.ravel(), _exclusive_cumsum(flat_nb), flat_nb
    while len(rest):
        more = left > 1
        out[pos] = (rest & _U64(0x7F)).astype(np.uint8) | (more.view(np.uint8) << np.uint8(7))
        rest, pos, left = rest[more] >> _U64(7), pos[more] + 1, left[more] - 1
    return out, nbytes


def _varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes in the varint of each value (negative int64 values take 10)."""
    v = np.asarray(values)
    v = v.view(np.uint64) if v.dtype == np.int64 else v.astype(np.uint64)
    n = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        more = v >= _U64(1 << (7 * k))
        if not more.any():
            break
        n += more
    return n


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    flat = values.ravel()
    return (np.cumsum(flat) - flat).reshape(values.shape)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each feature sits in the wire format (features in key order)."""

    names: tuple[str, ...]
    widths: np.ndarray  # values per example
    is_int: np.ndarray
    consts: bytes  # b"\x0a", int list tag, float list tag, then every entry head
    head_offset: np.ndarray
    head_len: np.ndarray

    @classmethod
    def of_features(cls, features: dict[str, S.Feature]) -> _Layout:
        names = tuple(sorted(features))
        consts, offsets, lengths = b"\x0a\x1a\x12", [], []
        for name in names:
            key = name.encode()
            if len(key) >= 128:
                raise ValueError(f"feature name too long: {name}")
            head = b"\x0a" + bytes([len(key)]) + key + b"\x12"  # map key, then the Feature value tag
            offsets.append(len(consts))
            lengths.append(len(head))
            consts += head
        return cls(
            names=names,
            widths=np.asarray([max(1, int(np.prod(features[n].shape))) for n in names]),
            is_int=np.asarray([features[n].dtype == "int64" for n in names]),
            consts=consts,
            head_offset=np.asarray(offsets),
            head_len=np.asarray(lengths),
        )


_LAYOUTS: dict[int, tuple[dict, _Layout]] = {}  # id(feature set) -> (the set, kept alive; its layout)


def _layout(features: dict[str, S.Feature]) -> _Layout:
    cached = _LAYOUTS.get(id(features))
    if cached is None or cached[0] is not features:
        cached = _LAYOUTS[id(features)] = (features, _Layout.of_features(features))
    return cached[1]


def _payloads(columns: Columns, layout: _Layout, n: int, base: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Packed values of every feature: (byte buffers, source offsets [N, F], lengths [N, F])."""
    src = np.zeros((n, len(layout.names)), dtype=np.int64)
    length = np.zeros_like(src)
    buffers = []
    for want_int in (True, False):
        cols = np.flatnonzero(layout.is_int == want_int)
        parts = [np.asarray(columns[layout.names[c]]).reshape(n, -1) for c in cols]
        for c, part in zip(cols, parts, strict=True):
            if part.shape[1] != layout.widths[c]:
                raise ValueError(
                    f"feature '{layout.names[c]}': {part.shape[1]} values per example, schema says {layout.widths[c]}"
                )
        matrix = np.concatenate(parts, axis=1)
        col_start = np.cumsum(layout.widths[cols]) - layout.widths[cols]
        if want_int:
            flat, nbytes = _varints(matrix)
            cum = np.concatenate([np.zeros((n, 1), dtype=np.int64), np.cumsum(nbytes, axis=1)], axis=1)
            row_start = _exclusive_cumsum(cum[:, -1])
            src[:, cols] = base + row_start[:, None] + cum[:, col_start]
            length[:, cols] = cum[:, col_start + layout.widths[cols]] - cum[:, col_start]
        else:
            flat = np.ascontiguousarray(matrix, dtype="<f4").view(np.uint8).ravel()
            src[:, cols] = base + 4 * (np.arange(n)[:, None] * matrix.shape[1] + col_start[None, :])
            length[:, cols] = 4 * layout.widths[cols][None, :]
        buffers.append(flat)
        base += len(flat)
    return buffers, src, length


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _string_suffixes(columns: Columns, names: list[str], n: int) -> list[bytes]:
    """Per example: a ``features`` field (tag 1) holding each string feature as a one-value ``bytes_list``."""
    heads = [b"\x0a" + _varint(len(name.encode())) + name.encode() for name in names]
    values = [np.asarray(columns[name]).reshape(n) for name in names]
    out = []
    for i in range(n):
        entries = b"".join(
            _delimited(b"\x0a", head + _delimited(b"\x12", _delimited(b"\x0a", _delimited(b"\x0a", _utf8(v[i])))))
            for head, v in zip(heads, values, strict=True)
        )
        out.append(_delimited(b"\x0a", entries))
    return out


def _utf8(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def serialize_examples(columns: Columns, features: dict[str, S.Feature] | None = None) -> list[bytes]:
    """Serialise column-wise examples as ``tf.train.Example`` protos (every feature of ``features``).

    ``features``: a schema feature set (default :data:`~tfrs_ctx.schema.FEATURES`). Numeric
    features are written as :func:`serialize_numeric` does; string features (scalars) follow as
    a second ``features`` field, which every protobuf parser merges into the first.
    """
    features = S.FEATURES if features is None else features
    strings = sorted(name for name, f in features.items() if f.dtype == "string")
    if not strings:
        return serialize_numeric(columns, features)
    numeric = _numeric_part(features)
    blobs = serialize_numeric(columns, numeric)
    if not blobs:
        return []
    suffixes = _string_suffixes(columns, strings, len(blobs))
    return [a + b for a, b in zip(blobs, suffixes, strict=True)]


_NUMERIC: dict[int, tuple[dict, dict]] = {}  # id(feature set) -> (the set, kept alive; its numeric features)


def _numeric_part(features: dict[str, S.Feature]) -> dict[str, S.Feature]:
    cached = _NUMERIC.get(id(features))
    if cached is None or cached[0] is not features:
        numeric = {name: f for name, f in features.items() if f.dtype != "string"}
        cached = _NUMERIC[id(features)] = (features, numeric)
    return cached[1]


def serialize_numeric(columns: Columns, features: dict[str, S.Feature] | None = None) -> list[bytes]:
    """Serialise column-wise examples as ``tf.train.Example`` protos (every feature of ``features``).

    ``features``: a schema feature set, :data:`~tfrs_ctx.schema.FEATURES` (default) or
    :data:`~tfrs_ctx.schema.SEQUENCE_FEATURES`. Byte-identical to
    ``tf.train.Example.SerializeToString(deterministic=True)`` (features in key order, packed
    lists), vectorised over the examples: no per-example Python.
    """
    layout = _layout(S.FEATURES if features is None else features)
    n, f = num_examples(columns), len(layout.names)
    if n == 0:
        return []
    consts = np.frombuffer(layout.consts, dtype=np.uint8)
    buffers, payload_src, payload_len = _payloads(columns, layout, n, base=len(consts))
    list_len = 1 + _varint_len(payload_len) + payload_len
    feature_len = 1 + _varint_len(list_len) + list_len
    entry_len = layout.head_len[None, :] + _varint_len(feature_len) + feature_len
    total = (1 + _varint_len(entry_len) + entry_len).sum(axis=1)
    # Varints of the lengths: per feature [entry, feature, list, payload], then the example's.
    base = len(consts) + sum(len(b) for b in buffers)
    head_flat, head_nb = _varints(np.stack([entry_len, feature_len, list_len, payload_len], axis=-1))
    head_src = base + _exclusive_cumsum(head_nb)
    total_flat, total_nb = _varints(total)
    total_src = base + len(head_flat) + _exclusive_cumsum(total_nb)
    # Segments per example: 0x0a, len(features), then per feature 9 segments.
    src = np.empty((n, f, 9), dtype=np.int64)
    seg = np.empty((n, f, 9), dtype=np.int64)
    tag = np.where(layout.is_int, 1, 2)
    for k, (s, ln) in enumerate(
        (
            (0, 1),
            (head_src[..., 0], head_nb[..., 0]),
            (layout.head_offset, layout.head_len),
            (head_src[..., 1], head_nb[..., 1]),
            (tag, 1),
            (head_src[..., 2], head_nb[..., 2]),
            (0, 1),
            (head_src[..., 3], head_nb[..., 3]),
            (payload_src, payload_len),
        )
    ):
        src[..., k], seg[..., k] = s, ln
    src = np.concatenate([np.zeros((n, 1), dtype=np.int64), total_src[:, None], src.reshape(n, -1)], axis=1).ravel()
    seg = np.concatenate([np.ones((n, 1), dtype=np.int64), total_nb[:, None], seg.reshape(n, -1)], axis=1).ravel()
    idx = np.repeat(src - _exclusive_cumsum(seg), seg) + np.arange(int(seg.sum()))
    data = np.concatenate([consts, *buffers, head_flat, total_flat])[idx].tobytes()
    ends = np.cumsum(1 + total_nb + total).tolist()
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
