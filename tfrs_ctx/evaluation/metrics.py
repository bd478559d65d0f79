"""Ranking metrics over the whole ad corpus, and bootstrap intervals.

Ranks are 0-based and ties count in the label's favour; a corpus row ``r`` is the ad with item
index ``r + NUM_RESERVED_IDS``. Training (early stopping), calibration and the evaluation report
all score with these functions.
"""

from __future__ import annotations

import numpy as np

from tfrs_ctx import schema

KS = (10, 50, 100, 200)
NDCG_K = 10


def label_ranks(query, corpus, labels, exclude=None) -> np.ndarray:
    """0-based rank of each label among all ads (ties count in the label's favour).

    ``query`` ``[B, d]``, ``corpus`` ``[N, d]`` (row r = item index r + NUM_RESERVED_IDS),
    ``labels`` ``[B]`` item indices; ``exclude`` ``[B, M]`` item indices to drop from the
    ranking (PAD/OOV and the label itself are never dropped).
    """
    scores = np.asarray(query, dtype=np.float32) @ np.asarray(corpus, dtype=np.float32).T
    return ranks_from_scores(scores, labels, exclude)


def recall_at_k(model, batches: list, k: int) -> float | None:
    """Full-ranking Recall@``k`` of ``model`` on a list of batches (``None`` if there are none)."""
    if not batches:
        return None
    corpus = model.corpus_embeddings()
    ranks = [label_ranks(model.query_embedding(b), corpus, b[schema.LABEL_ITEM]) for b in batches]
    return float(np.mean(np.concatenate(ranks) < k))


def ranks_from_scores(scores: np.ndarray, labels, exclude=None) -> np.ndarray:
    scores = np.array(scores, dtype=np.float32, copy=True)
    rows = np.asarray(labels, dtype=np.int64) - schema.NUM_RESERVED_IDS
    batch = np.arange(len(rows))
    label_scores = scores[batch, rows].copy()
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        drop = (exclude >= schema.NUM_RESERVED_IDS) & (exclude != np.asarray(labels)[:, None])
        b, j = np.nonzero(drop)
        scores[b, exclude[b, j] - schema.NUM_RESERVED_IDS] = -np.inf
    return (scores > label_scores[:, None]).sum(axis=1)


def per_request(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-request metric values (means of these are the report's figures)."""
    out = {f"recall@{k}": (ranks < k).astype(np.float64) for k in KS}
    out[f"ndcg@{NDCG_K}"] = np.where(ranks < NDCG_K, 1.0 / np.log2(ranks + 2.0), 0.0)
    return out


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def interval(values: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    means = values[idx].mean(axis=1)
    return {
        "mean": float(values.mean()),
        "lo": float(np.percentile(means, 2.5)),
        "hi": float(np.percentile(means, 97.5)),
    }


def paired_lift(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """mean(a) / mean(b) with a paired bootstrap interval (the same resamples for both)."""
    ratio = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), 1e-12)
    return {
        "lift": float(a.mean() / max(b.mean(), 1e-12)),
        "lo": float(np.percentile(ratio, 2.5)),
        "hi": float(np.percentile(ratio, 97.5)),
    }
