"""The load test's answer check: ids must be the reference's but for the order of tied ads."""

from __future__ import annotations

from benchmarks.load_test import same_up_to_ties

SCORES = [0.9, 0.5, 0.5 - 3e-8, 0.3, 0.3]  # ranks 2-3 tie, and 4-5 tie at the top-K boundary
REF = [1, 2, 3, 4, 5]


def test_identical_and_tied_swaps_pass():
    assert same_up_to_ties(REF, REF, SCORES)
    assert same_up_to_ties([1, 3, 2, 4, 5], REF, SCORES)
    assert same_up_to_ties([1, 3, 2, 5, 4], REF, SCORES)


def test_a_tie_at_rank_k_may_bring_in_the_next_ad():
    assert same_up_to_ties([1, 2, 3, 4, 9], REF, SCORES)


def test_anything_else_is_wrong():
    assert not same_up_to_ties([2, 1, 3, 4, 5], REF, SCORES)  # 0.9 vs 0.5: no tie
    assert not same_up_to_ties([1, 9, 3, 4, 5], REF, SCORES)  # an ad from outside, not at the boundary
    assert not same_up_to_ties([1, 2, 2, 4, 5], REF, SCORES)  # a duplicate
    assert not same_up_to_ties([1, 2, 3, 4], REF, SCORES)  # short
