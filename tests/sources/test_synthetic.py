"""The synthetic generator: determinism, sane tables, validity, and the context-strength knob."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tfrs_ctx import schema
from tfrs_ctx.apps import cli
from tfrs_ctx.data.rawio import read_table, table_files
from tfrs_ctx.data.validation import check_raw_dir
from tfrs_ctx.sources.synthetic import SUBJECT_ID_OFFSET, SyntheticConfig, generate

SMALL = {"users": 300, "items": 600, "subject_items": 800, "advertisers": 60}


def _generate(path: pathlib.Path, **overrides) -> dict:
    return generate(str(path), SyntheticConfig(**{**SMALL, **overrides}), progress=False)


def _contents(raw_dir: pathlib.Path) -> dict[str, pd.DataFrame]:
    """Every raw table as one frame (all Parquet parts concatenated in order)."""
    tables = {**schema.RAW_TABLES, **schema.OPTIONAL_RAW_TABLES}
    return {
        name: pd.concat([pq.read_table(p).to_pandas() for p in table_files(str(raw_dir), table)], ignore_index=True)
        for name, table in tables.items()
        if (raw_dir / name).is_dir()
    }


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame], names=tuple(schema.RAW_TABLES)) -> None:
    for name in names:
        left, right = a[name], b[name]
        assert left.shape == right.shape, name
        for column in left.columns:  # list columns hold numpy arrays: compare as Python lists
            assert left[column].map(_plain).tolist() == right[column].map(_plain).tolist(), (name, column)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value  # null ad_id


def test_same_seed_gives_identical_tables(tmp_path):
    _generate(tmp_path / "a", seed=3)
    _generate(tmp_path / "b", seed=3)
    _assert_same(_contents(tmp_path / "a"), _contents(tmp_path / "b"))


def test_different_seeds_differ(tmp_path):
    _generate(tmp_path / "a", seed=1)
    _generate(tmp_path / "b", seed=2)
    a, b = _contents(tmp_path / "a"), _contents(tmp_path / "b")
    for name in schema.RAW_TABLES:
        assert not a[name].equals(b[name]), f"table '{name}' identical across seeds"


def test_fixed_chunk_size_is_deterministic_and_chunks_become_parts(tmp_path):
    """Per-chunk RNGs are seeded by [seed, first_user], so output depends on chunk_users.

    For a fixed chunk size the output is deterministic; the item corpora (drawn before any
    chunk) do not depend on it at all.
    """
    _generate(tmp_path / "a", seed=5, chunk_users=64)
    _generate(tmp_path / "b", seed=5, chunk_users=64)
    _generate(tmp_path / "c", seed=5, chunk_users=1000)
    a, b, c = (_contents(tmp_path / x) for x in "abc")
    _assert_same(a, b)
    _assert_same(a, c, names=(schema.ITEMS.name, schema.SUBJECT_ITEMS.name))
    assert a[schema.USERS.name][schema.USER_ID].tolist() == c[schema.USERS.name][schema.USER_ID].tolist()
    # one Parquet part per chunk for the per-user tables, so memory stays bounded
    assert len(table_files(str(tmp_path / "a"), schema.CONVERSIONS)) == -(-SMALL["users"] // 64)
    assert len(table_files(str(tmp_path / "c"), schema.CONVERSIONS)) == 1


def test_row_counts_and_relations_are_sane(small_raw):
    cfg = SyntheticConfig(users=300, items=600, subject_items=800, advertisers=60, seed=7)  # conftest's small_raw
    frames = check_raw_dir(str(small_raw))
    users, items = frames[schema.USERS.name], frames[schema.ITEMS.name]
    conversions, requests = frames[schema.CONVERSIONS.name], frames[schema.REQUESTS.name]
    assert users[schema.USER_ID].tolist() == list(range(1, cfg.users + 1))
    assert items[schema.ITEM_ID].tolist() == list(range(1, cfg.items + 1))
    assert len(frames[schema.SUBJECT_ITEMS.name]) == cfg.subject_items
    assert items[schema.ADVERTISER_ID].between(1, cfg.advertisers).all()
    per_user = conversions.groupby(schema.USER_ID).size()
    assert per_user.min() >= 3  # every user has some history
    mean = per_user.mean()
    requests_per_user = cfg.requests_per_user + cfg.search_requests_per_user  # both logs' conversions join
    assert cfg.events_per_user <= mean <= cfg.events_per_user + requests_per_user + 2, mean
    assert 0.7 * cfg.requests_per_user <= len(requests) / cfg.users <= 1.3 * cfg.requests_per_user
    assert requests[schema.REQUEST_ID].tolist() == list(range(1, len(requests) + 1))
    assert set(conversions[schema.EVENT_TYPE]) <= set(schema.EVENT_TYPES)
    # conversions are sorted by (user, time)
    assert conversions.sort_values([schema.USER_ID, schema.TIMESTAMP], kind="stable").index.equals(conversions.index)
    # every request's converted ad is in the conversion log, for that user at that time
    keys = [schema.USER_ID, schema.TIMESTAMP, schema.ITEM_ID]
    joined = requests[keys].merge(conversions[keys].drop_duplicates(), on=keys, how="left", indicator=True)
    assert (joined["_merge"] == "both").all()
    # each item's advertiser is the one logged with its conversions
    adv = items.set_index(schema.ITEM_ID)[schema.ADVERTISER_ID]
    assert (adv.loc[conversions[schema.ITEM_ID]].to_numpy() == conversions[schema.ADVERTISER_ID].to_numpy()).all()
    # some demographics are missing, most are present
    for column in schema.DEMOGRAPHIC_COLUMNS:
        assert 0 < users[column].isna().mean() < 0.2, column


def test_cli_generate_matches_api_and_validates(tmp_path, capsys):
    args = ["--users", "300", "--items", "600", "--subject-items", "800", "--advertisers", "60", "--seed", "11"]
    assert cli.main(["generate", "--out", str(tmp_path / "cli"), *args, "--quiet"]) == 0
    assert '"conversions"' in capsys.readouterr().out
    summary = _generate(tmp_path / "api", seed=11)
    _assert_same(_contents(tmp_path / "cli"), _contents(tmp_path / "api"))
    frames = check_raw_dir(str(tmp_path / "cli"))
    assert {name: len(f) for name, f in frames.items()} == summary["rows"]
    assert (tmp_path / "cli" / "source.json").exists()


def _top_category_share(raw_dir: pathlib.Path) -> float:
    """Share of requests whose label's top category is the subject item's top category."""
    top_of_ad = read_table(str(raw_dir), schema.ITEMS).set_index(schema.ITEM_ID)[schema.CATEGORIES].map(lambda c: c[0])
    top_of_subject = (
        read_table(str(raw_dir), schema.SUBJECT_ITEMS).set_index(schema.ITEM_ID)[schema.CATEGORIES].map(lambda c: c[0])
    )
    requests = read_table(str(raw_dir), schema.REQUESTS)
    label_top = top_of_ad.loc[requests[schema.ITEM_ID]].to_numpy()
    subject_top = top_of_subject.loc[requests[schema.SUBJECT_ITEM_ID]].to_numpy()
    return float((label_top == subject_top).mean())


def test_context_strength_controls_label_subject_agreement(tmp_path):
    shares = {}
    for strength in (0.0, 0.5, 1.0):
        out = tmp_path / str(strength)
        generate(
            str(out),
            SyntheticConfig(users=2000, items=2000, subject_items=3000, seed=1, context_strength=strength),
            progress=False,
        )
        shares[strength] = _top_category_share(out)
    # 0: agreement only by chance (subject drawn from the user's interests 30% of the time,
    # the label from one of ~3 interests): ~0.16. 1: the label always comes from the subject's leaf.
    assert 0.05 < shares[0.0] < 0.3, shares
    assert shares[1.0] > 0.99, shares
    expected_mid = 0.5 + 0.5 * shares[0.0]  # half from the subject's leaf, half as at strength 0
    assert shares[0.0] < shares[0.5] < shares[1.0], shares
    assert shares[0.5] == pytest.approx(expected_mid, abs=0.05), shares


def test_ad_categories_are_the_leaf_its_parent_and_distinct_siblings_by_confidence(tmp_path):
    """Many leaves per parent (as at millions of ads), ads written in several parts."""
    _generate(tmp_path / "raw", items=4000, leaves_per_top=40, chunk_items=1500, seed=2)
    items = _contents(tmp_path / "raw")[schema.ITEMS.name]
    assert len(table_files(str(tmp_path / "raw"), schema.ITEMS)) == 3
    assert items[schema.ITEM_ID].tolist() == list(range(1, 4001))
    sibling_slots = []
    for cats, confs in zip(items[schema.CATEGORIES].map(list), items[schema.CONFIDENCES].map(list), strict=True):
        assert 3 <= len(cats) <= schema.MAX_CATEGORIES and len(confs) == len(cats)
        leaf, parent, *siblings = cats
        assert parent == leaf // 1000 * 1000 and leaf % 1000 >= 1
        assert len(set(cats)) == len(cats)  # distinct, never the own leaf again
        assert all(s // 1000 * 1000 == parent and s % 1000 >= 1 for s in siblings)
        assert confs == sorted(confs, reverse=True)
        sibling_slots += [s % 1000 for s in siblings]
    # siblings cover the parent's leaves roughly uniformly (40 leaves: each ~1/40 of the draws)
    counts = np.bincount(sibling_slots, minlength=41)[1:]
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_corpus_scaled_defaults_and_limits():
    small, large = SyntheticConfig().resolved(), SyntheticConfig(items=1_000_000).resolved()
    assert (small.advertisers, small.leaves_per_top) == (500, 15)  # the 10k-ad default world
    assert (large.advertisers, large.leaves_per_top) == (50_000, 150)
    assert SyntheticConfig(items=1_000_000, advertisers=7).resolved().advertisers == 7
    with pytest.raises(ValueError, match="subject item ids"):
        SyntheticConfig(items=SUBJECT_ID_OFFSET + 1).resolved()
    with pytest.raises(ValueError, match="cannot cover"):
        generate("/nonexistent-never-written", SyntheticConfig(users=1, items=100), progress=False)


def _query_matches_label(raw_dir: pathlib.Path) -> float:
    """Share of search requests whose query shares a word with the name of the label's leaf or top."""
    names = read_table(str(raw_dir), schema.CATEGORY_NAMES).set_index(schema.CATEGORY_ID)[schema.NAME]
    items = read_table(str(raw_dir), schema.ITEMS).set_index(schema.ITEM_ID)[schema.CATEGORIES]
    search = read_table(str(raw_dir), schema.SEARCH_REQUESTS)
    hits = []
    for query, ad in zip(search[schema.QUERY], search[schema.ITEM_ID], strict=True):
        leaf, top = items.loc[ad][:2]
        words = set(names.loc[leaf].split()) | {names.loc[top]}
        hits.append(bool(words & set(query.lower().strip("?!").split())))
    return float(np.mean(hits))


