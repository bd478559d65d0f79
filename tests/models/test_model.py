"""The two-tower model: the baseline flag, no-history path, loss on a small real fit."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.config import ModelConfig
from tfrs_ctx.models.two_tower import ContextualTwoTower
from tfrs_ctx.testing import toy_corpus

N, B = 200, 32


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    corpus = toy_corpus(N, rng)
    corpus[schema.LABEL_SAMPLING_PROB] = rng.random(N).astype("float32")  # popularity: mixed negatives' sampler
    return corpus


VOCAB = {v: 12 for v in schema.VOCABULARIES} | {schema.VOCAB_ITEM: N + 2, schema.VOCAB_CATEGORY: 30}


def batch(seed: int = 0) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for f in schema.FEATURES.values():
        shape = (B, *f.shape)
        out[f.name] = rng.integers(2, 12, shape) if f.dtype == "int64" else rng.random(shape).astype("float32")
    out[schema.HISTORY_ITEM] = rng.integers(2, N + 2, (B, schema.MAX_HISTORY))
    for name in (schema.HISTORY_TIME_GAP, schema.HISTORY_NEXT_GAP):
        out[name] = rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (B, schema.MAX_HISTORY))
    out[schema.HISTORY_LENGTH] = rng.integers(0, schema.MAX_HISTORY + 1, B)
    out[schema.CONTEXT_CATEGORIES] = rng.integers(2, 30, (B, schema.MAX_CATEGORIES))
    out[schema.LABEL_ITEM] = rng.integers(2, N + 2, B)
    return {k: tf.constant(v) for k, v in out.items()}


def test_baseline_flag_removes_the_context_path(corpus):
    base = ContextualTwoTower(ModelConfig(use_context=False, dropout=0.0), VOCAB, corpus)
    ctx = ContextualTwoTower(ModelConfig(use_context=True, dropout=0.0), VOCAB, corpus)
    x = batch()
    base(x), ctx(x)
    assert base.context_layer is None
    assert not [v for v in base.trainable_variables if "context_layer" in v.name]
    assert [v for v in ctx.trainable_variables if "context_layer" in v.name]
    shuffled = dict(x)
    shuffled[schema.CONTEXT_CATEGORIES] = tf.reverse(x[schema.CONTEXT_CATEGORIES], [0])
    shuffled[schema.CONTEXT_WEIGHTS] = tf.reverse(x[schema.CONTEXT_WEIGHTS], [0])
    np.testing.assert_allclose(base(x).numpy(), base(shuffled).numpy(), atol=1e-6)
    assert not np.allclose(ctx(x).numpy(), ctx(shuffled).numpy(), atol=1e-4)


def test_empty_history_uses_the_learned_no_history_vector(corpus):
    m = ContextualTwoTower(ModelConfig(dropout=0.0), VOCAB, corpus)
    x = batch()
    x[schema.HISTORY_LENGTH] = tf.zeros_like(x[schema.HISTORY_LENGTH])
    y = dict(x)
    y[schema.HISTORY_ITEM] = tf.reverse(x[schema.HISTORY_ITEM], [0])
    encoded = m.encode_history(x)
    np.testing.assert_allclose(m.head(encoded, x).numpy(), m.head(m.encode_history(y), y).numpy(), atol=1e-6)


@pytest.mark.parametrize("full_softmax", [True, False])
def test_loss_decreases(corpus, full_softmax):
    import tf_keras as keras

    loss = "full_softmax" if full_softmax else "in_batch"  # mixed: tests/models/test_mixed_negatives.py
    cfg = ModelConfig(loss=loss, embedding_dim=16, ff_dim=32, mlp_hidden=[32])
    m = ContextualTwoTower(cfg, VOCAB, corpus)
    assert m.full_softmax is full_softmax
    m.compile(optimizer=keras.optimizers.Adam(5e-3))
    ds = tf.data.Dataset.from_tensors(batch(1)).repeat(40)
    history = m.fit(ds, epochs=2, verbose=0).history["loss"]
    first = m.evaluate(tf.data.Dataset.from_tensors(batch(1)), verbose=0, return_dict=True)["loss"]
    assert history[-1] < history[0]
    assert first < history[0]


def test_no_context_loss_is_the_same_examples_loss_with_context_cleared(corpus):
    from tfrs_ctx.models.two_tower import without_context

    x = batch(2)
    plain = ContextualTwoTower(ModelConfig(dropout=0.0, no_context_loss_weight=0.0), VOCAB, corpus)
    aux = ContextualTwoTower(ModelConfig(dropout=0.0, no_context_loss_weight=0.5), VOCAB, corpus)
    plain.compute_loss(x), aux.compute_loss(x)  # builds both towers
    aux.set_weights(plain.get_weights())
    with_ctx = float(plain.compute_loss(x))
    cleared = float(plain.compute_loss(without_context(x)))
    assert with_ctx != pytest.approx(cleared)
    assert float(aux.compute_loss(x)) == pytest.approx(with_ctx + 0.5 * cleared, rel=1e-5)


def test_context_trust_zero_gives_exactly_the_no_context_embedding(corpus):
    from tfrs_ctx.models.two_tower import without_context

    m = ContextualTwoTower(ModelConfig(dropout=0.0), VOCAB, corpus)
    x = batch(3)
    m(x)
    assert not np.allclose(m(x).numpy(), m(without_context(x)).numpy(), atol=1e-4)
    m.context_layer.trust.assign(0.0)
    np.testing.assert_allclose(m(x).numpy(), m(without_context(x)).numpy(), atol=1e-6)


def test_calibration_trusts_context_only_where_it_carries_signal(corpus):
    """Trained where history and context both point at the label; the trust is then chosen on
    requests whose context is random (-> low trust) or whose history is random (-> high)."""
    import tf_keras as keras

    from tfrs_ctx.training.calibrate import TRUST_GRID, choose_trust

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(embedding_dim=16, ff_dim=32, mlp_hidden=[32], dropout=0.0, no_context_loss_weight=0.0)
    m = ContextualTwoTower(cfg, VOCAB, corpus)
    m.compile(optimizer=keras.optimizers.Adam(5e-3))

    def requests(seed: int, history: bool, context: bool) -> dict[str, tf.Tensor]:
        x = batch(seed)
        if history:  # the label's own item, viewed before
            x[schema.HISTORY_ITEM] = tf.tile(x[schema.LABEL_ITEM][:, None], [1, schema.MAX_HISTORY])
            x[schema.HISTORY_LENGTH] = tf.fill([B], tf.constant(schema.MAX_HISTORY, tf.int64))
        if context:  # the label's categories
            rows = x[schema.LABEL_ITEM] - schema.NUM_RESERVED_IDS
            x[schema.CONTEXT_CATEGORIES] = tf.gather(tf.constant(corpus[schema.LABEL_CATEGORIES]), rows)
        return x

    train = [requests(s, history=s % 3 != 0, context=s % 3 != 1) for s in range(10, 40)]
    ds = tf.data.Dataset.from_tensor_slices({k: tf.concat([x[k] for x in train], 0) for k in train[0]})
    m.fit(ds.batch(B).repeat(10), verbose=0)
    assert float(m.context_layer.trust.numpy()) == 1.0  # not trained by fit: non-trainable

    random_context = [requests(s, history=True, context=False) for s in range(100, 116)]
    trust, recalls = choose_trust(m, random_context, k=10)
    assert set(recalls) == set(TRUST_GRID) and float(m.context_layer.trust.numpy()) == pytest.approx(trust)
    assert trust < 1.0 and recalls[trust] == max(recalls.values()) > recalls[4.0]

    random_history = [requests(s, history=False, context=True) for s in range(200, 216)]
    trust, recalls = choose_trust(m, random_history, k=10)
    assert trust >= 1.0 and recalls[trust] == max(recalls.values()) > recalls[0.0] + 0.1


# ---- dense training (batches of sequence examples) ------------------------------------
L = schema.MAX_HISTORY


def sequence_batch(seed: int = 0, rows: int = 8) -> dict[str, tf.Tensor]:
    """Random sequence examples, left-padded, with a target at every position from the first input on."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in schema.SEQUENCE_FEATURES.values():
        shape = (rows, *f.shape)
        out[f.name] = rng.integers(2, 12, shape) if f.dtype == "int64" else rng.random(shape).astype("float32")
    length = rng.integers(1, L, rows)
    first = L - length
    position = np.arange(L)[None, :]
    real = position >= first[:, None]
    out[schema.HISTORY_LENGTH] = length
    out[schema.HISTORY_ITEM] = np.where(real, rng.integers(2, N + 2, (rows, L)), 0)
    out[schema.HISTORY_TIME_GAP] = rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (rows, L))
    for name in (schema.HISTORY_ADVERTISER, schema.HISTORY_EVENT_TYPE, schema.HISTORY_TIME_GAP):
        out[name] = np.where(real, out[name], 0)
    targets = position >= (first - 1)[:, None]  # the position before the first input: a first-event target
    out[schema.SEQ_LABEL_ITEM] = np.where(targets, rng.integers(2, N + 2, (rows, L)), 0)
    out[schema.SEQ_CONTEXT_CATEGORIES] = rng.integers(2, 30, (rows, L, schema.MAX_CATEGORIES))
    for name in schema.SEQ_TARGET_FEATURES:
        if name != schema.SEQ_LABEL_ITEM:
            mask = targets.reshape(rows, L, *([1] * (out[name].ndim - 2)))
            out[name] = np.where(mask, out[name], 0).astype(out[name].dtype)
    return {k: tf.constant(v) for k, v in out.items()}


