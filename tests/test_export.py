"""Hybrid export: head(encoder(history)) == full(history), core ops only, atomic layout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import export, schema, signatures
from tfrs_ctx.data import dataset, vocab


@pytest.fixture(scope="module")
def models(tiny_runs, small_data, tmp_path_factory):
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    out = tmp_path_factory.mktemp("models")
    handler = _Records()
    tf_logger = logging.getLogger("tensorflow")  # where TF and TF-Keras log their Python warnings
    tf_logger.addHandler(handler)
    try:
        result = export.export_all(model, str(small_data), str(out), version=7, top_k=20)
    finally:
        tf_logger.removeHandler(handler)
    return out, {**result, "warnings": handler.messages}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_export_logs_no_keras_serialization_warnings(models):
    """The TFRS task is built and the model has a serializable config: no "not built" or
    "non-serializable __init__ arguments" warnings at export."""
    _, result = models
    noisy = [m for m in result["warnings"] if "not built" in m or "non-serializable" in m]
    assert not noisy, noisy


def _raw(features: dict, data_dir) -> dict[str, np.ndarray]:
    """Vocab indices -> the raw values the signatures take (PAD -> 0 / "")."""
    out = {}
    for name, spec in signatures.full_inputs_spec().items():
        value = np.asarray(features[name])
        if spec.vocab:
            values = vocab.load_vocab(str(data_dir), spec.vocab)
            table = np.asarray(["", "__oov__", *values], object)
            raw = table[value]
            if spec.dtype == "int64":
                raw = np.asarray([int(v) if v not in ("", "__oov__") else 0 for v in raw.ravel()]).reshape(value.shape)
            else:
                raw = raw.astype(bytes)
            value = raw
        out[name] = value.astype(spec.numpy_dtype) if spec.dtype != "string" else value
    return out


def _random_raw(data_dir, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = np.asarray([int(v) for v in vocab.load_vocab(str(data_dir), schema.VOCAB_ITEM)])
    cats = np.asarray([int(v) for v in vocab.load_vocab(str(data_dir), schema.VOCAB_CATEGORY)])
    L, C = schema.MAX_HISTORY, schema.MAX_CATEGORIES
    raw = {
        schema.HISTORY_ITEM: rng.choice(items, (n, L)),
        schema.HISTORY_ADVERTISER: rng.integers(0, 80, (n, L)),
        schema.HISTORY_EVENT_TYPE: rng.choice(np.asarray([e.encode() for e in schema.EVENT_TYPES], object), (n, L)),
        schema.HISTORY_TIME_GAP: rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (n, L)),
        schema.HISTORY_LENGTH: rng.integers(0, L + 1, n),
        schema.CONTEXT_CATEGORIES: rng.choice(cats, (n, C)),
        schema.CONTEXT_WEIGHTS: (rng.random((n, C)) * (rng.random((n, 1)) > 0.3)).astype(np.float32),
        schema.USER_AGE_BUCKET: rng.choice(np.asarray([b"25-34", b"", b"65+", b"bogus"], object), n),
        schema.USER_COUNTRY: rng.choice(np.asarray([b"US", b"", b"DE"], object), n),
        schema.USER_GENDER: rng.choice(np.asarray([b"female", b"male", b""], object), n),
    }
    return raw


def _call(path: str, inputs: dict) -> dict[str, np.ndarray]:
    fn = tf.saved_model.load(path).signatures["serving_default"]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


@pytest.mark.parametrize("source", ["random", "real"])
def test_head_of_encoder_equals_full(models, small_data, source):
    _, result = models
    paths = result["paths"]
    if source == "random":
        raw = _random_raw(small_data, 64, seed=3)
    else:
        batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 64)))
        raw = _raw({k: v.numpy() for k, v in batch.items()}, small_data)
    enc = _call(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    head_inputs = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}
    head = _call(paths["context_head"], head_inputs)
    full = _call(paths["full"], raw)
    np.testing.assert_allclose(head[schema.USER_EMBEDDING], full[schema.USER_EMBEDDING], atol=1e-5)
    np.testing.assert_allclose(head[schema.TOP_K_SCORES], full[schema.TOP_K_SCORES], atol=1e-5)
    assert (head[schema.TOP_K_IDS] == full[schema.TOP_K_IDS]).mean() > 0.99  # ties may swap
    assert set(head[schema.MODEL_VERSION].tolist()) == {7} == set(enc[schema.MODEL_VERSION].tolist())
    assert head[schema.TOP_K_IDS].shape == (64, 20)
    assert np.all(np.diff(head[schema.TOP_K_SCORES], axis=1) <= 1e-6)  # ranked


def test_full_export_matches_the_in_process_model(models, small_data, tiny_runs):
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 32)))
    expected = model.query_embedding(batch).numpy()
    raw = _raw({k: v.numpy() for k, v in batch.items()}, small_data)
    got = _call(models[1]["paths"]["full"], raw)[schema.USER_EMBEDDING]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_layout_atomic_and_versioned(models):
    out, _ = models
    for name in export.MODEL_NAMES:
        entries = os.listdir(out / name)
        assert entries == ["7"], entries  # no temporary directory left behind
        extra = out / name / "7" / "assets.extra"
        assert (extra / export.WARMUP_FILE).stat().st_size > 0
        assert json.loads((extra / export.INFO_FILE).read_text())["model_version"] == 7
    with pytest.raises(FileExistsError):  # versions are immutable: refused before any work
        export.export_all(None, "", str(out), version=7)  # type: ignore[arg-type]


FRESH = """
import sys, numpy as np, tensorflow as tf
for path in sys.argv[1:]:
    sig = tf.saved_model.load(path).signatures["serving_default"]
    args = {}
    for name, spec in sig.structured_input_signature[1].items():
        shape = [2] + list(spec.shape[1:])
        args[name] = tf.zeros(shape, spec.dtype) if spec.dtype != tf.string else tf.fill(shape, "")
    out = sig(**args)
    assert all(np.isfinite(v.numpy()).all() for v in out.values() if v.dtype.is_floating)