def test_search_log_is_an_optional_surface_with_its_own_stream(tmp_path):
    assert SyntheticConfig().search_requests_per_user > 0  # on by default: the pipeline reads it
    _generate(tmp_path / "off", seed=4, search_requests_per_user=0.0)
    _generate(tmp_path / "on", seed=4, search_requests_per_user=2.0)
    off, on = _contents(tmp_path / "off"), _contents(tmp_path / "on")
    assert not (tmp_path / "off" / schema.SEARCH_REQUESTS.name).exists()
    # every other table is the same draw; the search conversions join the conversion log
    _assert_same(off, on, names=("items", "users", "subject_items", "requests", "category_names"))
    search = on[schema.SEARCH_REQUESTS.name]
    assert 1.5 * SMALL["users"] < len(search) < 2.5 * SMALL["users"]
    assert search[schema.REQUEST_ID].tolist() == list(range(1, len(search) + 1))
    assert len(on["conversions"]) == len(off["conversions"]) + len(search)
    frames = check_raw_dir(str(tmp_path / "on"))  # the optional tables are validated where present
    assert len(frames[schema.SEARCH_REQUESTS.name]) == len(search)
    assert (search[schema.QUERY].str.len() > 0).all()


def test_search_strength_controls_query_label_agreement_and_typos_happen(tmp_path):
    shares = {}
    for strength in (0.0, 1.0):
        out = tmp_path / str(strength)
        _generate(out, seed=6, users=600, search_requests_per_user=2.0, search_strength=strength)
        shares[strength] = _query_matches_label(out)
    assert shares[1.0] > 0.6 and shares[0.0] < 0.35 and shares[1.0] > shares[0.0] + 0.35, shares
    # misspellings: words of the log that no category name, synonym or modifier holds
    _generate(tmp_path / "typos", seed=6, users=600, search_requests_per_user=2.0, typo_rate=0.5)
    _generate(tmp_path / "clean", seed=6, users=600, search_requests_per_user=2.0, typo_rate=0.0)

    def vocabulary(raw):
        return {
            w for q in read_table(str(raw), schema.SEARCH_REQUESTS)[schema.QUERY] for w in q.lower().strip("?!").split()
        }

    clean, typos = vocabulary(tmp_path / "clean"), vocabulary(tmp_path / "typos")
    assert len(typos - clean) > 0.3 * len(clean)


def test_an_unknown_ad_in_the_search_log_is_a_clear_error(tmp_path):
    _generate(tmp_path / "raw", seed=4, search_requests_per_user=1.0)
    path = table_files(str(tmp_path / "raw"), schema.SEARCH_REQUESTS)[0]
    frame = pq.read_table(path).to_pandas()
    frame.loc[3, schema.ITEM_ID] = 10**9
    frame.to_parquet(path)
    with pytest.raises(ValueError, match=r"search_requests.*unknown id 1000000000.*items"):
        check_raw_dir(str(tmp_path / "raw"))
