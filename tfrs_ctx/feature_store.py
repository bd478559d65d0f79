"""Feast helpers: the store directory layout, apply / materialize wrappers, online reads.

A *store directory* (``STORE``) holds everything one Feast deployment of this product
needs on disk: the Parquet offline sources the user-encoding pipeline writes
(``user_encodings/*.parquet``, ``user_demographics.parquet``, ``subject_items.parquet``),
the pipeline's state (``encode_state.json``: watermark, model version), and, with the
SQLite default, the Feast registry and online store. ``feature_repo/`` holds the
definitions and resolves every path from the ``TFRS_CTX_STORE`` environment variable
(``schema.STORE_DIR_ENV``), so one repo serves any number of store directories::

    export TFRS_CTX_STORE=$PWD/store
    feast -c feature_repo apply
    feast -c feature_repo materialize-incremental "$(date -u +%Y-%m-%dT%H:%M:%S)"

The helpers here do the same in-process (:func:`open_store`, :func:`apply`,
:func:`materialize`) and read the online store for the serving client
(:func:`read_user_features`, :func:`read_subject_items`): a user or subject item the
store does not know comes back as ``None``, never as zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import pathlib
import re
import runpy
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tfrs_ctx import schema as S

if TYPE_CHECKING:  # pragma: no cover
    from feast import FeatureStore

STAGING_DIR = ".staging"  # STORE/<dir>/<run>/: a run's outputs before they are published
# Where a never-materialized feature view starts: before any valid raw timestamp.
FIRST_MATERIALIZE_START = dt.datetime.fromtimestamp(S.MIN_TIMESTAMP, dt.UTC)
USER_FEATURES: dict[str, tuple[str, ...]] = {
    S.FV_USER_SEQUENCE: (S.ENCODED_HISTORY, S.HISTORY_LENGTH, S.MODEL_VERSION),
    S.FV_USER_DEMOGRAPHICS: S.DEMOGRAPHIC_COLUMNS,
}
SUBJECT_ITEM_FEATURES: dict[str, tuple[str, ...]] = {
    S.FV_SUBJECT_ITEM_CONTEXT: (S.CATEGORIES, S.CONFIDENCES, S.AD_ID)  # AD_ID: the ad it is (None: not an ad)
}


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StorePaths:
    """Absolute paths of a store directory's files."""

    root: str

    @property
    def encodings(self) -> str:
        return os.path.join(self.root, S.USER_ENCODINGS_DIR)

    @property
    def demographics(self) -> str:
        return os.path.join(self.root, S.USER_DEMOGRAPHICS_FILE)

    @property
    def subject_items(self) -> str:
        return os.path.join(self.root, S.SUBJECT_ITEMS_FILE)

    @property
    def state(self) -> str:
        return os.path.join(self.root, S.ENCODE_STATE_FILE)

    @property
    def staging(self) -> str:
        return os.path.join(self.root, STAGING_DIR)


def store_paths(store_dir: str | os.PathLike) -> StorePaths:
    return StorePaths(os.path.abspath(os.fspath(store_dir)))


def store_dir_from_env() -> str:
    """The store directory named by ``$TFRS_CTX_STORE`` (what ``feature_repo/`` resolves paths in)."""
    value = os.environ.get(S.STORE_DIR_ENV, "")
    if not value:
        raise RuntimeError(
            f"{S.STORE_DIR_ENV} is not set: export {S.STORE_DIR_ENV}=/path/to/store before running feast "
            "(it holds the Parquet sources, and with SQLite the registry and online store)"
        )
    return os.path.abspath(value)


def default_repo_dir() -> pathlib.Path:
    """``feature_repo/`` of the source tree, else the copy ``setup.py`` installs under ``share/``."""
    here = pathlib.Path(__file__).resolve().parents[1] / "feature_repo"
    if (here / S.FEAST_YAML).exists():
        return here
    return pathlib.Path(sys.prefix) / "share" / "tfrs-ctx" / "feature_repo"


def repo_yaml(repo: str | os.PathLike | None = None, online: str = "sqlite") -> pathlib.Path:
    """The repo's ``feature_store.yaml`` for an online store: ``sqlite`` (default) or ``redis``."""
    names = {"sqlite": S.FEAST_YAML, "redis": S.FEAST_REDIS_YAML}
    if online not in names:
        raise ValueError(f"online store must be one of {sorted(names)}, got {online!r}")
    return pathlib.Path(repo or default_repo_dir()) / names[online]


