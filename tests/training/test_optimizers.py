"""LazyAdam (row-sparse Adam for embedding tables) against tf-keras Adam, and train.optimizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tfrs_ctx  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from tfrs_ctx import schema
from tfrs_ctx.training.run_dir import SUMMARY_FILE


def _tables(seed: int = 0):
    import tensorflow as tf

    start = np.random.default_rng(seed).normal(size=(20, 4)).astype(np.float32)
    return tf.Variable(start), tf.Variable(start), start


def _sparse_grad(variable, rows: list[int], seed: int):
    """The IndexedSlices gradient of a random linear loss on ``tf.gather(variable, rows)``."""
    import tensorflow as tf

    weights = tf.constant(np.random.default_rng(seed).normal(size=(len(rows), 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(variable, rows) * weights)
    return tape.gradient(loss, variable)


def test_lazy_adam_equals_adam_on_rows_touched_every_step_and_leaves_the_others_unchanged():
    import tensorflow as tf

    from tfrs_ctx.training.optimizers import LazyAdam

    lazy_var, dense_var, start = _tables()
    lazy, adam = LazyAdam(0.01), tf.keras.optimizers.Adam(0.01)
    rows = [3, 7, 3, 11, 7, 7]  # duplicates: summed before the moments, as in a dense gradient
    for step in range(4):
        grad = _sparse_grad(lazy_var, rows, seed=step)
        assert isinstance(grad, tf.IndexedSlices)
        lazy.apply_gradients([(grad, lazy_var)])
        adam.apply_gradients([(tf.convert_to_tensor(grad), dense_var)])  # dense Adam on the same gradient
    np.testing.assert_allclose(lazy_var.numpy(), dense_var.numpy(), rtol=1e-5, atol=1e-6)
    untouched = [r for r in range(20) if r not in rows]
    np.testing.assert_array_equal(lazy_var.numpy()[untouched], start[untouched])
    assert not np.allclose(lazy_var.numpy()[[3, 7, 11]], start[[3, 7, 11]])


def test_lazy_adam_does_not_move_or_decay_rows_a_step_did_not_touch():
    import tensorflow as tf

    from tfrs_ctx.training.optimizers import LazyAdam

    lazy_var, dense_var, _ = _tables(1)
    lazy, adam = LazyAdam(0.01), tf.keras.optimizers.Adam(0.01)
    for opt, var in ((lazy, lazy_var), (adam, dense_var)):
        opt.apply_gradients([(_sparse_grad(var, [2, 5], 0), var)])
    after_first = lazy_var.numpy().copy()
    moments = lazy._momentums[0].numpy().copy()
    for opt, var in ((lazy, lazy_var), (adam, dense_var)):
        opt.apply_gradients([(_sparse_grad(var, [9], 1), var)])
    np.testing.assert_array_equal(lazy_var.numpy()[[2, 5]], after_first[[2, 5]])  # lazy: rows 2, 5 stay put
    np.testing.assert_array_equal(lazy._momentums[0].numpy()[[2, 5]], moments[[2, 5]])
    assert not np.allclose(dense_var.numpy()[[2, 5]], after_first[[2, 5]])  # Adam's momentum moves them on
    np.testing.assert_allclose(lazy_var.numpy()[9], dense_var.numpy()[9], rtol=1e-5)  # first step of row 9


def test_lazy_adam_dense_gradients_are_plain_adam_and_config_round_trips():
    import tensorflow as tf
    import tf_keras as keras

    from tfrs_ctx.training.optimizers import LazyAdam

    lazy_var, dense_var, _ = _tables(2)
    lazy, adam = LazyAdam(0.02, beta_1=0.8), tf.keras.optimizers.Adam(0.02, beta_1=0.8)
    grad = tf.constant(np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32))
    for _ in range(3):
        lazy.apply_gradients([(grad, lazy_var)])
        adam.apply_gradients([(grad, dense_var)])
    np.testing.assert_allclose(lazy_var.numpy(), dense_var.numpy(), rtol=1e-6)

    config = lazy.get_config()
    assert config["name"] == "LazyAdam" and config["beta_1"] == 0.8
    again = LazyAdam.from_config(config)
    assert isinstance(again, LazyAdam) and again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(lazy))
    assert isinstance(restored, LazyAdam)
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(amsgrad=True)


def test_the_item_table_gets_a_sparse_gradient_from_every_lookup(small_data):
    """History, candidate tower and mixed negatives read the item table by gather: IndexedSlices, not dense."""
    import tensorflow as tf
    from conftest import TINY_MODEL

    from tfrs_ctx.config import load_config
    from tfrs_ctx.data import dataset
    from tfrs_ctx.training.run_dir import build_model

    cfg = load_config("synthetic", [*TINY_MODEL, "model.loss=mixed", "model.sampled_negatives=64"])
    cfg.train.data_dir = str(small_data)
    model = build_model(cfg)
    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN, 8)))
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    table = model.item_embedding.embeddings
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    looked_up = set(np.unique(grad.indices.numpy()))
    assert looked_up >= set(batch[schema.LABEL_ITEM].numpy()) | set(batch[schema.HISTORY_ITEM].numpy().ravel())
    assert len(looked_up) < table.shape[0] / 2  # history + labels + 64 negatives, not the whole table


def test_auto_picks_lazy_adam_for_large_item_vocabularies_and_bad_names_fail():
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training import optimizers

    assert optimizers.resolve("auto", 10_000) == "adam"
    assert optimizers.resolve("auto", 1_000_002) == "lazy_adam"
    assert optimizers.resolve("adagrad", 1_000_002) == "adagrad"
    assert isinstance(optimizers.make_optimizer("auto", 1e-3, 10_000_002), optimizers.LazyAdam)
    with pytest.raises(ValueError, match=r"train\.optimizer"):
        load_config("synthetic", ["train.optimizer=sgd"])


def test_training_with_lazy_adam_lowers_the_loss(small_data, tmp_path):
    from conftest import train_tiny

    from tfrs_ctx.data import dataset
    from tfrs_ctx.training.run_dir import build_model, load_trained

    run = train_tiny(small_data, tmp_path / "lazy", "train.optimizer=lazy_adam", "train.epochs=1")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["optimizer"] == "lazy_adam"
    trained, cfg = load_trained(str(run), str(small_data))
    batches = list(dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN, 256).take(3))
    untrained = build_model(cfg)
    trained_loss = np.mean([float(trained.compute_loss(b)) for b in batches])
    assert trained_loss < np.mean([float(untrained.compute_loss(b)) for b in batches]) - 0.2
