"""tf.data input pipeline over the training-data TFRecords, built from the schema alone.

Before a split is read, its files are checked once per process (:func:`verify_tfrecords`): a
truncated or corrupt shard is a ``tf.errors.DataLossError`` naming the file, and a split whose
record count differs from ``metadata.json`` (a missing shard) one naming the split, never a
silent partial read. tf.data's own error on a damaged shard does not say which file it was, and
a gzip shard cut where a record ends reads as a shorter shard without any error.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema

DEFAULT_SHUFFLE_BUFFER = 10_000
_READ_BYTES = 1 << 22
_VERIFIED: dict[tuple[str, int, int], int] = {}  # (path, size, mtime_ns) -> record count, files read whole


def _scan_gzip_tfrecords(path: str) -> int:
    """Records of a gzip TFRecord file; raises ``ValueError`` unless every gzip member and record is whole."""
    count, pending, members, in_member = 0, b"", 0, False
    inflate = zlib.decompressobj(wbits=31)
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            while chunk:
                pending += inflate.decompress(chunk)
                in_member, chunk = True, b""
                if inflate.eof:  # a member ended, its CRC checked; another may follow
                    members, in_member, chunk = members + 1, False, inflate.unused_data
                    inflate = zlib.decompressobj(wbits=31)
            pos = 0  # TFRecord framing: length (u64), length CRC, data, data CRC
            while len(pending) - pos >= 12:
                end = pos + 16 + struct.unpack_from("<Q", pending, pos)[0]
                if end > len(pending):
                    break
                count, pos = count + 1, end
            pending = pending[pos:]
    if in_member or not members:
        raise ValueError("the gzip stream ends early" if in_member else "empty file, not a gzip stream")
    if pending:
        raise ValueError(f"record {count + 1} is cut short ({len(pending)} bytes)")
    return count


def count_records(path: str) -> int:
    """Records of one gzip TFRecord file, read to the end; ``DataLossError`` naming ``path`` if it is damaged."""
    stat = tf.io.gfile.stat(path)
    key = (path, stat.length, stat.mtime_nsec)
    if key not in _VERIFIED:
        try:
            _VERIFIED[key] = _scan_gzip_tfrecords(path)
        except (ValueError, zlib.error) as e:
            message = f"{path}: truncated or corrupt TFRecord file ({e}); rebuild the data"
            raise tf.errors.DataLossError(None, None, message) from e
    return _VERIFIED[key]


def verify_tfrecords(data_dir: str, split: str, files: list[str]) -> int:
    """Check every file of a split reads to the end and, with ``metadata.json``, the split's count; returns it."""
    total = sum(count_records(path) for path in files)
    metadata = os.path.join(data_dir, schema.METADATA_FILE)
    expected = load_metadata(data_dir).get("counts", {}).get(split) if tf.io.gfile.exists(metadata) else None
    if expected is not None and total != expected:
        raise tf.errors.DataLossError(
            None,
            None,
            f"split '{split}' of {data_dir}: {total} records in {len(files)} files, but {metadata} says {expected} "
            "(a shard is missing or was replaced); rebuild the data",
        )
    return total


def parse_examples(serialized: tf.Tensor, features: dict | None = None) -> dict[str, tf.Tensor]:
    """Parse a batch of serialised ``tf.train.Example`` into ``{feature: [B, *shape]}`` (default: FEATURES)."""
    return tf.io.parse_example(serialized, schema.feature_spec(features))