def dense_model(corpus, **kwargs) -> ContextualTwoTower:
    cfg = ModelConfig(dropout=0.0, time_gap=schema.TIME_GAP_NEXT_EVENT, **kwargs)
    model = ContextualTwoTower(cfg, VOCAB, corpus)
    model(batch())
    return model


def seeded_loss(model: ContextualTwoTower, x: dict[str, tf.Tensor]) -> float:
    """The loss with the random draws reset first (mixed negatives: the same sampled ads every call)."""
    tf.random.set_seed(11)
    return float(model.compute_loss(x))


@pytest.mark.parametrize("loss", ["full_softmax", "in_batch", "mixed"])
def test_padding_positions_never_change_the_dense_loss(corpus, loss):
    model = dense_model(corpus, loss=loss)
    x = sequence_batch(1)
    loss = seeded_loss(model, x)
    rng = np.random.default_rng(5)
    noisy = {}
    pad_inputs = ~model_valid(x)
    no_target = x[schema.SEQ_LABEL_ITEM].numpy() == schema.PAD_ID
    for name, value in x.items():
        v = value.numpy().copy()
        if name in schema.HISTORY_FEATURES:  # garbage in the padding inputs
            v[pad_inputs] = rng.integers(2, 11, v[pad_inputs].shape)
        elif name in schema.SEQ_TARGET_FEATURES and name != schema.SEQ_LABEL_ITEM:  # and in target-less positions
            v[no_target] = rng.integers(2, 12, v[no_target].shape).astype(v.dtype)
        noisy[name] = tf.constant(v)
    assert seeded_loss(model, noisy) == pytest.approx(loss, rel=1e-5)
    # one more all-padding row (no input, no target) changes nothing either
    padded = {}
    for name, value in x.items():
        extra = tf.zeros_like(value[:1])
        padded[name] = tf.concat([value, extra], axis=0)
    assert seeded_loss(model, padded) == pytest.approx(loss, rel=1e-5)


