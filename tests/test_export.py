"""Hybrid export: head(encoder(history)) == full(history), core ops only, atomic layout."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import export, schema, signatures
from tfrs_ctx.data import dataset, vocab
from tfrs_ctx.testing import call_signature


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


def test_an_export_without_a_calibration_record_says_so(models):
    """No ``calibration`` passed (an older run's summary): every model says ``unknown``, flagged."""
    out, result = models
    for name in (schema.MODEL_CONTEXT_HEAD, schema.MODEL_FULL, schema.MODEL_ENCODER):
        path = pathlib.Path(out, name, str(result["version"]), "assets.extra", export.INFO_FILE)
        info = json.loads(path.read_text())
        assert info["calibration"]["source"] == "unknown" and info["calibration"]["flagged"], name


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


@pytest.mark.parametrize("source", ["random", "real"])
def test_head_of_encoder_equals_full(models, small_data, source):
    _, result = models
    paths = result["paths"]
    if source == "random":
        raw = _random_raw(small_data, 64, seed=3)
    else:
        batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 64)))
        raw = _raw({k: v.numpy() for k, v in batch.items()}, small_data)
    enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    head_inputs = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}
    head = call_signature(paths["context_head"], head_inputs)
    full = call_signature(paths["full"], raw)
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
    got = call_signature(models[1]["paths"]["full"], raw)[schema.USER_EMBEDDING]
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
    if "k" in args:  # the optional k (servers fill it from the signature's defaults)
        args["k"] = tf.ones([2], tf.int64)
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
    enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    head_inputs = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}
    head = call_signature(paths["context_head"], head_inputs)[schema.USER_EMBEDDING]
    full = call_signature(paths["full"], raw)[schema.USER_EMBEDDING]
    np.testing.assert_allclose(head, full, atol=1e-5)
    np.testing.assert_allclose(full, model.query_embedding(batch).numpy(), atol=1e-5)


# ---- the corpus index, k per request, what each SavedModel carries -------------------------------


def _head_raw(paths, small_data, n: int = 32, seed: int = 5) -> dict[str, np.ndarray]:
    raw = _random_raw(small_data, n, seed=seed)
    enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    return {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}


def test_signature_defaults_make_k_optional(models):
    from tensorflow.core.protobuf import saved_model_pb2

    for name in export.MODEL_NAMES:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((models[0] / name / "7" / "saved_model.pb").read_bytes())
        sig = proto.meta_graphs[0].signature_def["serving_default"]
        if name == schema.MODEL_ENCODER:
            assert schema.REQUEST_K not in sig.inputs and not sig.defaults
        else:
            assert tf.make_ndarray(sig.defaults[schema.REQUEST_K]).tolist() == [20]


def test_k_per_request(models, small_data):
    paths = models[1]["paths"]
    inputs = _head_raw(paths, small_data)
    full = call_signature(paths["context_head"], inputs)
    five = call_signature(paths["context_head"], inputs, k=[5])  # [1]: the same k for every row
    assert five[schema.TOP_K_IDS].shape == (32, 5)
    np.testing.assert_array_equal(five[schema.TOP_K_IDS], full[schema.TOP_K_IDS][:, :5])
    np.testing.assert_array_equal(five[schema.TOP_K_SCORES], full[schema.TOP_K_SCORES][:, :5])
    ks = np.arange(32) % 20 + 1  # [B]: one k per row; output [B, max(k)], padded beyond each row's k
    each = call_signature(paths["context_head"], inputs, k=ks)
    assert each[schema.TOP_K_IDS].shape == (32, 20)
    for row, k in enumerate(ks):
        np.testing.assert_array_equal(each[schema.TOP_K_IDS][row, :k], full[schema.TOP_K_IDS][row, :k])
        assert (each[schema.TOP_K_IDS][row, k:] == -1).all() and np.isneginf(each[schema.TOP_K_SCORES][row, k:]).all()


