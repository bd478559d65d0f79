"""Dense training's per-position inputs, computed in the tf.data pipeline from ``train_sequences``.

* :func:`strict_state_positions` (``train.dense_strict_history``): the state a target position is
  scored from is that of the last input *strictly before* its target's timestamp, so a target
  never sees an event of its own timestamp, as a per-target history (events ``< target``) and the
  evaluation's requests never do. Without it, events sharing a timestamp (half of MovieLens'
  ratings share their second with the user's previous one) are inputs of one another in the causal
  pass, ordered by item id. Only inputs that are targets of the same window carry a timestamp
  (``SEQ_LABEL_TIMESTAMP`` of the position before); the inputs before a later window's first
  target do not and count as strictly earlier (a tie can remain there, at a window's start only).
* :class:`UserTargetWeights` (``train.dense_user_targets = K``): each target weighs
  ``min(1, K / n_user)``, rescaled so the mean weight over every target of the split is 1: a user
  with ``n`` targets counts as at most ``K`` in the loss, however many windows they have, as the
  per-target split's ``--max_targets_per_user K`` would, but every target is still learned from.
  ``n_user`` comes from one pass over the split's user ids and labels at the start of training.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.data import dataset
from tfrs_ctx.models.two_tower import SEQ_STATE_POSITION, SEQ_TARGET_WEIGHT


def strict_state_positions(features: dict[str, tf.Tensor]) -> tf.Tensor:
    """``[B, L]`` int64: per target position ``q``, the last input ``j <= q`` strictly before its target.

    ``L - length - 1`` (the padding position before the first input: an empty history) when every
    input up to ``q`` shares the target's timestamp. Positions without a target keep ``q``.
    """
    labels = features[schema.SEQ_LABEL_ITEM]
    stamps = features[schema.SEQ_LABEL_TIMESTAMP]
    length = tf.shape(labels)[1]
    target = labels != schema.PAD_ID
    batch = tf.shape(labels)[0]
    # input j is the target of position j - 1: its timestamp is known only if that position holds one
    known = tf.concat([tf.zeros([batch, 1], tf.bool), target[:, :-1]], axis=1)
    input_stamp = tf.concat([tf.zeros([batch, 1], stamps.dtype), stamps[:, :-1]], axis=1)
    first = tf.cast(length, tf.int64) - tf.cast(tf.reshape(features[schema.HISTORY_LENGTH], [-1, 1]), tf.int64)
    positions = tf.range(length, dtype=tf.int64)
    is_input = positions[tf.newaxis] >= first  # [B, L]
    earlier = tf.logical_or(~known[:, tf.newaxis, :], input_stamp[:, tf.newaxis, :] < stamps[:, :, tf.newaxis])
    causal = positions[tf.newaxis, :] <= positions[:, tf.newaxis]  # [q, j]: j <= q
    ok = is_input[:, tf.newaxis, :] & causal[tf.newaxis] & earlier  # [B, q, j]
    last = tf.reduce_max(tf.where(ok, positions[tf.newaxis, tf.newaxis], -1), axis=2)
    last = tf.where(last < 0, tf.maximum(first - 1, 0) + tf.zeros_like(last), last)
    return tf.where(target, last, positions[tf.newaxis] + tf.zeros_like(last))


def with_strict_state_positions(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = dict(features)
    features[SEQ_STATE_POSITION] = strict_state_positions(features)
    return features


class UserTargetWeights:
    """Per-user target weights ``min(1, K / n_user)`` (mean 1 over the split's targets) for batches of windows."""

    def __init__(self, data_dir: str, cap: int):
        users, counts = count_user_targets(data_dir)
        raw = np.minimum(1.0, cap / counts.astype(np.float64))
        self.scale = float(counts.sum() / (raw * counts).sum())  # mean weight over every target: 1
        self.users, self.counts = users, counts
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(users, tf.int64), tf.constant(raw * self.scale, tf.float32)
            ),
            default_value=1.0,
        )

    def __call__(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = dict(features)
        user = self.table.lookup(tf.cast(features[schema.EX_USER_ID], tf.int64))
        target = tf.cast(features[schema.SEQ_LABEL_ITEM] != schema.PAD_ID, tf.float32)
        features[SEQ_TARGET_WEIGHT] = target * user[:, tf.newaxis]
        return features


def count_user_targets(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Every user of ``train_sequences`` and their targets (each conversion is one window position's)."""
    totals: dict[int, int] = {}
    ds = dataset.make_dataset(data_dir, schema.SPLIT_TRAIN_SEQUENCES, 4096)
    for batch in ds:
        users = batch[schema.EX_USER_ID].numpy()
        targets = (batch[schema.SEQ_LABEL_ITEM].numpy() != schema.PAD_ID).sum(axis=1)
        for user, n in zip(users.tolist(), targets.tolist(), strict=True):
            totals[user] = totals.get(user, 0) + n
    users = np.fromiter(totals, dtype=np.int64, count=len(totals))
    counts = np.fromiter(totals.values(), dtype=np.int64, count=len(totals))
    return users, np.maximum(counts, 1)
