"""tf.data input pipeline over the training-data TFRecords, built from the schema alone."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema

DEFAULT_SHUFFLE_BUFFER = 10_000


def parse_examples(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse a batch of serialised ``tf.train.Example`` into ``{feature: [B, *shape]}``."""
    return tf.io.parse_example(serialized, schema.feature_spec())


def make_dataset(
    data_dir: str,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of parsed examples of one split.

    Without ``shuffle`` the order is deterministic (files sorted, interleave deterministic);
    with it, files and examples are shuffled (seeded) and parallel reads may reorder.
    """
    pattern = schema.tfrecord_pattern(data_dir, split)
    if not tf.io.gfile.glob(pattern):
        raise FileNotFoundError(f"no TFRecords for split '{split}' at {pattern}")
    files = tf.data.Dataset.list_files(pattern, shuffle=shuffle, seed=seed if shuffle else None)
    ds = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(parse_examples, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    return ds.prefetch(tf.data.AUTOTUNE)


def history_mask(history_length: tf.Tensor, max_len: int = schema.MAX_HISTORY) -> tf.Tensor:
    """``[B, max_len]`` bool mask of the real events of left-padded histories."""
    length = tf.cast(tf.reshape(history_length, [-1, 1]), tf.int32)
    return tf.range(max_len, dtype=tf.int32)[tf.newaxis, :] >= max_len - length


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