bad = [m for m in sys.modules if m.startswith(("tensorflow_recommenders", "tfrs_ctx", "tf_keras"))]
assert not bad, bad
print("OK", len(sys.argv) - 1)
"""


def test_loads_in_a_fresh_process_without_the_project(models, tmp_path):
    paths = list(models[1]["paths"].values())
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, *paths], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 3" in proc.stdout


def test_saved_model_cli_shows_named_signatures(models):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run(
        [cli, "show", "--all", "--dir", models[1]["paths"]["context_head"]], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (schema.ENCODED_HISTORY, schema.CONTEXT_CATEGORIES, schema.TOP_K_IDS, schema.MODEL_VERSION):
        assert name in proc.stdout
    assert "serving_default" in proc.stdout


def test_dense_model_exports_its_time_gap_semantics_and_hybrid_equals_full(small_data, tmp_path):
    """A dense-trained model: the same three SavedModels; the caller feeds next-event gaps (model_info says so)."""
    from conftest import train_tiny

    from tfrs_ctx.training.run_dir import load_trained

    run = train_tiny(small_data, tmp_path / "dense", "train.mode=dense", "train.epochs=1")
    model, _ = load_trained(str(run), str(small_data))
    result = export.export_all(model, str(small_data), str(tmp_path / "models"), version=9, top_k=20)
    paths = result["paths"]
    for path in paths.values():
        with open(os.path.join(path, "assets.extra", schema.MODEL_INFO_FILE)) as f:
            assert json.load(f)["time_gap"] == schema.TIME_GAP_NEXT_EVENT
    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 32)))
    features = {k: v.numpy() for k, v in batch.items()}
    features[schema.HISTORY_TIME_GAP] = features[schema.HISTORY_NEXT_GAP]  # the signature's gaps, its semantics
    raw = _raw(features, small_data)
    enc = _call(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    head_inputs = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}
    head = _call(paths["context_head"], head_inputs)[schema.USER_EMBEDDING]
    full = _call(paths["full"], raw)[schema.USER_EMBEDDING]
    np.testing.assert_allclose(head, full, atol=1e-5)
    np.testing.assert_allclose(full, model.query_embedding(batch).numpy(), atol=1e-5)
