"""The demo end to end at small scale: real Beam, training, export, Feast, gRPC server, client."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from serving.client.candidates import AdRequest, CandidateClient
from serving.client.features import FeastFeatureReader
from tfrs_ctx import schema
from tfrs_ctx.evaluation import metrics

pytestmark = pytest.mark.slow


def _raw_history(raw_dir, user_id: int, as_of: int) -> dict[str, np.ndarray]:
    """An independent oracle: the user's last MAX_HISTORY conversions at or before ``as_of``."""
    conv = pd.read_parquet(raw_dir / schema.CONVERSIONS.name)
    conv = conv[(conv[schema.USER_ID] == user_id) & (conv[schema.TIMESTAMP] <= as_of)]
    conv = conv.sort_values([schema.TIMESTAMP, schema.ITEM_ID, schema.ADVERTISER_ID, schema.EVENT_TYPE])
    tail = conv.tail(schema.MAX_HISTORY)
    L = schema.MAX_HISTORY
    return {
        schema.HISTORY_ITEM: np.asarray([schema.pad_left(tail[schema.ITEM_ID].tolist(), L, 0)], np.int64),
        schema.HISTORY_ADVERTISER: np.asarray([schema.pad_left(tail[schema.ADVERTISER_ID].tolist(), L, 0)], np.int64),
        schema.HISTORY_EVENT_TYPE: np.asarray([schema.pad_left(tail[schema.EVENT_TYPE].tolist(), L, "")], object),
        schema.HISTORY_TIME_GAP: np.asarray(
            [schema.pad_left([schema.time_gap_bucket(as_of - t) for t in tail[schema.TIMESTAMP]], L, 0)], np.int64
        ),
        schema.HISTORY_LENGTH: np.asarray([len(tail)], np.int64),
    }


def test_demo_writes_the_report_with_every_figure(demo_work):
    report = json.loads((demo_work / "report" / "report.json").read_text())
    assert report["requests"] > 0
    for row in ("popularity", "baseline", "contextual", "contextual_no_context"):
        for k in metrics.KS:
            assert 0.0 <= report["rows"][row][f"recall@{k}"]["mean"] <= 1.0
    assert report["lift"]["recall@100"]["lift"] > 0
    assert (demo_work / "report" / "recall_at_k.png").stat().st_size > 10_000
    shown = json.loads((demo_work / "recommendations.json").read_text())
    assert len(shown) == 9 and all(len(s["ads"]) == 10 for s in shown)


def test_predict_equals_the_in_process_full_model(demo_work, demo_server):
    state = json.loads((demo_work / "store" / "encode_state.json").read_text())
    users = pd.read_parquet(demo_work / "raw" / schema.USERS.name)
    user = int(users[schema.USER_ID].iloc[3])
    subjects = pd.read_parquet(demo_work / "raw" / schema.SUBJECT_ITEMS.name)
    subject = subjects.iloc[5]
    reader = FeastFeatureReader.open(str(demo_work / "store"))
    with CandidateClient(f"127.0.0.1:{demo_server.port}", reader) as client:
        rec = client.recommend([AdRequest(user, int(subject[schema.ITEM_ID]))])[0]
    assert rec.history_used and rec.context_used and rec.model_version == state["model_version"]

    demo_row = users[users[schema.USER_ID] == user].iloc[0]
    inputs = _raw_history(demo_work / "raw", user, state["as_of"])
    cats = schema.pad_right(list(subject[schema.CATEGORIES]), schema.MAX_CATEGORIES, 0)
    weights = schema.pad_right(list(subject[schema.CONFIDENCES]), schema.MAX_CATEGORIES, 0.0)
    inputs[schema.CONTEXT_CATEGORIES] = np.asarray([cats], np.int64)
    inputs[schema.CONTEXT_WEIGHTS] = np.asarray([weights], np.float32)
    for column, feature in schema.DEMOGRAPHIC_FEATURE_OF_COLUMN.items():
        inputs[feature] = np.asarray([demo_row[column] or ""], object)
    full = tf.saved_model.load(str(demo_work / "models" / schema.MODEL_FULL / str(state["model_version"])))
    inputs[schema.REQUEST_K] = np.asarray([len(rec.item_ids)], np.int64)  # the exported max (the client's default)
    out = full.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
    expected_ids = out[schema.TOP_K_IDS].numpy()[0].tolist()
    expected_scores = out[schema.TOP_K_SCORES].numpy()[0]
    np.testing.assert_allclose(rec.scores, expected_scores, atol=1e-5)
    # The stored vector was encoded in a Beam batch, the reference in a batch of one: ads whose scores
    # tie within 1e-5 may come in another order (another matmul kernel); every other rank must match.
    close = np.abs(np.diff(expected_scores)) <= 1e-5
    tied = np.r_[close, False] | np.r_[False, close]
    assert [a for a, t in zip(rec.item_ids, tied, strict=True) if not t] == [
        b for b, t in zip(expected_ids, tied, strict=True) if not t
    ]
    assert len(set(rec.item_ids) & set(expected_ids)) >= len(expected_ids) - int(tied[-1])


def signature_specs(model_dir) -> dict:
    """``serving_default`` inputs and outputs (dtype, shape) of a SavedModel version directory."""
    from serving.model_server.servable import read_meta_graph

    sig = read_meta_graph(str(model_dir)).signature_def["serving_default"]

    def specs(tensors) -> dict:
        return {
            name: {"dtype": tf.dtypes.as_dtype(t.dtype).name, "shape": [d.size for d in t.tensor_shape.dim]}
            for name, t in sorted(tensors.items())
        }

    defaults = {
        name: {"dtype": tf.dtypes.as_dtype(t.dtype).name, "value": tf.make_ndarray(t).tolist()}
        for name, t in sorted(sig.defaults.items())
    }
    return {
        "inputs": specs(sig.inputs),
        "outputs": specs(sig.outputs),
        "defaults": defaults,
        "method_name": sig.method_name,
    }


def test_exported_signatures_are_the_recorded_interface(demo_work):
    """The demo's three SavedModels serve exactly the signatures recorded in tests/golden/ (the
    client, the Feast views and every deployed caller depend on them): a change is deliberate."""
    golden = json.loads((pathlib.Path(__file__).parent / "golden" / "demo_signatures.json").read_text())
    for name, expected in golden.items():
        base = demo_work / "models" / name
        version = max(base.iterdir(), key=lambda p: int(p.name))
        assert signature_specs(version) == expected, name
