"""Layers: shapes, masks (padding never changes the output), get_config round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfrs_ctx import schema
from tfrs_ctx.models import layers

L, D = schema.MAX_HISTORY, 16


def _encoder(causal: bool = True) -> layers.SequenceEncoder:
    enc = layers.SequenceEncoder(L, D, blocks=2, heads=2, ff_dim=32, dropout=0.0, causal=causal)
    return enc


@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_changes_the_encoder_output(causal):
    rng = np.random.default_rng(0)
    enc = _encoder(causal)
    events = rng.normal(size=(4, L, D)).astype("float32")
    length = np.array([0, 1, 7, L])
    out = enc(events, length).numpy()
    # Overwrite every padding position with garbage: the output must not move.
    garbage = events.copy()
    for b, n in enumerate(length):
        garbage[b, : L - n] = rng.normal(scale=100.0, size=(L - n, D))
    out2 = enc(garbage, length).numpy()
    np.testing.assert_allclose(out[1:], out2[1:], atol=1e-5)
    assert out.shape == (4, D)
    assert np.isfinite(out).all()


def test_causal_mask_hides_the_future_and_padding():
    valid = tf.constant([[False, True, True]])
    causal = layers.attention_mask(valid, causal=True).numpy()[0]
    # the padding query attends to itself only (never to a later event); real queries to real keys <= them
    assert causal.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    full = layers.attention_mask(valid, causal=False).numpy()[0]
    assert full.tolist() == [[True, True, True], [False, True, True], [False, True, True]]


def test_valid_positions_are_left_padded():
    v = layers.valid_positions(tf.constant([0, 2, 5]), 5).numpy()
    assert v.tolist() == [[False] * 5, [False, False, False, True, True], [True] * 5]


def test_context_layer_weights_and_missing_context():
    ctx = layers.ContextLayer(dim=8, dropout=0.0, drop_context=0.0)
    emb = tf.constant(np.random.default_rng(1).normal(size=(3, schema.MAX_CATEGORIES, 4)).astype("float32"))
    w = np.zeros((3, schema.MAX_CATEGORIES), "float32")
    w[0, :2] = [0.9, 0.1]
    w[1, :2] = [0.45, 0.05]  # same proportions, different scale -> same average
    out = ctx(emb[:2], w[:2]).numpy()
    assert out.shape == (2, 9)
    # Weighted average, not sum: proportional weights give the same vector when embeddings match.
    emb2 = tf.concat([emb[:1], emb[:1]], 0)
    same = ctx(emb2, w[:2]).numpy()
    np.testing.assert_allclose(same[0], same[1], atol=1e-6)
    empty = ctx(emb[2:], w[2:]).numpy()
    assert empty[0, -1] == 0.0 and np.all(empty[0, :-1] == 0.0)  # no context: zero vector, flag 0
    assert out[0, -1] == 1.0


def test_context_layer_drops_whole_context_in_training_only():
    ctx = layers.ContextLayer(dim=8, dropout=0.0, drop_context=1.0)
    emb = tf.ones((5, schema.MAX_CATEGORIES, 4))
    w = tf.ones((5, schema.MAX_CATEGORIES))
    assert np.all(ctx(emb, w, training=True).numpy()[:, -1] == 0.0)
    assert np.all(ctx(emb, w, training=False).numpy()[:, -1] == 1.0)


@pytest.mark.parametrize(
    "layer",
    [
        layers.PositionalEmbedding(L, D),
        layers.TransformerBlock(D, 2, 32, 0.1, causal=False),
        layers.SequenceEncoder(L, D, blocks=3, heads=4, ff_dim=24, dropout=0.2, causal=False),
        layers.ContextLayer(12, dropout=0.6, drop_context=0.25, seed=3),
        layers.MLP([32, 16], 8, dropout=0.1),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(revived) is type(layer) and revived.get_config() == config


def test_mlp_output_is_normalised():
    out = layers.MLP([8], 4)(tf.random.normal((6, 5))).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
