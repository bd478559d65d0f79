"""Training: ``tfrs-ctx train --config CONFIG.yaml --out RUN_DIR [--set section.key=value ...]``.

tf.data from the sharded TFRecords (parallel reads, shuffle, prefetch), Adam with a warm-up +
cosine learning-rate schedule, early stopping on validation Recall@K (full ranking over the
ad corpus), checkpoints with resume, TensorBoard logs, a progress bar, seeds.

Validation uses the ``train_requests`` split (related-items requests *before* the time
cutoff, with their real context), so the held-out ``eval`` requests are never looked at.
After training on synthetic context, the contextual model's context trust is chosen on the
other ``train_requests`` (``train.calibration_examples``; see ``tfrs_ctx.training.calibrate``).

The run directory's layout, loading and summary are :mod:`tfrs_ctx.training.run_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import tensorflow as tf
import tf_keras as keras

from tfrs_ctx import schema
from tfrs_ctx.config import MODE_DENSE, Config, load_config, save_config
from tfrs_ctx.data import dataset
from tfrs_ctx.evaluation.metrics import recall_at_k
from tfrs_ctx.models.two_tower import without_context
from tfrs_ctx.training.calibrate import calibrate
from tfrs_ctx.training.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOGS_DIR,
    build_model,
    dummy_batch,
    save_final,
    write_summary,
)


def mix_context(features: dict[str, tf.Tensor], noise: float, seed: int) -> dict[str, tf.Tensor]:
    """With probability ``noise`` per example, swap in the context of another example of the batch.

    Synthetic context from the label is a perfect signal; real request context is not (the
    converted ad often follows the user's history, not the subject item). Swapped contexts
    teach the model to weigh context against history instead of trusting it blindly.
    """
    features = dict(features)
    batch = tf.shape(features[schema.CONTEXT_WEIGHTS])[0]
    other = tf.random.shuffle(tf.range(batch), seed=seed)
    swap = tf.random.uniform([batch], seed=seed + 1) < noise
    for name in schema.CONTEXT_FEATURES:
        features[name] = tf.where(swap[:, tf.newaxis], tf.gather(features[name], other), features[name])
    return features


def mix_sequence_context(features: dict[str, tf.Tensor], noise: float, seed: int) -> dict[str, tf.Tensor]:
    """:func:`mix_context` per target position of a batch of sequences (swaps among target positions only)."""
    features = dict(features)
    valid = tf.reshape(features[schema.SEQ_LABEL_ITEM], [-1]) != schema.PAD_ID
    n = tf.size(valid)
    targets = tf.cast(tf.where(valid)[:, 0], tf.int32)
    source = tf.tensor_scatter_nd_update(tf.range(n), targets[:, tf.newaxis], tf.random.shuffle(targets, seed=seed))
    swap = tf.logical_and(valid, tf.random.uniform([n], seed=seed + 1) < noise)
    for name in (schema.SEQ_CONTEXT_CATEGORIES, schema.SEQ_CONTEXT_WEIGHTS):
        values = features[name]
        flat = tf.reshape(values, [n, schema.MAX_CATEGORIES])
        mixed = tf.where(swap[:, tf.newaxis], tf.gather(flat, source), flat)
        features[name] = tf.reshape(mixed, tf.shape(values))
    return features


def without_sequence_context(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = dict(features)
    for name in (schema.SEQ_CONTEXT_CATEGORIES, schema.SEQ_CONTEXT_WEIGHTS):
        features[name] = tf.zeros_like(features[name])
    return features


def sequence_dataset(cfg: Config, counts: dict[str, int]) -> tuple[tf.data.Dataset, int]:
    """Dense mode: batches of ``train_sequences`` windows and the windows per epoch."""
    t = cfg.train
    if not counts.get(schema.SPLIT_TRAIN_SEQUENCES):
        raise ValueError(
            f"train.mode=dense: {t.data_dir} has no {schema.SPLIT_TRAIN_SEQUENCES} split (rebuild the data with "
            "beam_pipelines.build_training_data)"
        )
    train = dataset.make_dataset(
        t.data_dir,
        schema.SPLIT_TRAIN_SEQUENCES,
        t.sequence_batch_size,
        shuffle=True,
        repeat=True,
        seed=t.seed,
        shuffle_buffer=t.shuffle_buffer,
    )
    if t.context_source == "none":
        train = train.map(without_sequence_context, num_parallel_calls=tf.data.AUTOTUNE)
    elif t.context_noise > 0:
        train = train.map(
            lambda f: mix_sequence_context(f, t.context_noise, t.seed), num_parallel_calls=tf.data.AUTOTUNE
        )
    return train, counts[schema.SPLIT_TRAIN_SEQUENCES]


def training_dataset(cfg: Config, counts: dict[str, int]) -> tuple[tf.data.Dataset, int]:
    """The training stream for ``train.mode`` / ``train.context_source`` and the examples per epoch."""
    t = cfg.train
    if t.mode == MODE_DENSE:
        return sequence_dataset(cfg, counts)
    train = dataset.make_dataset(
        t.data_dir,
        schema.SPLIT_TRAIN,
        t.batch_size,
        shuffle=True,
        repeat=True,
        seed=t.seed,
        shuffle_buffer=t.shuffle_buffer,
    )
    if t.context_source == "synthetic":
        if t.context_noise > 0:
            train = train.map(lambda f: mix_context(f, t.context_noise, t.seed), num_parallel_calls=tf.data.AUTOTUNE)
        return train, counts[schema.SPLIT_TRAIN]
    train = train.map(without_context, num_parallel_calls=tf.data.AUTOTUNE)
    if t.context_source == "none" or not counts.get(schema.SPLIT_TRAIN_REQUESTS):
        return train, counts[schema.SPLIT_TRAIN]
    # "real": organic conversions carry no request context; logged requests carry their own,
    # all but the validation examples (early stopping must not score examples it trained on).
    available = counts[schema.SPLIT_TRAIN_REQUESTS] - t.validation_examples
    if available <= 0:
        print(f"context_source=real: all {counts[schema.SPLIT_TRAIN_REQUESTS]} train_requests are validation examples")
        return train, counts[schema.SPLIT_TRAIN]
    requests = dataset.requests_after_validation(t.data_dir, t.validation_examples)
    requests = requests.shuffle(min(available, t.shuffle_buffer), seed=t.seed + 1)
    requests = requests.repeat().batch(t.batch_size)
    total = counts[schema.SPLIT_TRAIN] + available
    weights = [counts[schema.SPLIT_TRAIN] / total, available / total]
    return tf.data.Dataset.sample_from_datasets([train, requests], weights, seed=t.seed), total


def targets_per_example(mode: str, metadata: dict) -> float:
    """Labels learned per training example: 1 per target; a sequence window's mean target positions."""
    if mode != MODE_DENSE:
        return 1.0
    return metadata.get("train_sequence_targets", 0) / max(1, metadata["counts"].get(schema.SPLIT_TRAIN_SEQUENCES, 0))


class ValidationRecall(keras.callbacks.Callback):
    """Full-ranking Recall@K on validation requests at each epoch end -> ``logs['val_recall']``."""

    def __init__(self, batches: list[dict[str, tf.Tensor]], k: int):
        super().__init__()
        self.batches, self.k = batches, k

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        recall = recall_at_k(self.model, self.batches, self.k)
        if logs is not None:
            logs["val_recall"] = recall
        print(f"\nepoch {epoch + 1}: validation Recall@{self.k} = {recall:.4f}")


class CheckpointEveryEpoch(keras.callbacks.Callback):
    def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable):
        super().__init__()
        self.manager, self.epoch = manager, epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.assign(epoch + 1)
        self.manager.save()


