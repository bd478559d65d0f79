"""A training run's directory: its layout, the trained model's save and load, the summary.

``RUN_DIR/config.yaml`` (the config it was trained with), ``checkpoints/`` (resume),
``final/`` (the weights evaluation, calibration and export load), ``logs/`` (TensorBoard) and
``train_summary.json``. Training, calibration and evaluation read and write runs through this
module only.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.config import Config, load_config
from tfrs_ctx.data import dataset
from tfrs_ctx.models.two_tower import LOSS_MIXED, ContextualTwoTower, resolve_loss

FINAL_DIR = "final"
FINAL_WEIGHTS = "weights"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "train_summary.json"
LOGS_DIR = "logs"


def build_model(cfg: Config) -> ContextualTwoTower:
    meta = dataset.load_metadata(cfg.train.data_dir)
    corpus = dataset.load_corpus(cfg.train.data_dir)
    if resolve_loss(cfg.model, len(corpus[schema.ITEM_ID])) == LOSS_MIXED:
        corpus[schema.LABEL_SAMPLING_PROB] = ad_popularity(cfg.train.data_dir, corpus[schema.ITEM_ID])
    share = cfg.train.dense_no_context_share
    return ContextualTwoTower(cfg.model, meta["vocab_sizes"], corpus, seed=cfg.train.seed, dense_no_context_share=share)


def ad_popularity(data_dir: str, item_ids: np.ndarray) -> np.ndarray:
    """Training targets per ad (``item_counts.tsv``), aligned with ``item_ids``: mixed negatives' popularity."""
    with tf.io.gfile.GFile(os.path.join(data_dir, schema.ITEM_COUNTS_FILE)) as f:
        counts = np.loadtxt(f, dtype=np.int64, delimiter="\t", ndmin=2)
    if np.array_equal(counts[:, 0], item_ids):  # the file is in vocabulary order, as the corpus
        return counts[:, 1].astype(np.float32)
    lookup = dict(zip(counts[:, 0].tolist(), counts[:, 1].tolist(), strict=True))
    return np.asarray([lookup.get(int(i), 0) for i in item_ids], dtype=np.float32)


def load_trained(run_dir: str, data_dir: str | None = None) -> tuple[ContextualTwoTower, Config]:
    """Rebuild a trained model from its run directory (weights from ``final/``)."""
    cfg = load_config(os.path.join(run_dir, CONFIG_FILE))
    if data_dir:
        cfg.train.data_dir = data_dir
    model = build_model(cfg)
    status = tf.train.Checkpoint(model=model).read(os.path.join(run_dir, FINAL_DIR, FINAL_WEIGHTS))
    model(dummy_batch(1), training=False)  # create the variables; restores them
    model.candidate_embedding({k: v[:1] for k, v in model.corpus.items()})  # the tower on one ad, not 10M
    status.assert_existing_objects_matched().expect_partial()
    return model, cfg


def dummy_batch(batch: int) -> dict[str, tf.Tensor]:
    """A batch of all-padding examples (no history, no context, demographics missing)."""
    out = {}
    for f in schema.FEATURES.values():
        dtype = tf.int64 if f.dtype == "int64" else tf.float32
        out[f.name] = tf.zeros((batch, *f.shape), dtype)
    return out


def read_summary(run_dir: str) -> dict:
    """A run's ``train_summary.json`` (empty if it has none yet)."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_summary(run_dir: str, summary: dict) -> None:
    with open(os.path.join(run_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)


def save_final(model: ContextualTwoTower, run_dir: str) -> None:
    """The weights evaluation and export load (``final/``)."""
    tf.train.Checkpoint(model=model).write(os.path.join(run_dir, FINAL_DIR, FINAL_WEIGHTS))
