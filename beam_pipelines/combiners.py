"""Beam ``CombineFn``s the pipelines share: conversion stats, counts, demographic values, last targets."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam

from tfrs_ctx import schema as S
from tfrs_ctx.data.vocab import is_missing


class StatsFn(beam.CombineFn):
    """Merges per-chunk (min timestamp, max timestamp, event-type counts)."""

    def create_accumulator(self) -> tuple:
        return (None, None, Counter())

    def add_input(self, acc: tuple, stats: tuple) -> tuple:
        return self.merge_accumulators([acc, stats])

    def merge_accumulators(self, accs: Iterable[tuple]) -> tuple:
        lo, hi, types = None, None, Counter()
        for a_lo, a_hi, a_types in accs:
            lo = a_lo if lo is None else (lo if a_lo is None else min(lo, a_lo))
            hi = a_hi if hi is None else (hi if a_hi is None else max(hi, a_hi))
            types.update(a_types)
        return lo, hi, types

    def extract_output(self, acc: tuple) -> tuple:
        return acc


class MergeCounts(beam.CombineFn):
    """Sums ``Counter``s (or mappings of counts)."""

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, counts: Mapping) -> Counter:
        acc.update(counts)
        return acc

    def merge_accumulators(self, accs: Iterable[Counter]) -> Counter:
        out = Counter()
        for a in accs:
            out.update(a)
        return out

    def extract_output(self, acc: Counter) -> dict:
        return dict(acc)


def demographic_counts(user: Mapping[str, Any]) -> dict[str, Counter]:
    return {c: Counter() if is_missing(user.get(c)) else Counter([str(user[c])]) for c in S.DEMOGRAPHIC_COLUMNS}


class MergeDemographics(beam.CombineFn):
    """Value counts per demographic column."""

    def create_accumulator(self) -> dict[str, Counter]:
        return {c: Counter() for c in S.DEMOGRAPHIC_COLUMNS}

    def add_input(self, acc: dict, counts: Mapping[str, Counter]) -> dict:
        for c in S.DEMOGRAPHIC_COLUMNS:
            acc[c].update(counts[c])
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for a in accs:
            self.add_input(out, a)
        return out

    def extract_output(self, acc: dict) -> dict:
        return {c: dict(v) for c, v in acc.items()}


class LastTargets(beam.CombineFn):
    """A user's latest ``n`` targets by (timestamp, item_id), the order examples use, and their total."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self) -> tuple[int, list]:
        return 0, []

    def add_input(self, acc: tuple[int, list], targets: list) -> tuple[int, list]:
        return self.merge_accumulators([acc, (len(targets), targets)])

    def merge_accumulators(self, accs: Iterable[tuple[int, list]]) -> tuple[int, list]:
        accs = list(accs)
        return sum(a[0] for a in accs), heapq.nlargest(self.n, (t for a in accs for t in a[1]))

    def extract_output(self, acc: tuple[int, list]) -> tuple[int, list]:
        return acc
