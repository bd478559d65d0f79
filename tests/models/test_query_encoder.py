"""The search query encoder: in-graph normalisation, hashed words and n-grams, SavedModel round trip."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfrs_ctx.models.query_encoder import QueryEncoder, char_ngrams, normalize_query, query_words

ODD = ["Red  Running-Shoes!", "", "   ...  ", "ÉTÉ Été", "a_b", "x", "Ünïcode\tTABS\nnew", "v2 4k-TV", "ﬁne"]


def _decoded(ragged: tf.RaggedTensor) -> list[list[str]]:
    return [[w.decode() for w in row] for row in ragged.to_list()]


def test_graph_normalisation_is_the_python_rule():
    words = _decoded(query_words(tf.constant(ODD), max_words=16))
    assert [" ".join(w) for w in words] == [normalize_query(q) for q in ODD]
    assert words[0] == ["red", "running", "shoes"] and words[1] == [] and words[2] == []


def test_char_ngrams_mark_word_boundaries_and_keep_short_words():
    grams = _decoded(char_ngrams(query_words(tf.constant(["ab", "a", "shoe"]), 16), 3))
    assert grams == [["<ab", "ab>"], ["<a>"], ["<sh", "sho", "hoe", "oe>"]]


def test_empty_queries_embed_to_zero_and_are_absent():
    enc = QueryEncoder(8, word_buckets=64, ngram_buckets=64, embedding_dim=4)
    q = tf.constant(["red shoes", "", "?!", "shoes"])
    out = enc(q).numpy()
    assert np.all(out[1:3] == 0) and np.abs(out[[0, 3]]).sum() > 0
    assert enc.present(q).numpy().tolist() == [True, False, False, True]


def test_a_misspelling_shares_most_ngrams_and_word_order_does_not_matter():
    enc = QueryEncoder(8)
    (w1, n1), (w2, n2) = enc.tokens(tf.constant(["running shoes"])), enc.tokens(tf.constant(["runing shoes"]))
    a, b = set(n1.flat_values.numpy()), set(n2.flat_values.numpy())
    assert len(a & b) / len(a | b) > 0.6 and set(w1.flat_values.numpy()) != set(w2.flat_values.numpy())
    out = enc(tf.constant(["red shoes", "shoes red", "SHOES, red!"])).numpy()
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)


def test_max_words_keeps_the_first_words():
    enc = QueryEncoder(8, max_words=2)
    out = enc(tf.constant(["red shoes", "red shoes and more words"])).numpy()
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_saved_model_serves_raw_strings_and_config_round_trips(tmp_path):
    enc = QueryEncoder(8, word_buckets=128, ngram_buckets=256, embedding_dim=4)
    queries = tf.constant(ODD)
    expected = enc(queries).numpy()
    module = tf.Module()
    module.enc = enc
    spec = [tf.TensorSpec([None], tf.string)]
    module.serve = tf.function(lambda q: {"query_embedding": enc(q)}, input_signature=spec)
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    served = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    np.testing.assert_allclose(served(q=queries)["query_embedding"].numpy(), expected, atol=1e-6)

    clone = QueryEncoder.from_config(enc.get_config())
    assert clone.get_config() == enc.get_config()
    clone(queries[:1])
    clone.set_weights(enc.get_weights())
    np.testing.assert_allclose(clone(queries).numpy(), expected, atol=1e-6)
    assert isinstance(keras.layers.deserialize(keras.layers.serialize(enc)), QueryEncoder)
    with pytest.raises(ValueError, match="ngram"):
        QueryEncoder(8, ngram=1)
