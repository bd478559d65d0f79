"""Both Beam pipelines on Beam's DaskRunner (a LocalCluster of 2 worker processes) give the DirectRunner's output.

Real runs of the real pipelines on a copy of the session's synthetic raw tables with malformed
rows in every table; every output is read back and compared, order aside (TFRecord examples,
vocabularies, item counts, corpus, consumed items, dead letters and their counts; the Feast
Parquet rows of the user encodings and snapshots).
"""

from __future__ import annotations

import glob
import json
import logging
import pathlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import build_training_data as btd
from beam_pipelines import encode_users, runner
from beam_pipelines.tables import DEAD_LETTER_DIR
from tfrs_ctx import schema as S

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

UNKNOWN_ID = 987_654_321
EVENT_TS = 1_800_000_000


def _jsonl(path: pathlib.Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def _first_row(raw: pathlib.Path, table: S.Table) -> dict:
    return pq.read_table(sorted((raw / table.name).glob("*.parquet"))[0]).slice(0, 1).to_pylist()[0]


@pytest.fixture(scope="module")
def raw(small_raw, tmp_path_factory) -> tuple[pathlib.Path, dict[str, int]]:
    """A copy of ``small_raw`` with bad rows in every table; the number of dead letters expected per table."""
    out = tmp_path_factory.mktemp("dask_raw") / "raw"
    shutil.copytree(small_raw, out)
    conv, item = _first_row(out, S.CONVERSIONS), _first_row(out, S.ITEMS)
    user, subject, request = _first_row(out, S.USERS), _first_row(out, S.SUBJECT_ITEMS), _first_row(out, S.REQUESTS)
    search, name = _first_row(out, S.SEARCH_REQUESTS), _first_row(out, S.CATEGORY_NAMES)
    bad = {
        S.CONVERSIONS: [{**conv, S.ITEM_ID: UNKNOWN_ID}, {**conv, S.EVENT_TYPE: "refund"}, '{"user_id": 1, '],
        S.ITEMS: [item, {**item, S.ITEM_ID: None}],  # a duplicate key, a missing id
        S.USERS: [{**user, S.USER_ID: "u1"}],
        S.SUBJECT_ITEMS: [{**subject, S.CATEGORIES: None}],
        S.REQUESTS: [request, {**request, S.SUBJECT_ITEM_ID: UNKNOWN_ID}],  # a duplicate id, an unknown subject
        S.SEARCH_REQUESTS: [{**search, S.QUERY: "other"}, {**search, S.REQUEST_ID: 10**9, S.ITEM_ID: UNKNOWN_ID}],
        S.CATEGORY_NAMES: [{**name, S.NAME: "zzz"}],  # a duplicate key
    }
    for table, rows in bad.items():
        extra = [conv] if table is S.CONVERSIONS else []  # a good row among bad ones (a repeated event)
        _jsonl(out / table.name / "part-bad.jsonl", [*rows, *extra])
    return out, {table.name: len(rows) for table, rows in bad.items()}


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes (one thread each) for the module's Dask runs."""
    from distributed import LocalCluster

    runner.quiet_dask_logs()
    with LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=logging.WARNING
    ) as c:
        yield c.scheduler_address


def dask_flags(address: str) -> list[str]:
    return ["--runner", "DaskRunner", "--dask_client_address", address]


# --------------------------------------------------------------------------------------
# Reading outputs back
# --------------------------------------------------------------------------------------
def training_outputs(data_dir: pathlib.Path) -> dict:
    """Everything the training-data pipeline wrote, order-free: sorted records and lines, whole small files."""
    import tensorflow as tf

    result: dict = {}
    for split in (*S.SPLITS, *S.SEARCH_SPLITS):
        files = sorted(glob.glob(S.tfrecord_pattern(str(data_dir), split)))
        result[split] = sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))
        result[f"{split} files"] = [pathlib.Path(f).name for f in files]
    consumed = [f"{name}/part-*" for name in (S.EVAL_CONSUMED_DIR, S.EVAL_SEARCH_CONSUMED_DIR)]
    for pattern in (*consumed, f"{DEAD_LETTER_DIR}/*.jsonl"):
        for path in sorted(data_dir.glob(pattern)):
            result[str(path.relative_to(data_dir))] = sorted(path.read_text().splitlines())
    for path in sorted((data_dir / S.VOCAB_DIR).iterdir()):
        result[f"vocab/{path.name}"] = path.read_text()
    result["item_counts"] = (data_dir / S.ITEM_COUNTS_FILE).read_text()
    result["corpus"] = pq.read_table(data_dir / S.CORPUS_FILE).to_pylist()
    metadata = json.loads((data_dir / S.METADATA_FILE).read_text())
    metadata["options"].pop("output")
    result["metadata"] = metadata
    return result