def model_valid(x) -> np.ndarray:
    length = x[schema.HISTORY_LENGTH].numpy()
    return np.arange(L)[None, :] >= (L - length)[:, None]


def test_a_position_never_sees_its_own_label_or_later_events(corpus):
    model = dense_model(corpus)
    x = sequence_batch(2)
    q = L - 5  # every row has at least one input before or at q? rows with first > q: states there are unused
    states = model.encode_history(x, all_positions=True).numpy()
    changed = {}
    rng = np.random.default_rng(9)
    for name, value in x.items():
        v = value.numpy().copy()
        if name in schema.HISTORY_FEATURES:  # every later input (events after position q's target)
            v[:, q + 1 :] = rng.integers(2, 11, v[:, q + 1 :].shape)
        if name in schema.SEQ_TARGET_FEATURES:  # its own label and every later one
            v[:, q:] = rng.integers(2, 12, v[:, q:].shape).astype(v.dtype)
        changed[name] = tf.constant(v)
    after = model.encode_history(changed, all_positions=True).numpy()
    np.testing.assert_allclose(after[:, : q + 1], states[:, : q + 1], atol=1e-5)
    assert not np.allclose(after[:, q + 1 :], states[:, q + 1 :], atol=1e-3)
    # the last state is what the per-target encoder (and the feature store) computes
    np.testing.assert_allclose(states[:, -1], model.encode_history(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("use_context,loss", [(True, "auto"), (False, "auto"), (True, "mixed")])
def test_dense_and_per_target_losses_agree_on_a_one_target_sequence(corpus, use_context, loss):
    model = dense_model(corpus, use_context=use_context, loss=loss)
    seq = {k: v.numpy() for k, v in sequence_batch(3).items()}
    one = {k: v.copy() for k, v in seq.items()}
    for name in schema.SEQ_TARGET_FEATURES:  # keep the last position's target only
        one[name][:, :-1] = 0
    per_target = {k: v.numpy() for k, v in batch(4).items()}
    per_target = {k: v[: len(seq[schema.HISTORY_LENGTH])] for k, v in per_target.items()}
    for name in (*schema.HISTORY_FEATURES, schema.HISTORY_LENGTH, *schema.DEMOGRAPHIC_FEATURES):
        per_target[name] = seq[name]
    per_target[schema.HISTORY_NEXT_GAP] = seq[schema.HISTORY_TIME_GAP]  # the dense model's gap semantics
    for name, target in schema.SEQ_TARGET_FEATURES.items():
        per_target[target] = seq[name][:, -1]
    dense = seeded_loss(model, {k: tf.constant(v) for k, v in one.items()})
    single = seeded_loss(model, {k: tf.constant(v) for k, v in per_target.items()})
    assert dense == pytest.approx(single, rel=1e-5)


def test_dense_loss_decreases(corpus):
    import tf_keras as keras

    model = dense_model(corpus)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    x = sequence_batch(6, rows=16)
    first = float(model.compute_loss(x))
    for _ in range(15):
        model.train_step(x)
    assert float(model.compute_loss(x)) < first


@pytest.mark.parametrize("loss", ["full_softmax", "in_batch", "mixed"])
def test_dense_target_weights_scale_each_target_loss(corpus, loss):
    from tfrs_ctx.models.two_tower import SEQ_TARGET_WEIGHT

    model = dense_model(corpus, loss=loss)
    x = sequence_batch(7)
    target = tf.cast(x[schema.SEQ_LABEL_ITEM] != schema.PAD_ID, tf.float32)
    plain = seeded_loss(model, x)
    assert seeded_loss(model, {**x, SEQ_TARGET_WEIGHT: target}) == pytest.approx(plain, rel=1e-5)
    assert seeded_loss(model, {**x, SEQ_TARGET_WEIGHT: 3.0 * target}) == pytest.approx(3 * plain, rel=1e-5)
    # weight 0 on one row's targets: the loss moves, and garbage weights in its padding change nothing
    rows = tf.cast(tf.range(8) != 2, tf.float32)[:, tf.newaxis]
    some = seeded_loss(model, {**x, SEQ_TARGET_WEIGHT: target * rows})
    assert some < plain
    noisy = target * rows + (1 - target) * 5.0
    assert seeded_loss(model, {**x, SEQ_TARGET_WEIGHT: noisy}) == pytest.approx(some, rel=1e-5)


def test_dense_state_positions_pick_an_earlier_state(corpus):
    from tfrs_ctx.models.two_tower import SEQ_STATE_POSITION

    model = dense_model(corpus)
    x = sequence_batch(8)
    own = tf.broadcast_to(tf.range(L, dtype=tf.int64)[tf.newaxis], x[schema.SEQ_LABEL_ITEM].shape)
    encoded, flat = model.dense_targets(x)
    same, _ = model.dense_targets({**x, SEQ_STATE_POSITION: own})
    np.testing.assert_allclose(same.numpy(), encoded.numpy())
    back = tf.maximum(own - 1, 0)  # every target scored from the state one position earlier
    earlier, flat_back = model.dense_targets({**x, SEQ_STATE_POSITION: back})
    states = model.encode_history(x, all_positions=True).numpy()
    where = np.argwhere(x[schema.SEQ_LABEL_ITEM].numpy() != schema.PAD_ID)
    np.testing.assert_allclose(earlier.numpy(), states[where[:, 0], np.maximum(where[:, 1] - 1, 0)], atol=1e-6)
    # the history length is the earlier position's (one event fewer; 0 before the first input)
    np.testing.assert_array_equal(
        flat_back[schema.HISTORY_LENGTH].numpy(), np.maximum(flat[schema.HISTORY_LENGTH].numpy() - 1, 0)
    )


def test_corpus_embeddings_in_blocks_equal_one_call(corpus, monkeypatch):
    """Eager corpus embeddings run the tower over blocks (memory at 10M ads); the rows are the same."""
    from tfrs_ctx.models import two_tower

    m = ContextualTwoTower(ModelConfig(dropout=0.0), VOCAB, corpus)
    whole = m.corpus_embeddings().numpy()
    monkeypatch.setattr(two_tower, "CORPUS_BLOCK", 7)  # N is not a multiple of 7: a short last block
    assert N % 7
    blocked = m.corpus_embeddings().numpy()
    np.testing.assert_array_equal(m.corpus_embeddings_array(), blocked)  # export's: one preallocated array
    assert blocked.shape == whole.shape == (N, ModelConfig().output_dim)
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-6)
    graph = tf.function(m.corpus_embeddings)().numpy()  # in a graph (the full-softmax loss): one call
    np.testing.assert_allclose(graph, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", ["full_softmax", "in_batch", "mixed"])
def test_dense_no_context_share_over_every_target_is_the_plain_loss(corpus, loss):
    # a share just under 1 draws every target (in a random order): the subset path must give the plain loss
    x = sequence_batch(9)
    rows = tf.constant(np.arange(0, N, 3), tf.int64)  # mixed: the same sampled ads whatever else is drawn

    def fixed(model: ContextualTwoTower) -> ContextualTwoTower:
        if model.negatives is not None:
            model.negatives.sample = lambda: rows
        model.compute_loss(x)  # builds the candidate tower too
        return model

    plain = fixed(dense_model(corpus, loss=loss))

    def with_share(share: float) -> ContextualTwoTower:
        model = fixed(ContextualTwoTower(plain.cfg, VOCAB, corpus, dense_no_context_share=share))
        model.set_weights(plain.get_weights())
        return model

    assert seeded_loss(with_share(0.999), x) == pytest.approx(seeded_loss(plain, x), rel=1e-5)
    # a real subset: another estimate of the same loss (close on an untrained model, where every target's
    # loss is near log(candidates): so the same tolerance as above, not a wider one)
    assert seeded_loss(with_share(0.5), x) != pytest.approx(seeded_loss(plain, x), rel=1e-5)


def test_mixed_loss_of_a_subset_of_queries_is_their_share_of_the_batch_loss():
    from tfrs_ctx.models.two_tower import mixed_softmax_loss

    rng = np.random.default_rng(3)
    q, c = tf.constant(rng.normal(size=(12, 8)), tf.float32), tf.constant(rng.normal(size=(20, 8)), tf.float32)
    ids = tf.constant(rng.integers(2, 9, 20))  # repeats: accidental hits to mask
    log_counts = tf.constant(rng.normal(size=20), tf.float32)
    subset = tf.constant([1, 4, 5, 10])
    indicator = tf.scatter_nd(subset[:, tf.newaxis], tf.ones(4), [12])
    whole = mixed_softmax_loss(q, c, ids, log_counts, 0.1, indicator)
    part = mixed_softmax_loss(tf.gather(q, subset), c, ids, log_counts, 0.1, positives=subset)
    assert float(part) == pytest.approx(float(whole), rel=1e-5)


def test_dense_training_with_a_no_context_share_lowers_the_loss(corpus):
    import tf_keras as keras

    cfg = ModelConfig(dropout=0.0, time_gap=schema.TIME_GAP_NEXT_EVENT, loss="mixed", sampled_negatives=64)
    model = ContextualTwoTower(cfg, VOCAB, corpus, dense_no_context_share=0.25)
    model(batch())
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    x = sequence_batch(6, rows=16)
    first = seeded_loss(model, x)
    for _ in range(15):
        model.train_step(x)
    assert seeded_loss(model, x) < first
