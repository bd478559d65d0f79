"""Evaluation metrics against by-hand answers."""

from __future__ import annotations

import numpy as np
import pytest

from tfrs_ctx import schema
from tfrs_ctx.evaluation import evaluate, metrics

R = schema.NUM_RESERVED_IDS


def test_ranks_by_hand():
    # 4 ads (indices 2..5). Scores per request; labels are item indices.
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.4, 0.6]], dtype=np.float32)
    labels = np.array([R + 2, R + 0])  # request 0: label score 0.5 -> one ad above (0.9); request 1: top
    assert metrics.ranks_from_scores(scores, labels).tolist() == [1, 0]
    # Excluding the ad with 0.9 (index R+1) from request 0 lifts its label to rank 0.
    exclude = np.array([[R + 1, 0], [schema.PAD_ID, schema.OOV_ID]])
    assert metrics.ranks_from_scores(scores, labels, exclude).tolist() == [0, 0]


def test_label_is_never_excluded():
    scores = np.array([[0.1, 0.9, 0.5]], dtype=np.float32)
    assert metrics.ranks_from_scores(scores, [R + 0], [[R + 0]]).tolist() == [2]


def test_label_ranks_from_embeddings():
    corpus = np.eye(3, dtype=np.float32)
    query = np.array([[0.2, 0.5, 0.9]], dtype=np.float32)
    assert metrics.label_ranks(query, corpus, [R + 0]).tolist() == [2]


def test_row_chunks_give_the_same_ranks(monkeypatch):
    rng = np.random.default_rng(0)
    query, corpus = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    corpus[7] = corpus[3]  # a tie: counts in the label's favour
    labels = rng.integers(R, R + 50, size=37)
    labels[:5] = R + 3
    exclude = rng.integers(0, R + 50, size=(37, 6))
    whole = metrics.label_ranks(query, corpus, labels, exclude)
    scores = query @ corpus.T
    before = scores.copy()
    whole_scores = metrics.ranks_from_scores(scores, labels, exclude)
    monkeypatch.setattr(metrics, "SCORE_BUDGET", 3 * 50 + 7)  # 3 rows per chunk, the last chunk shorter
    assert metrics._row_chunks(37, 50)[-1] == slice(36, 37)
    np.testing.assert_array_equal(metrics.label_ranks(query, corpus, labels, exclude), whole)
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, labels, exclude), whole_scores)
    np.testing.assert_array_equal(scores, before)  # the caller's scores are not modified
    assert metrics.label_ranks(np.zeros((0, 8), np.float32), corpus, np.zeros(0, np.int64)).shape == (0,)


def test_recall_and_ndcg_by_hand():
    ranks = np.array([0, 3, 9, 10, 60, 150, 500])
    m = metrics.per_request(ranks)
    assert m["recall@10"].mean() == pytest.approx(3 / 7)
    assert m["recall@50"].mean() == pytest.approx(4 / 7)
    assert m["recall@100"].mean() == pytest.approx(5 / 7)
    assert m["recall@200"].mean() == pytest.approx(6 / 7)
    by_hand = (1 / np.log2(2) + 1 / np.log2(5) + 1 / np.log2(11)) / 7
    assert m["ndcg@10"].mean() == pytest.approx(by_hand)


def test_bootstrap_interval_and_paired_lift():
    a = np.array([1.0, 1.0, 0.0, 1.0] * 50)
    b = np.array([1.0, 0.0, 0.0, 0.0] * 50)
    idx = metrics.bootstrap_indices(len(a), 500, seed=0)
    ci = metrics.interval(a, idx)
    assert ci["mean"] == pytest.approx(0.75)
    assert ci["lo"] < 0.75 < ci["hi"]
    lift = metrics.paired_lift(a, b, idx)
    assert lift["lift"] == pytest.approx(3.0)
    assert lift["lo"] < 3.0 < lift["hi"]
    # Identical rows: the paired interval collapses to exactly 1.
    same = metrics.paired_lift(a, a, idx)
    assert same["lo"] == same["hi"] == 1.0


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {"baseline": rng.integers(0, 400, 300), "contextual": rng.integers(0, 100, 300)}
    report = evaluate.build_report(ranks, bootstrap=200)
    evaluate.write_report(report, str(tmp_path))
    assert report["lift"]["recall@100"]["lift"] > 1.0
    text = (tmp_path / "report.md").read_text()
    assert "| contextual |" in text and "recall@200" in text
    assert (tmp_path / "recall_at_k.png").stat().st_size > 10_000
