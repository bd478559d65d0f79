"""Bad input across the product: every case gets a clear error or a defined, logged fallback.

The index of bad-input handling (GitHub issue 8): each case, then the tests that prove it (a bare
name is in this file). Everything runs on real components: the real Beam pipelines on broken raw
files, real TFRecords cut mid-record, the product's exported SavedModels (an untrained tiny
model: the signatures, lookups and warm-up are the product's) in the real model server on
loopback, and a real Feast store holding broken vectors.

1. Malformed raw rows -> dead letters with the reason and counts; every good row still there
   * every kind of bad value, in a whole table and in one row (what a dead letter says)
       test_validation.py::test_bad_table_error_names_table_column_and_rows
       test_validation.py::test_row_problem_flags_exactly_the_bad_rows
   * the typed Parquet fast path finds exactly what row-by-row validation finds
       test_build_training_data.py::test_typed_parquet_fast_path_matches_row_by_row_validation
   * training data, a hand-made bad directory
       test_build_training_data.py::test_malformed_rows_reach_the_dead_letter_output
   * training data: nulls, wrong types, negative / NaN / fractional timestamps, unknown event
     types, unknown ids, duplicate keys (request ids too), unparseable lines; rows in == rows
     kept + dead letters, and the examples are byte for byte those of the clean tables
       test_training_data_dead_letters_keep_every_good_row
   * user encoding (encode_users): the same for the tables it reads, dead letters in the store
       test_encode_users_dead_letters_keep_every_good_row
   * an unknown event type is a bad value
       test_unknown_event_type_is_a_raw_table_error
2. Truncated TFRecords -> a DataLossError naming the file, never a partial read
   * a shard cut mid-record, or empty; cut anywhere; a missing shard (names the split)
       test_truncated_shard_is_an_error_naming_the_file
       test_every_cut_of_a_shard_is_caught
       test_missing_shard_is_an_error_naming_the_split
   * training and evaluation (they read through the same reader)
       test_training_and_evaluation_refuse_a_truncated_shard
3. Corrupt SavedModel versions -> logged, END with the error, the previous version serves on
   * garbage saved_model.pb, missing variables, truncated variables
       test_corrupt_versions_are_logged_reported_and_skipped
   * a corrupt export during a hot swap under load; at start-up; a failing warm-up request
       test_model_server.py::test_hot_swap_under_load_has_zero_failures
       test_model_server.py::test_model_status
   * loading one directly (the server's Servable, the Beam encoder): a clear error
       test_loading_a_corrupt_version_directly_is_a_clear_error
4. Bad Predict requests -> INVALID_ARGUMENT / NOT_FOUND (FAILED_PRECONDITION for an unknown
   signature, as TF Serving), a clear message, and the server keeps serving
   * dtype, shape, rank, missing / extra input, bad tensor_content, unknown signature / model /
     version / label / output alias, empty model name (on a tiny model)
       test_model_server.py::test_errors_use_tf_serving_codes_and_never_kill_the_server
   * the same on the product's context_head, an oversized batch (``MAX_BATCH_SIZE`` rows
     without batching), a corrupt version asked for by number; a good request after each
       test_bad_predict_requests_on_the_product_head
   * oversized batch and unequal batch dimensions with batching; a message over the size limit
       test_model_server.py::test_batching_limits
       test_model_server.py::test_single_model_form_message_limit_and_graceful_shutdown
5. Broken stored user vectors -> cold start, logged, noted; never NaN to Predict or in scores
   * NaN, inf, -inf in the feature store
       test_non_finite_stored_vector_is_a_cold_start
   * the wrong length
       test_wrong_length_stored_vector_is_a_cold_start
   * a NaN context weight from the caller: the no-context path, noted
       test_non_finite_context_weight_never_reaches_predict
   * a vector of a model version the server does not serve
       test_client.py::test_version_mismatch_refuses_or_cold_starts
6. Unknown ids -> a defined fallback (OOV id, cold start, no context), logged, noted
   * unknown user: cold start, noted
       test_client.py::test_cold_start_user_gets_the_no_history_path
   * unknown subject item: no-context path, noted
       test_client.py::test_unknown_subject_item_gets_the_no_context_path
   * unknown category ids and demographic strings sent to the exported head: the OOV id
       test_unknown_vocabulary_values_map_to_the_oov_id
   * unknown category in explicit context: the OOV id; noted by the client given the category vocabulary
       test_unknown_context_category_maps_to_the_oov_id
       test_unknown_context_category_is_noted
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import pathlib
import re
import shutil
import time

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from conftest import predict_request
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from beam_pipelines import build_training_data as btd
from beam_pipelines import encode_users
from beam_pipelines.tables import DEAD_LETTER_DIR, json_safe
from serving.client.candidates import AdRequest, CandidateClient
from serving.client.features import FeastFeatureReader
from serving.launcher import start_server
from serving.model_server import health
from serving.model_server.servable import Servable
from serving.model_server.server import MAX_BATCH_SIZE
from tfrs_ctx import export, signatures
from tfrs_ctx import feature_store as F
from tfrs_ctx import schema as S
from tfrs_ctx.config import load_config
from tfrs_ctx.data import dataset, rawio
from tfrs_ctx.data.validation import RawTableError, check_table, row_problem
from tfrs_ctx.data.vocab import load_vocab
from tfrs_ctx.evaluation import evaluate
from tfrs_ctx.training import train
from tfrs_ctx.training.run_dir import build_model, dummy_batch

VERSION = 5  # the exported model version; the corrupt versions come after it
HEAD = S.MODEL_CONTEXT_HEAD
DIM = 16  # encoded_history width of TINY_MODEL (model.embedding_dim)
END = get_model_status_pb2.ModelVersionStatus.END
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
UNKNOWN_ID = 999_999_999
DUPLICATE_KEY_USERS = (987_654_321, 876_543_219, 765_432_198)  # a request's conflicting copy moves to one of these


# --------------------------------------------------------------------------------------
# 1. Malformed raw rows through the Beam pipelines
# --------------------------------------------------------------------------------------
def _rows(raw: pathlib.Path, table: S.Table) -> list[dict]:
    return [row for path in rawio.table_files(str(raw), table) for row in rawio.iter_rows(path)]


def _sorts_after(row: dict, other: dict) -> bool:
    """Whether ``keep_first``'s canonical order puts ``row`` after ``other`` (so ``other`` is kept)."""

    def key(r: dict) -> str:
        return json.dumps(json_safe(r), sort_keys=True)

    return key(row) > key(other)