def store_rows(store: pathlib.Path) -> dict[str, list[dict]]:
    """The Feast Parquet rows a store holds, sorted by key."""
    tables = {
        "encodings": (f"{S.USER_ENCODINGS_DIR}/*.parquet", S.USER_ID),
        "demographics": (S.USER_DEMOGRAPHICS_FILE, S.USER_ID),
        "subject_items": (S.SUBJECT_ITEMS_FILE, S.SUBJECT_ITEM_ID),
    }
    out = {}
    for name, (pattern, key) in tables.items():
        rows = [r for path in sorted(store.glob(pattern)) for r in pq.read_table(path).to_pylist()]
        out[name] = sorted(rows, key=lambda r, k=key: r[k])
    return out


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------
def test_dask_runner_names_and_local_cluster():
    assert runner.is_dask(PipelineOptions(["--runner", "DaskRunner"]))
    assert runner.is_dask(PipelineOptions(["--runner", runner.DASK_RUNNER]))
    assert not runner.is_dask(PipelineOptions([]))
    from distributed import Client

    options = PipelineOptions(["--runner", "DaskRunner", "--dask_workers", "2"])
    with runner.dask_scheduler(options) as address, Client(address) as client:
        assert sorted(client.nthreads().values()) == [1, 1]  # 2 worker processes, one thread each
        from apache_beam.runners.dask.dask_runner import DaskOptions

        assert options.view_as(DaskOptions).npartitions == 2 * runner.PARTITIONS_PER_WORKER
    with pytest.raises(OSError), Client(address, timeout=2):  # stopped with the block
        pass


def test_build_training_data_on_dask_equals_the_direct_runner(raw, cluster, tmp_path):
    raw_dir, dead = raw
    flags = ["--input", str(raw_dir), "--num_shards", "3"]
    direct = btd.run([*flags, "--output", str(tmp_path / "direct")], save_main_session=False)
    on_dask = btd.run([*flags, "--output", str(tmp_path / "dask"), *dask_flags(cluster)], save_main_session=False)
    tables = [*S.RAW_TABLES, *S.OPTIONAL_RAW_TABLES]  # the synthetic default has the search surface
    assert on_dask["dead_letter"] == direct["dead_letter"] == {name: dead[name] for name in tables}
    assert on_dask["counts"] == direct["counts"] and min(direct["counts"].values()) > 0
    a, b = training_outputs(tmp_path / "direct"), training_outputs(tmp_path / "dask")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert a["train files"] == [f"part-{i:05d}-of-00003{S.TFRECORD_SUFFIX}" for i in range(3)]
    letters = [json.loads(line) for key, lines in b.items() if key.startswith(DEAD_LETTER_DIR) for line in lines]
    assert len(letters) == sum(dead.values()) and all(d["reason"] for d in letters)


@pytest.fixture(scope="module")
def encoder(tiny_runs, small_data, tmp_path_factory) -> pathlib.Path:
    from tfrs_ctx import export
    from tfrs_ctx.training.run_dir import load_trained

    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    out = tmp_path_factory.mktemp("dask_models")
    export.export_all(model, str(small_data), str(out), version=3, top_k=10)
    return out / "encoder"


def test_encode_users_on_dask_equals_the_direct_runner(raw, cluster, encoder, tmp_path):
    raw_dir, dead = raw
    flags = ["--raw", str(raw_dir), "--model", str(encoder), "--event_timestamp", str(EVENT_TS)]
    flags += ["--max_batch_size", "128", "--output_shards", "2"]
    direct = encode_users.run([*flags, "--output", str(tmp_path / "direct")])
    on_dask = encode_users.run([*flags, "--output", str(tmp_path / "dask"), *dask_flags(cluster)])
    for summary in (direct, on_dask):
        summary.pop("files")
        summary.pop("dead_letter_files")
    assert on_dask == direct
    assert direct["dead_letter"] == {t: dead[t] for t in direct["dead_letter"]} and direct["users_encoded"] > 0
    a, b = store_rows(tmp_path / "direct"), store_rows(tmp_path / "dask")
    assert a["demographics"] == b["demographics"] and a["subject_items"] == b["subject_items"]
    assert len(a["encodings"]) == len(b["encodings"]) == direct["users_encoded"]
    vectors = [np.asarray([r[S.ENCODED_HISTORY] for r in rows]) for rows in (a["encodings"], b["encodings"])]
    # Batches differ (each runner's grouping), and batched float math may differ in the last bits.
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-5)
    for x, y in zip(a["encodings"], b["encodings"], strict=True):
        assert {k: v for k, v in x.items() if k != S.ENCODED_HISTORY} == {
            k: v for k, v in y.items() if k != S.ENCODED_HISTORY
        }
    assert len(list((tmp_path / "dask" / S.USER_ENCODINGS_DIR).glob("*.parquet"))) == 2