def redis_yaml_with_ttl(key_ttl_seconds: int, dest_dir: str | os.PathLike, repo: str | os.PathLike | None = None):
    """A copy of the repo's Redis yaml (in ``dest_dir``) whose keys expire ``key_ttl_seconds`` after
    their last write (Feast's ``key_ttl_seconds``; every materialization of a user renews it).

    A user's key holds all of its feature views, so a user the daily job has not re-encoded for the
    TTL drops out of Redis altogether and reads as unknown (``None``): keep the TTL above the
    longest gap between re-encodings you want served (the sequence view's own TTL is 2 days).
    """
    if key_ttl_seconds <= 0:
        raise ValueError(f"key_ttl_seconds must be > 0, got {key_ttl_seconds}")
    text = repo_yaml(repo, online="redis").read_text()
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("connection_string:"))
    lines.insert(at + 1, f"  key_ttl_seconds: {int(key_ttl_seconds)}")
    out = pathlib.Path(dest_dir) / f"feature_store.redis.ttl{int(key_ttl_seconds)}.yaml"
    out.write_text("\n".join(lines) + "\n")
    return out


@contextlib.contextmanager
def store_env(store_dir: str | os.PathLike, **extra: str) -> Iterator[None]:
    """Set ``$TFRS_CTX_STORE`` (and any ``extra`` variables) for the duration of the block."""
    values = {S.STORE_DIR_ENV: store_paths(store_dir).root, **extra}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --------------------------------------------------------------------------------------
# Apply and materialize
# --------------------------------------------------------------------------------------
def open_store(
    store_dir: str | os.PathLike, repo: str | os.PathLike | None = None, fs_yaml: str | os.PathLike | None = None
) -> FeatureStore:
    """A ``FeatureStore`` on ``store_dir`` configured by the repo's yaml (default: SQLite).

    ``fs_yaml`` defaults to ``$FEAST_FS_YAML_FILE_PATH`` when set (as the Feast CLI does),
    else ``repo/feature_store.yaml``. The yaml's ``${VARS}`` are expanded now; one left
    unexpanded (e.g. ``REDIS_CONNECTION_STRING`` unset) is an error.
    """
    from feast import FeatureStore
    from feast.constants import FEAST_FS_YAML_FILE_PATH_ENV_NAME

    repo = pathlib.Path(repo or default_repo_dir()).resolve()
    fs_yaml = pathlib.Path(fs_yaml or os.environ.get(FEAST_FS_YAML_FILE_PATH_ENV_NAME) or repo / S.FEAST_YAML)
    with store_env(store_dir):
        unset = _unset_variables(fs_yaml.read_text())
        if unset:
            raise RuntimeError(f"{fs_yaml}: environment variable(s) not set: {', '.join(unset)}")
        return FeatureStore(repo_path=str(repo), fs_yaml_file=fs_yaml.resolve())


def _unset_variables(yaml_text: str) -> list[str]:
    """``${VARS}`` of a yaml's non-comment lines that the environment does not set."""
    lines = [line.split("#", 1)[0] for line in yaml_text.splitlines()]
    return sorted({m for m in re.findall(r"\$\{(\w+)\}", "\n".join(lines)) if not os.environ.get(m)})


def load_definitions(store_dir: str | os.PathLike, repo: str | os.PathLike | None = None) -> list[Any]:
    """The Feast objects of ``repo/features.py``, evaluated fresh for ``store_dir``."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    path = pathlib.Path(repo or default_repo_dir()) / S.FEAST_DEFINITIONS
    with store_env(store_dir):
        namespace = runpy.run_path(str(path))
    kinds = (Entity, DataSource, FeatureView, FeatureService)
    return [obj for obj in namespace.values() if isinstance(obj, kinds)]


def apply(
    store_dir: str | os.PathLike, repo: str | os.PathLike | None = None, fs_yaml: str | os.PathLike | None = None
) -> FeatureStore:
    """``feast apply`` in-process: register the repo's definitions for ``store_dir``."""
    store = open_store(store_dir, repo, fs_yaml)
    store.apply(load_definitions(store_dir, repo))
    return store


def registry_exists(store: FeatureStore) -> bool:
    """Whether the store's registry file exists (``feast apply`` ran for this configuration)."""
    path = store.config.registry.path
    return os.path.exists(path if os.path.isabs(path) else os.path.join(str(store.repo_path), path))


def materialize(store: FeatureStore, end: dt.datetime | None = None) -> dict[str, str]:
    """``materialize-incremental`` up to ``end`` (default now, UTC); returns ``{view: how}``.

    A view never materialized before starts at ``FIRST_MATERIALIZE_START`` rather than at
    ``end - ttl`` (Feast's default), so a fresh online store also gets the rows of users
    whose last encoding is older than the TTL (the daily job re-encodes only active users).
    """
    end = end or dt.datetime.now(dt.UTC)
    views = store.list_feature_views()
    fresh = [v.name for v in views if v.most_recent_end_time is None]
    seen = [v.name for v in views if v.most_recent_end_time is not None]
    if fresh:
        store.materialize(start_date=FIRST_MATERIALIZE_START, end_date=end, feature_views=fresh)
    if seen:
        store.materialize_incremental(end_date=end, feature_views=seen)
    return {**dict.fromkeys(fresh, "full"), **dict.fromkeys(seen, "incremental")}


