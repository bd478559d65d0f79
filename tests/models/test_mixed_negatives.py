"""Mixed negatives (``model.loss=mixed``): in-batch labels plus corpus ads sampled per step.

The loss is checked against a softmax computed by hand in numpy from the model's own embeddings
and the sampler's real draws; the correction against the exact full-softmax normaliser; the
accidental-hit removal on a batch where every negative is the label.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.config import ModelConfig, load_config
from tfrs_ctx.models.two_tower import LOSS_MIXED, ContextualTwoTower, CorpusNegatives, resolve_loss
from tfrs_ctx.testing import random_features, toy_corpus

N, B = 200, 32
VOCAB = {v: 12 for v in schema.VOCABULARIES} | {schema.VOCAB_ITEM: N + 2, schema.VOCAB_CATEGORY: 30}


def make_corpus(popularity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    corpus = toy_corpus(N, np.random.default_rng(0))
    zipf = 1.0 / np.arange(1, N + 1)
    corpus[schema.LABEL_SAMPLING_PROB] = (zipf / zipf.sum() if popularity is None else popularity).astype("float32")
    return corpus


def make_batch(corpus: dict[str, np.ndarray], seed: int = 0, labels: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(seed)
    out = random_features(B, N, rng)
    out[schema.HISTORY_TIME_GAP] = rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (B, schema.MAX_HISTORY))
    out[schema.HISTORY_LENGTH] = rng.integers(0, schema.MAX_HISTORY + 1, B)
    out[schema.CONTEXT_CATEGORIES] = rng.integers(2, 30, (B, schema.MAX_CATEGORIES))
    label = rng.integers(2, 20, B) if labels is None else labels  # popular ads: repeats within the batch
    out[schema.LABEL_ITEM] = label
    rows = label - schema.NUM_RESERVED_IDS
    for name in (schema.LABEL_ADVERTISER, schema.LABEL_CATEGORIES, schema.LABEL_CONFIDENCES):
        out[name] = corpus[name][rows]
    out[schema.LABEL_SAMPLING_PROB] = corpus[schema.LABEL_SAMPLING_PROB][rows]
    return {k: tf.constant(v) for k, v in out.items()}


def mixed_model(corpus, **kwargs) -> ContextualTwoTower:
    cfg = ModelConfig(loss="mixed", dropout=0.0, embedding_dim=16, ff_dim=32, mlp_hidden=[32], **kwargs)
    return ContextualTwoTower(cfg, VOCAB, corpus)


class RecordingSampler:
    """The model's real sampler, keeping what it drew (the hand computation needs the same rows)."""

    def __init__(self, negatives: CorpusNegatives):
        self.negatives, self.drawn = negatives, []
        self.sample_real = negatives.sample

    def __call__(self) -> tf.Tensor:
        rows = self.sample_real()
        self.drawn.append(rows.numpy())
        return rows


def test_mixed_loss_equals_a_hand_computed_softmax():
    corpus = make_corpus()
    model = mixed_model(corpus, sampled_negatives=300, sampled_popularity_share=0.5, no_context_loss_weight=0.0)
    x = make_batch(corpus)
    model.compute_loss(x)  # builds the towers
    recorder = RecordingSampler(model.negatives)
    model.negatives.sample = recorder
    loss = float(model.compute_loss(x))
    (rows,) = recorder.drawn

    queries = model.query_embedding(x).numpy()
    batch_ads = model.candidate_embedding(x).numpy()
    sampled = {name: tf.gather(model.corpus[name], rows) for name in schema.CANDIDATE_FEATURES}
    ads = np.concatenate([batch_ads, model.candidate_embedding(sampled).numpy()])
    labels = x[schema.LABEL_ITEM].numpy()
    ids = np.concatenate([labels, rows + schema.NUM_RESERVED_IDS])
    popularity = corpus[schema.LABEL_SAMPLING_PROB].astype(np.float64)
    popularity /= popularity.sum()
    q = 0.5 / N + 0.5 * popularity  # the sampler's distribution
    p = np.concatenate([x[schema.LABEL_SAMPLING_PROB].numpy(), popularity[rows]])
    expected = B * p + 300 * q[ids - schema.NUM_RESERVED_IDS]
    logits = queries @ ads.T / model.cfg.temperature - np.log(expected)[None]
    hits = ids[None, :] == labels[:, None]
    hits[np.arange(B), np.arange(B)] = False
    assert hits[:, B:].any() and hits[:, :B].any()  # both kinds of accidental hit happened and are removed
    logits[hits] = -np.inf
    by_hand = -(logits[np.arange(B), np.arange(B)] - np.logaddexp.reduce(logits, axis=1)).sum()
    assert loss == pytest.approx(by_hand, rel=1e-4)


