"""Keras (tf-keras, Keras 2) layers of the contextual sequential two-tower model.

Every layer has ``get_config`` so it round-trips through ``from_config``. Histories are
left-padded (see :mod:`tfrs_ctx.schema`): the most recent event is at position ``-1``.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


def _serializable(layer: keras.layers.Layer, config: dict, **kwargs) -> dict:
    base = keras.layers.Layer.get_config(layer)
    base.update(config)
    base.update(kwargs)
    return base


@keras.utils.register_keras_serializable("tfrs_ctx")
class PositionalEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to a ``[B, L, d]`` sequence."""

    def __init__(self, max_length: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length, self.dim = max_length, dim
        self.positions = keras.layers.Embedding(max_length, dim, name="positions")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        length = tf.shape(x)[1]
        return x + self.positions(tf.range(length))[tf.newaxis]

    def get_config(self) -> dict:
        return _serializable(self, {"max_length": self.max_length, "dim": self.dim})


def attention_mask(valid: tf.Tensor, causal: bool) -> tf.Tensor:
    """``[B, L, L]`` mask: query i may attend key j iff j is a real event (and j <= i if causal).

    A query with no real key to attend (a padding position before the first event) attends to
    itself only: an all-masked row would attend uniformly to every key, later events included,
    and dense training reads the state of the position just before the first event. Real
    positions' masks are unchanged (their own key is real).
    """
    mask = valid[:, tf.newaxis, :]
    length = tf.shape(valid)[1]
    if causal:
        lower = tf.linalg.band_part(tf.ones((length, length), tf.bool), -1, 0)
        mask = tf.logical_and(mask, lower[tf.newaxis])
    else:
        mask = tf.tile(mask, [1, length, 1])
    diagonal = tf.eye(length, dtype=tf.bool)[tf.newaxis]
    return tf.logical_or(mask, tf.logical_and(diagonal, tf.logical_not(valid)[:, :, tf.newaxis]))


@keras.utils.register_keras_serializable("tfrs_ctx")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm Transformer block: self-attention and feed-forward, each residual + dropout."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float = 0.1, causal: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.ff_dim, self.dropout, self.causal = dim, heads, ff_dim, dropout, causal
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.ff1 = keras.layers.Dense(ff_dim, activation="gelu")
        self.ff2 = keras.layers.Dense(dim)
        self.drop1 = keras.layers.Dropout(dropout)
        self.drop2 = keras.layers.Dropout(dropout)

    def call(self, x: tf.Tensor, valid: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        h = self.norm1(x)
        h = self.attention(h, h, attention_mask=attention_mask(valid, self.causal), training=training)
        x = x + self.drop1(h, training=training)
        h = self.ff2(self.ff1(self.norm2(x)))
        return x + self.drop2(h, training=training)

    def get_config(self) -> dict:
        return _serializable(
            self,
            {
                "dim": self.dim,
                "heads": self.heads,
                "ff_dim": self.ff_dim,
                "dropout": self.dropout,
                "causal": self.causal,
            },
        )


@keras.utils.register_keras_serializable("tfrs_ctx")
class SequenceEncoder(keras.layers.Layer):
    """N Transformer blocks over an embedded, left-padded history -> last valid hidden state.

    Inputs: ``events`` ``[B, L, d]`` (summed event embeddings) and ``length`` ``[B]``.
    Output ``[B, d]``: the hidden state at the last position (the most recent event); with
    ``all_positions=True``, ``[B, L, d]``: every position's state (with ``causal``, position ``i``
    has seen events ``<= i`` only; dense training scores each against its next event). Padding
    positions are masked out of attention, so padding never changes a real position's state.
    """

    def __init__(
        self,
        max_length: int,
        dim: int,
        blocks: int = 2,
        heads: int = 2,
        ff_dim: int = 128,
        dropout: float = 0.1,
        causal: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_length, self.dim, self.blocks, self.heads = max_length, dim, blocks, heads
        self.ff_dim, self.dropout, self.causal = ff_dim, dropout, causal
        self.position = PositionalEmbedding(max_length, dim)
        self.input_dropout = keras.layers.Dropout(dropout)
        self.stack = [TransformerBlock(dim, heads, ff_dim, dropout, causal, name=f"block_{i}") for i in range(blocks)]
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(
        self,
        events: tf.Tensor,
        length: tf.Tensor,
        training: bool | None = None,
        all_positions: bool = False,
        last: int = 0,
    ) -> tf.Tensor:
        """``last`` > 0 (cross-attention fusion): the last ``last`` positions' states ``[B, last, d]``."""
        valid = valid_positions(length, tf.shape(events)[1])
        x = self.input_dropout(self.position(events), training=training)
        for block in self.stack:
            x = block(x, valid, training=training)
        if last > 0 and not all_positions:
            x = x[:, -last:]
        elif not all_positions:
            return self.norm(x[:, -1])
        shape = tf.shape(x)  # the norm is per position; flattened, it sees the [B, d] rank it was built on
        return tf.reshape(self.norm(tf.reshape(x, [-1, self.dim])), shape)

    def get_config(self) -> dict:
        return _serializable(
            self,
            {
                "max_length": self.max_length,
                "dim": self.dim,
                "blocks": self.blocks,
                "heads": self.heads,
                "ff_dim": self.ff_dim,
                "dropout": self.dropout,
                "causal": self.causal,
            },
        )


def valid_positions(length: tf.Tensor, max_length: tf.Tensor | int) -> tf.Tensor:
    """``[B, L]`` bool: which positions of a left-padded history hold real events."""
    positions = tf.range(max_length, dtype=tf.int64)[tf.newaxis]
    length = tf.cast(tf.reshape(length, [-1, 1]), tf.int64)
    return positions >= tf.cast(max_length, tf.int64) - length


def weighted_average(embeddings: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Confidence-weighted mean over axis 1 and the total weight ``[B, 1]`` (0 = nothing)."""
    weights = tf.cast(weights, embeddings.dtype)[..., tf.newaxis]
    total = tf.reduce_sum(weights, axis=1)
    return tf.reduce_sum(embeddings * weights, axis=1) / tf.maximum(total, 1e-6), total


@keras.utils.register_keras_serializable("tfrs_ctx")
class ContextLayer(keras.layers.Layer):
    """Interest categories of what the user is looking at -> a context vector.

    The categories' embeddings (a shared table passed in) are averaged with their confidence
    weights, then a dense layer with a high dropout rate. In training, the whole context of
    an example is dropped with probability ``drop_context``, so the model also learns the
    no-context case. Output: the vector and a has-context flag, ``[B, dim + 1]``, both scaled
    by ``trust``: a non-trainable scalar, 1 while training on synthetic context, chosen on real
    request context after training (``tfrs_ctx.training.calibrate``); at 0 the output is exactly the
    no-context output.
    """

    def __init__(self, dim: int, dropout: float = 0.5, drop_context: float = 0.3, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.dropout, self.drop_context, self.seed = dim, dropout, drop_context, seed
        self.dense = keras.layers.Dense(dim, activation="relu")
        self.drop = keras.layers.Dropout(dropout, seed=seed)
        self.trust = self.add_weight(name="trust", shape=(), initializer="ones", trainable=False)

    def call(self, category_embeddings: tf.Tensor, weights: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        weights = tf.cast(weights, tf.float32)
        if training and self.drop_context > 0:
            keep = tf.random.uniform([tf.shape(weights)[0], 1], seed=self.seed) >= self.drop_context
            weights = weights * tf.cast(keep, weights.dtype)
        pooled, total = weighted_average(category_embeddings, weights)
        has_context = tf.cast(total > 0, tf.float32)
        vector = self.drop(self.dense(pooled), training=training) * has_context
        return tf.concat([vector, has_context], axis=-1) * self.trust

    def get_config(self) -> dict:
        return _serializable(
            self, {"dim": self.dim, "dropout": self.dropout, "drop_context": self.drop_context, "seed": self.seed}
        )


def mask_states(states: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """``[B, N, d]`` states of the last ``N`` positions with the rows before the history's first event zeroed.

    Row ``j`` is a real state iff ``j >= N - min(length, N)`` (left padding): the mask is derived from
    ``history_length``, so the zero rows and the length are all a store needs to hold.
    """
    valid = valid_positions(length, tf.shape(states)[1])
    return tf.where(valid[..., tf.newaxis], states, tf.zeros_like(states))


@keras.utils.register_keras_serializable("tfrs_ctx")
class CrossAttentionFusion(keras.layers.Layer):
    """The context vector as the query of a multi-head attention over the last ``N`` encoded states.

    Inputs: ``query`` ``[B, q]`` (the context layer's output), ``states`` ``[B, N, d]`` and ``length``
    ``[B]`` (the history length: the states before the first event are masked, see :func:`mask_states`).
    Output ``[B, dim]``: the attention's output projection; zeros where no state is real (no history).
    A masked state never changes the output (its score is -1e9 before the softmax, its value zeroed).
    """

    def __init__(self, dim: int, heads: int = 2, **kwargs):
        super().__init__(**kwargs)
        if dim % heads:
            raise ValueError(f"cross-attention: dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads = dim, heads
        self.query_proj = keras.layers.Dense(dim, name="query")
        self.key_proj = keras.layers.Dense(dim, use_bias=False, name="key")
        self.value_proj = keras.layers.Dense(dim, name="value")
        self.output_proj = keras.layers.Dense(dim, name="output")

    def build(self, input_shape) -> None:
        # The key and value projections are applied folded (see call), never to a [B, N, d] tensor.
        self.key_proj.build((None, self.dim))
        self.value_proj.build((None, self.dim))
        super().build(input_shape)

    def call(self, query: tf.Tensor, states: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
        """Standard multi-head attention, computed with the key and value projections folded.

        Score of head h at state s: ``(W_q q)_h . (W_k s)_h = s . (W_k,h (W_q q)_h)``, and the attended
        value ``sum_n w_hn (W_v s_n + b_v)_h = W_v,h (sum_n w_hn s_n) + b_v,h``: two weighted sums
        over the ``[B, N, d]`` states instead of two projections of them (fewer ops online, the same
        numbers up to float rounding).
        """
        n, h, head_dim = tf.shape(states)[1], self.heads, self.dim // self.heads
        valid = tf.cast(valid_positions(length, n), states.dtype)[..., tf.newaxis]  # [B, N, 1]
        q = tf.reshape(self.query_proj(query), [-1, 1, h, head_dim])  # [B, 1, H, e]
        w_k = tf.reshape(self.key_proj.kernel, [self.dim, h, head_dim])  # [d, H, e]
        folded = tf.reduce_sum(q * w_k[tf.newaxis], axis=-1)  # [B, d, H]
        states = states * valid  # products and sums, not BatchMatMul: oneDNN's costs ~0.1-0.2 ms at N = 8
        scores = tf.reduce_sum(states[..., tf.newaxis] * folded[:, tf.newaxis], axis=2)  # [B, N, H]
        scores /= tf.sqrt(tf.cast(head_dim, states.dtype))
        scores += (1.0 - valid) * tf.cast(-1e9, scores.dtype)
        # The softmax over the N states (axis 1) written out: tf.nn.softmax on a non-last axis adds two
        # transposes, and it and the einsum it replaced were 60 % of the served head's CPU time at batch 1.
        scores = tf.exp(scores - tf.reduce_max(scores, axis=1, keepdims=True))
        weights = scores / tf.reduce_sum(scores, axis=1, keepdims=True) * valid  # [B, N, H]; 0 without a real state
        pooled = tf.reduce_sum(weights[:, :, tf.newaxis] * states[..., tf.newaxis], axis=1)  # [B, d, H]
        w_v = tf.reshape(self.value_proj.kernel, [self.dim, h, head_dim])  # [d, H, e]
        attended = tf.reduce_sum(pooled[..., tf.newaxis] * w_v[tf.newaxis], axis=1)  # [B, H, e]
        total = tf.reduce_sum(weights, axis=1)[..., tf.newaxis]  # [B, H, 1]
        attended += total * tf.reshape(self.value_proj.bias, [h, head_dim])
        any_state = tf.minimum(tf.reduce_sum(valid, axis=1), 1.0)  # [B, 1]
        return self.output_proj(tf.reshape(attended, [-1, self.dim])) * any_state

    def get_config(self) -> dict:
        return _serializable(self, {"dim": self.dim, "heads": self.heads})


@keras.utils.register_keras_serializable("tfrs_ctx")
class L2Normalize(keras.layers.Layer):
    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(x, axis=-1)


@keras.utils.register_keras_serializable("tfrs_ctx")
class MLP(keras.layers.Layer):
    """Dense stack ending in a linear layer of ``output_dim``, L2-normalised."""

    def __init__(self, hidden: list[int], output_dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.output_dim, self.dropout = list(hidden), output_dim, dropout
        self.layers_ = []
        for units in self.hidden:
            self.layers_ += [keras.layers.Dense(units, activation="relu"), keras.layers.Dropout(dropout)]
        self.layers_.append(keras.layers.Dense(output_dim))
        self.normalize = L2Normalize()

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        for layer in self.layers_:
            x = layer(x, training=training)
        return self.normalize(x)

    def get_config(self) -> dict:
        return _serializable(self, {"hidden": self.hidden, "output_dim": self.output_dim, "dropout": self.dropout})
