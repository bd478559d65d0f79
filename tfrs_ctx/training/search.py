"""Training the search surface (``model.search_query``): each target trains one surface.

A ``train`` example of search-capable data carries two synthetic contexts written from its label:
the categories (the related-items surface) and a query (:mod:`tfrs_ctx.data.search_context`). A
real request brings one of them, never both, so each target keeps one: its query with probability
``train.search_share`` (its categories cleared), else its categories (its query cleared). The
choice is a seeded draw per example in the input pipeline; the context dropout and the no-context
loss then act on whichever block is left.
"""

from __future__ import annotations

import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.models.two_tower import no_query


def one_surface(features: dict[str, tf.Tensor], share: float, seed: int) -> dict[str, tf.Tensor]:
    """A batch of ``train`` examples with one surface's context each (see the module docstring)."""
    features = dict(features)
    queries = features[schema.CONTEXT_QUERY]
    search = tf.random.uniform(tf.shape(queries), seed=seed + 11) < share
    features[schema.CONTEXT_QUERY] = tf.where(search, queries, no_query(queries))
    for name in schema.CONTEXT_FEATURES:
        values = features[name]
        features[name] = tf.where(search[:, tf.newaxis], tf.zeros_like(values), values)
    return features
