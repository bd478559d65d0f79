"""The synthetic world's search surface: taxonomy words, and queries the way users type them.

Every top-level interest has one word and every leaf interest two (pseudo-words made of
syllables, unique across the taxonomy); about half of the leaf words have a synonym that no
category name contains, and a few dozen modifier words ("cheap", "new" in spirit) belong to no
interest at all. ``category_names`` (category id -> name) is what a shop's taxonomy would
publish: the leaf's two words, the top-level word.

A search request has an intent leaf (one of the user's interests with probability
``search_from_interest``, else any leaf by popularity) and one query of three kinds:

* head (35%): one word — the leaf's first word, or the top-level word (the intent is then a
  leaf of that top, so the query is ambiguous);
* tail (55%): one or both leaf words, each a synonym with probability 0.3, plus the top word
  (30%) and a modifier (40%), in random order;
* spanning (10%): the first words of the intent leaf and of another leaf.

Each word of 4+ letters is misspelt with probability ``typo_rate`` (one deletion, insertion,
substitution or swap: :func:`tfrs_ctx.data.search_context.misspell`); 20% start with a capital,
5% end with ``?`` or ``!``. The converted ad comes from the intent leaf with probability
``search_strength`` and from the user's current interests otherwise (the ``context_strength``
of the related-items surface, for search).
"""

from __future__ import annotations

import numpy as np

from tfrs_ctx.data.search_context import misspell

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
KIND_PROBS = (0.35, 0.55, 0.10)  # head, tail, spanning
N_MODIFIERS = 40


def _pseudo_words(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """``n`` distinct new pseudo-words of 2-3 consonant-vowel syllables (not in ``taken``)."""
    words: list[str] = []
    while len(words) < n:
        syllables = rng.integers(2, 4)
        word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(5)] for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


class SearchWorld:
    """Words of a taxonomy of ``num_top`` x ``leaves_per_top`` leaves, and a query writer."""

    def __init__(self, num_top: int, leaves_per_top: int, rng: np.random.Generator):
        taken: set[str] = set()
        self.num_top, self.leaves_per_top = num_top, leaves_per_top
        n_leaves = num_top * leaves_per_top
        self.top_word = _pseudo_words(num_top, rng, taken)
        flat = _pseudo_words(2 * n_leaves, rng, taken)
        self.leaf_words = [flat[2 * i : 2 * i + 2] for i in range(n_leaves)]
        synonyms = _pseudo_words(2 * n_leaves, rng, taken)
        has = rng.random(2 * n_leaves) < 0.5
        self.synonym = {flat[i]: synonyms[i] for i in np.flatnonzero(has)}
        self.modifiers = _pseudo_words(N_MODIFIERS, rng, taken)

    def category_names(self, category_id) -> dict[str, list]:
        """``category_names`` columns: every top-level and leaf category with its name."""
        leaves = np.arange(self.num_top * self.leaves_per_top)
        ids = [int(x) for x in category_id(leaves)]
        tops = [(t + 1) * 1000 for t in range(self.num_top)]
        return {"category_id": tops + ids, "name": self.top_word + [" ".join(w) for w in self.leaf_words]}

    def queries(
        self, intent: np.ndarray, leaf_pop: np.ndarray, typo_rate: float, rng: np.random.Generator
    ) -> tuple[list[str], np.ndarray]:
        """One query per intent leaf, and the leaf each query's context-following ad comes from.

        That leaf is the intent, except for a top-level head query (a leaf of that top, by
        popularity) and a spanning query (either of its two leaves).
        """
        n, per_top = len(intent), self.leaves_per_top
        kind = rng.choice(3, size=n, p=KIND_PROBS)
        u = rng.random((n, 6))
        other = rng.integers(0, self.num_top * per_top, size=n)
        target = intent.copy()
        out = []
        for i in range(n):
            leaf, top = int(intent[i]), int(intent[i]) // per_top
            words = self.leaf_words[leaf]
            if kind[i] == 0:
                if u[i, 0] < 0.3:
                    q = [self.top_word[top]]
                    within = leaf_pop[top * per_top : (top + 1) * per_top]
                    target[i] = top * per_top + rng.choice(per_top, p=within / within.sum())
                else:
                    q = [words[0]]
            elif kind[i] == 1:
                q = list(words) if u[i, 0] < 0.5 else [words[int(u[i, 1] < 0.5)]]
                q = [self.synonym.get(w, w) if rng.random() < 0.3 else w for w in q]
                if u[i, 2] < 0.3:
                    q.append(self.top_word[top])
                if u[i, 3] < 0.4:
                    q.append(self.modifiers[rng.integers(N_MODIFIERS)])
                q = [q[j] for j in rng.permutation(len(q))]
            else:
                q = [words[0], self.leaf_words[int(other[i])][0]]
                if u[i, 0] < 0.5:
                    target[i] = other[i]
            q = [misspell(w, rng.random(3)) if len(w) >= 4 and rng.random() < typo_rate else w for w in q]
            text = " ".join(q)
            if u[i, 4] < 0.2:
                text = text[:1].upper() + text[1:]
            if u[i, 5] < 0.05:
                text += "?" if rng.random() < 0.5 else "!"
            out.append(text)
        return out, target