@pytest.mark.parametrize("k", [[0], [21], [-3], [1, 2, 3]])
def test_bad_k_fails_in_the_graph(models, small_data, k):
    paths = models[1]["paths"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        call_signature(paths["context_head"], _head_raw(paths, small_data, n=4), k=k)


def _variable_names(path) -> list[str]:
    return [name for name, _ in tf.train.list_variables(os.path.join(path, "variables", "variables"))]


def test_each_model_carries_only_what_it_needs(models):
    paths = models[1]["paths"]
    enc, head = _variable_names(paths["encoder"]), _variable_names(paths["context_head"])
    assert not any(n.startswith("index/") for n in enc), "the encoder must not carry the corpus"
    assert any(n.startswith("index/embeddings") for n in head)
    assert any(n.startswith("index/") for n in _variable_names(paths["full"]))
    info = json.loads((models[0] / "context_head" / "7" / "assets.extra" / export.INFO_FILE).read_text())
    retrieval = info["retrieval"]
    assert retrieval["mode"] == "exact" and retrieval["max_k"] == 20 == info["top_k"]
    assert retrieval["n_items"] == info["n_items"] > 0 and retrieval["build_seconds"] >= 0
    assert "retrieval" not in json.loads((models[0] / "encoder" / "7" / "assets.extra" / export.INFO_FILE).read_text())


def test_every_exported_graph_uses_core_ops_only(models, ivf_models):
    from tfrs_ctx.retrieval.core_ops import non_core_ops, saved_model_ops

    for result in (models[1], ivf_models[1]):
        for name, path in result["paths"].items():
            ops = saved_model_ops(path)
            assert not non_core_ops(ops), (name, non_core_ops(ops))
            assert not any("scann" in op.lower() for op in ops)
    assert "RaggedRange" in saved_model_ops(ivf_models[1]["paths"]["context_head"])


@pytest.fixture(scope="module")
def ivf_models(tiny_runs, small_data, tmp_path_factory):
    """The same model exported with an IVF index probing every partition (exact: nprobe = all)."""
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    out = tmp_path_factory.mktemp("ivf_models")
    params = {"n_partitions": 8, "nprobe": 8, "quantization": "none"}
    result = export.export_all(model, str(small_data), str(out), version=7, top_k=20, index="ivf", index_params=params)
    return out, result


def test_ivf_head_with_every_partition_equals_exact_and_full(models, ivf_models, small_data):
    assert ivf_models[1]["retrieval"]["mode"] == "ivf" and ivf_models[1]["retrieval"]["n_partitions"] == 8
    raw = _random_raw(small_data, 48, seed=11)
    paths = ivf_models[1]["paths"]
    enc = call_signature(paths["encoder"], {k: raw[k] for k in signatures.ENCODER_INPUTS})
    inputs = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: enc[schema.ENCODED_HISTORY]}
    ivf = call_signature(paths["context_head"], inputs)
    exact = call_signature(models[1]["paths"]["context_head"], inputs)
    for name in (schema.TOP_K_IDS, schema.TOP_K_SCORES):  # same total order, same canonical scores
        np.testing.assert_array_equal(ivf[name], exact[name])
    full = call_signature(paths["full"], raw)
    np.testing.assert_allclose(full[schema.TOP_K_SCORES], ivf[schema.TOP_K_SCORES], atol=1e-5)
    assert (full[schema.TOP_K_IDS] == ivf[schema.TOP_K_IDS]).mean() > 0.99


def test_ivf_nprobe_calibrated_to_target_overlap(tiny_runs, small_data, tmp_path):
    """Without --nprobe an IVF export picks the smallest nprobe reaching the target overlap on the
    training period's requests and records it in model_info.json."""
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    params = {"n_partitions": 16, "quantization": "none", "target_overlap": 1.0}
    result = export.export_all(
        model, str(small_data), str(tmp_path), version=3, top_k=20, index="ivf", index_params=params
    )
    cfg = result["retrieval"]
    assert cfg["nprobe_source"] == "target_overlap" and cfg["calibration"]["target"] == 1.0
    assert cfg["calibration"]["queries"] > 0 and cfg["calibration"]["overlap"] == 1.0 and 1 <= cfg["nprobe"] <= 16
    with open(os.path.join(result["paths"]["context_head"], "assets.extra", export.INFO_FILE)) as f:
        assert json.load(f)["retrieval"]["nprobe"] == cfg["nprobe"]
    fixed = export.build_index(model, 20, "ivf", str(small_data), n_partitions=16, nprobe=5)
    assert fixed.get_config()["nprobe"] == 5 and fixed.get_config()["nprobe_source"] == "given"


def test_tiny_corpus_pads_missing_results(tiny_runs, small_data, tmp_path):
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    n = int(model.corpus_item_ids.shape[0])
    result = export.export_all(model, str(small_data), str(tmp_path), version=1, top_k=n + 5)
    paths = result["paths"]
    out = call_signature(paths["context_head"], _head_raw(paths, small_data, n=3))
    assert out[schema.TOP_K_IDS].shape == (3, n + 5)
    assert (out[schema.TOP_K_IDS][:, n:] == -1).all() and np.isneginf(out[schema.TOP_K_SCORES][:, n:]).all()
    assert (out[schema.TOP_K_IDS][:, :n] >= 0).all()


def test_evaluate_ranks_through_the_served_index(models, tiny_runs, small_data):
    """The served row (exact index here) agrees with exact scoring for labels within the exported K."""
    from tfrs_ctx.evaluation import evaluate
    from tfrs_ctx.evaluation.metrics import label_ranks
    from tfrs_ctx.training.run_dir import load_trained

    served, info = evaluate.served_index_ranks(str(models[0]), str(small_data), False, max_requests=150)
    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 150)))
    corpus = model.corpus_embeddings().numpy()
    exact = label_ranks(model.query_embedding(batch), corpus, batch[schema.LABEL_ITEM].numpy())
    assert info["top_k"] == 20 and len(served) == len(exact) == 150  # the eval split holds more than 150
    within = exact < 20
    assert (served[within] == exact[within]).mean() > 0.97  # ties may order differently
    assert (served[~within] >= 20).all()
