"""Cross-attention fusion (``model.fusion=cross_attention``): the layer's mask and config, the encoder's
``[N, d]`` output, dense windows, the store-layout migration, and hybrid export through the model server."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from test_model import VOCAB, batch, sequence_batch

from tfrs_ctx import schema, signatures
from tfrs_ctx.config import Config, ModelConfig
from tfrs_ctx.models.layers import CrossAttentionFusion
from tfrs_ctx.models.two_tower import ContextualTwoTower

STATES = 4


@pytest.fixture(scope="module")
def corpus():
    from test_model import corpus as fixture

    return fixture.__wrapped__()


def cross_model(corpus, **kwargs) -> ContextualTwoTower:
    cfg = ModelConfig(dropout=0.0, fusion="cross_attention", fusion_states=STATES, **kwargs)
    model = ContextualTwoTower(cfg, VOCAB, corpus)
    model(batch())
    return model


def test_layer_round_trips_through_its_config():
    layer = CrossAttentionFusion(16, 4, name="x")
    again = CrossAttentionFusion.from_config(layer.get_config())
    assert (again.dim, again.heads, again.name) == (16, 4, "x")
    with pytest.raises(ValueError, match="multiple"):
        CrossAttentionFusion(10, 4)


def test_config_refuses_an_unknown_fusion_or_n():
    with pytest.raises(ValueError, match=r"model\.fusion must"):
        Config.from_dict({"model": {"fusion": "sum"}})
    with pytest.raises(ValueError, match="fusion_states"):
        Config.from_dict({"model": {"fusion": "cross_attention", "fusion_states": 0}})


def test_states_before_the_first_event_never_change_the_output(corpus):
    model = cross_model(corpus)
    x = batch()
    length = x[schema.HISTORY_LENGTH].numpy()
    length[:4] = [0, 1, 2, STATES + 3]  # no history, shorter than N, longer than N
    x[schema.HISTORY_LENGTH] = tf.constant(length)
    encoded = model.encode_history(x).numpy()
    assert encoded.shape == (len(length), STATES, model.cfg.embedding_dim)
    masked = np.arange(STATES)[None] < (STATES - np.minimum(length, STATES))[:, None]
    assert masked[:3].any() and not masked[3].any()
    assert np.all(encoded[masked] == 0)  # the encoder exports zero rows there
    user = model.head(tf.constant(encoded), x).numpy()
    np.testing.assert_allclose(user, model(x).numpy(), atol=1e-6)
    garbage = encoded.copy()
    garbage[masked] = np.random.default_rng(0).normal(size=garbage[masked].shape) * 50
    np.testing.assert_array_equal(model.head(tf.constant(garbage), x).numpy(), user)
    real = encoded.copy()
    real[3, 0] += 1.0  # a real state does change it
    assert not np.allclose(model.head(tf.constant(real), x).numpy()[3], user[3], atol=1e-4)


def test_trust_zero_is_exactly_the_no_context_embedding(corpus):
    from tfrs_ctx.models.two_tower import without_context

    model = cross_model(corpus)
    x = batch()
    model.context_layer.trust.assign(0.0)
    np.testing.assert_array_equal(model(x).numpy(), model(without_context(x)).numpy())


def test_the_baseline_ignores_the_fusion(corpus):
    model = cross_model(corpus, use_context=False)
    assert model.cross_attention is None and model.fusion_states == 0
    assert model.encode_history(batch()).shape.rank == 2


def test_dense_windows_are_the_causal_states_the_offline_encoder_exports(corpus):
    model = cross_model(corpus, time_gap=schema.TIME_GAP_NEXT_EVENT)
    x = sequence_batch(2)
    states = model.encode_history(x, all_positions=True)
    rows = tf.range(tf.shape(states)[0], dtype=tf.int64)
    last = tf.stack([rows, tf.fill(tf.shape(rows), tf.cast(tf.shape(states)[1] - 1, tf.int64))], axis=1)
    windows = model.state_windows(states, last, x[schema.HISTORY_LENGTH])
    np.testing.assert_allclose(windows.numpy(), model.encode_history(x).numpy(), atol=1e-5)
    encoded, _ = model.dense_targets(x)
    assert encoded.shape[1:] == (STATES, model.cfg.embedding_dim)
    assert np.isfinite(float(model.compute_loss(x)))


def test_dense_loss_with_cross_attention_equals_the_per_target_loss(corpus):
    import test_model
    from test_model import test_dense_and_per_target_losses_agree_on_a_one_target_sequence as agree

    plain = test_model.dense_model
    test_model.dense_model = lambda c, **kw: plain(c, fusion="cross_attention", fusion_states=STATES, **kw)
    try:
        agree(corpus, True, "mixed")
    finally:
        test_model.dense_model = plain


# ---- a trained tiny model: export, the model server, the client ---------------------------------------
@pytest.fixture(scope="module")
def exported(small_data, tmp_path_factory):
    """An untrained tiny cross-attention model on ``small_data`` (exactness needs no training), exported."""
    from conftest import TINY_MODEL

    from tfrs_ctx import export
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training.run_dir import build_model, dummy_batch

    cfg = load_config("synthetic", [*TINY_MODEL, "model.fusion=cross_attention", f"model.fusion_states={STATES}"])
    cfg.train.data_dir = str(small_data)
    model = build_model(cfg)
    model(dummy_batch(2))
    root = tmp_path_factory.mktemp("cross")
    result = export.export_all(model, str(small_data), str(root / "models"), version=3, top_k=10)
    return model, root / "models", result["paths"]


_LOADED: dict[str, object] = {}


def _call(path: str, inputs: dict) -> dict[str, np.ndarray]:
    """``serving_default`` in process, each SavedModel loaded once (``k``: the exported 10)."""
    if path not in _LOADED:
        _LOADED[path] = tf.saved_model.load(path).signatures["serving_default"]
    fn = _LOADED[path]
    inputs = dict(inputs)
    if schema.REQUEST_K in fn.structured_input_signature[1]:
        inputs[schema.REQUEST_K] = np.asarray([10], np.int64)
    return {name: v.numpy() for name, v in fn(**{n: tf.constant(v) for n, v in inputs.items()}).items()}


def test_hybrid_export_is_exact_and_says_its_layout(exported, small_data):
    from test_export import _random_raw

    model, _, paths = exported
    raw = _random_raw(small_data, 48, seed=4)
    enc = _call(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})[schema.ENCODED_HISTORY]
    assert enc.shape == (48, STATES, model.cfg.embedding_dim)
    head_in = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc}
    head = _call(paths["context_head"], head_in)
    full = _call(paths["full"], raw)
    np.testing.assert_allclose(head[schema.USER_EMBEDDING], full[schema.USER_EMBEDDING], atol=1e-5)
    np.testing.assert_allclose(head[schema.TOP_K_SCORES], full[schema.TOP_K_SCORES], atol=1e-5)
    with open(os.path.join(paths["context_head"], "assets.extra", schema.MODEL_INFO_FILE)) as f:
        info = json.load(f)
    assert (info["fusion"], info["fusion_states"]) == ("cross_attention", STATES)
    assert info["store_schema_version"] == schema.STORE_SCHEMA_VERSION


class _Reader:
    """A feature reader over fixed rows (the Feast-backed one is tested on the demo's store)."""

    def __init__(self, users: dict):
        self.rows = users

    def users(self, user_ids):
        return {u: self.rows[u] for u in user_ids if u in self.rows}

    def subject_items(self, item_ids):
        return {}


def test_served_round_trip_with_n_states_and_a_stored_vector_of_another_layout(exported, small_data, caplog):
    from test_export import _random_raw

    from serving.client.candidates import AdRequest, CandidateClient, UserState
    from serving.launcher import start_server

    model, models_dir, paths = exported
    raw = _random_raw(small_data, 3, seed=8)
    raw[schema.HISTORY_LENGTH] = np.asarray([schema.MAX_HISTORY, 2, schema.MAX_HISTORY])
    enc = _call(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})[schema.ENCODED_HISTORY]
    d = model.cfg.embedding_dim
    users = {
        u: UserState(enc[u].reshape(-1), int(raw[schema.HISTORY_LENGTH][u]), 3) for u in range(2)
    }  # as the store holds them: flat [N * d]
    users[2] = UserState(enc[2, -1], schema.MAX_HISTORY, 3)  # a store-schema-1 row: [d] only
    cats = [int(c) for c in raw[schema.CONTEXT_CATEGORIES][0]]
    requests = [AdRequest(u, context_categories=cats, context_weights=[1.0] * len(cats)) for u in range(3)]
    head_only = [
        "--model_name",
        schema.MODEL_CONTEXT_HEAD,
        "--model_base_path",
        str(models_dir / schema.MODEL_CONTEXT_HEAD),
    ]
    with start_server(None, config=None, extra_args=head_only, server="python") as server:
        server.wait_ready(300)
        with CandidateClient(f"127.0.0.1:{server.port}", _Reader(users), deadline_s=30) as client:
            assert (client.embedding_dim, client.fusion_states) == (d, STATES)
            with caplog.at_level(logging.WARNING, logger="tfrs_ctx.client"):
                recs = client.recommend(requests)
    for u in range(2):
        expected = _call(
            paths["context_head"],
            {
                **{k: raw[k][u : u + 1] for k in signatures.HEAD_INPUTS},
                schema.CONTEXT_CATEGORIES: np.asarray([cats], np.int64),
                schema.CONTEXT_WEIGHTS: np.ones((1, len(cats)), np.float32),
                **{k: np.asarray([b""], object) for k in schema.DEMOGRAPHIC_FEATURES},
                schema.ENCODED_HISTORY: enc[u : u + 1],
            },
        )
        assert recs[u].history_used and recs[u].model_version == 3
        np.testing.assert_allclose(recs[u].scores, expected[schema.TOP_K_SCORES][0], atol=1e-5)
    assert not recs[2].history_used  # another layout: logged, noted, cold start
    assert any(f"not {STATES * d}: cold start" in n for n in recs[2].notes)
    assert any("stored vector has length" in r.getMessage() for r in caplog.records)


def test_a_store_of_layout_1_is_re_encoded_in_full_once(small_raw, tmp_path):
    from beam_pipelines import encode_users
    from tfrs_ctx import feature_store as F

    config = encode_users.EncodeConfig(
        raw=str(small_raw),
        model="",
        output=str(tmp_path),
        full=False,
        as_of=None,
        event_timestamp=None,
        min_batch_size=1,
        max_batch_size=1,
        output_shards=0,
        xla=False,
    )
    model, paths = encode_users.EncoderModel("", 5), F.store_paths(tmp_path)
    old = encode_users.EncodeState(watermark=100, model_version=5, event_timestamp=10)  # no layout: 1
    plan = encode_users.plan_run(config, model, old, paths)
    assert plan.full and "store schema version changed (1 -> 2)" in plan.reason
    current = encode_users.EncodeState(
        watermark=100, model_version=5, event_timestamp=10, store_schema_version=schema.STORE_SCHEMA_VERSION
    )
    assert not encode_users.plan_run(config, model, current, paths).full
