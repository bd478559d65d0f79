"""User encoding (Beam + RunInference) -> Feast offline sources -> SQLite / Redis online stores.

One store directory goes through a first run (Feast CLI apply + materialize-incremental),
an incremental run (new conversions for a few users), and an idempotent rerun; the online
values are checked against the encoder SavedModel called directly on histories built here
from the raw tables (independently of the pipeline's transforms).
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from beam_pipelines import encode_users
from beam_pipelines.encoder_inference import ENCODER_INPUTS, EncoderModelHandler
from tfrs_ctx import export
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.apps import daily
from tfrs_ctx.data import rawio
from tfrs_ctx.testing import local_redis_server

VERSION = 11
NO_HISTORY_USER = 999_000_001  # in the users table, without conversions
UNKNOWN_USER = 999_000_002  # nowhere
ACTIVE_USERS = 3  # users that get new conversions in the incremental run


# --------------------------------------------------------------------------------------
# Reference: histories from the raw tables (pandas), the encoder called directly
# --------------------------------------------------------------------------------------
def reference_inputs(raw_dir, user_ids, as_of: int) -> dict[str, np.ndarray]:
    """Each user's last MAX_HISTORY conversions at or before ``as_of``, left-padded raw values."""
    conv = rawio.read_table(str(raw_dir), S.CONVERSIONS)
    conv = conv[conv[S.TIMESTAMP] <= as_of].sort_values([S.TIMESTAMP, S.ITEM_ID, S.ADVERTISER_ID, S.EVENT_TYPE])
    groups = {u: g.tail(S.MAX_HISTORY) for u, g in conv.groupby(S.USER_ID)}
    L = S.MAX_HISTORY
    out = {name: [] for name in ENCODER_INPUTS}
    for u in user_ids:
        g = groups[u]
        out[S.HISTORY_ITEM].append(S.pad_left(g[S.ITEM_ID].tolist(), L, 0))
        out[S.HISTORY_ADVERTISER].append(S.pad_left(g[S.ADVERTISER_ID].tolist(), L, 0))
        out[S.HISTORY_EVENT_TYPE].append(S.pad_left(g[S.EVENT_TYPE].tolist(), L, ""))
        out[S.HISTORY_TIME_GAP].append(S.pad_left([S.time_gap_bucket(as_of - t) for t in g[S.TIMESTAMP]], L))
        out[S.HISTORY_LENGTH].append(len(g))
    return {
        name: np.asarray(values, dtype=object if name == S.HISTORY_EVENT_TYPE else np.int64)
        for name, values in out.items()
    }


def reference_vectors(encoder_path: str, raw_dir, user_ids, as_of: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = reference_inputs(raw_dir, user_ids, as_of)
    fn = tf.saved_model.load(encoder_path).signatures["serving_default"]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return out[S.ENCODED_HISTORY].numpy(), out[S.MODEL_VERSION].numpy()


def online_vectors(store, user_ids) -> dict[int, dict]:
    return dict(zip(user_ids, F.read_user_features(store, user_ids), strict=True))


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_runs, small_data, tmp_path_factory):
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    out = tmp_path_factory.mktemp("fs_models")
    result = export.export_all(model, str(small_data), str(out), version=VERSION, top_k=10)
    return out, result["paths"]["encoder"]


@pytest.fixture(scope="module")
def raw(small_raw, tmp_path_factory):
    """A private copy of the raw tables (the incremental test appends to it), plus a user without history."""
    out = tmp_path_factory.mktemp("fs_raw") / "raw"
    shutil.copytree(small_raw, out)
    extra = {S.USER_ID: [NO_HISTORY_USER], S.AGE_BUCKET: [None], S.COUNTRY: ["US"], S.GENDER: [None]}
    pq.write_table(pa.table(extra, schema=S.USERS.arrow_schema()), out / S.USERS.name / "part-extra.parquet")
    subjects = rawio.read_table(str(out), S.SUBJECT_ITEMS)  # the first 5 subject items are ads (stated)
    subjects[S.AD_ID] = [1 + i if i < 5 else None for i in range(len(subjects))]
    shutil.rmtree(out / S.SUBJECT_ITEMS.name)
    rawio.write_table(str(out), S.SUBJECT_ITEMS, subjects.astype({S.AD_ID: "Int64"}))
    return out