def copy_sources(store_dir: str, dest: str) -> str:
    """Copy a store directory's offline sources and state (not registries or online stores) to ``dest``.

    A Redis registry records how far it has materialized: a fresh Redis needs a fresh copy.
    """
    src, out = store_paths(store_dir), store_paths(dest)
    shutil.copytree(src.encodings, out.encodings)
    for name in ("demographics", "subject_items", "state"):
        if os.path.exists(getattr(src, name)):
            shutil.copy2(getattr(src, name), getattr(out, name))
    return out.root


# --------------------------------------------------------------------------------------
# Online reads
# --------------------------------------------------------------------------------------
def feature_refs(views: dict[str, tuple[str, ...]]) -> list[str]:
    return [f"{view}:{name}" for view, names in views.items() for name in names]


def _online(store: FeatureStore, views: dict[str, tuple[str, ...]], key: str, ids: Sequence[int]) -> dict:
    rows = {key: [int(i) for i in ids]}
    return store.get_online_features(features=feature_refs(views), entity_rows=rows).to_dict(
        include_event_timestamps=True
    )


def read_user_features(store: FeatureStore, user_ids: Sequence[int]) -> list[dict[str, Any] | None]:
    """Per user: ``None`` when the store knows nothing of them, else a dict of every user feature.

    ``encoded_history`` is a float32 array ``[N * d]``; it is ``None``, with
    ``history_length``, ``model_version`` and ``event_timestamp`` (unix seconds of the
    encoding), when the user has no encoding (no conversion history). Demographics are raw
    strings, ``None`` when missing.
    """
    return _user_rows(_online(store, USER_FEATURES, S.USER_ID, user_ids), len(user_ids))


def read_subject_items(store: FeatureStore, subject_item_ids: Sequence[int]) -> list[dict[str, Any] | None]:
    """Per subject item: ``None`` when unknown, else ``{categories: [raw ids], confidences: [floats],
    ad_id: the raw ad id it is, or None when it is not an ad}``.

    The lists hold the item's top ``MAX_CATEGORIES`` categories by confidence (unpadded).
    """
    data = _online(store, SUBJECT_ITEM_FEATURES, S.SUBJECT_ITEM_ID, subject_item_ids)
    return _subject_rows(data, len(subject_item_ids))


def read_request_features(
    store: FeatureStore, user_ids: Sequence[int], subject_item_ids: Sequence[int]
) -> tuple[list[dict[str, Any] | None], list[dict[str, Any] | None]]:
    """:func:`read_user_features` and :func:`read_subject_items` in one ``get_online_features`` call.

    The Feast SDK's fixed cost per call is most of a small read; one call over both entities pays it
    once. Feast reads each feature view for its own join key only (deduplicated), so the shorter id
    column is padded with its last id and the padding's rows are dropped.
    """
    if not subject_item_ids:
        return read_user_features(store, user_ids), []
    if not user_ids:
        return [], read_subject_items(store, subject_item_ids)
    n, m = len(user_ids), len(subject_item_ids)
    width = max(n, m)
    rows = {
        S.USER_ID: [int(i) for i in user_ids] + [int(user_ids[-1])] * (width - n),
        S.SUBJECT_ITEM_ID: [int(i) for i in subject_item_ids] + [int(subject_item_ids[-1])] * (width - m),
    }
    data = store.get_online_features(
        features=feature_refs({**USER_FEATURES, **SUBJECT_ITEM_FEATURES}), entity_rows=rows
    ).to_dict(include_event_timestamps=True)
    return _user_rows(data, n), _subject_rows(data, m)


def _user_rows(data: dict, n: int) -> list[dict[str, Any] | None]:
    from feast.online_response import TIMESTAMP_POSTFIX

    names = [name for group in USER_FEATURES.values() for name in group]
    encoded_at = data[S.ENCODED_HISTORY + TIMESTAMP_POSTFIX]
    out: list[dict[str, Any] | None] = []
    for i in range(n):
        row = {name: data[name][i] for name in names}
        if all(v is None for v in row.values()):
            out.append(None)
            continue
        if row[S.ENCODED_HISTORY] is not None:
            row[S.ENCODED_HISTORY] = np.asarray(row[S.ENCODED_HISTORY], dtype=np.float32)
        row[S.EVENT_TIMESTAMP] = int(encoded_at[i]) if row[S.ENCODED_HISTORY] is not None else None
        out.append(row)
    return out


def _subject_rows(data: dict, n: int) -> list[dict[str, Any] | None]:
    names = SUBJECT_ITEM_FEATURES[S.FV_SUBJECT_ITEM_CONTEXT]
    out: list[dict[str, Any] | None] = []
    for i in range(n):
        row = {name: data[name][i] if name in data else None for name in names}
        out.append(None if all(row[c] is None for c in (S.CATEGORIES, S.CONFIDENCES)) else row)
    return out
