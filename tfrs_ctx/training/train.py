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
from tfrs_ctx.training import dense, distributed, optimizers, search, subject
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
    if schema.CONTEXT_QUERY in features:  # the search surface's context swaps with the rest
        features[schema.CONTEXT_QUERY] = tf.where(
            swap, tf.gather(features[schema.CONTEXT_QUERY], other), features[schema.CONTEXT_QUERY]
        )
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


def sequence_dataset(
    cfg: Config, counts: dict[str, int], worker: tuple[int, int] | None = None, batch_size: int | None = None
) -> tuple[tf.data.Dataset, int]:
    """Dense mode: batches of ``train_sequences`` windows and the windows per epoch (``worker``,
    ``batch_size``: as :func:`training_dataset`, in windows)."""
    t = cfg.train
    if not counts.get(schema.SPLIT_TRAIN_SEQUENCES):
        raise ValueError(
            f"train.mode=dense: {t.data_dir} has no {schema.SPLIT_TRAIN_SEQUENCES} split (rebuild the data with "
            "beam_pipelines.build_training_data)"
        )
    train = dataset.make_dataset(
        t.data_dir,
        schema.SPLIT_TRAIN_SEQUENCES,
        batch_size or t.sequence_batch_size,
        shuffle=True,
        repeat=True,
        seed=t.seed,
        shuffle_buffer=t.shuffle_buffer,
        worker=worker,
    )
    if t.context_source == "none":
        train = train.map(without_sequence_context, num_parallel_calls=tf.data.AUTOTUNE)
    elif t.context_noise > 0:
        train = train.map(
            lambda f: mix_sequence_context(f, t.context_noise, t.seed), num_parallel_calls=tf.data.AUTOTUNE
        )
    if cfg.model.subject_embedding:  # the previous event as the subject ad (training/subject.py)
        tables = subject.corpus_tables(t.data_dir) if t.subject_real_context else None
        train = train.map(
            lambda f: subject.with_sequence_subjects(f, t.subject_share, t.seed, tables),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if t.dense_strict_history:
        train = train.map(dense.with_strict_state_positions, num_parallel_calls=tf.data.AUTOTUNE)
    if t.dense_user_targets:
        train = train.map(
            dense.UserTargetWeights(t.data_dir, t.dense_user_targets), num_parallel_calls=tf.data.AUTOTUNE
        )
    return train, counts[schema.SPLIT_TRAIN_SEQUENCES]


def training_dataset(
    cfg: Config, counts: dict[str, int], worker: tuple[int, int] | None = None, batch_size: int | None = None
) -> tuple[tf.data.Dataset, int]:
    """The training stream for ``train.mode`` / ``train.context_source`` and the examples per epoch.

    ``worker=(index, count)``: worker ``index``'s share of the stream (by file, see
    :func:`tfrs_ctx.data.dataset.worker_share`), in batches of ``batch_size`` (default: the mode's
    batch size; a worker's share of the global batch in multi-worker training).
    """
    t = cfg.train
    if t.mode == MODE_DENSE:
        return sequence_dataset(cfg, counts, worker, batch_size)
    batch_size = batch_size or t.batch_size
    searching = cfg.model.search_query and cfg.model.use_context and t.context_source == "synthetic"
    train = dataset.make_dataset(
        t.data_dir,
        schema.SPLIT_TRAIN,
        batch_size,
        shuffle=True,
        repeat=True,
        seed=t.seed,
        shuffle_buffer=t.shuffle_buffer,
        worker=worker,
        features=schema.with_query(schema.FEATURES) if searching else None,
    )
    if t.context_source == "synthetic":
        if t.context_noise > 0:
            train = train.map(lambda f: mix_context(f, t.context_noise, t.seed), num_parallel_calls=tf.data.AUTOTUNE)
        if searching:  # each target keeps its query or its categories (training/search.py)
            train = train.map(
                lambda f: search.one_surface(f, t.search_share, t.seed), num_parallel_calls=tf.data.AUTOTUNE
            )
        if cfg.model.subject_embedding:  # the previous event as the subject ad (training/subject.py)
            tables = subject.corpus_tables(t.data_dir) if t.subject_real_context else None
            train = train.map(
                lambda f: subject.with_example_subjects(f, t.subject_share, t.seed, tables),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
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
    if worker is not None:  # by example, after the skip: the validation requests stay out on every worker
        requests = requests.shard(worker[1], worker[0])
    requests = requests.shuffle(min(available, t.shuffle_buffer), seed=t.seed + 1)
    requests = requests.repeat().batch(batch_size)
    total = counts[schema.SPLIT_TRAIN] + available
    weights = [counts[schema.SPLIT_TRAIN] / total, available / total]
    return tf.data.Dataset.sample_from_datasets([train, requests], weights, seed=t.seed), total


def targets_per_example(mode: str, metadata: dict) -> float:
    """Labels learned per training example: 1 per target; a sequence window's mean target positions."""
    if mode != MODE_DENSE:
        return 1.0
    return metadata.get("train_sequence_targets", 0) / max(1, metadata["counts"].get(schema.SPLIT_TRAIN_SEQUENCES, 0))


def training_dataset_size(cfg: Config, counts: dict[str, int]) -> int:
    """Examples per epoch of :func:`training_dataset` (without building it)."""
    t = cfg.train
    if t.mode == MODE_DENSE:
        return counts[schema.SPLIT_TRAIN_SEQUENCES]
    available = counts.get(schema.SPLIT_TRAIN_REQUESTS, 0) - t.validation_examples
    if t.context_source == "real" and available > 0:
        return counts[schema.SPLIT_TRAIN] + available
    return counts[schema.SPLIT_TRAIN]


class ValidationRecall(keras.callbacks.Callback):
    """Full-ranking Recall@K on validation requests at each epoch end -> ``logs['val_recall']``.

    In multi-worker training every worker computes it on the same requests with the same
    (mirrored) weights, and all take the chief's value, so early stopping decides the same on all.
    """

    def __init__(self, batches: list[dict[str, tf.Tensor]], k: int, strategy=None):
        super().__init__()
        self.batches, self.k, self.strategy = batches, k, strategy

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        recall = recall_at_k(self.model, self.batches, self.k)
        if self.strategy is not None:
            recall = distributed.from_chief(self.strategy, recall)
        if logs is not None:
            logs["val_recall"] = recall
        print(f"\nepoch {epoch + 1}: validation Recall@{self.k} = {recall:.4f}")


class EpochTimer(keras.callbacks.Callback):
    """``logs['epoch_seconds']``: each epoch's wall time (training steps and validation), into the history."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.started


class CheckpointEveryEpoch(keras.callbacks.Callback):
    """Save at every epoch end; a non-chief worker's save goes to a temporary directory, then is deleted."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable, strategy=None):
        super().__init__()
        self.manager, self.epoch, self.strategy = manager, epoch, strategy

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.assign(epoch + 1)
        self.manager.save()
        if self.strategy is not None:
            distributed.discard(self.manager.directory, self.strategy)


def train(cfg: Config, run_dir: str, verbose: int = 1, strategy=None) -> dict:
    """Train (or resume) one model into ``run_dir``; returns the training summary.

    ``strategy``: a ``MultiWorkerMirroredStrategy`` made by :func:`distributed.make_strategy`
    before any other TensorFlow op, this process being one worker; ``None``: one process
    (TensorFlow's default strategy). ``train.batch_size`` is the global batch either way.
    """
    t = cfg.train
    strategy = strategy or tf.distribute.get_strategy()
    multi = distributed.is_multi_worker(strategy)
    chief = distributed.is_chief(strategy)
    tf.keras.utils.set_random_seed(t.seed)
    os.makedirs(run_dir, exist_ok=True)
    if chief:
        save_config(cfg, os.path.join(run_dir, CONFIG_FILE))
    meta = dataset.load_metadata(t.data_dir)
    batch_size = t.sequence_batch_size if t.mode == MODE_DENSE else t.batch_size
    if multi:
        replicas = strategy.num_replicas_in_sync
        if batch_size % replicas:
            raise ValueError(f"the global batch {batch_size} is not divisible by the {replicas} replicas")

        def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            worker = (ctx.input_pipeline_id, ctx.num_input_pipelines)
            per_replica = ctx.get_per_replica_batch_size(batch_size)
            return training_dataset(cfg, meta["counts"], worker, per_replica)[0]

        ds = strategy.distribute_datasets_from_function(input_fn)
        per_epoch = training_dataset_size(cfg, meta["counts"])
    else:
        ds, per_epoch = training_dataset(cfg, meta["counts"])
    steps = t.steps_per_epoch or max(1, per_epoch // batch_size)
    total_steps = steps * t.epochs
    with strategy.scope():
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, total_steps - int(t.warmup_fraction * total_steps)),
            alpha=0.05,
            warmup_target=t.learning_rate,
            warmup_steps=int(t.warmup_fraction * total_steps),
        )
        optimizer_name = optimizers.resolve(t.optimizer, meta["vocab_sizes"][schema.VOCAB_ITEM])
        optimizer = optimizers.make_optimizer(optimizer_name, schedule, meta["vocab_sizes"][schema.VOCAB_ITEM])
        model = build_model(cfg)
        model.compile(optimizer=optimizer)

        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
        checkpoints = os.path.join(run_dir, CHECKPOINT_DIR)
        manager = tf.train.CheckpointManager(ckpt, distributed.write_dir(checkpoints, strategy), max_to_keep=2)
        latest = tf.train.latest_checkpoint(checkpoints)  # the chief's, on every worker
        if latest:
            ckpt.restore(latest).expect_partial()
            print(f"resuming from {latest}")
        model(dummy_batch(1))  # build, so a pending restore lands before fit reads the epoch
    initial_epoch = int(epoch.numpy())

    callbacks: list[keras.callbacks.Callback] = [EpochTimer()]
    validation = dataset.validation_requests(t.data_dir, meta["counts"], t.validation_examples)
    if not validation:
        print(
            f"WARNING: {t.data_dir} has no {schema.SPLIT_TRAIN_REQUESTS} (no request before the cutoff): "
            "NO VALIDATION. Early stopping is off (all epochs run); the context trust falls back to derived or "
            "synthetic context (train_summary.json calibration.source; flagged when uncalibrated).",
            file=sys.stderr,
        )
    else:
        callbacks.append(ValidationRecall(validation, t.early_stopping_k, strategy if multi else None))
        callbacks.append(
            keras.callbacks.EarlyStopping(
                "val_recall", mode="max", patience=t.early_stopping_patience, restore_best_weights=True
            )
        )
    callbacks += [
        CheckpointEveryEpoch(manager, epoch, strategy if multi else None),
        keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS_DIR), update_freq=50, profile_batch=0),
    ]
    started = time.perf_counter()
    history = model.fit(
        ds, epochs=t.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose
    )
    seconds = time.perf_counter() - started
    epochs_run = len(history.epoch)
    with strategy.scope():  # the candidate tower too (a resumed run with no epoch left has not built it)
        model.candidate_embedding({k: v[:1] for k, v in model.corpus.items()})  # one ad: all 10M held 5 GB
    calibration = calibrate(model, cfg, meta["counts"], validation)
    if multi and model.context_layer is not None:  # the same trust on every worker, the chief's
        model.context_layer.trust.assign(distributed.from_chief(strategy, float(model.context_layer.trust.numpy())))
    final = distributed.write_dir(run_dir, strategy)
    save_final(model, final)
    distributed.discard(final, strategy)
    val_recalls = [float(v) for v in history.history.get("val_recall", []) if v == v]  # no NaN into JSON
    examples = epochs_run * steps * batch_size
    summary = {
        "mode": t.mode,
        "optimizer": optimizer_name,
        "time_gap": cfg.model.time_gap,
        "epochs_run": epochs_run,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "workers": distributed.num_workers(strategy),
        "seconds": round(seconds, 1),
        "examples_per_second": round(examples / max(seconds, 1e-9), 1),
        "targets_per_second": round(examples * targets_per_example(t.mode, meta) / max(seconds, 1e-9), 1),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "validation": "train_requests" if validation else "none: no request before the cutoff",
        "best_val_recall": max(val_recalls) if val_recalls else None,
        "full_softmax": bool(model.full_softmax),
        "loss": model.loss_kind,
        "calibration": calibration,
    }
    if chief:
        write_summary(run_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, or a bundled name: synthetic | movielens")
    parser.add_argument("--out", required=True, help="run directory (resumes if it holds checkpoints)")
    parser.add_argument("--data", help="TFRecord directory (overrides train.data_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    cluster = parser.add_argument_group("multi-worker training (else TF_CONFIG, if set, names the cluster)")
    cluster.add_argument("--worker_hosts", help="host:port of every worker, comma-separated; worker 0 is the chief")
    cluster.add_argument("--task_index", type=int, help="this worker's index in --worker_hosts")
    cluster.add_argument(
        "--collective_timeout",
        type=float,
        default=distributed.DEFAULT_COLLECTIVE_TIMEOUT_S,
        help="seconds a collective waits for the other workers before failing",
    )
    args = parser.parse_args(argv)
    if (args.worker_hosts is None) != (args.task_index is None):
        parser.error("--worker_hosts and --task_index go together")
    if args.worker_hosts:
        distributed.write_tf_config(args.worker_hosts, args.task_index)
    strategy = distributed.make_strategy(args.collective_timeout)  # before any other TensorFlow op
    cfg = load_config(args.config, args.set)
    if args.data:
        cfg.train.data_dir = args.data
    if not cfg.train.data_dir:
        parser.error("no data directory: pass --data or set train.data_dir")
    # one line per epoch in logs
    summary = train(cfg, args.out, verbose=1 if sys.stdout.isatty() else 2, strategy=strategy)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
