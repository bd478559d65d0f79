"""Optimizers for ``train.optimizer``: ``adam``, ``lazy_adam`` (row-sparse Adam), ``adagrad``, ``auto``.

tf-keras Adam, given the ``tf.IndexedSlices`` gradient of an embedding lookup, still decays
every row of both slots and rewrites every row of the table each step: at 1M ads x 64 that
was ~2 s a step and at 10M its dense temporaries did not fit in memory. :class:`LazyAdam`
updates only the rows the step touched (duplicate indices summed first, then Adam's moments
of those rows gathered, updated and scattered back); dense gradients get plain Adam. On
rows touched every step it is exactly Adam; a row's moments do not decay while it is not
looked up (TF-Addons' LazyAdam semantics).

``auto`` is Adam for item vocabularies up to :data:`LAZY_ADAM_MIN_ITEMS` rows and LazyAdam
above (see the README's "Large corpora" for the measured step times and quality).
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from tfrs_ctx.config import OPTIMIZERS

AUTO, ADAM, LAZY_ADAM, ADAGRAD = OPTIMIZERS
LAZY_ADAM_MIN_ITEMS = 200_000  # auto: above this many item-vocabulary rows, LazyAdam


@keras.saving.register_keras_serializable(package="tfrs_ctx")
class LazyAdam(keras.optimizers.Adam):
    """Adam whose sparse (``tf.IndexedSlices``) updates touch only the gradient's rows."""

    def __init__(self, learning_rate=0.001, name: str = "LazyAdam", **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("LazyAdam does not support amsgrad")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        lr = tf.cast(self.learning_rate, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        epsilon = self.epsilon * tf.sqrt(1 - tf.pow(beta_2, step)) if self.adaptive_epsilon else self.epsilon
        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]

        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), rows))


def resolve(name: str, item_vocab_size: int) -> str:
    """``auto`` -> ``adam`` or ``lazy_adam`` by the item vocabulary's size; other names unchanged."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == AUTO:
        return LAZY_ADAM if item_vocab_size > LAZY_ADAM_MIN_ITEMS else ADAM
    return name


def make_optimizer(
    name: str, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule, item_vocab_size: int
) -> keras.optimizers.Optimizer:
    """The ``train.optimizer`` named (``auto`` resolved by :func:`resolve`) at ``learning_rate``."""
    name = resolve(name, item_vocab_size)
    if name == LAZY_ADAM:
        return LazyAdam(learning_rate)
    if name == ADAGRAD:
        return keras.optimizers.Adagrad(learning_rate)
    return keras.optimizers.Adam(learning_rate)
