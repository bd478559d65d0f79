"""Shared fixtures. TF_USE_LEGACY_KERAS must be set before TensorFlow is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ML100K = pathlib.Path(os.environ.get("TFRS_CTX_ML100K", REPO.parent / "shared" / "datasets" / "ml-100k"))


@pytest.fixture(scope="session")
def ml100k_dir() -> pathlib.Path:
    """MovieLens-100k (read in place; its licence forbids copying it into the repo)."""
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100k not found at {ML100K} (set TFRS_CTX_ML100K to its folder)")
    return ML100K


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> pathlib.Path:
    """A small synthetic raw-table directory (300 users), generated once per session."""
    from tfrs_ctx.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("raw")
    generate(str(out), SyntheticConfig(users=300, items=600, subject_items=800, advertisers=60, seed=7), progress=False)
    return out
