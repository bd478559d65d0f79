"""The search surface's context: a raw query string embedded in the graph with core ``tf.strings`` ops.

The served model takes the query text exactly as the user typed it (a ``[B]`` string tensor), so
no tokenizer runs outside the graph and a stock ``tensorflow_model_server`` serves it:

1. normalise: Unicode-aware lower case, every run of characters that is not a letter or digit
   becomes one space (:data:`NORMALIZE_PATTERN`; :func:`normalize_query` is the same rule in
   Python, for tests and logs);
2. words: split on spaces, at most ``max_words`` (the first ones) per query;
3. hashed word embeddings (FarmHash fingerprint buckets, stable across TF versions and
   platforms) and hashed character n-grams of each word with boundary marks (``<ab>`` gives
   ``<ab``, ``ab>`` for n = 3), so a misspelt or unseen word still shares most of its n-grams
   with the word it means;
4. each bag mean-pooled per query, concatenated, projected to ``dim``.

An empty (or all-punctuation) query is the absence of a query: its embedding is zeros and
:meth:`QueryEncoder.present` is false, which the context layer treats as "no context".
"""

from __future__ import annotations

import re

import tensorflow as tf
import tf_keras as keras

NORMALIZE_PATTERN = r"[^\p{L}\p{N}]+"  # RE2 (tf.strings.regex_replace)
_PY_PATTERN = re.compile(r"[\W_]+", re.UNICODE)


def normalize_query(text: str) -> str:
    """The graph's normalisation in Python: lower case, non-alphanumeric runs to one space."""
    return " ".join(_PY_PATTERN.sub(" ", text.lower()).split())


def query_words(queries: tf.Tensor, max_words: int) -> tf.RaggedTensor:
    """``[B]`` raw strings -> ``[B, (words)]`` normalised words (at most ``max_words`` each)."""
    text = tf.strings.lower(queries, encoding="utf-8")
    text = tf.strings.regex_replace(text, NORMALIZE_PATTERN, " ")
    return tf.strings.split(tf.strings.strip(text))[:, :max_words]


def char_ngrams(words: tf.RaggedTensor, n: int) -> tf.RaggedTensor:
    """``[B, (words)]`` -> ``[B, (n-grams)]``: every word's character n-grams, with ``<`` ``>`` marks.

    A marked word shorter than ``n`` characters is kept whole as its one n-gram.
    """
    marked = tf.strings.join(["<", words, ">"])
    chars = tf.strings.unicode_split(marked, "UTF-8")  # [B, W, C]
    grams = tf.strings.ngrams(chars, n, separator="", preserve_short_sequences=True)
    return grams.merge_dims(1, 2)


def _bag_mean(ids: tf.RaggedTensor, table: keras.layers.Embedding) -> tf.Tensor:
    vectors = tf.ragged.map_flat_values(table, ids)
    count = tf.cast(ids.row_lengths(), vectors.dtype)[:, tf.newaxis]
    return tf.reduce_sum(vectors, axis=1) / tf.maximum(count, 1.0)


@keras.utils.register_keras_serializable("tfrs_ctx")
class QueryEncoder(keras.layers.Layer):
    """``[B]`` raw query strings -> ``[B, dim]`` (zeros for an empty query)."""

    def __init__(
        self,
        dim: int,
        word_buckets: int = 1 << 17,
        ngram_buckets: int = 1 << 17,
        ngram: int = 3,
        embedding_dim: int = 32,
        max_words: int = 16,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {ngram}")
        self.dim, self.word_buckets, self.ngram_buckets = dim, word_buckets, ngram_buckets
        self.ngram, self.embedding_dim, self.max_words = ngram, embedding_dim, max_words
        self.words = keras.layers.Embedding(word_buckets, embedding_dim, name="word_buckets")
        self.ngrams = keras.layers.Embedding(ngram_buckets, embedding_dim, name="ngram_buckets")
        self.project = keras.layers.Dense(dim, activation="gelu", name="project")

    def tokens(self, queries: tf.Tensor) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
        """The hashed word and n-gram bucket ids of each query (ragged, ``[B, (tokens)]``)."""
        words = query_words(queries, self.max_words)
        word_ids = tf.strings.to_hash_bucket_fast(words, self.word_buckets)
        ngram_ids = tf.strings.to_hash_bucket_fast(char_ngrams(words, self.ngram), self.ngram_buckets)
        return word_ids, ngram_ids

    def present(self, queries: tf.Tensor) -> tf.Tensor:
        """``[B]`` bool: the query holds at least one word."""
        return query_words(queries, self.max_words).row_lengths() > 0

    def embed(self, queries: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``[B, dim]`` embeddings and the ``[B, 1]`` float has-a-word flag, from one tokenisation."""
        queries = tf.reshape(queries, [-1])
        word_ids, ngram_ids = self.tokens(queries)
        pooled = tf.concat([_bag_mean(word_ids, self.words), _bag_mean(ngram_ids, self.ngrams)], axis=-1)
        present = tf.cast(word_ids.row_lengths() > 0, pooled.dtype)[:, tf.newaxis]
        return self.project(pooled) * present, present

    def call(self, queries: tf.Tensor) -> tf.Tensor:
        return self.embed(queries)[0]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            dim=self.dim,
            word_buckets=self.word_buckets,
            ngram_buckets=self.ngram_buckets,
            ngram=self.ngram,
            embedding_dim=self.embedding_dim,
            max_words=self.max_words,
        )
        return config


@keras.utils.register_keras_serializable("tfrs_ctx")
class QueryContextLayer(keras.layers.Layer):
    """The search surface's context block: ``[B]`` raw queries -> ``[B, dim + 1]`` (vector, has-query flag).

    The search counterpart of :class:`tfrs_ctx.models.layers.ContextLayer`: the
    :class:`QueryEncoder` vector, a dropout, the whole query dropped with ``drop_context`` in
    training, and its own non-trainable ``trust`` (1 as trained, chosen on logged search requests
    after training: :func:`tfrs_ctx.training.calibrate.calibrate_search`); at trust 0 (or an empty
    query) the block is exactly zero, the no-query answer.
    """

    def __init__(
        self,
        dim: int,
        dropout: float = 0.0,
        drop_context: float = 0.0,
        buckets: int = 1 << 16,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim, self.dropout, self.drop_context, self.buckets, self.seed = dim, dropout, drop_context, buckets, seed
        self.encoder = QueryEncoder(dim, word_buckets=buckets, ngram_buckets=buckets, name="query_encoder")
        self.drop = keras.layers.Dropout(dropout, seed=seed)
        self.trust = self.add_weight(name="trust", shape=(), initializer="ones", trainable=False)

    def call(self, queries: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        vector, present = self.encoder.embed(queries)  # one tokenisation serves both
        if training and self.drop_context > 0:
            present *= tf.cast(tf.random.uniform(tf.shape(present), seed=self.seed) >= self.drop_context, tf.float32)
        vector = self.drop(vector, training=training) * present
        return tf.concat([vector, present], axis=-1) * self.trust

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            dim=self.dim, dropout=self.dropout, drop_context=self.drop_context, buckets=self.buckets, seed=self.seed
        )
        return config
