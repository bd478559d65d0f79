"""MovieLens-100k as raw tables: real data in the same schema as the synthetic generator.

The files are read in place (``u.data``, ``u.item``, ``u.user``, ``u.genre``); the
dataset's licence forbids redistributing it, so nothing is copied into the repository.

Mapping
-------
* ``conversions``: every rating (100,000), ``event_type`` from the rating
  (5 -> checkout, 4 -> add_to_cart, 3 -> lead, 1-2 -> page_visit), ``item_id`` = movie id,
  ``advertiser_id`` = the movie's release year, a proxy for "who made the ad"
  (0 when the release date is unknown). Sorted by (user_id, timestamp, item_id).
* ``items`` (the ad corpus) and ``subject_items``: the 1682 movies. ``categories`` are
  genre ids (``u.genre`` index + 1; the "unknown" genre is 1) in genre-index order, at
  most ``MAX_CATEGORIES`` of them, each with confidence ``1 / number kept``. A movie with
  no genre flag gets the "unknown" genre. Every subject item is an ad: ``subject_items.ad_id``
  = its own movie id (stated in the table, see ``schema.SUBJECT_ITEMS``).
* ``users``: 943 users. ``age_bucket`` in the synthetic generator's buckets plus
  ``"under-18"``; ``gender`` ``"female"``/``"male"``; ``country`` a region from the zip
  code: ``"US-<first digit>"`` for a 5-digit numeric zip, ``"non-US"`` otherwise.
  Occupation has no schema column and is left out.
* ``requests``: one related-items request per user with at least ``MIN_RATINGS`` ratings
  (all 943 users have at least 20). With the user's ratings sorted by
  (timestamp, item_id), the label (``item_id``) is the last event and the subject item
  (``subject_item_id``) is the one before it: a real neighbouring event, never derived
  from the label. The request timestamp is the label's timestamp.

The last-event split (``--last-event-split``)
--------------------------------------------
The usual sequential-recommendation split holds out *every* user's last event, which no single
time cutoff does. With the flag, each user's timeline is shifted by one constant (every gap
between a user's events kept) so that their request, i.e. their last rating, sits at
``LAST_EVENT_CUTOFF``: built with ``--cutoff LAST_EVENT_CUTOFF``, all 943 requests are held
out, every rating before the label's timestamp trains, and no logged request precedes the
cutoff (the trust then comes from the training histories: ``tfrs_ctx.training.calibrate``).
Ratings sharing the label's timestamp land at the cutoff too: neither trained on nor history.

History rule for requests (for the training-data pipeline)
----------------------------------------------------------
All 100,000 ratings stay in ``conversions``, the subject-item event included. A request's
history is built from the user's conversions strictly before the request timestamp *and
without the conversion of the request's subject item* (a user rates a movie once, so that
is exactly one event): the subject item is the request's context, and leaving it in the
history would leak the context into the sequence. ``source.json`` records this rule
(``SUBJECT_ITEMS_ARE_ADS`` and ``HISTORY_EXCLUDES_SUBJECT_EVENT``); for the synthetic
source, subject items are a separate corpus and no event is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

from tfrs_ctx import schema
from tfrs_ctx.data.rawio import write_table
from tfrs_ctx.sources.synthetic import AGE_BUCKETS

# Event type per star rating.
EVENT_TYPE_OF_RATING = {
    5: schema.EVENT_CHECKOUT,
    4: schema.EVENT_ADD_TO_CART,
    3: schema.EVENT_LEAD,
    2: schema.EVENT_PAGE_VISIT,
    1: schema.EVENT_PAGE_VISIT,
}
UNDER_18 = "under-18"
AGE_EDGES = (18, 25, 35, 45, 55, 65)  # lower edges of AGE_BUCKETS
GENDER_OF_CODE = {"F": "female", "M": "male"}
NON_US = "non-US"
UNKNOWN_ADVERTISER = 0
MIN_RATINGS = 3  # a request needs a label, a subject item and at least one history event
NUM_GENRE_FLAGS = 19
LAST_EVENT_CUTOFF = 1_000_000_000  # --last-event-split: every request at this timestamp (2001-09-09)
# source.json keys telling the training-data pipeline how requests relate to the history.
SUBJECT_ITEMS_ARE_ADS = "subject_items_are_ads"
HISTORY_EXCLUDES_SUBJECT_EVENT = "history_excludes_subject_event"

_RATING = "rating"  # u.data column with no schema counterpart
_RELEASE_DATE = "release_date"
_AGE, _GENDER_CODE, _OCCUPATION, _ZIP = "age", "gender_code", "occupation", "zip"


def _path(src: str, name: str) -> str:
    path = os.path.join(src, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MovieLens-100k: {path} not found (is --src the ml-100k folder?)")
    return path


def read_ratings(src: str) -> pd.DataFrame:
    """``u.data``: user_id, item_id, rating, timestamp (tab-separated)."""
    names = [schema.USER_ID, schema.ITEM_ID, _RATING, schema.TIMESTAMP]
    return pd.read_csv(_path(src, "u.data"), sep="\t", header=None, names=names, dtype=np.int64)


def read_genres(src: str) -> list[str]:
    """``u.genre``: genre names by index (index 0 is "unknown")."""
    genres = pd.read_csv(_path(src, "u.genre"), sep="|", header=None, names=["name", "index"], encoding="latin-1")
    genres = genres.dropna().astype({"index": np.int64}).sort_values("index")
    if genres["index"].tolist() != list(range(NUM_GENRE_FLAGS)):
        raise ValueError(f"MovieLens-100k: u.genre should list genres 0..{NUM_GENRE_FLAGS - 1}")
    return genres["name"].tolist()


def read_movies(src: str) -> pd.DataFrame:
    """``u.item``: item_id, release_date and the genre flags (as a [n, 19] int array column set)."""
    flags = [f"genre_{i}" for i in range(NUM_GENRE_FLAGS)]
    names = [schema.ITEM_ID, "title", _RELEASE_DATE, "video_release_date", "url", *flags]
    movies = pd.read_csv(
        _path(src, "u.item"), sep="|", header=None, names=names, encoding="latin-1", keep_default_na=False, dtype=str
    )
    movies[schema.ITEM_ID] = movies[schema.ITEM_ID].astype(np.int64)
    movies[flags] = movies[flags].astype(np.int64)
    return movies[[schema.ITEM_ID, _RELEASE_DATE, *flags]]


def read_users(src: str) -> pd.DataFrame:
    """``u.user``: user_id, age, gender code, occupation, zip (pipe-separated)."""
    names = [schema.USER_ID, _AGE, _GENDER_CODE, _OCCUPATION, _ZIP]
    return pd.read_csv(_path(src, "u.user"), sep="|", header=None, names=names, dtype=str, keep_default_na=False)


def release_year(date: str) -> int:
    """``"01-Jan-1995"`` -> 1995; ``UNKNOWN_ADVERTISER`` when the date is missing."""
    tail = date.strip()[-4:]
    return int(tail) if tail.isdigit() else UNKNOWN_ADVERTISER


def age_bucket(age: int) -> str:
    """Synthetic-style age bucket, with ``"under-18"`` below the first edge."""
    if age < AGE_EDGES[0]:
        return UNDER_18
    return AGE_BUCKETS[int(np.searchsorted(AGE_EDGES, age, side="right")) - 1]


def zip_region(zip_code: str) -> str:
    """US zip -> ``"US-<first digit>"`` (the zip's national area); anything else -> ``"non-US"``."""
    zip_code = zip_code.strip()
    return f"US-{zip_code[0]}" if len(zip_code) == 5 and zip_code.isdigit() else NON_US


def genre_categories(flags: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    """Genre flags [n, 19] -> category ids (genre index + 1) and equal confidences per movie."""
    categories, confidences = [], []
    for row in flags:
        genres = (np.flatnonzero(row) + 1).tolist()[: schema.MAX_CATEGORIES] or [1]  # none -> "unknown"
        categories.append(genres)
        confidences.append([1.0 / len(genres)] * len(genres))
    return categories, confidences


def build_tables(src: str) -> dict[str, pd.DataFrame]:
    """All raw tables of MovieLens-100k as pandas frames keyed by table name."""
    ratings = read_ratings(src)
    read_genres(src)  # checks the genre list the flags refer to
    movies = read_movies(src).sort_values(schema.ITEM_ID, ignore_index=True)
    users = read_users(src)

    flags = movies[[f"genre_{i}" for i in range(NUM_GENRE_FLAGS)]].to_numpy()
    categories, confidences = genre_categories(flags)
    years = movies[_RELEASE_DATE].map(release_year).astype(np.int64)
    items = pd.DataFrame(
        {
            schema.ITEM_ID: movies[schema.ITEM_ID],
            schema.ADVERTISER_ID: years,
            schema.CATEGORIES: categories,
            schema.CONFIDENCES: confidences,
        }
    )
    subject_items = items[[schema.ITEM_ID, schema.CATEGORIES, schema.CONFIDENCES]].copy()
    subject_items[schema.AD_ID] = items[schema.ITEM_ID]  # stated, not inferred: each subject movie is that ad

    bad_ratings = np.flatnonzero(~ratings[_RATING].isin(list(EVENT_TYPE_OF_RATING)))
    if len(bad_ratings):
        raise ValueError(f"MovieLens-100k: ratings outside 1..5 at u.data lines {(bad_ratings[:5] + 1).tolist()}")
    ratings = ratings.sort_values([schema.USER_ID, schema.TIMESTAMP, schema.ITEM_ID], ignore_index=True)
    advertiser_of = pd.Series(years.to_numpy(), index=movies[schema.ITEM_ID])
    unknown_events = ~ratings[schema.ITEM_ID].isin(advertiser_of.index)
    if unknown_events.any():
        raise ValueError(f"MovieLens-100k: {int(unknown_events.sum())} ratings of movies missing from u.item")
    conversions = pd.DataFrame(
        {
            schema.USER_ID: ratings[schema.USER_ID],
            schema.TIMESTAMP: ratings[schema.TIMESTAMP],
            schema.ITEM_ID: ratings[schema.ITEM_ID],
            schema.ADVERTISER_ID: advertiser_of.loc[ratings[schema.ITEM_ID]].to_numpy(),
            schema.EVENT_TYPE: ratings[_RATING].map(EVENT_TYPE_OF_RATING),
        }
    )

    # One request per user: label = last event, subject = the event before it.
    per_user = ratings.groupby(schema.USER_ID, sort=True)
    eligible = per_user.size() >= MIN_RATINGS
    last = per_user.tail(1).set_index(schema.USER_ID)
    previous = per_user.nth(-2).set_index(schema.USER_ID)
    request_users = eligible.index[eligible.to_numpy()]
    requests = pd.DataFrame(
        {
            schema.REQUEST_ID: np.arange(1, len(request_users) + 1, dtype=np.int64),
            schema.USER_ID: request_users.to_numpy(dtype=np.int64),
            schema.TIMESTAMP: last.loc[request_users, schema.TIMESTAMP].to_numpy(),
            schema.SUBJECT_ITEM_ID: previous.loc[request_users, schema.ITEM_ID].to_numpy(),
            schema.ITEM_ID: last.loc[request_users, schema.ITEM_ID].to_numpy(),
        }
    )

    users_table = pd.DataFrame(
        {
            schema.USER_ID: users[schema.USER_ID].astype(np.int64),
            schema.AGE_BUCKET: users[_AGE].astype(np.int64).map(age_bucket),
            schema.COUNTRY: users[_ZIP].map(zip_region),
            schema.GENDER: users[_GENDER_CODE].map(GENDER_OF_CODE),  # anything else -> missing
        }
    )
    return {
        schema.CONVERSIONS.name: conversions,
        schema.ITEMS.name: items,
        schema.USERS.name: users_table,
        schema.SUBJECT_ITEMS.name: subject_items,
        schema.REQUESTS.name: requests,
    }


def shift_to_last_event(tables: dict[str, pd.DataFrame], cutoff: int = LAST_EVENT_CUTOFF) -> None:
    """Shift each user's conversions and request by one constant so the request is at ``cutoff``."""
    requests = tables[schema.REQUESTS.name]
    offset = pd.Series(cutoff - requests[schema.TIMESTAMP].to_numpy(), index=requests[schema.USER_ID].to_numpy())
    for name in (schema.CONVERSIONS.name, schema.REQUESTS.name):
        frame = tables[name]
        shift = offset.reindex(frame[schema.USER_ID].to_numpy()).fillna(0).to_numpy(dtype=np.int64)
        frame[schema.TIMESTAMP] = frame[schema.TIMESTAMP].to_numpy() + shift


def import_movielens(src: str, out: str, last_event_split: bool = False) -> dict:
    """Write MovieLens-100k under ``out`` as raw tables; returns the summary (``rows`` by table).

    ``last_event_split``: every user's timeline shifted so their request is at ``LAST_EVENT_CUTOFF``
    (build with ``--cutoff`` that value: see the module docstring)."""
    t0 = time.perf_counter()
    tables = build_tables(src)
    if last_event_split:
        shift_to_last_event(tables)
    os.makedirs(out, exist_ok=True)
    rows = {name: write_table(out, schema.RAW_TABLES[name], frame) for name, frame in tables.items()}
    summary = {
        "source": "movielens-100k",
        "src": os.path.abspath(src),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 3),
        SUBJECT_ITEMS_ARE_ADS: True,
        HISTORY_EXCLUDES_SUBJECT_EVENT: True,
        "last_event_cutoff": LAST_EVENT_CUTOFF if last_event_split else None,
        "mapping": {
            schema.EVENT_TYPE: {str(r): e for r, e in sorted(EVENT_TYPE_OF_RATING.items())},
            schema.ADVERTISER_ID: f"release year ({UNKNOWN_ADVERTISER} when unknown)",
            schema.CATEGORIES: "u.genre index + 1, equal confidences",
            schema.COUNTRY: f"US-<first zip digit> | {NON_US}",
            "dropped": ["occupation"],
        },
    }
    with open(os.path.join(out, "source.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``tfrs-ctx import-movielens --src ML100K_DIR --out RAW_DIR``."""
    parser = argparse.ArgumentParser(prog="tfrs-ctx import-movielens", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="the ml-100k folder (read in place, never copied)")
    parser.add_argument("--out", required=True, help="directory for the raw tables")
    parser.add_argument(
        "--last-event-split",
        action="store_true",
        help=f"shift each user's timeline so every request is at {LAST_EVENT_CUTOFF}: build with --cutoff that value",
    )
    args = parser.parse_args(argv)
    summary = import_movielens(args.src, args.out, args.last_event_split)
    print(json.dumps({k: summary[k] for k in ("rows", "seconds", "last_event_cutoff")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