def _write_jsonl(path: pathlib.Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def break_raw(raw: pathlib.Path) -> dict[str, list[tuple[dict | str, str]]]:
    """Add bad rows to every table of a copy of ``small_raw``; returns ``{table: [(row, reason fragment)]}``.

    Good rows are only moved (conversions: some into a JSON-lines part among bad rows) or
    repeated exactly (a duplicate key keeps one of two identical rows), so the pipelines'
    output must be exactly that of the clean tables.
    """
    bad: dict[str, list[tuple[dict | str, str]]] = {name: [] for name in S.RAW_TABLES}
    conversions = _rows(raw, S.CONVERSIONS)
    good = conversions[0]
    # Typed Parquet part (the vectorised fast path): bad rows in between good ones.
    typed_bad = [
        ({**good, S.EVENT_TYPE: "Checkout"}, "column 'event_type': unknown value 'Checkout'"),
        ({**good, S.EVENT_TYPE: "refund"}, "column 'event_type': unknown value 'refund'"),
        ({**good, S.TIMESTAMP: -1}, "column 'timestamp': timestamp -1 out of range"),
        ({**good, S.USER_ID: None}, "column 'user_id': missing value"),
        ({**good, S.EVENT_TYPE: None}, "column 'event_type': missing value"),
        ({**good, S.ITEM_ID: UNKNOWN_ID}, f"column 'item_id': unknown id {UNKNOWN_ID}"),
    ]
    first = sorted(glob.glob(str(raw / S.CONVERSIONS.name / "*.parquet")))[0]
    rows = pq.read_table(first).to_pylist()
    moved, rows = rows[-25:], rows[:-25]
    for i, (row, _) in enumerate(typed_bad):
        rows.insert(7 * i + 3, row)
    nullable = pa.schema([pa.field(f.name, f.type, nullable=True) for f in S.CONVERSIONS.arrow_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), first)
    bad[S.CONVERSIONS.name] += typed_bad
    # JSON-lines part (row by row): good rows moved here, between bad ones of every kind.
    jsonl_bad = [
        ({**good, S.USER_ID: "abc"}, "column 'user_id': expected an int64, got str 'abc'"),
        ({**good, S.TIMESTAMP: -86_400}, "column 'timestamp': timestamp -86400 out of range"),
        ({**good, S.TIMESTAMP: float("nan")}, "column 'timestamp': missing value"),
        ({**good, S.TIMESTAMP: good[S.TIMESTAMP] + 0.5}, "column 'timestamp': expected an int64, got float"),
        ({**good, S.TIMESTAMP: "yesterday"}, "column 'timestamp': expected an int64, got str"),
        ({**good, S.ADVERTISER_ID: True}, "column 'advertiser_id': expected an int64, got bool"),
        ({**good, S.EVENT_TYPE: 3}, "column 'event_type': expected a string, got int"),
        ({**good, S.EVENT_TYPE: "purchase"}, "column 'event_type': unknown value 'purchase'"),
        ({k: v for k, v in good.items() if k != S.ADVERTISER_ID}, "column 'advertiser_id': missing"),
        ({**good, S.ITEM_ID: None}, "column 'item_id': missing value"),
    ]
    lines: list = [*moved]
    for i, (row, _) in enumerate(jsonl_bad):
        lines.insert(2 * i + 1, row)
    lines.append('{"user_id": 1, "timestamp": ')
    _write_jsonl(raw / S.CONVERSIONS.name / "part-bad.jsonl", lines)
    bad[S.CONVERSIONS.name] += [*jsonl_bad, ('{"user_id": 1, "timestamp": ', "unparseable row: part-bad.jsonl:")]

    item = _rows(raw, S.ITEMS)[3]
    subject = _rows(raw, S.SUBJECT_ITEMS)[5]
    user = _rows(raw, S.USERS)[7]
    request = _rows(raw, S.REQUESTS)[11]
    moved_request = next(
        {**request, S.USER_ID: u} for u in DUPLICATE_KEY_USERS if _sorts_after({**request, S.USER_ID: u}, request)
    )
    small = {
        S.ITEMS.name: [
            ({**item, S.CONFIDENCES: item[S.CONFIDENCES][:-1]}, "column 'confidences':"),
            ({**item, S.ITEM_ID: UNKNOWN_ID, S.CONFIDENCES: [1.5] * len(item[S.CATEGORIES])}, "out of [0, 1]"),
            ({**item, S.ITEM_ID: UNKNOWN_ID + 1, S.CATEGORIES: ["sofa"]}, "expected a list of int64, got element str"),
            ({**item, S.ITEM_ID: None}, "column 'item_id': missing value"),
            (item, "duplicate key (item_id)"),
        ],
        S.SUBJECT_ITEMS.name: [
            ({**subject, S.CONFIDENCES: [float("nan")] * len(subject[S.CATEGORIES])}, "got element float nan"),
            ({**subject, S.CATEGORIES: None}, "column 'categories': missing value"),
            (subject, "duplicate key (item_id)"),
        ],
        S.USERS.name: [
            ({**user, S.USER_ID: UNKNOWN_ID, S.AGE_BUCKET: 34}, "column 'age_bucket': expected a string, got int"),
            ({**user, S.USER_ID: "u1"}, "column 'user_id': expected an int64, got str"),
            (user, "duplicate key (user_id)"),
        ],
        S.REQUESTS.name: [
            ({**request, S.SUBJECT_ITEM_ID: UNKNOWN_ID}, f"column 'subject_item_id': unknown id {UNKNOWN_ID}"),
            ({**request, S.ITEM_ID: UNKNOWN_ID}, f"column 'item_id': unknown id {UNKNOWN_ID}"),
            ({**request, S.TIMESTAMP: None}, "column 'timestamp': missing value"),
            (request, "duplicate key (request_id)"),  # an exact copy
            (moved_request, "duplicate key (request_id)"),  # the same id for another user
        ],
    }
    for name, cases in small.items():
        _write_jsonl(raw / name / "part-bad.jsonl", [row for row, _ in cases])
        bad[name] += cases
    return bad


@pytest.fixture(scope="module")
def bad_raw(small_raw, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A copy of ``small_raw`` with bad rows in every table, and what was added."""
    raw = tmp_path_factory.mktemp("bad_raw") / "raw"
    shutil.copytree(small_raw, raw)
    return raw, break_raw(raw)


def _lines_in(raw: pathlib.Path, table: S.Table) -> int:
    return len(_rows(raw, table))


def _records(data_dir: pathlib.Path, split: str) -> list[bytes]:
    files = sorted(glob.glob(S.tfrecord_pattern(str(data_dir), split)))
    return sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def _dead_letters(directory: pathlib.Path, name: str) -> list[dict]:
    """A table's dead letters: ``<name>-*.jsonl`` (training data) or ``run-<ts>-<name>-*.jsonl`` (the store)."""
    files = sorted(p for p in directory.glob("*.jsonl") if re.fullmatch(rf"(.*-)?{name}-\d+-of-\d+\.jsonl", p.name))
    return [json.loads(line) for f in files for line in pathlib.Path(f).read_text().splitlines()]


def _check_dead_letters(letters: list[dict], table: str, expected: list[tuple[dict | str, str]]) -> None:
    """Every bad row is in the dead letters once, with its reason; nothing else is."""
    assert len(letters) == len(expected), [d["reason"] for d in letters]
    remaining = list(letters)
    for row, reason in expected:
        want = {"__unparseable__"} if isinstance(row, str) else json_safe(row)
        match = next(
            (
                d
                for d in remaining
                if reason in d["reason"] and (d["row"] == want or (isinstance(row, str) and want <= set(d["row"])))
            ),
            None,
        )
        assert match is not None, (table, reason, row, [d["reason"] for d in remaining])
        assert match["table"] == table
        remaining.remove(match)


def test_training_data_dead_letters_keep_every_good_row(bad_raw, small_raw, small_data, tmp_path):
    raw, bad = bad_raw
    out = tmp_path / "data"
    metadata = btd.run(["--input", str(raw), "--output", str(out)], save_main_session=False)
    for name, table in S.RAW_TABLES.items():
        rows_in, good = _lines_in(raw, table), _lines_in(small_raw, table)
        assert metadata["dead_letter"][name] == len(bad[name]), name
        assert metadata["rows"][name] == good, name  # every good row kept
        assert metadata["rows"][name] + metadata["dead_letter"][name] == rows_in, name  # nothing else lost
        _check_dead_letters(_dead_letters(out / DEAD_LETTER_DIR, name), name, bad[name])
    clean = dataset.load_metadata(str(small_data))
    assert metadata["counts"] == clean["counts"] and metadata["cutoff_timestamp"] == clean["cutoff_timestamp"]
    for split in S.SPLITS:  # byte for byte the examples of the clean tables
        assert _records(out, split) == _records(small_data, split), split
    for name in S.VOCABULARIES:
        assert load_vocab(str(out), name) == load_vocab(str(small_data), name), name


def test_unknown_event_type_is_a_raw_table_error():
    row = {S.USER_ID: 1, S.TIMESTAMP: 1_700_000_000, S.ITEM_ID: 2, S.ADVERTISER_ID: 3}
    frame = pd.DataFrame([{**row, S.EVENT_TYPE: e} for e in (*S.EVENT_TYPES, "purchase", "checkout ")])
    with pytest.raises(RawTableError, match=r"column 'event_type': unknown value 'purchase' .* at rows \[5, 6\]"):
        check_table(S.CONVERSIONS, frame)
    assert row_problem(S.CONVERSIONS, {**row, S.EVENT_TYPE: "checkout "}).startswith("column 'event_type': unknown")
    check_table(S.CONVERSIONS, frame.iloc[:5])  # the five known types pass


def test_encode_users_dead_letters_keep_every_good_row(store, bad_raw, small_raw):
    raw, bad = bad_raw
    summary = store["summary"]
    tables = (S.CONVERSIONS, S.ITEMS, S.USERS, S.SUBJECT_ITEMS)
    assert set(summary["rows"]) == set(summary["dead_letter"]) == {t.name for t in tables}
    letters_dir = store["root"] / DEAD_LETTER_DIR
    assert sorted(summary["dead_letter_files"]) == sorted(glob.glob(str(letters_dir / "*.jsonl")))
    for table in tables:
        assert summary["dead_letter"][table.name] == len(bad[table.name]), table.name
        assert summary["rows"][table.name] == _lines_in(small_raw, table), table.name
        assert summary["rows"][table.name] + summary["dead_letter"][table.name] == _lines_in(raw, table)
        _check_dead_letters(_dead_letters(letters_dir, table.name), table.name, bad[table.name])
    clean_users = rawio.read_table(str(small_raw), S.CONVERSIONS)[S.USER_ID].unique()
    assert summary["users_encoded"] == len(clean_users) and store["users"] == sorted(clean_users.tolist())


# --------------------------------------------------------------------------------------
# 2. Truncated or missing TFRecord shards
# --------------------------------------------------------------------------------------
@pytest.fixture
def damaged_data(small_data, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(small_data, tmp_path / "data"))


def _cut(path: pathlib.Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_truncated_shard_is_an_error_naming_the_file(damaged_data):
    shard = sorted((damaged_data / S.SPLIT_EVAL).glob("part-*"))[1]
    dataset.make_dataset(str(damaged_data), S.SPLIT_EVAL, 64)  # verified whole: the check is cached per file
    _cut(shard)  # tf.data itself reads some cuts (at a record's end) as a shorter shard, without an error
    with pytest.raises(tf.errors.DataLossError, match=re.escape(f"{shard}: truncated or corrupt TFRecord file")):
        dataset.make_dataset(str(damaged_data), S.SPLIT_EVAL, 64)
    shard.write_bytes(b"")  # cut to nothing: tf.data would read it as a shard without records
    with pytest.raises(tf.errors.DataLossError, match=re.escape(f"{shard}: truncated or corrupt TFRecord file")):
        dataset.make_dataset(str(damaged_data), S.SPLIT_EVAL, 64)


def test_every_cut_of_a_shard_is_caught(damaged_data, tmp_path):
    data = sorted((damaged_data / S.SPLIT_EVAL).glob("part-*"))[0].read_bytes()
    whole = tmp_path / "whole.tfrecord.gz"
    whole.write_bytes(data)
    records = tf.data.TFRecordDataset(str(whole), compression_type="GZIP")
    assert dataset.count_records(str(whole)) == int(records.reduce(np.int64(0), lambda n, _: n + 1)) > 0
    for cut in range(0, len(data), 41):
        path = tmp_path / f"cut-{cut}.tfrecord.gz"
        path.write_bytes(data[:cut])
        with pytest.raises(tf.errors.DataLossError, match=re.escape(f"{path}: truncated or corrupt TFRecord file")):
            dataset.count_records(str(path))


def test_missing_shard_is_an_error_naming_the_split(damaged_data):
    expected = dataset.load_metadata(str(damaged_data))["counts"][S.SPLIT_TRAIN]
    sorted((damaged_data / S.SPLIT_TRAIN).glob("part-*"))[0].unlink()
    message = re.escape(f"split 'train' of {damaged_data}: ") + f".* says {expected}"
    with pytest.raises(tf.errors.DataLossError, match=message):
        dataset.make_dataset(str(damaged_data), S.SPLIT_TRAIN, 64)


def test_training_and_evaluation_refuse_a_truncated_shard(damaged_data, models, tmp_path):
    from conftest import TINY_MODEL

    train_shard = sorted((damaged_data / S.SPLIT_TRAIN).glob("part-*"))[2]
    _cut(train_shard)
    cfg = load_config("synthetic", [*TINY_MODEL, "train.epochs=1"])
    cfg.train.data_dir = str(damaged_data)
    with pytest.raises(tf.errors.DataLossError, match=re.escape(str(train_shard))):
        train.train(cfg, str(tmp_path / "run"), verbose=0)
    eval_shard = sorted((damaged_data / S.SPLIT_EVAL).glob("part-*"))[0]
    _cut(eval_shard)
    model = models[1]
    with pytest.raises(tf.errors.DataLossError, match=re.escape(str(eval_shard))):
        evaluate.score_rows(str(damaged_data), model, model, exclude_history=False)


# --------------------------------------------------------------------------------------
# The product's SavedModels (untrained tiny model) and the server
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(small_data, tmp_path_factory) -> tuple[pathlib.Path, object]:
    """encoder / context_head / full of an untrained tiny model, exported like any version."""
    from conftest import TINY_MODEL

    cfg = load_config("synthetic", TINY_MODEL)
    cfg.train.data_dir = str(small_data)
    model = build_model(cfg)
    model(dummy_batch(1), training=False)
    model.corpus_embeddings()
    out = tmp_path_factory.mktemp("models")
    export.export_all(model, str(small_data), str(out), version=VERSION, top_k=10)
    return out, model


def _corrupt_copy(source: pathlib.Path, target: pathlib.Path, kind: str) -> pathlib.Path:
    """A copy of a version directory broken one way, moved into place atomically (never seen half-made)."""
    tmp = target.parent / f".tmp-{target.name}"
    shutil.copytree(source, tmp)
    if kind == "garbage-pb":
        (tmp / "saved_model.pb").write_bytes(b"\x08\x01garbage, not a SavedModel")
    elif kind == "no-variables":
        shutil.rmtree(tmp / "variables")
    elif kind == "truncated-variables":
        (data,) = (tmp / "variables").glob("variables.data-*")
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    os.rename(tmp, target)
    return target


CORRUPT = {VERSION + 1: "garbage-pb", VERSION + 2: "no-variables", VERSION + 3: "truncated-variables"}


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The compatible server on a copy of the head (fast polling); corrupt versions are added by the tests."""
    base = tmp_path_factory.mktemp("served") / HEAD
    shutil.copytree(models[0] / HEAD / str(VERSION), base / str(VERSION))
    args = [f"--model_name={HEAD}", f"--model_base_path={base}"]
    with start_server(None, config=None, poll_seconds=0.2, server="python", extra_args=args) as server:
        server.wait_ready(120)
        channel = grpc.insecure_channel(server.address)
        yield {
            "server": server,
            "base": base,
            "channel": channel,
            "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
            "models": model_service_pb2_grpc.ModelServiceStub(channel),
        }
        channel.close()


def _statuses(stub, name: str = HEAD) -> dict:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = name
    return {s.version: s for s in stub.GetModelStatus(req, timeout=10).model_version_status}


def _head_request(rows: int = 2, *, version: int | None = None, signature: str = "", **overrides):
    """A Predict request for the product head: all-padding inputs (no history, no context)."""
    inputs = {**signatures.example_inputs(signatures.head_inputs_spec(DIM), rows), **overrides}
    return predict_request(HEAD, inputs, version=version, signature=signature)


def _assert_serves(served) -> None:
    """A good request right after: answered by the good version, finite scores; health SERVING."""
    response = served["predict"].Predict(_head_request(), timeout=30)
    assert response.model_spec.version.value == VERSION
    assert np.isfinite(tf.make_ndarray(response.outputs[S.TOP_K_SCORES])).all()
    assert health.check(served["channel"], HEAD) == "SERVING"


# --------------------------------------------------------------------------------------
# 3. Corrupt SavedModel versions
# --------------------------------------------------------------------------------------
def test_corrupt_versions_are_logged_reported_and_skipped(served, models):
    source = models[0] / HEAD / str(VERSION)
    for version, kind in CORRUPT.items():
        _corrupt_copy(source, served["base"] / str(version), kind)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = _statuses(served["models"])
        if all(v in statuses and statuses[v].state == END for v in CORRUPT):
            break
        time.sleep(0.2)
    assert statuses[VERSION].state == AVAILABLE and statuses[VERSION].status.error_code == 0
    for version in CORRUPT:
        status = statuses[version]
        assert status.state == END and status.status.error_code != 0, version
        assert str(served["base"] / str(version)) in status.status.error_message, status.status.error_message
    assert "is not a valid SavedModel" in statuses[VERSION + 1].status.error_message
    assert "cannot load the SavedModel" in statuses[VERSION + 2].status.error_message
    assert "cannot load the SavedModel" in statuses[VERSION + 3].status.error_message
    logs = served["server"].logs()
    for version in CORRUPT:
        assert f"model '{HEAD}': version {version} at {served['base'] / str(version)} failed to load, skipped" in logs
    _assert_serves(served)


@pytest.mark.parametrize("kind", sorted(set(CORRUPT.values())))
def test_loading_a_corrupt_version_directly_is_a_clear_error(models, tmp_path, kind):
    head = _corrupt_copy(models[0] / HEAD / str(VERSION), tmp_path / "head" / "1", kind)
    with pytest.raises(ValueError, match="SavedModel") as caught:
        Servable(HEAD, 1, str(head))
    assert str(head) in str(caught.value)
    encoder = _corrupt_copy(models[0] / S.MODEL_ENCODER / str(VERSION), tmp_path / "encoder" / "1", kind)
    assert encode_users.resolve_model(str(encoder.parent)).path == str(encoder)  # the newest version is picked
    with pytest.raises(ValueError, match=re.escape(f"cannot load the encoder SavedModel at {encoder}")):
        encode_users.EncoderModelHandler(str(encoder)).load_model()


# --------------------------------------------------------------------------------------
# 4. Bad Predict requests on the product head
# --------------------------------------------------------------------------------------
def test_bad_predict_requests_on_the_product_head(served):
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    bad_content = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\x00" * 10)
    for size in (2, DIM):
        bad_content.tensor_shape.dim.add(size=size)
    unknown_model = _head_request()
    unknown_model.model_spec.name = "nope"
    cases = [
        (_head_request(encoded_history=np.zeros((2, DIM), np.float64)), invalid, "expects DT_FLOAT but DT_DOUBLE"),
        (_head_request(history_length=np.zeros(2, np.int32)), invalid, "expects DT_INT64 but DT_INT32"),
        (_head_request(user_country=np.zeros(2, np.int64)), invalid, "expects DT_STRING but DT_INT64"),
        (
            _head_request(encoded_history=np.zeros((2, DIM + 1), np.float32)),
            invalid,
            f"shape [2, {DIM + 1}] is incompatible",
        ),
        (_head_request(encoded_history=np.zeros(2, np.float32)), invalid, "shape [2] is incompatible"),
        (_head_request(context_categories=np.zeros((2, 6), np.int64)), invalid, "shape [2, 6] is incompatible"),
        (_head_request(encoded_history=bad_content), invalid, "tensor_content has 10 bytes"),
        (_head_request(context_weights=None), invalid, "Missing but required: {context_weights}"),
        (_head_request(bogus=np.zeros(2, np.float32)), invalid, "Sent extra: {bogus}"),
        (_head_request(MAX_BATCH_SIZE + 1), invalid, f"larger than maximum input batch size {MAX_BATCH_SIZE}"),
        (_head_request(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope" not found'),
        (unknown_model, not_found, "Servable not found for request: Latest(nope)"),
        (_head_request(version=VERSION + 100), not_found, f"Specific({HEAD}, {VERSION + 100})"),
        (_head_request(version=VERSION + 1), not_found, f"Specific({HEAD}, {VERSION + 1})"),  # corrupt or absent
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as caught:
            served["predict"].Predict(req, timeout=30)
        assert caught.value.code() == code, (text, caught.value.details())
        assert text in caught.value.details(), caught.value.details()
        _assert_serves(served)
    rows = served["predict"].Predict(_head_request(MAX_BATCH_SIZE), timeout=60).outputs[S.TOP_K_IDS]
    assert rows.tensor_shape.dim[0].size == MAX_BATCH_SIZE  # the limit itself is fine


# --------------------------------------------------------------------------------------
# 5. Broken stored user vectors (the store that encode_users filled, plus broken rows)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(bad_raw, models, tmp_path_factory) -> dict:
    """encode_users on the bad raw tables into a store, broken vectors added, Feast applied + materialized."""
    raw, _ = bad_raw
    root = tmp_path_factory.mktemp("store") / "store"
    now = int(time.time())
    flags = {"--raw": raw, "--model": models[0] / S.MODEL_ENCODER, "--output": root, "--event_timestamp": now - 600}
    summary = encode_users.run([str(x) for flag in flags.items() for x in flag])
    encoded = pd.concat(pd.read_parquet(p) for p in summary["files"] if S.USER_ENCODINGS_DIR in p)
    users = sorted(encoded[S.USER_ID].tolist())
    dim = len(encoded[S.ENCODED_HISTORY].iloc[0])
    broken = {  # user -> the vector stored for them, newer than their real one
        users[0]: [math.nan] + [0.1] * (dim - 1),
        users[1]: [math.inf] + [0.1] * (dim - 1),
        users[2]: [-math.inf] * dim,
        users[3]: [0.1] * (dim + 3),  # the wrong length
    }
    rows = pa.table(
        {
            S.USER_ID: list(broken),
            S.EVENT_TIMESTAMP: [(now - 300) * 1_000_000] * len(broken),
            S.ENCODED_HISTORY: list(broken.values()),
            S.HISTORY_LENGTH: [5] * len(broken),
            S.MODEL_VERSION: [VERSION] * len(broken),
        },
        schema=encode_users.encoding_schema(),
    )
    pq.write_table(rows, F.store_paths(root).encodings + "/broken-vectors.parquet")
    feast_store = F.apply(root)
    F.materialize(feast_store)
    return {"root": root, "summary": summary, "users": users, "broken": list(broken)}


@pytest.fixture(scope="module")
def client(store, served):
    reader = FeastFeatureReader.open(str(store["root"]))
    with CandidateClient(served["server"].address, reader, deadline_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def categories(small_data) -> list[int]:
    return [int(c) for c in load_vocab(str(small_data), S.VOCAB_CATEGORY)]


def _finite(rec) -> bool:
    return len(rec.item_ids) > 0 and np.isfinite(rec.scores).all()


def test_non_finite_stored_vector_is_a_cold_start(client, store, caplog):
    healthy = store["users"][5]
    users = [*store["broken"][:3], healthy]
    with caplog.at_level(logging.INFO, logger="tfrs_ctx.client"):
        recs = client.recommend([AdRequest(u, None) for u in users])
    for user, rec in zip(users[:3], recs[:3], strict=True):
        assert not rec.history_used and _finite(rec), (user, rec)
        assert any("not finite" in n and "cold start" in n for n in rec.notes), rec.notes
        assert f"user {user}: stored vector has NaN/inf" in caplog.text
    assert recs[3].history_used and _finite(recs[3]) and recs[3].model_version == VERSION


def test_wrong_length_stored_vector_is_a_cold_start(client, store):
    user, healthy = store["broken"][3], store["users"][5]
    rec, other = client.recommend([AdRequest(user, None), AdRequest(healthy, None)])
    assert not rec.history_used and _finite(rec)
    assert any("length" in n and "cold start" in n for n in rec.notes), rec.notes
    assert other.history_used and _finite(other)  # the rest of the batch is unaffected


def test_non_finite_context_weight_never_reaches_predict(client, store, categories):
    user = store["users"][5]
    rec = client.recommend([AdRequest(user, None, categories[:2], [math.nan, 0.5])])[0]
    assert _finite(rec), rec.scores[:5]
    assert not rec.context_used and any("context" in n for n in rec.notes), rec.notes


# --------------------------------------------------------------------------------------
# 6. Unknown ids
# --------------------------------------------------------------------------------------
def test_unknown_vocabulary_values_map_to_the_oov_id(served):
    """Two different unknown values give the same row (both are the OOV id), which is not the missing value's row."""
    first = np.eye(1, S.MAX_CATEGORIES, dtype=np.int64)  # one category, then padding
    cases = {  # two unknown values, then the missing value
        S.CONTEXT_CATEGORIES: np.asarray([[UNKNOWN_ID], [UNKNOWN_ID + 7], [0]], np.int64) * first,
        S.USER_COUNTRY: np.asarray([b"ZZ", b"no such country", b""], object),
        S.USER_AGE_BUCKET: np.asarray([b"200+", b"-1", b""], object),
        S.USER_GENDER: np.asarray([b"?", b"unknown", b""], object),
    }
    for name, values in cases.items():
        overrides = {name: values}
        if name == S.CONTEXT_CATEGORIES:  # weight 0 is padding: the missing row has no context
            overrides[S.CONTEXT_WEIGHTS] = (np.asarray([[0.9], [0.9], [0.0]]) * first).astype(np.float32)
        response = served["predict"].Predict(_head_request(3, **overrides), timeout=30)
        out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        assert np.isfinite(out[S.TOP_K_SCORES]).all(), name
        np.testing.assert_array_equal(out[S.TOP_K_IDS][0], out[S.TOP_K_IDS][1], err_msg=name)
        np.testing.assert_allclose(out[S.USER_EMBEDDING][0], out[S.USER_EMBEDDING][1], atol=1e-6, err_msg=name)
        assert not np.allclose(out[S.USER_EMBEDDING][0], out[S.USER_EMBEDDING][2], atol=1e-6), name


def test_unknown_context_category_maps_to_the_oov_id(client, store, categories):
    user = store["users"][5]
    known = [categories[0], categories[1]]
    first, second, real, none = client.recommend(
        [
            AdRequest(user, None, [UNKNOWN_ID], [0.9]),
            AdRequest(user, None, [UNKNOWN_ID + 7], [0.9]),
            AdRequest(user, None, known, [0.9, 0.4]),
            AdRequest(user, None),
        ]
    )
    for rec in (first, second, real, none):
        assert rec.history_used and _finite(rec)
    assert first.item_ids == second.item_ids  # any unknown category is the one OOV id
    assert first.scores == pytest.approx(second.scores, abs=1e-6)
    assert first.scores != pytest.approx(none.scores, abs=1e-6)  # the OOV id is a context, not dropped


def test_unknown_context_category_is_noted(store, served, categories, caplog):
    reader = FeastFeatureReader.open(str(store["root"]))
    request = AdRequest(store["users"][5], None, [categories[0], UNKNOWN_ID], [0.9, 0.5])
    with (
        CandidateClient(served["server"].address, reader, deadline_s=30, known_categories=categories) as client,
        caplog.at_level(logging.INFO, logger="tfrs_ctx.client"),
    ):
        rec = client.recommend([request])[0]
    assert _finite(rec)
    assert any(f"unknown context category {UNKNOWN_ID}" in n for n in rec.notes), rec.notes
    assert not any(f"unknown context category {categories[0]}" in n for n in rec.notes), rec.notes
    assert f"unknown context category {UNKNOWN_ID}" in caplog.text
