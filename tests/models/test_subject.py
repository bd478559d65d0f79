"""The subject ad's embedding (model.subject_embedding): masked when absent, shared table, training
transforms, and hybrid exactness of the exported head with the new input."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import export, schema, signatures
from tfrs_ctx.config import Config, ModelConfig
from tfrs_ctx.models.two_tower import SEQ_STATE_POSITION, SEQ_SUBJECT_ITEM, ContextualTwoTower, without_context
from tfrs_ctx.testing import call_signature, random_features, toy_corpus
from tfrs_ctx.training import subject

N, B = 60, 8
VOCAB = {v: 12 for v in schema.VOCABULARIES} | {schema.VOCAB_ITEM: N + 2, schema.VOCAB_CATEGORY: 30}
SMALL = dict(embedding_dim=16, ff_dim=32, mlp_hidden=[32], output_dim=16, category_dim=8, context_dim=8)


def _corpus() -> dict[str, np.ndarray]:
    return toy_corpus(N, np.random.default_rng(0))


def _batch(seed: int = 0) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    out = random_features(B, N, rng)
    out[schema.HISTORY_LENGTH] = rng.integers(1, schema.MAX_HISTORY + 1, B)
    for name in (schema.HISTORY_TIME_GAP, schema.HISTORY_NEXT_GAP):
        out[name] = rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (B, schema.MAX_HISTORY))
    out[schema.SUBJECT_ITEM] = rng.integers(2, N + 2, B)
    return {k: tf.constant(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def model() -> ContextualTwoTower:
    return ContextualTwoTower(ModelConfig(**SMALL, subject_embedding=True), VOCAB, _corpus())


def test_the_subject_path_uses_the_shared_ad_table_and_changes_the_answer(model):
    features = _batch()
    with_subject = model.query_embedding(features).numpy()
    other = {**features, schema.SUBJECT_ITEM: (features[schema.SUBJECT_ITEM] - 2 + 1) % N + 2}
    assert not np.allclose(with_subject, model.query_embedding(other).numpy(), atol=1e-4)
    assert model.subject_layer is not None and not any("subject" in w.name for w in model.item_embedding.weights)
    names = [w.name for w in model.trainable_weights if "embedding" in w.name and "item" in w.name]
    assert len(names) == 1, names  # one ad-id table: the towers' and the subject's


def test_a_request_without_a_subject_ad_is_masked_whatever_its_subject_id(model):
    """PAD (not an ad) and OOV (an unknown ad) give the same answer, and the answer without the subject
    block; changing the subject ad of a non-ad request changes nothing."""
    features = _batch(1)
    answers = [
        model.query_embedding({**features, schema.SUBJECT_ITEM: tf.fill([B], tf.constant(v, tf.int64))}).numpy()
        for v in (schema.PAD_ID, schema.OOV_ID)
    ]
    np.testing.assert_array_equal(answers[0], answers[1])
    part = model.subject_part({**features, schema.SUBJECT_ITEM: tf.zeros([B], tf.int64)}, features[schema.SUBJECT_ITEM])
    assert not part.numpy().any()
    cleared = model.query_embedding(without_context(features)).numpy()
    model.context_layer.trust.assign(0.0)
    try:  # trust 0: exactly the no-context answer, subject included
        np.testing.assert_allclose(model.query_embedding(features).numpy(), cleared, atol=1e-6)
    finally:
        model.context_layer.trust.assign(1.0)


def test_per_target_subjects_shift_the_history_and_keep_the_rest():
    features = _batch(2)
    out = subject.with_example_subjects(features, share=1.0)
    n = features[schema.HISTORY_LENGTH].numpy()
    np.testing.assert_array_equal(out[schema.SUBJECT_ITEM], features[schema.HISTORY_ITEM][:, -1])
    np.testing.assert_array_equal(out[schema.HISTORY_LENGTH], n - 1)
    np.testing.assert_array_equal(out[schema.HISTORY_ITEM][:, 1:], features[schema.HISTORY_ITEM][:, :-1])
    np.testing.assert_array_equal(out[schema.HISTORY_NEXT_GAP][:, -1], out[schema.HISTORY_TIME_GAP][:, -1])
    none = subject.with_example_subjects(features, share=1e-9)
    assert not none[schema.SUBJECT_ITEM].numpy().any()
    np.testing.assert_array_equal(none[schema.HISTORY_ITEM], features[schema.HISTORY_ITEM])


def test_dense_subjects_score_from_the_state_before_the_subject_event():
    L = schema.MAX_HISTORY
    items = np.zeros((1, L), np.int64)
    items[0, -3:] = [7, 8, 9]  # three inputs at L-3..L-1
    labels = np.zeros((1, L), np.int64)
    labels[0, -4:] = [7, 8, 9, 10]  # L-4 (empty history) predicts 7, ..., L-1 predicts 10
    context = {
        n: tf.zeros((1, L, schema.MAX_CATEGORIES), d)
        for n, d in ((schema.SEQ_CONTEXT_CATEGORIES, tf.int64), (schema.SEQ_CONTEXT_WEIGHTS, tf.float32))
    }
    tables = (tf.constant(np.arange(N * 5).reshape(N, 5), tf.int64), tf.ones((N, 5), tf.float32))
    out = subject.with_sequence_subjects(
        {schema.HISTORY_ITEM: tf.constant(items), schema.SEQ_LABEL_ITEM: tf.constant(labels),
         schema.HISTORY_LENGTH: tf.constant([3]), **context},
        share=1.0, tables=tables,
    )  # fmt: skip
    state, subj = out[SEQ_STATE_POSITION].numpy()[0], out[SEQ_SUBJECT_ITEM].numpy()[0]
    assert state[L - 4] == L - 4 and subj[L - 4] == schema.PAD_ID  # no previous event: no subject
    np.testing.assert_array_equal(state[-3:], [L - 4, L - 3, L - 2])  # the state before the subject event
    np.testing.assert_array_equal(subj[-3:], [7, 8, 9])
    cats = out[schema.SEQ_CONTEXT_CATEGORIES].numpy()[0]  # a subject target's context: the subject's categories
    np.testing.assert_array_equal(cats[-3:], tables[0].numpy()[[5, 6, 7]])
    assert not cats[: L - 3].any()


def test_config_refuses_a_subject_path_nothing_trains():
    with pytest.raises(ValueError, match="context_is_previous_event"):
        Config.from_dict({"model": {"subject_embedding": True}})
    baseline = Config.from_dict({"model": {"subject_embedding": True, "use_context": False}})
    assert ContextualTwoTower(baseline.model, VOCAB, _corpus()).subject_layer is None  # no context path at all
    cfg = Config.from_dict({"model": {"subject_embedding": True}, "train": {"context_is_previous_event": True}})
    assert cfg.model.subject_embedding and cfg.train.subject_share == 0.5 and cfg.train.subject_real_context


def test_hybrid_export_with_the_subject_ad_is_exact(small_data, tmp_path):
    """head(encoder(x), subject ad) == full(x, subject ad) == the Keras model, within 1e-5; a raw id
    outside the vocabulary and NO_SUBJECT_AD (the default) are the no-subject answer. With cross-attention
    fusion, so the two optional context parts are checked together ([N, d] states and the subject ad)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from tfrs_ctx.config import load_config
    from tfrs_ctx.data import dataset, vocab
    from tfrs_ctx.evaluation.evaluate import raw_inputs
    from tfrs_ctx.training.run_dir import build_model

    cfg = load_config(
        "synthetic", [f"model.{k}={v}" for k, v in SMALL.items()] + ["model.subject_embedding=true",
        "model.fusion=cross_attention", "model.fusion_states=4", "train.context_is_previous_event=true"]
    )  # fmt: skip
    cfg.model.mlp_hidden = [32]
    cfg.train.data_dir = str(small_data)
    model = build_model(cfg)
    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 16)))
    ads = np.asarray([int(v) for v in vocab.load_vocab(str(small_data), schema.VOCAB_ITEM)], np.int64)
    index = np.arange(16) % len(ads)
    batch = {**batch, schema.SUBJECT_ITEM: tf.constant(index + schema.NUM_RESERVED_IDS, tf.int64)}
    model(batch)
    paths = export.export_all(model, str(small_data), str(tmp_path / "models"), version=3, top_k=10)["paths"]
    raw = raw_inputs({k: v.numpy() for k, v in batch.items()}, str(small_data))
    subject_ids = ads[index]
    enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})[schema.ENCODED_HISTORY]
    assert enc.shape == (16, 4, cfg.model.embedding_dim)  # the [N, d] states of cross-attention
    head_in = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc}
    head = call_signature(paths["context_head"], {**head_in, schema.SUBJECT_AD: subject_ids})[schema.USER_EMBEDDING]
    full = call_signature(paths["full"], {**raw, schema.SUBJECT_AD: subject_ids})[schema.USER_EMBEDDING]
    np.testing.assert_allclose(head, full, atol=1e-5)
    np.testing.assert_allclose(full, model.query_embedding(batch).numpy(), atol=1e-5)
    none = model.query_embedding({**batch, schema.SUBJECT_ITEM: tf.zeros([16], tf.int64)}).numpy()
    assert not np.allclose(none, full, atol=1e-4)
    for missing in (np.full(16, ads.max() + 12345, np.int64), np.asarray([schema.NO_SUBJECT_AD], np.int64)):
        got = call_signature(paths["context_head"], {**head_in, schema.SUBJECT_AD: missing})[schema.USER_EMBEDDING]
        np.testing.assert_allclose(got, none, atol=1e-5)  # an unknown ad id, the default ([1]: every row)
    for name in (schema.MODEL_CONTEXT_HEAD, schema.MODEL_FULL):  # optional for a model server: a default
        proto = saved_model_pb2.SavedModel()
        with open(f"{paths[name]}/saved_model.pb", "rb") as f:
            proto.ParseFromString(f.read())
        defaults = proto.meta_graphs[0].signature_def["serving_default"].defaults
        assert tf.make_ndarray(defaults[schema.SUBJECT_AD]).tolist() == [schema.NO_SUBJECT_AD]
    rows = [signatures.HeadRow(subject_ad_id=None), signatures.HeadRow(subject_ad_id=int(ads[0]))]
    assert signatures.head_inputs(rows, 16)[schema.SUBJECT_AD].tolist() == [schema.NO_SUBJECT_AD, int(ads[0])]
    assert schema.SUBJECT_AD not in signatures.head_inputs(rows[:1], 16)  # none: the signature's default