def train(cfg: Config, run_dir: str, verbose: int = 1) -> dict:
    """Train (or resume) one model into ``run_dir``; returns the training summary."""
    t = cfg.train
    tf.keras.utils.set_random_seed(t.seed)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, CONFIG_FILE))
    meta = dataset.load_metadata(t.data_dir)
    ds, per_epoch = training_dataset(cfg, meta["counts"])
    batch_size = t.sequence_batch_size if t.mode == MODE_DENSE else t.batch_size
    steps = t.steps_per_epoch or max(1, per_epoch // batch_size)
    total_steps = steps * t.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, total_steps - int(t.warmup_fraction * total_steps)),
        alpha=0.05,
        warmup_target=t.learning_rate,
        warmup_steps=int(t.warmup_fraction * total_steps),
    )
    optimizer = keras.optimizers.Adam(schedule)
    model = build_model(cfg)
    model.compile(optimizer=optimizer)

    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(run_dir, CHECKPOINT_DIR), max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        print(f"resuming from {manager.latest_checkpoint}")
    model(dummy_batch(1))  # build, so a pending restore lands before fit reads the epoch
    initial_epoch = int(epoch.numpy())

    callbacks: list[keras.callbacks.Callback] = []
    validation = dataset.validation_requests(t.data_dir, meta["counts"], t.validation_examples)
    if not validation:
        print(
            f"WARNING: {t.data_dir} has no {schema.SPLIT_TRAIN_REQUESTS} (no request before the cutoff): "
            "NO VALIDATION. Early stopping is off (all epochs run) and the context trust is not calibrated.",
            file=sys.stderr,
        )
    else:
        callbacks.append(ValidationRecall(validation, t.early_stopping_k))
        callbacks.append(
            keras.callbacks.EarlyStopping(
                "val_recall", mode="max", patience=t.early_stopping_patience, restore_best_weights=True
            )
        )
    callbacks += [
        CheckpointEveryEpoch(manager, epoch),
        keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS_DIR), update_freq=50, profile_batch=0),
    ]
    started = time.perf_counter()
    history = model.fit(
        ds, epochs=t.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose
    )
    seconds = time.perf_counter() - started
    epochs_run = len(history.epoch)
    calibration = calibrate(model, cfg, meta["counts"], validation)
    save_final(model, run_dir)
    val_recalls = [float(v) for v in history.history.get("val_recall", []) if v == v]  # no NaN into JSON
    examples = epochs_run * steps * batch_size
    summary = {
        "mode": t.mode,
        "time_gap": cfg.model.time_gap,
        "epochs_run": epochs_run,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "examples_per_second": round(examples / max(seconds, 1e-9), 1),
        "targets_per_second": round(examples * targets_per_example(t.mode, meta) / max(seconds, 1e-9), 1),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "validation": "train_requests" if validation else "none: no request before the cutoff",
        "best_val_recall": max(val_recalls) if val_recalls else None,
        "full_softmax": bool(model.full_softmax),
        "calibration": calibration,
    }
    write_summary(run_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, or a bundled name: synthetic | movielens")
    parser.add_argument("--out", required=True, help="run directory (resumes if it holds checkpoints)")
    parser.add_argument("--data", help="TFRecord directory (overrides train.data_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.data:
        cfg.train.data_dir = args.data
    if not cfg.train.data_dir:
        parser.error("no data directory: pass --data or set train.data_dir")
    summary = train(cfg, args.out, verbose=1 if sys.stdout.isatty() else 2)  # one line per epoch in logs
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
