"""The subject item's own embedding in the context path (``model.subject_embedding``).

Where a request's subject item is an ad (``subject_items.ad_id``, see :data:`tfrs_ctx.schema.SUBJECT_ITEM`),
the head also sees that ad's id embedding: the *same* table as the candidate tower's and the
history's ad-id embedding (shared, not a copy), through a dense layer -> ``[B, dim]``, and a
has-subject flag, ``[B, dim + 1]``. Where the subject is not an ad (PAD_ID, or OOV_ID: an ad id
outside the vocabulary) the block is exactly zero: masked, never a fake id's embedding. The block
is concatenated to the category context (:class:`tfrs_ctx.models.layers.ContextLayer`'s output)
and scaled by the same ``trust``, so trust 0 is still exactly the no-context answer.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from tfrs_ctx import schema


def subject_mask(subject: tf.Tensor) -> tf.Tensor:
    """``[B, 1]`` float: 1 where the subject item is a known ad (an index >= NUM_RESERVED_IDS)."""
    return tf.cast(tf.reshape(subject, [-1, 1]) >= schema.NUM_RESERVED_IDS, tf.float32)


@keras.utils.register_keras_serializable("tfrs_ctx")
class SubjectLayer(keras.layers.Layer):
    """A subject ad's (shared) id embedding -> ``[B, dim + 1]``: a dense vector and a has-subject flag,
    both zero where the subject is not a known ad."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.dense = keras.layers.Dense(dim, activation="relu")

    def call(self, embedding: tf.Tensor, subject: tf.Tensor) -> tf.Tensor:
        mask = subject_mask(subject)
        return tf.concat([self.dense(embedding) * mask, mask], axis=-1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"dim": self.dim})
        return config


def subject_of(features: dict[str, tf.Tensor], batch_of: tf.Tensor) -> tf.Tensor:
    """``[B]`` the batch's subject ad indices (PAD_ID where the features carry none)."""
    if schema.SUBJECT_ITEM in features:
        return tf.reshape(tf.cast(features[schema.SUBJECT_ITEM], tf.int64), [-1])
    return tf.zeros(tf.shape(batch_of)[:1], tf.int64)


def raw_subject_index(table: tf.lookup.StaticHashTable, raw: tf.Tensor, batch_of: tf.Tensor) -> tf.Tensor:
    """Serving: ``[B]`` raw subject ad ids (``[1]``: one for every row) -> ad-vocabulary indices;
    ``NO_SUBJECT_AD`` -> PAD_ID, an id outside the vocabulary -> OOV_ID (both: no subject)."""
    raw = tf.broadcast_to(tf.reshape(tf.cast(raw, tf.int64), [-1]), tf.shape(batch_of)[:1])
    return tf.where(raw == schema.NO_SUBJECT_AD, tf.constant(schema.PAD_ID, tf.int64), table.lookup(raw))
