"""Shared fixtures. TF_USE_LEGACY_KERAS must be set before TensorFlow is imported."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ML100K = pathlib.Path(os.environ.get("TFRS_CTX_ML100K", REPO.parent / "shared" / "datasets" / "ml-100k"))


def predict_request(model: str, inputs: dict, *, version: int | None = None, label: str | None = None, signature=""):
    """A PredictRequest from numpy arrays or ready TensorProtos; an input set to ``None`` is left out."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for name, value in inputs.items():
        if value is not None:
            proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
            req.inputs[name].CopyFrom(proto)
    return req


@pytest.fixture(scope="session")
def ml100k_dir() -> pathlib.Path:
    """MovieLens-100k (read in place; its licence forbids copying it into the repo)."""
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100k not found at {ML100K} (set TFRS_CTX_ML100K to its folder)")
    return ML100K


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> pathlib.Path:
    """A small synthetic raw-table directory (300 users), generated once per session."""
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("raw")
    generate(str(out), SyntheticConfig(users=300, items=600, subject_items=800, advertisers=60, seed=7), progress=False)
    return out


@pytest.fixture(scope="session")
def small_data(small_raw, tmp_path_factory) -> pathlib.Path:
    """TFRecords, vocabularies and corpus built by the real Beam pipeline from ``small_raw``."""
    from beam_pipelines import build_training_data

    out = tmp_path_factory.mktemp("data")
    build_training_data.run(["--input", str(small_raw), "--output", str(out)])
    return out


TINY_MODEL = [
    "model.embedding_dim=16",
    "model.ff_dim=32",
    "model.mlp_hidden=[32]",
    "model.output_dim=16",
    "model.category_dim=8",
    "model.context_dim=16",
    "train.batch_size=64",
    "train.epochs=2",
    "train.validation_examples=200",
]


def train_tiny(data_dir: pathlib.Path, run_dir: pathlib.Path, *overrides: str) -> pathlib.Path:
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training import train

    cfg = load_config("synthetic", [*TINY_MODEL, *overrides])
    cfg.train.data_dir = str(data_dir)
    train.train(cfg, str(run_dir), verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def tiny_runs(small_data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny contextual and a tiny baseline model trained on ``small_data``."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "contextual": train_tiny(small_data, root / "contextual"),
        "baseline": train_tiny(small_data, root / "baseline", "model.use_context=false"),
    }


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory) -> pathlib.Path:
    """The end-to-end demo at small scale: every stage, a tiny model; returns its workdir."""
    from tfrs_ctx.apps import demo

    work = tmp_path_factory.mktemp("demo")
    tiny = [f"--set={o}" for o in TINY_MODEL if not o.startswith("train.epochs")]
    rc = demo.main(["--workdir", str(work), "--users", "400", "--epochs", "2", "--bootstrap", "100", *tiny])
    assert rc == 0
    return work


@pytest.fixture(scope="session")
def demo_server(demo_work):
    """The compatible model server on the demo's models (a separate process on loopback)."""
    from serving.launcher import start_server

    with start_server(demo_work / "models", server="python") as server:
        server.wait_ready(300)
        yield server


# ---- the serving client's tests (tests/serving): a reader, the demo's ids, a server of another version
@pytest.fixture(scope="module")
def reader(demo_work):
    """A Feast reader on the demo's SQLite store."""
    from serving.client.features import FeastFeatureReader

    return FeastFeatureReader.open(str(demo_work / "store"))


@pytest.fixture(scope="module")
def known(demo_work):
    """The demo's user ids and subject item ids."""
    import pandas as pd

    from tfrs_ctx import schema

    users = pd.read_parquet(demo_work / "raw" / schema.USERS.name)[schema.USER_ID].tolist()
    subjects = pd.read_parquet(demo_work / "raw" / schema.SUBJECT_ITEMS.name)[schema.ITEM_ID].tolist()
    return users, subjects


@pytest.fixture(scope="module")
def other_version_server(demo_work, tmp_path_factory):
    """A server whose context_head has only a different version than the stored vectors'."""
    import shutil

    from serving.launcher import start_server
    from tfrs_ctx import schema

    models = tmp_path_factory.mktemp("models_v2")
    (version,) = [p.name for p in (demo_work / "models" / schema.MODEL_CONTEXT_HEAD).iterdir()]
    shutil.copytree(
        demo_work / "models" / schema.MODEL_CONTEXT_HEAD / version, models / schema.MODEL_CONTEXT_HEAD / "1"
    )
    with start_server(
        models,
        config=None,
        extra_args=[
            "--model_name",
            schema.MODEL_CONTEXT_HEAD,
            "--model_base_path",
            str(models / schema.MODEL_CONTEXT_HEAD),
        ],
        server="python",
    ) as server:
        server.wait_ready(300)
        yield server
