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
# float32 scores held at once (256 MiB): a 1,024-query batch over 1M ads is ranked 67 rows at a time,
# not as one 4 GiB matrix (and its copy); at 10k ads a whole batch is one chunk.
SCORE_BUDGET = 1 << 26


def label_ranks(query, corpus, labels, exclude=None) -> np.ndarray:
    """0-based rank of each label among all ads (ties count in the label's favour).

    ``query`` ``[B, d]``, ``corpus`` ``[N, d]`` (row r = item index r + NUM_RESERVED_IDS),
    ``labels`` ``[B]`` item indices; ``exclude`` ``[B, M]`` item indices to drop from the
    ranking (PAD/OOV and the label itself are never dropped). Queries are scored in row chunks
    of at most ``SCORE_BUDGET`` scores (a row's label and its competitors from one product).
    """
    query = np.asarray(query, dtype=np.float32)
    corpus_t = np.asarray(corpus, dtype=np.float32).T
    labels, exclude = np.asarray(labels), None if exclude is None else np.asarray(exclude)
    parts = [
        _ranks(query[rows] @ corpus_t, labels[rows], None if exclude is None else exclude[rows], copy=False)
        for rows in _row_chunks(len(query), corpus_t.shape[1])
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def recall_at_k(model, batches: list, k: int) -> float | None:
    """Full-ranking Recall@``k`` of ``model`` on a list of batches (``None`` if there are none)."""
    if not batches:
        return None
    corpus = model.corpus_embeddings()
    ranks = [label_ranks(model.query_embedding(b), corpus, b[schema.LABEL_ITEM]) for b in batches]
    return float(np.mean(np.concatenate(ranks) < k))


def ranks_from_scores(scores: np.ndarray, labels, exclude=None) -> np.ndarray:
    """0-based rank of each label given ``[B, N]`` scores (``scores`` is not modified)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    exclude = None if exclude is None else np.asarray(exclude)
    parts = [
        _ranks(scores[rows], labels[rows], None if exclude is None else exclude[rows], copy=True)
        for rows in _row_chunks(len(scores), scores.shape[1])
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _row_chunks(rows: int, columns: int) -> list[slice]:
    """Row slices holding at most ``SCORE_BUDGET`` scores each (at least one row)."""
    step = max(1, SCORE_BUDGET // max(columns, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _ranks(scores: np.ndarray, labels: np.ndarray, exclude: np.ndarray | None, copy: bool) -> np.ndarray:
    """Ranks of one row chunk; ``copy=False``: ``scores`` is a fresh float32 product, modified in place."""
    scores = np.array(scores, dtype=np.float32) if copy else scores
    rows = labels.astype(np.int64) - schema.NUM_RESERVED_IDS
    batch = np.arange(len(rows))
    label_scores = scores[batch, rows].copy()
    if exclude is not None:
        exclude = exclude.astype(np.int64)
        drop = (exclude >= schema.NUM_RESERVED_IDS) & (exclude != labels[:, None])
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