@pytest.mark.parametrize("share", [0.0, 0.9])
def test_sampled_negatives_are_corrected_to_the_full_softmax_normaliser(share):
    """Corrected sampled logits estimate log sum_j exp(s_j) over the whole corpus, uniform or skewed draws."""
    corpus = make_corpus()
    negatives = CorpusNegatives(corpus, count=100_000, popularity_share=share)
    tf.random.set_seed(1)
    rows = negatives.sample().numpy()
    frequency = np.bincount(rows, minlength=N) / len(rows)
    q = negatives.q.numpy()
    assert (np.abs(frequency - q) < 6 * np.sqrt(q / len(rows))).all()  # the draws follow q
    scores = np.random.default_rng(2).normal(0, 2, N) + np.log(corpus[schema.LABEL_SAMPLING_PROB]) * 0.5
    exact = np.logaddexp.reduce(scores)
    counts = negatives.expected_counts(tf.constant([], tf.int64), tf.constant([], tf.float32), tf.constant(rows))
    np.testing.assert_allclose(counts.numpy(), len(rows) * q[rows], rtol=1e-5)
    corrected = np.logaddexp.reduce(scores[rows] - np.log(counts.numpy()))
    assert corrected == pytest.approx(exact, abs=0.05)
    if share:  # uncorrected (a uniform sampler's constant shift) it is far off
        assert abs(np.logaddexp.reduce(scores[rows] - np.log(len(rows) / N)) - exact) > 0.3


def test_accidental_hits_are_removed():
    """Every label and every sampled ad is the same ad: each row's softmax holds its own positive only."""
    popularity = np.zeros(N, np.float32)
    popularity[5] = 1.0
    corpus = make_corpus(popularity)
    model = mixed_model(corpus, sampled_negatives=64, sampled_popularity_share=1.0)
    x = make_batch(corpus, labels=np.full(B, 5 + schema.NUM_RESERVED_IDS))
    assert float(model.compute_loss(x)) == pytest.approx(0.0, abs=1e-4)
    # and one other label: its row now sees the 64 sampled copies of ad 5 as real negatives
    labels = np.full(B, 5 + schema.NUM_RESERVED_IDS)
    labels[0] = 9 + schema.NUM_RESERVED_IDS
    assert float(model.compute_loss(make_batch(corpus, labels=labels))) > 1.0


def test_mixed_training_lowers_the_loss():
    import tf_keras as keras

    corpus = make_corpus()
    model = mixed_model(corpus, sampled_negatives=128)
    model.compile(optimizer=keras.optimizers.Adam(5e-3))
    x = make_batch(corpus, seed=3, labels=np.random.default_rng(3).integers(2, N + 2, B))
    tf.random.set_seed(0)
    before = np.mean([float(model.compute_loss(x)) for _ in range(5)])
    model.fit(tf.data.Dataset.from_tensors(x).repeat(60), verbose=0)
    after = np.mean([float(model.compute_loss(x)) for _ in range(5)])
    assert after < before - 1.0


def test_auto_takes_mixed_above_the_full_softmax_threshold_and_mixed_needs_popularity():
    cfg = ModelConfig(full_softmax_max_items=100)
    assert resolve_loss(cfg, 100) == "full_softmax" and resolve_loss(cfg, 101) == LOSS_MIXED
    corpus = make_corpus()
    del corpus[schema.LABEL_SAMPLING_PROB]
    with pytest.raises(ValueError, match="popularity"):
        mixed_model(corpus)
    with pytest.raises(ValueError, match="sampled_negatives"):
        load_config("synthetic", ["model.loss=mixed", "model.sampled_negatives=0"])
