"""Synthetic search context for training: a query written from the label ad's category names.

The search surface's counterpart of :func:`tfrs_ctx.data.examples.synthetic_context`: a
training target gets the query a user who wanted that ad might have typed — the words of the
names of its confident categories (``confidence >= min_confidence``: its leaf and parent in the
synthetic taxonomy), each dropped with ``word_drop`` (at least one word is kept), shuffled, and
each word of 4+ letters misspelt with ``typo_rate``. Synonyms and modifier words, which real
queries hold and category names do not, are not invented: the hashed n-grams and the real
search log (calibration) cover them. All randomness comes from the example's stable key, so
every worker and every run writes the same query.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tfrs_ctx import schema as S
from tfrs_ctx.data.stable_random import stable_uniform

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_QUERY_WORDS = 8


def category_name_table(vocab_tokens: list, names: dict[int, str]) -> np.ndarray:
    """Names aligned with the category vocabulary (index -> lower-case name, ``""`` unknown)."""
    return np.array([names.get(int(t), "").lower() if isinstance(t, (int, np.integer)) else "" for t in vocab_tokens])


def misspell(word: str, u: Sequence[float]) -> str:
    """One edit of a word of 3+ letters chosen by three uniforms in [0, 1): position, operation, letter.

    The operation is a deletion, insertion, substitution or swap of neighbours; the first and last
    letters are kept. The synthetic search log's typos and the training queries' use this one rule.
    """
    i = 1 + int(u[0] * (len(word) - 2))
    op, letter = int(u[1] * 4), _LETTERS[int(u[2] * len(_LETTERS))]
    if op == 0:
        return word[:i] + word[i + 1 :]
    if op == 1:
        return word[:i] + letter + word[i:]
    if op == 2:
        return word[:i] + letter + word[i + 1 :]
    return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]


def synthetic_queries(
    categories: np.ndarray,
    confidences: np.ndarray,
    names: np.ndarray,
    keys: np.ndarray,
    word_drop: float = 0.3,
    typo_rate: float = 0.05,
    min_confidence: float = 0.3,
) -> np.ndarray:
    """``[N]`` query strings (object array) for labels with ``[N, C]`` category indices.

    ``names[i]`` is the name of category index ``i`` (:func:`category_name_table`); a label
    with no named confident category gets ``""``, which the model reads as no query.
    """
    n = len(categories)
    u_drop = stable_uniform(keys, 2, MAX_QUERY_WORDS)
    u_order = stable_uniform(keys, 3, MAX_QUERY_WORDS)
    u_typo = stable_uniform(keys, 4, 4 * MAX_QUERY_WORDS).reshape(n, MAX_QUERY_WORDS, 4)
    out = np.empty(n, dtype=object)
    for r in range(n):
        confident = (categories[r] != S.PAD_ID) & (confidences[r] >= min_confidence)
        words = [w for c in categories[r][confident] for w in str(names[c]).split()][:MAX_QUERY_WORDS]
        if not words:
            out[r] = ""
            continue
        kept = [j for j in range(len(words)) if u_drop[r, j] >= word_drop] or [0]
        kept.sort(key=lambda j: u_order[r, j])
        query = []
        for j in kept:
            w, u = words[j], u_typo[r, j]
            query.append(misspell(w, u[1:]) if len(w) >= 4 and u[0] < typo_rate else w)
        out[r] = " ".join(query)
    return out
