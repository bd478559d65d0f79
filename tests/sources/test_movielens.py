"""MovieLens-100k import: real data, read in place, in the same raw schema as the generator."""

from __future__ import annotations

import csv
import json
import pathlib
from collections import defaultdict

import pandas as pd
import pytest

from tfrs_ctx import schema
from tfrs_ctx.apps import cli
from tfrs_ctx.data import rawio
from tfrs_ctx.data.validation import check_raw_dir
from tfrs_ctx.sources.movielens import (
    EVENT_TYPE_OF_RATING,
    HISTORY_EXCLUDES_SUBJECT_EVENT,
    NON_US,
    SUBJECT_ITEMS_ARE_ADS,
    UNDER_18,
    age_bucket,
    import_movielens,
    zip_region,
)
from tfrs_ctx.sources.synthetic import AGE_BUCKETS, GENDERS

N_USERS, N_MOVIES, N_RATINGS = 943, 1682, 100_000


@pytest.fixture(scope="module")
def imported(ml100k_dir, tmp_path_factory) -> tuple[pathlib.Path, dict[str, pd.DataFrame]]:
    """Import once per module through the CLI; the tables as validated by check_raw_dir."""
    out = tmp_path_factory.mktemp("ml100k_raw")
    assert cli.main(["import-movielens", "--src", str(ml100k_dir), "--out", str(out)]) == 0
    return out, check_raw_dir(str(out))


@pytest.fixture(scope="module")
def ratings_by_user(ml100k_dir) -> dict[int, list[tuple[int, int, int]]]:
    """u.data read independently: user -> [(timestamp, item, rating)] sorted by (timestamp, item)."""
    by_user: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    with open(ml100k_dir / "u.data") as f:
        for user, item, rating, ts in csv.reader(f, delimiter="\t"):
            by_user[int(user)].append((int(ts), int(item), int(rating)))
    return {u: sorted(events) for u, events in by_user.items()}


def test_row_counts(imported):
    out, frames = imported
    rows = {name: len(f) for name, f in frames.items()}
    assert rows == {
        schema.CONVERSIONS.name: N_RATINGS,
        schema.ITEMS.name: N_MOVIES,
        schema.USERS.name: N_USERS,
        schema.SUBJECT_ITEMS.name: N_MOVIES,
        schema.REQUESTS.name: N_USERS,  # every user has >= 20 ratings
    }
    source = json.loads((out / "source.json").read_text())
    assert source["rows"] == rows
    assert source[SUBJECT_ITEMS_ARE_ADS] is True and source[HISTORY_EXCLUDES_SUBJECT_EVENT] is True


def test_conversions_are_every_rating(imported, ratings_by_user):
    conversions = imported[1][schema.CONVERSIONS.name]
    expected = [
        (u, ts, item, EVENT_TYPE_OF_RATING[rating])
        for u in sorted(ratings_by_user)
        for ts, item, rating in ratings_by_user[u]
    ]
    columns = [schema.USER_ID, schema.TIMESTAMP, schema.ITEM_ID, schema.EVENT_TYPE]
    assert list(conversions[columns].itertuples(index=False, name=None)) == expected
    assert set(EVENT_TYPE_OF_RATING.values()) <= set(schema.EVENT_TYPES)
    # the advertiser proxy is the item's release year, the same in both tables
    items = imported[1][schema.ITEMS.name].set_index(schema.ITEM_ID)
    logged = conversions[schema.ADVERTISER_ID].to_numpy()
    assert (items[schema.ADVERTISER_ID].loc[conversions[schema.ITEM_ID]].to_numpy() == logged).all()


def test_items_are_movies_with_genres(imported):
    frames = imported[1]
    items, subjects = frames[schema.ITEMS.name], frames[schema.SUBJECT_ITEMS.name]
    assert items[schema.ITEM_ID].tolist() == list(range(1, N_MOVIES + 1))
    assert subjects[schema.ITEM_ID].tolist() == items[schema.ITEM_ID].tolist()
    for c, w in zip(items[schema.CATEGORIES], items[schema.CONFIDENCES], strict=True):
        assert 1 <= len(c) <= schema.MAX_CATEGORIES
        assert all(1 <= g <= 19 for g in c) and list(c) == sorted(set(c))
        assert w.tolist() == pytest.approx([1.0 / len(c)] * len(c))
    toy_story = items.iloc[0]  # 1|Toy Story (1995)|01-Jan-1995|...: Animation, Children's, Comedy
    assert toy_story[schema.CATEGORIES].tolist() == [4, 5, 6] and toy_story[schema.ADVERTISER_ID] == 1995
    unknown = items.set_index(schema.ITEM_ID).loc[267]  # 267|unknown||||1|0|...: no date, "unknown" genre
    assert unknown[schema.CATEGORIES].tolist() == [1] and unknown[schema.ADVERTISER_ID] == 0
    years = items[schema.ADVERTISER_ID]
    assert ((years == 0) | years.between(1900, 2000)).all()


