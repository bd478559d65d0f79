"""The context trust when no request log calibrates it: derived previous-event requests (MovieLens,
real TFRecords), the flagged synthetic fallback, and what the summary, model_info.json and report say."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tfrs_ctx import schema
from tfrs_ctx.data import dataset
from tfrs_ctx.training import calibrate
from tfrs_ctx.training.run_dir import SUMMARY_FILE, load_trained

HISTORY = (*schema.HISTORY_FEATURES, schema.HISTORY_NEXT_GAP)


def _examples(data: pathlib.Path, split: str) -> list[dict]:
    return list(dataset.make_dataset(str(data), split, 4096).unbatch().as_numpy_iterator())


@pytest.fixture(scope="module")
def ml_raw(ml100k_dir, tmp_path_factory) -> pathlib.Path:
    from tfrs_ctx.sources.movielens import import_movielens

    out = tmp_path_factory.mktemp("ml_raw")
    import_movielens(str(ml100k_dir), str(out))
    return out


@pytest.fixture(scope="module")
def ml_data(ml_raw, tmp_path_factory) -> pathlib.Path:
    """MovieLens-100k through the real pipeline, the default request-quantile cutoff."""
    from beam_pipelines import build_training_data

    out = tmp_path_factory.mktemp("ml_data")
    build_training_data.run(["--input", str(ml_raw), "--output", str(out), "--max_targets_per_user", "5"])
    return out


def test_previous_event_requests_are_the_data_s_own_requests(ml_data):
    """Where a logged request's subject is its label's previous training event, the derived request
    from that training target is the logged request: same label, context, subject, history."""
    real = {(int(e[schema.EX_USER_ID]), int(e[schema.LABEL_ITEM])): e for e in _examples(ml_data, "train_requests")}
    derived = list(calibrate.derived_requests(str(ml_data), 10**9).as_numpy_iterator())
    assert derived and all(d[schema.HISTORY_LENGTH] >= 1 for d in derived)
    matched = 0
    for d in derived:
        r = real.get((int(d[schema.EX_USER_ID]), int(d[schema.LABEL_ITEM])))
        if r is None or r[schema.SUBJECT_ITEM] != d[schema.SUBJECT_ITEM]:
            continue  # a subject tied in time with its label is not in the target's history
        matched += 1
        n = int(d[schema.HISTORY_LENGTH])  # the logged one may hold one event more (the 50-event cap)
        assert int(r[schema.HISTORY_LENGTH]) in (n, n + 1)
        for name in HISTORY:
            np.testing.assert_array_equal(d[name][-n:], r[name][-n:], err_msg=name)
            assert not d[name][:-n].any(), name  # left padding
        for name in (*schema.CONTEXT_FEATURES, schema.EX_TIMESTAMP, *schema.DEMOGRAPHIC_FEATURES):
            np.testing.assert_array_equal(d[name], r[name], err_msg=name)
    assert matched >= len(real) // 3, (matched, len(real))


def test_previous_event_requests_never_read_an_event_at_or_after_the_cutoff(ml_data):
    cutoff = dataset.load_metadata(str(ml_data))["cutoff_timestamp"]
    derived = list(calibrate.derived_requests(str(ml_data), 10**9).as_numpy_iterator())
    held_out = {}  # user -> the items of their eval requests (label and subject: events at/after the cutoff)
    for e in _examples(ml_data, "eval"):
        assert e[schema.EX_TIMESTAMP] >= cutoff
        held_out.setdefault(int(e[schema.EX_USER_ID]), set()).add(int(e[schema.LABEL_ITEM]))
    assert held_out
    for d in derived:
        assert d[schema.EX_TIMESTAMP] < cutoff
        late = held_out.get(int(d[schema.EX_USER_ID]), set())
        seen = {int(d[schema.LABEL_ITEM]), int(d[schema.SUBJECT_ITEM]), *d[schema.HISTORY_ITEM].tolist()}
        assert not late & seen  # a movie is rated once: its eval event never enters calibration


def _no_request_data(raw: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    from beam_pipelines import build_training_data
    from tfrs_ctx.data import rawio

    first = int(rawio.read_table(str(raw), schema.REQUESTS)[schema.TIMESTAMP].min())
    # 5 targets per user: what the trust is chosen on, not how well the model trains, is under test
    build_training_data.run(
        ["--input", str(raw), "--output", str(out), f"--cutoff={first}", "--max_targets_per_user=5"]
    )
    assert dataset.load_metadata(str(out))["counts"][schema.SPLIT_TRAIN_REQUESTS] == 0
    return out


def _train(config: str, data: pathlib.Path, run: pathlib.Path) -> dict:
    from conftest import TINY_MODEL

    from tfrs_ctx.config import load_config
    from tfrs_ctx.training import train

    cfg = load_config(config, [*TINY_MODEL, "train.epochs=1"])
    cfg.train.data_dir = str(data)
    train.train(cfg, str(run), verbose=0)
    return json.loads((run / SUMMARY_FILE).read_text())


def _served_calibration(run: pathlib.Path, data: pathlib.Path, models: pathlib.Path, summary: dict) -> dict:
    from tfrs_ctx import export

    model, _ = load_trained(str(run), str(data))
    export.export_all(model, str(data), str(models), version=1, calibration=summary["calibration"])
    infos = [json.loads((models / n / "1" / "assets.extra" / export.INFO_FILE).read_text()) for n in export.MODEL_NAMES]
    assert all(info["calibration"] == infos[0]["calibration"] for info in infos)
    return infos[0]["calibration"]


def _report(data: pathlib.Path, run: pathlib.Path, out: pathlib.Path) -> tuple[dict, str]:
    from conftest import train_tiny

    from tfrs_ctx.evaluation import evaluate

    base = train_tiny(data, out / "baseline", "model.use_context=false", "train.epochs=1")
    report = evaluate.evaluate_runs(str(data), str(run), str(base), str(out / "report"), bootstrap=20)
    return report, (out / "report" / "report.md").read_text()


def test_movielens_without_a_request_log_calibrates_on_previous_events(ml_raw, tmp_path):
    data = _no_request_data(ml_raw, tmp_path / "data")
    summary = _train("movielens", data, tmp_path / "run")
    c = summary["calibration"]
    assert c["source"] == "previous_event" and not c["flagged"] and c["flag"] is None and c["in_sample"]
    assert 0 < c["examples"] <= dataset.load_metadata(str(data))["counts"]["train"]
    assert c["recall_by_trust"][f"{c['trust']:g}"] == max(c["recall_by_trust"].values()) >= c["no_context_recall"]
    model, _ = load_trained(str(tmp_path / "run"), str(data))
    assert float(model.context_layer.trust.numpy()) == pytest.approx(c["trust"])
    # The export and the report copy this record as they do the synthetic one (tested below, once).


def test_synthetic_without_a_request_log_is_flagged_uncalibrated(small_raw, tmp_path):
    data = _no_request_data(small_raw, tmp_path / "data")
    summary = _train("synthetic", data, tmp_path / "run")
    c = summary["calibration"]
    assert c["source"] == "synthetic" and c["flagged"] and c["flag"] == calibrate.UNCALIBRATED
    assert c["examples"] > 0 and 0.0 <= c["trust"] <= 1.0 and max(map(float, c["recall_by_trust"])) == 1.0
    served = _served_calibration(tmp_path / "run", data, tmp_path / "models", summary)
    assert served["source"] == "synthetic" and served["flagged"] and served["flag"] == "uncalibrated"
    assert served["trust"] == pytest.approx(c["trust"])
    report, text = _report(data, tmp_path / "run", tmp_path)
    assert report["calibration"]["flagged"] and "**UNCALIBRATED context trust" in text


def test_the_trust_never_beats_no_context_by_losing_and_ties_go_to_the_lower_trust(tiny_runs, small_data):
    model, _ = load_trained(str(tiny_runs["contextual"]), str(small_data))
    counts = dataset.load_metadata(str(small_data))["counts"]
    batches = dataset.validation_requests(str(small_data), counts, 200)
    trust, recalls = calibrate.choose_trust(model, batches, 100)
    assert recalls[trust] >= recalls[0.0] and all(recalls[g] < recalls[trust] for g in recalls if g < trust)
    # Context missing everywhere: every trust gives the no-context answer, all tie -> trust 0.
    empty = [{**b, **{n: b[n] * 0 for n in schema.CONTEXT_FEATURES}} for b in batches]
    trust, recalls = calibrate.choose_trust(model, empty, 100)
    assert trust == 0.0 and len(set(recalls.values())) == 1
    assert float(model.context_layer.trust.numpy()) == 0.0