def make_dataset(
    data_dir: str,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    drop_remainder: bool = False,
    worker: tuple[int, int] | None = None,
    features: dict[str, schema.Feature] | None = None,
) -> tf.data.Dataset:
    """Batches of parsed examples of one split (its schema feature set: :func:`schema.split_features`,
    or ``features``, e.g. with the search query; a feature an example lacks parses as its default).

    Without ``shuffle`` the order is deterministic (files sorted, interleave deterministic);
    with it, files and examples are shuffled (seeded) and parallel reads may reorder. The
    split's files are verified first (:func:`verify_tfrecords`).

    ``worker=(index, count)``: only worker ``index``'s share of ``count`` (multi-worker training):
    the files ``index::count`` when the split has at least ``count`` files, else (too few files
    to share out) every ``count``-th example of all of them (:func:`worker_share`).
    """
    pattern = schema.tfrecord_pattern(data_dir, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecords for split '{split}' at {pattern}")
    verify_tfrecords(data_dir, split, files)
    by_example = None
    if worker is None:
        files = tf.data.Dataset.list_files(pattern, shuffle=shuffle, seed=seed if shuffle else None)
    else:
        mine, by_example = worker_share(files, *worker)
        files = tf.data.Dataset.from_tensor_slices(mine)
        if shuffle and by_example is None:
            files = files.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        # Sharding by example needs the same order on every worker: every N-th of one sequence.
        deterministic=not shuffle or by_example is not None,
    )
    if by_example is not None:
        ds = ds.shard(*by_example)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    spec = schema.feature_spec(features or schema.split_features(split))
    ds = ds.map(lambda s: tf.io.parse_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    return ds.prefetch(tf.data.AUTOTUNE)


def worker_share(files: list[str], index: int, count: int) -> tuple[list[str], tuple[int, int] | None]:
    """Worker ``index`` of ``count``'s files, and ``(count, index)`` when it must shard by example.

    By file when there are at least as many files as workers (each worker reads only its own; with
    a count that does not divide the files, some workers read one file more, so keep the pipeline's
    ``--num_shards`` a multiple of the workers); else every worker reads every file and keeps every
    ``count``-th example (tf.data's DATA sharding: correct, but each worker reads all the data).
    """
    if not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    if len(files) >= count:
        return files[index::count], None
    print(
        f"only {len(files)} file(s) for {count} workers: sharding by example (every worker reads every file); "
        f"rebuild the data with --num_shards a multiple of {count} to shard by file"
    )
    return files, (count, index)


def history_mask(history_length: tf.Tensor, max_len: int = schema.MAX_HISTORY) -> tf.Tensor:
    """``[B, max_len]`` bool mask of the real events of left-padded histories."""
    length = tf.cast(tf.reshape(history_length, [-1, 1]), tf.int32)
    return tf.range(max_len, dtype=tf.int32)[tf.newaxis, :] >= max_len - length


def validation_requests(data_dir: str, counts: dict[str, int], n: int) -> list[dict[str, tf.Tensor]]:
    """The first ``n`` ``train_requests`` in file order, in batches (none if the data has none)."""
    if not counts.get(schema.SPLIT_TRAIN_REQUESTS):
        return []
    return list(_requests_in_order(data_dir).take(n).batch(1024))


def requests_after_validation(data_dir: str, n: int) -> tf.data.Dataset:
    """``train_requests`` after the first ``n`` (:func:`validation_requests`), unbatched, in file order."""
    return _requests_in_order(data_dir).skip(n)


def _requests_in_order(data_dir: str) -> tf.data.Dataset:
    return make_dataset(data_dir, schema.SPLIT_TRAIN_REQUESTS, 1024).unbatch()


def load_metadata(data_dir: str) -> dict:
    """The dataset metadata written by the training-data pipeline."""
    with tf.io.gfile.GFile(os.path.join(data_dir, schema.METADATA_FILE)) as f:
        return json.load(f)


def load_corpus(data_dir: str) -> dict[str, np.ndarray]:
    """The ad corpus: raw ``ITEM_ID`` [N] and every candidate feature [N, *shape], by item index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tf.io.gfile.GFile(os.path.join(data_dir, schema.CORPUS_FILE), "rb") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    out = {schema.ITEM_ID: table.column(schema.ITEM_ID).to_numpy().astype(np.int64)}
    for name in schema.CANDIDATE_FEATURES:
        feature = schema.FEATURES[name]
        column = table.column(name).combine_chunks()
        values = column.flatten() if feature.shape else column
        dtype = np.int64 if feature.dtype == "int64" else np.float32
        out[name] = values.to_numpy().astype(dtype).reshape((len(table), *feature.shape))
    return out