def test_users_demographics(imported):
    users = imported[1][schema.USERS.name]
    assert users[schema.USER_ID].tolist() == list(range(1, N_USERS + 1))
    assert set(users[schema.AGE_BUCKET]) <= {*AGE_BUCKETS, UNDER_18}
    assert set(users[schema.GENDER]) == {"female", "male"} <= set(GENDERS)
    countries = set(users[schema.COUNTRY])
    assert NON_US in countries and {f"US-{d}" for d in range(10)} <= countries
    first = users.iloc[0]  # 1|24|M|technician|85711
    assert (first[schema.AGE_BUCKET], first[schema.GENDER], first[schema.COUNTRY]) == ("18-24", "male", "US-8")
    assert list(users.columns) == list(schema.USERS.column_names)  # occupation is dropped


def test_requests_use_a_real_neighbouring_event(imported, ratings_by_user):
    requests = imported[1][schema.REQUESTS.name]
    assert requests[schema.REQUEST_ID].tolist() == list(range(1, N_USERS + 1))
    assert requests[schema.USER_ID].tolist() == sorted(ratings_by_user)
    for user, ts, subject, label in requests[
        [schema.USER_ID, schema.TIMESTAMP, schema.SUBJECT_ITEM_ID, schema.ITEM_ID]
    ].itertuples(index=False, name=None):
        events = ratings_by_user[user]
        assert (ts, label) == events[-1][:2]  # the label is the user's last event
        assert subject == events[-2][1]  # the context is the event right before it
        assert subject != label  # a user rates a movie once
        assert events[-2][0] <= ts


def test_helpers():
    assert [age_bucket(a) for a in (7, 17, 18, 24, 25, 64, 65, 73)] == [
        UNDER_18,
        UNDER_18,
        "18-24",
        "18-24",
        "25-34",
        "55-64",
        "65+",
        "65+",
    ]
    assert [zip_region(z) for z in ("85711", "02139", "E2A4H", "V0R2M", "1234", "")] == [
        "US-8",
        "US-0",
        NON_US,
        NON_US,
        NON_US,
        NON_US,
    ]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"u\.data not found"):
        import_movielens(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_the_last_event_split_holds_out_every_request_and_keeps_every_gap(ml100k_dir, tmp_path):
    from tfrs_ctx.sources.movielens import LAST_EVENT_CUTOFF, build_tables, import_movielens

    summary = import_movielens(str(ml100k_dir), str(tmp_path), last_event_split=True)
    assert summary["last_event_cutoff"] == LAST_EVENT_CUTOFF
    shifted = {t.name: rawio.read_table(str(tmp_path), t) for t in (schema.CONVERSIONS, schema.REQUESTS)}
    original = build_tables(str(ml100k_dir))
    requests, conversions = shifted[schema.REQUESTS.name], shifted[schema.CONVERSIONS.name]
    assert (requests[schema.TIMESTAMP] == LAST_EVENT_CUTOFF).all() and len(requests) == N_USERS
    before = original[schema.CONVERSIONS.name].merge(
        original[schema.REQUESTS.name][[schema.USER_ID, schema.TIMESTAMP]], on=schema.USER_ID, suffixes=("", "_r")
    )
    after = conversions.sort_values([schema.USER_ID, schema.TIMESTAMP, schema.ITEM_ID], ignore_index=True)
    assert after[schema.ITEM_ID].tolist() == before[schema.ITEM_ID].tolist()  # same events, same order
    shift = after[schema.TIMESTAMP] - before[schema.TIMESTAMP]
    assert (shift == LAST_EVENT_CUTOFF - before[f"{schema.TIMESTAMP}_r"]).all()  # one constant per user
    assert (
        (after[schema.TIMESTAMP] < LAST_EVENT_CUTOFF) == (before[schema.TIMESTAMP] < before[f"{schema.TIMESTAMP}_r"])
    ).all()