def test_subject_ads_come_from_ad_id_only_and_older_rows_mean_none(caplog):
    """ItemColumns rows -> SUBJECT_ITEM: PAD where ad_id is null or the column is absent (older data,
    logged), OOV for an ad id outside the vocabulary, the ad's index otherwise; never the subject's own id."""
    import logging

    from tfrs_ctx.data import examples
    from tfrs_ctx.data.rawio import ItemColumns
    from tfrs_ctx.data.vocab import IntVocabulary

    vocab = IntVocabulary([101, 102])
    rows = [{schema.ITEM_ID: 101, schema.CATEGORIES: [1], schema.CONFIDENCES: [1.0], schema.AD_ID: v}
            for v in (None, 102, 999)]  # fmt: skip
    ads = examples.subject_ad_ids(ItemColumns.from_rows(rows, with_advertiser=False))
    assert examples.subject_ad_indices(ads, vocab).tolist() == [schema.PAD_ID, 3, schema.OOV_ID]
    older = [{k: v for k, v in r.items() if k != schema.AD_ID} for r in rows]
    with caplog.at_level(logging.INFO, logger=examples.__name__):
        ads = examples.subject_ad_ids(ItemColumns.from_rows(older, with_advertiser=False))
    assert examples.subject_ad_indices(ads, vocab).tolist() == [schema.PAD_ID] * 3
    assert "no subject item is an ad" in caplog.text


def test_served_index_evaluation_sends_the_raw_subject_ad():
    from tfrs_ctx.evaluation.evaluate import raw_subject_ads

    corpus_ids = np.asarray([500, 600, 700], np.int64)  # rows 0..2 = ad indices 2..4
    got = raw_subject_ads(np.asarray([schema.PAD_ID, schema.OOV_ID, 2, 4]), corpus_ids)
    assert got.tolist() == [schema.NO_SUBJECT_AD, schema.NO_SUBJECT_AD, 500, 700]
