"""The search surface in the model (model.search_query): the query block, its trust, one surface per
training target, the config rules, and hybrid exactness of the exported head with the query input."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import export, schema, signatures
from tfrs_ctx.config import Config, ModelConfig
from tfrs_ctx.models.two_tower import ContextualTwoTower, without_context
from tfrs_ctx.testing import call_signature, random_features, toy_corpus
from tfrs_ctx.training import search

N, B = 60, 6
VOCAB = {v: 12 for v in schema.VOCABULARIES} | {schema.VOCAB_ITEM: N + 2, schema.VOCAB_CATEGORY: 30}
SMALL = dict(embedding_dim=16, ff_dim=32, mlp_hidden=[32], output_dim=16, category_dim=8, context_dim=8)
QUERIES = ["vintage leather armchair", "Armchiar!", "", "red shoes", "  ?? ", "lamp"]


def _batch(seed: int = 0, queries=QUERIES) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    raw = random_features(B, N, rng)
    raw[schema.HISTORY_LENGTH] = rng.integers(1, schema.MAX_HISTORY + 1, B)
    for name in (schema.HISTORY_TIME_GAP, schema.HISTORY_NEXT_GAP):
        raw[name] = rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (B, schema.MAX_HISTORY))
    out = {k: tf.constant(v) for k, v in raw.items()}
    out[schema.CONTEXT_QUERY] = tf.constant(queries)
    return out


@pytest.fixture(scope="module")
def model() -> ContextualTwoTower:
    return ContextualTwoTower(
        ModelConfig(**SMALL, search_query=True, query_buckets=256), VOCAB, toy_corpus(N, np.random.default_rng(0))
    )


def test_a_query_changes_the_answer_and_an_empty_one_is_no_query(model):
    features = _batch()
    got = model.query_embedding(features).numpy()
    no_query = {**features, schema.CONTEXT_QUERY: tf.constant([""] * B)}
    base = model.query_embedding(no_query).numpy()
    changed = ~np.isclose(got, base, atol=1e-5).all(axis=1)
    assert changed.tolist() == [True, True, False, True, False, True]  # "" and punctuation only: no query
    absent = {k: v for k, v in features.items() if k != schema.CONTEXT_QUERY}  # older batches: no feature
    np.testing.assert_array_equal(model.query_embedding(absent).numpy(), base)
    np.testing.assert_array_equal(model.query_embedding(without_context(features)).numpy(),
                                  model.query_embedding(without_context(absent)).numpy())  # fmt: skip


def test_query_trust_zero_is_exactly_the_no_query_answer(model):
    features = {**_batch(1), schema.CONTEXT_WEIGHTS: tf.zeros([B, schema.MAX_CATEGORIES])}
    cleared = model.query_embedding(without_context(features)).numpy()
    model.query_layer.trust.assign(0.0)
    try:
        np.testing.assert_allclose(model.query_embedding(features).numpy(), cleared, atol=1e-6)
    finally:
        model.query_layer.trust.assign(1.0)
    assert model.context_layer.trust is not model.query_layer.trust  # each surface has its own trust


def test_the_loss_trains_the_query_tables(model):
    features = _batch(2)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(features, training=True)
    tables = [w for w in model.query_layer.trainable_weights if "buckets" in w.name]
    grads = tape.gradient(loss, tables)
    assert len(tables) == 2 and all(g is not None for g in grads)
    assert all(float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in grads)


def test_each_training_target_keeps_one_surface():
    features = _batch(3, ["a b", "c", "d", "e", "f", "g"])
    features[schema.CONTEXT_WEIGHTS] = tf.ones([B, schema.MAX_CATEGORIES])
    for share in (1e-9, 0.5, 1.0):
        out = search.one_surface(features, share, seed=0)
        has_query = out[schema.CONTEXT_QUERY].numpy() != b""
        has_categories = out[schema.CONTEXT_WEIGHTS].numpy().sum(axis=1) > 0
        np.testing.assert_array_equal(has_query, ~has_categories)
        assert has_query.all() if share == 1.0 else (not has_query.any() if share < 1e-6 else True)


def test_config_rules():
    with pytest.raises(ValueError, match="per_target"):
        Config.from_dict({"model": {"search_query": True}, "train": {"mode": "dense"}})
    with pytest.raises(ValueError, match="search_share"):
        Config.from_dict({"model": {"search_query": True}, "train": {"search_share": 1.0}})
    baseline = Config.from_dict({"model": {"search_query": True, "use_context": False}})
    assert ContextualTwoTower(baseline.model, VOCAB, toy_corpus(N, np.random.default_rng(0))).query_layer is None


def test_hybrid_export_with_the_query_is_exact(small_data, tmp_path):
    """head(encoder(x), query) == full(x, query) == the Keras model within 1e-5, for concat and
    cross-attention; the query input is optional (default "" = no query) and only search models have it."""
    from tensorflow.core.protobuf import saved_model_pb2

    from tfrs_ctx.config import load_config
    from tfrs_ctx.data import dataset
    from tfrs_ctx.evaluation.evaluate import raw_inputs
    from tfrs_ctx.training.run_dir import build_model

    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, B)))
    batch = {**batch, schema.CONTEXT_QUERY: tf.constant(QUERIES)}
    raw = raw_inputs({k: v.numpy() for k, v in batch.items()}, str(small_data))
    queries = np.asarray([q.encode() for q in QUERIES], object)
    for fusion in ("concat", "cross_attention"):
        overrides = [f"model.{k}={v}" for k, v in SMALL.items() if k != "mlp_hidden"]
        cfg = load_config("synthetic", [*overrides, "model.search_query=true", "model.query_buckets=512",
                                        f"model.fusion={fusion}", "model.fusion_states=4"])  # fmt: skip
        cfg.model.mlp_hidden = [32]
        cfg.train.data_dir = str(small_data)
        model = build_model(cfg)
        model(batch)
        out = tmp_path / fusion
        paths = export.export_all(model, str(small_data), str(out), version=1, top_k=10)["paths"]
        enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})[schema.ENCODED_HISTORY]
        head_in = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc}
        head = call_signature(paths["context_head"], {**head_in, schema.CONTEXT_QUERY: queries})[schema.USER_EMBEDDING]
        full = call_signature(paths["full"], {**raw, schema.CONTEXT_QUERY: queries})[schema.USER_EMBEDDING]
        np.testing.assert_allclose(head, full, atol=1e-5)
        np.testing.assert_allclose(full, model.query_embedding(batch).numpy(), atol=1e-5)
        none = model.query_embedding({**batch, schema.CONTEXT_QUERY: tf.constant([""] * B)}).numpy()
        default = call_signature(paths["context_head"], {**head_in, schema.CONTEXT_QUERY: np.asarray([b""], object)})
        np.testing.assert_allclose(default[schema.USER_EMBEDDING], none, atol=1e-5)  # [1] "" for every row
        proto = saved_model_pb2.SavedModel()
        with open(f"{paths['context_head']}/saved_model.pb", "rb") as f:
            proto.ParseFromString(f.read())
        defaults = proto.meta_graphs[0].signature_def["serving_default"].defaults
        assert tf.make_ndarray(defaults[schema.CONTEXT_QUERY]).tolist() == [b""]
    rows = [signatures.HeadRow(), signatures.HeadRow(query="red shoes")]
    assert signatures.head_inputs(rows, 16)[schema.CONTEXT_QUERY].tolist() == [b"", b"red shoes"]
    assert schema.CONTEXT_QUERY not in signatures.head_inputs(rows[:1], 16)  # none: the signature's default
