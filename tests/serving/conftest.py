"""Fixtures of the serving client's tests: a Feast reader on the demo's store, its users and subject items,
and a server whose context_head serves only another version than the stored vectors'."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from serving.client.features import FeastFeatureReader
from tfrs_ctx import schema


@pytest.fixture(scope="module")
def reader(demo_work):
    return FeastFeatureReader.open(str(demo_work / "store"))


@pytest.fixture(scope="module")
def known(demo_work):
    users = pd.read_parquet(demo_work / "raw" / schema.USERS.name)[schema.USER_ID].tolist()
    subjects = pd.read_parquet(demo_work / "raw" / schema.SUBJECT_ITEMS.name)[schema.ITEM_ID].tolist()
    return users, subjects


@pytest.fixture(scope="module")
def other_version_server(demo_work, tmp_path_factory):
    """A server whose context_head has only a different version than the stored vectors'."""
    from serving.launcher import start_server

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
