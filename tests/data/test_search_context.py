"""Synthetic search context: queries from the label's category names, deterministic per example."""

from __future__ import annotations

import numpy as np

from tfrs_ctx.data.examples import stable_keys
from tfrs_ctx.data.search_context import category_name_table, synthetic_queries

NAMES = category_name_table(
    ["<pad>", "<oov>", 1000, 1001, 1002, 2000], {1000: "Kube", 1001: "vupo tesa", 1002: "molla"}
)
# label categories as vocabulary indices (leaf, parent, sibling), with confidences
CATS = np.array([[3, 2, 4], [4, 2, 0], [5, 0, 0], [1, 0, 0]])
CONFS = np.array([[0.9, 0.5, 0.2], [0.8, 0.4, 0.0], [0.9, 0.0, 0.0], [0.9, 0.0, 0.0]], np.float32)


def _keys(n: int, seed: int = 0) -> np.ndarray:
    return stable_keys(seed, np.arange(n), np.arange(n) * 100, np.arange(n) + 7)


def test_no_noise_gives_every_confident_name_word():
    q = synthetic_queries(CATS, CONFS, NAMES, _keys(4), word_drop=0.0, typo_rate=0.0)
    assert sorted(q[0].split()) == ["kube", "tesa", "vupo"]  # the sibling (0.2) is not confident
    assert sorted(q[1].split()) == ["kube", "molla"]
    assert q[2] == "" and q[3] == ""  # no name (2000), out of vocabulary: no query at all


def test_drops_shuffles_and_misspells_deterministically_never_empty():
    cats, confs = np.repeat(CATS[:1], 2000, axis=0), np.repeat(CONFS[:1], 2000, axis=0)
    q = synthetic_queries(cats, confs, NAMES, _keys(2000), word_drop=0.5, typo_rate=0.5)
    again = synthetic_queries(cats, confs, NAMES, _keys(2000), word_drop=0.5, typo_rate=0.5)
    assert q.tolist() == again.tolist()
    assert all(len(x.split()) >= 1 for x in q)
    lengths = np.array([len(x.split()) for x in q])
    assert 1.5 < lengths.mean() < 2.2  # 3 words, half dropped, at least one kept
    clean = {"kube", "vupo", "tesa"}
    words = [w for x in q for w in x.split()]
    typo_share = np.mean([w not in clean for w in words])
    assert 0.35 < typo_share < 0.6  # every word here has 4 letters: ~half misspelt (a few edits are no-ops)
    assert len({x.split()[0] for x in q if len(x.split()) == 3 and set(x.split()) <= clean}) > 1  # order varies
    other = synthetic_queries(cats, confs, NAMES, _keys(2000, seed=1), word_drop=0.5, typo_rate=0.5)
    assert other.tolist() != q.tolist()