def encode(raw_dir, models_dir, store, *extra: str) -> dict:
    return encode_users.run(
        ["--raw", str(raw_dir), "--model", str(models_dir / "encoder"), "--output", str(store), *extra]
    )


def feast_cli(store, *args: str) -> str:
    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    env = {**os.environ, S.STORE_DIR_ENV: str(store)}
    proc = subprocess.run(
        [feast, "-c", str(F.default_repo_dir()), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds")


@pytest.fixture(scope="module")
def first(raw, models, tmp_path_factory):
    """First run, applied and materialized with Feast's own CLI; what the online store held then."""
    store = tmp_path_factory.mktemp("fs_store") / "store"
    summary = encode(raw, models[0], store)
    feast_cli(store, "apply")
    feast_cli(store, "materialize-incremental", now_iso())
    users = sorted(rawio.read_table(str(raw), S.CONVERSIONS)[S.USER_ID].unique().tolist())
    online = online_vectors(F.open_store(store), [*users, NO_HISTORY_USER, UNKNOWN_USER])
    files = {p: digest(p) for p in glob.glob(f"{store}/{S.USER_ENCODINGS_DIR}/*")}
    return {"store": store, "summary": summary, "users": users, "online": online, "files": files}


@pytest.fixture(scope="module")
def incremental(first, raw, models):
    """New conversions (a new raw part file) for a few users, then an incremental run + materialize."""
    conv = rawio.read_table(str(raw), S.CONVERSIONS)
    active = first["users"][:: len(first["users"]) // ACTIVE_USERS][:ACTIVE_USERS]
    t0 = int(conv[S.TIMESTAMP].max())
    sample = conv.iloc[: len(active)]
    new = pd.DataFrame(
        {
            S.USER_ID: active,
            S.TIMESTAMP: [t0 + 3600 * (k + 1) for k in range(len(active))],
            S.ITEM_ID: sample[S.ITEM_ID].tolist(),
            S.ADVERTISER_ID: sample[S.ADVERTISER_ID].tolist(),
            S.EVENT_TYPE: sample[S.EVENT_TYPE].tolist(),
        }
    )
    pq.write_table(
        pa.Table.from_pandas(new, schema=S.CONVERSIONS.arrow_schema(), preserve_index=False),
        raw / S.CONVERSIONS.name / "part-new.parquet",
    )
    summary = encode(raw, models[0], first["store"])
    store = F.open_store(first["store"])
    F.materialize(store)
    online = online_vectors(store, [*first["users"], NO_HISTORY_USER, UNKNOWN_USER])
    return {"summary": summary, "active": active, "online": online}


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server on a free loopback port, stopped after the module (skips without the binary)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    with local_redis_server() as connection_string:
        yield connection_string


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------
def test_online_vectors_are_the_encoders(first, raw, models):
    users, online, summary = first["users"], first["online"], first["summary"]
    assert summary["users_encoded"] == len(users) and summary["mode"] == "first run"
    assert summary["model_version"] == VERSION
    expected, versions = reference_vectors(models[1], raw, users, summary["as_of"])
    lengths = reference_inputs(raw, users, summary["as_of"])[S.HISTORY_LENGTH]
    got = np.stack([online[u][S.ENCODED_HISTORY] for u in users])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert {online[u][S.MODEL_VERSION] for u in users} == {VERSION} == set(versions.tolist())
    assert [online[u][S.HISTORY_LENGTH] for u in users] == lengths.tolist()
    assert {online[u][S.EVENT_TIMESTAMP] for u in users} == {summary["event_timestamp"]}


def test_missing_user_reads_as_none_not_zeros(first):
    online = first["online"]
    assert online[UNKNOWN_USER] is None
    no_history = online[NO_HISTORY_USER]  # demographics only: no encoding row at all
    assert no_history[S.ENCODED_HISTORY] is None and no_history[S.HISTORY_LENGTH] is None
    assert no_history[S.MODEL_VERSION] is None and no_history[S.COUNTRY] == "US" and no_history[S.GENDER] is None
    rows = pd.concat(pd.read_parquet(p) for p in first["files"])
    assert NO_HISTORY_USER not in set(rows[S.USER_ID]) and len(rows) == len(first["users"])


def test_demographics_and_subject_items(first, raw):
    store = F.open_store(first["store"])
    users = rawio.read_table(str(raw), S.USERS).set_index(S.USER_ID)
    for u in first["users"][:50]:
        for column in S.DEMOGRAPHIC_COLUMNS:
            value = users.loc[u, column]
            assert first["online"][u][column] == (None if value is None or value != value else value)
    subjects = rawio.read_table(str(raw), S.SUBJECT_ITEMS).head(20)
    got = F.read_subject_items(store, [*subjects[S.ITEM_ID].tolist(), UNKNOWN_USER])
    assert got[-1] is None
    for row, item in zip(subjects.itertuples(index=False), got, strict=False):
        cats, confs = getattr(row, S.CATEGORIES), getattr(row, S.CONFIDENCES)
        order = sorted(range(len(cats)), key=lambda i: -confs[i])[: S.MAX_CATEGORIES]
        assert item[S.CATEGORIES] == [int(cats[i]) for i in order]
        np.testing.assert_allclose(item[S.CONFIDENCES], [confs[i] for i in order], rtol=1e-6)
    assert [item[S.AD_ID] for item in got[:-1]] == [1, 2, 3, 4, 5] + [None] * 15  # null: not an ad


def test_incremental_run_touches_only_active_users(first, incremental, raw, models):
    summary, active = incremental["summary"], incremental["active"]
    assert summary["users_encoded"] == len(active)
    assert summary["users_skipped_no_new_activity"] == len(first["users"]) - len(active)
    assert summary["watermark"] > first["summary"]["watermark"] and not summary["snapshots_exported"]
    for path, expected in first["files"].items():  # earlier files untouched, one new file
        assert digest(path) == expected
    new_files = [p for p in summary["files"] if p not in first["files"]]
    assert sorted(pd.concat(pd.read_parquet(p) for p in new_files)[S.USER_ID]) == sorted(active)
    before, after = first["online"], incremental["online"]
    for u in first["users"]:
        if u not in active:
            np.testing.assert_array_equal(after[u][S.ENCODED_HISTORY], before[u][S.ENCODED_HISTORY])
            assert after[u][S.EVENT_TIMESTAMP] == before[u][S.EVENT_TIMESTAMP]
    expected, _ = reference_vectors(models[1], raw, active, summary["as_of"])
    np.testing.assert_allclose(np.stack([after[u][S.ENCODED_HISTORY] for u in active]), expected, rtol=1e-5, atol=1e-6)
    assert {after[u][S.EVENT_TIMESTAMP] for u in active} == {summary["event_timestamp"]}


def test_rerun_is_idempotent(first, incremental, raw, models):
    store_dir = first["store"]
    files = sorted(glob.glob(f"{store_dir}/{S.USER_ENCODINGS_DIR}/*"))
    summary = encode(raw, models[0], store_dir)
    assert summary["users_encoded"] == 0 and summary["files"] == [] and not summary["snapshots_exported"]
    assert summary["watermark"] == incremental["summary"]["watermark"]
    assert sorted(glob.glob(f"{store_dir}/{S.USER_ENCODINGS_DIR}/*")) == files
    store = F.open_store(store_dir)
    F.materialize(store)
    again = online_vectors(store, [*first["users"], NO_HISTORY_USER, UNKNOWN_USER])
    for u, row in incremental["online"].items():
        if row is None:
            assert again[u] is None
        else:
            assert {k: v for k, v in again[u].items() if k != S.ENCODED_HISTORY} == {
                k: v for k, v in row.items() if k != S.ENCODED_HISTORY
            }
            np.testing.assert_array_equal(again[u][S.ENCODED_HISTORY], row[S.ENCODED_HISTORY])


@pytest.mark.redis
def test_redis_gives_the_same_answers(first, incremental, redis_server, monkeypatch):
    monkeypatch.setenv("REDIS_CONNECTION_STRING", redis_server)
    redis_yaml = F.repo_yaml(online="redis")
    redis_store = F.apply(first["store"], fs_yaml=redis_yaml)  # same sources, its own registry
    assert redis_store.config.online_store.type == "redis"
    assert set(F.materialize(redis_store).values()) == {"full"}  # a fresh online store: from the beginning
    ids = [*first["users"], NO_HISTORY_USER, UNKNOWN_USER]
    on_redis, on_sqlite = online_vectors(redis_store, ids), online_vectors(F.open_store(first["store"]), ids)
    for u in ids:
        if on_sqlite[u] is None or on_sqlite[u][S.ENCODED_HISTORY] is None:
            assert on_redis[u] == on_sqlite[u]
            continue
        np.testing.assert_array_equal(on_redis[u][S.ENCODED_HISTORY], on_sqlite[u][S.ENCODED_HISTORY])
        rest = [k for k in on_sqlite[u] if k != S.ENCODED_HISTORY]
        assert {k: on_redis[u][k] for k in rest} == {k: on_sqlite[u][k] for k in rest}
    subjects = [10_000_001, 10_000_002, 10_000_003, UNKNOWN_USER]
    assert F.read_subject_items(redis_store, subjects) == F.read_subject_items(F.open_store(first["store"]), subjects)


@pytest.mark.redis
def test_daily_command_on_redis(incremental, raw, models, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_CONNECTION_STRING", redis_server)
    store_dir = tmp_path / "store"
    argv = ["--raw", str(raw), "--models", str(models[0]), "--store", str(store_dir), "--online", "redis"]
    summary = daily.run(argv)
    assert summary["online"]["applied"] and set(summary["online"]["materialized"].values()) == {"full"}
    redis_store = F.open_store(store_dir, fs_yaml=F.repo_yaml(online="redis"))
    users = sorted(incremental["online"])[:40]
    users = [u for u in users if incremental["online"][u] and incremental["online"][u][S.ENCODED_HISTORY] is not None]
    expected, _ = reference_vectors(models[1], raw, users, summary["encode"]["as_of"])
    got = online_vectors(redis_store, users)
    np.testing.assert_allclose(np.stack([got[u][S.ENCODED_HISTORY] for u in users]), expected, rtol=1e-5, atol=1e-6)
    again = daily.run(argv)  # nothing new: nothing encoded, an incremental materialization
    assert again["encode"]["users_encoded"] == 0 and not again["online"]["applied"]
    assert set(again["online"]["materialized"].values()) == {"incremental"}


def test_multi_process_encode_equals_in_process(first, raw, models, tmp_path):
    store_dir = tmp_path / "store"
    summary = encode(
        raw,
        models[0],
        store_dir,
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        "--as_of",
        str(first["summary"]["as_of"]),
    )
    multi = pd.concat(pd.read_parquet(p) for p in summary["files"] if S.USER_ENCODINGS_DIR in p)
    single = pd.concat(pd.read_parquet(p) for p in first["files"])
    multi, single = (f.sort_values(S.USER_ID).reset_index(drop=True) for f in (multi, single))
    assert multi[S.USER_ID].tolist() == single[S.USER_ID].tolist()
    np.testing.assert_allclose(np.stack(multi[S.ENCODED_HISTORY]), np.stack(single[S.ENCODED_HISTORY]), atol=1e-6)
    assert multi[S.HISTORY_LENGTH].tolist() == single[S.HISTORY_LENGTH].tolist()


def test_raw_histories_window_padding_and_gaps():
    events = encode_users.T.UserEvents(
        timestamp=np.asarray([100, 200, 300, 400], dtype=np.int64),
        item=np.asarray([1, 2, 3, 4], dtype=np.int64),
        advertiser=np.asarray([10, 20, 30, 40], dtype=np.int64),
        event_type=np.asarray(["checkout", "lead", "signup", "lead"]),
    )
    out = encode_users.raw_histories([events, events], as_of=300)  # the event at 400 is after as_of
    assert out[S.HISTORY_LENGTH].tolist() == [3, 3]
    assert out[S.HISTORY_ITEM][0, -4:].tolist() == [0, 1, 2, 3]
    assert out[S.HISTORY_EVENT_TYPE][0, -4:].tolist() == ["", "checkout", "lead", "signup"]
    assert out[S.HISTORY_TIME_GAP][0, -4:].tolist() == [S.PAD_ID, *(S.time_gap_bucket(g) for g in (200, 100, 0))]
    assert out[S.HISTORY_ITEM].shape == (2, S.MAX_HISTORY)


def test_raw_histories_in_next_event_semantics_match_the_training_examples(tmp_path):
    """A dense-trained model's encoder gets each event's gap to the next one, the last one's to as_of."""
    import json

    from tfrs_ctx.data.vocab import Vocabulary

    events = encode_users.T.UserEvents(
        timestamp=np.asarray([100, 200, 4000, 90_000], dtype=np.int64),
        item=np.asarray([1, 2, 3, 4], dtype=np.int64),
        advertiser=np.asarray([10, 20, 30, 40], dtype=np.int64),
        event_type=np.asarray(["checkout", "lead", "signup", "lead"]),
    )
    out = encode_users.raw_histories([events], as_of=100_000, time_gap=S.TIME_GAP_NEXT_EVENT)
    assert out[S.HISTORY_TIME_GAP][0, -4:].tolist() == [S.time_gap_bucket(g) for g in (100, 3800, 86_000, 10_000)]
    vocabs = {name: Vocabulary([]) for name in S.VOCABULARIES}
    vocabs[S.VOCAB_ITEM], vocabs[S.VOCAB_ADVERTISER] = Vocabulary([1, 2, 3, 4]), Vocabulary([10, 20, 30, 40])
    vocabs[S.VOCAB_EVENT_TYPE] = Vocabulary(["checkout", "lead", "signup"])
    examples = encode_users.T.history_at(events, vocabs, 100_000)  # the Beam builder, a target at as_of
    np.testing.assert_array_equal(out[S.HISTORY_TIME_GAP][0], examples[S.HISTORY_NEXT_GAP])
    with pytest.raises(ValueError, match="time_gap"):
        encode_users.raw_histories([events], as_of=100_000, time_gap="sideways")
    # the encoder job reads the semantics from the export (older exports: to_target)
    version = tmp_path / "7"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    info = {S.MODEL_VERSION: 7}
    (version / "assets.extra" / S.MODEL_INFO_FILE).write_text(json.dumps(info))
    assert encode_users.resolve_model(str(tmp_path)).time_gap == S.TIME_GAP_TO_TARGET
    info["time_gap"] = S.TIME_GAP_NEXT_EVENT
    (version / "assets.extra" / S.MODEL_INFO_FILE).write_text(json.dumps(info))
    assert encode_users.resolve_model(str(tmp_path)).time_gap == S.TIME_GAP_NEXT_EVENT


def test_model_version_change_forces_a_full_run(first, models, raw):
    config = encode_users.EncodeConfig(
        raw=str(raw),
        model="",
        output=str(first["store"]),
        full=False,
        as_of=None,
        event_timestamp=None,
        min_batch_size=1,
        max_batch_size=1,
        output_shards=0,
        xla=False,
    )
    state = encode_users.EncodeState.load(F.store_paths(first["store"]).state)
    same = encode_users.plan_run(config, encode_users.EncoderModel("", VERSION), state, F.store_paths(first["store"]))
    assert not same.full and same.watermark == state.watermark
    other = encode_users.plan_run(
        config, encode_users.EncoderModel("", VERSION + 1), state, F.store_paths(first["store"])
    )
    assert other.full and other.watermark is None and "model version" in other.reason
    assert other.event_timestamp > state.event_timestamp
    assert encode_users.resolve_model(str(models[0] / "encoder")).version == VERSION


def test_padded_batches_give_the_same_vectors(models, raw):
    inputs = reference_inputs(raw, [1, 2, 3, 4, 5], as_of=2_000_000_000)
    examples = [{k: v[i] for k, v in inputs.items()} for i in range(5)]
    plain = EncoderModelHandler(models[1], 2, 8)
    padded = EncoderModelHandler(models[1], 2, 8, xla=True)  # pads to 8 rows (XLA needs a fresh process)
    model = plain.load_model()
    a, b = list(plain.run_inference(examples, model)), list(padded.run_inference(examples, model))
    assert len(b) == 5 and all(x.example is e for x, e in zip(b, examples, strict=True))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.inference[0], y.inference[0], rtol=1e-5, atol=1e-6)
        assert x.inference[1] == y.inference[1] == VERSION
