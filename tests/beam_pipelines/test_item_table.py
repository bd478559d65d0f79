"""The column-wise items path: vectorised validation, dedupe, top-category tables, int vocabularies."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from beam_pipelines.item_table import dedupe_items, typed_item_suspects, validate_item_chunk
from beam_pipelines.portable import COUNT, DEAD, MAIN
from tfrs_ctx import schema as S
from tfrs_ctx.data import examples as T
from tfrs_ctx.data.rawio import ItemColumns
from tfrs_ctx.data.vocab import IntVocabulary, Vocabulary, vocab_text


def _item(i: int, rng: np.random.Generator) -> dict:
    n = int(rng.integers(0, 8))
    return {
        S.ITEM_ID: i,
        S.ADVERTISER_ID: int(rng.integers(1, 5)),
        S.CATEGORIES: rng.integers(100, 120, n).tolist(),
        # float32 values, with ties (a coarse grid)
        S.CONFIDENCES: [float(np.float32(v)) for v in rng.integers(0, 5, n) / 4],
    }


def _batch(rows: list[dict]) -> pa.RecordBatch:
    schema = pa.schema([pa.field(f.name, f.type, nullable=True) for f in S.ITEMS.arrow_schema()])
    return pa.RecordBatch.from_pylist(rows, schema=schema)


def _bad_rows(rng: np.random.Generator) -> list[dict]:
    rows = [_item(i, rng) for i in range(1, 41)]
    rows[2][S.ITEM_ID] = None
    rows[3][S.CATEGORIES] = None
    rows[4][S.CONFIDENCES] = [0.5, float("nan")]
    rows[4][S.CATEGORIES] = [100, 101]
    rows[5][S.CONFIDENCES] = [1.5]
    rows[5][S.CATEGORIES] = [100]
    rows[6][S.CATEGORIES] = [100, None]
    rows[6][S.CONFIDENCES] = [0.1, 0.2]
    rows[7][S.CONFIDENCES] = rows[7][S.CONFIDENCES] + [0.5]  # one entry too many
    rows[8][S.ADVERTISER_ID] = None
    rows[9][S.CONFIDENCES] = [-0.25]
    rows[9][S.CATEGORIES] = [100]
    return rows


def _dead(d: list[dict]) -> list[str]:
    return sorted(json.dumps(x, sort_keys=True) for x in d)


@pytest.mark.parametrize("offset", [0, 3], ids=["whole", "sliced"])
def test_typed_item_fast_path_matches_row_by_row_validation(offset):
    batch = _batch(_bad_rows(np.random.default_rng(0))).slice(offset)
    assert typed_item_suspects(S.ITEMS, batch) is not None
    fast, fast_dead = validate_item_chunk(S.ITEMS, batch)
    slow, slow_dead = validate_item_chunk(S.ITEMS, batch.to_pylist())
    assert len(fast_dead) == 8 - (offset > 2) and _dead(fast_dead) == _dead(slow_dead)
    key = lambda r: r[S.ITEM_ID]  # noqa: E731
    assert sorted(fast.row_dicts(), key=key) == sorted(slow.row_dicts(), key=key)


def test_other_arrow_types_take_the_row_path():
    rows = [_item(i, np.random.default_rng(i)) for i in range(1, 5)]
    as_double = pa.RecordBatch.from_pylist(rows)  # confidences list<double>
    assert typed_item_suspects(S.ITEMS, as_double) is None
    extra = _batch(rows).append_column("note", pa.array(["x"] * 4))
    assert typed_item_suspects(S.ITEMS, extra) is None
    columns, dead = validate_item_chunk(S.ITEMS, as_double)
    assert not dead and columns.row_dicts() == rows


def test_dedupe_keeps_the_canonical_first_row_whatever_the_part_order():
    rng = np.random.default_rng(1)
    rows = [_item(i, rng) for i in range(1, 11)]
    dups = [dict(rows[0], **{S.ADVERTISER_ID: 9}), dict(rows[4]), dict(rows[4], **{S.CONFIDENCES: []})]
    dups[2][S.CATEGORIES] = []
    parts = [ItemColumns.from_arrow(_batch(rows[:5])), ItemColumns.from_rows(rows[5:] + dups)]
    results = []
    for order in (parts, parts[::-1]):
        tagged = list(dedupe_items(S.ITEMS, order))
        (kept,) = [v for t, v in tagged if t == MAIN]
        dead = [v for t, v in tagged if t == DEAD]
        assert [v for t, v in tagged if t == COUNT] == [("rows_items", 10)]
        assert len(dead) == 3 and all(d["reason"] == "duplicate key (item_id)" for d in dead)
        results.append((sorted(kept.row_dicts(), key=lambda r: r[S.ITEM_ID]), _dead(dead)))
    assert results[0] == results[1]
    for item_id in (1, 5):
        group = [r for r in rows + dups if r[S.ITEM_ID] == item_id]
        first = min(group, key=lambda r: json.dumps(r, sort_keys=True))
        assert [r for r in results[0][0] if r[S.ITEM_ID] == item_id] == [first]


def test_category_table_equals_top_categories_row_by_row():
    rng = np.random.default_rng(2)
    rows = [_item(i, rng) for i in range(1, 300)]
    vocab = IntVocabulary(np.arange(100, 120)[::-1])
    columns = ItemColumns.from_rows(rows)
    cats, confs = T.category_table(columns, vocab)
    for i, row in enumerate(rows):
        want_cats, want_confs = T.top_categories(row[S.CATEGORIES], row[S.CONFIDENCES], vocab)
        assert cats[i].tolist() == want_cats
        np.testing.assert_array_equal(confs[i], np.asarray(want_confs, dtype=np.float32))


def test_lookups_from_columns_equal_lookups_from_rows():
    rng = np.random.default_rng(3)
    rows = [_item(i, rng) for i in rng.permutation(np.arange(1, 200)).tolist()]
    subjects = [{k: v for k, v in _item(i, rng).items() if k != S.ADVERTISER_ID} for i in (905, 901, 903)]
    counts = {int(i): int(c) for i, c in zip(rng.integers(1, 200, 50), rng.integers(1, 9, 50), strict=True)}
    vocabs = T.build_vocabularies(rows, subjects, counts, {"checkout": 3}, {})
    assert list(vocabs[S.VOCAB_ITEM][:3]) == sorted(counts, key=lambda i: (-counts[i], i))[:3]
    a = T.Lookups.build(vocabs, rows, subjects, counts)
    b = T.Lookups.build(vocabs, ItemColumns.from_arrow(_batch(rows)), ItemColumns.from_rows(subjects, False), counts)
    for field in ("item_ids", "item_advertiser", "item_categories", "item_confidences", "item_sampling_prob"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.subject_ids, [901, 903, 905])
    np.testing.assert_array_equal(a.subject_categories, b.subject_categories)


def test_int_vocabulary_indexes_like_the_string_vocabulary():
    ids = [7, 3, 12, 100]
    ints, strings = IntVocabulary(ids), Vocabulary(ids)
    for value in (7, 3.0, "12", "007", 100, 5, None, "", float("nan"), True, "x", 2**70):
        assert ints.index(value) == strings.index(value), value
    np.testing.assert_array_equal(ints.int_indices(np.array([3, 4, 100])), strings.int_indices(np.array([3, 4, 100])))
    assert ints.values == strings.values and ints.size == strings.size and ints.value(3) == "3"
    assert ints.text() == vocab_text(ids)
    with pytest.raises(ValueError, match="unique"):
        IntVocabulary([1, 1])
