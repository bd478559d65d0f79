"""``tfrs-ctx recommend`` prints each ad's advertiser and categories, from ``--raw`` or ``--data``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tfrs_ctx import schema
from tfrs_ctx.apps import recommend

pytestmark = pytest.mark.slow


def _rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "ad"])
    return [line.split() for line in lines[header + 1 :]]


@pytest.mark.parametrize("source", ["raw", "data"])
def test_table_shows_advertiser_and_categories(demo_work, demo_server, capsys, source):
    users = pd.read_parquet(demo_work / "raw" / schema.USERS.name)[schema.USER_ID].tolist()
    subjects = pd.read_parquet(demo_work / "raw" / schema.SUBJECT_ITEMS.name)[schema.ITEM_ID].tolist()
    items = pd.read_parquet(demo_work / "raw" / schema.ITEMS.name).set_index(schema.ITEM_ID)
    args = ["--user", str(users[0]), "--subject-item", str(subjects[0]), "-k", "5"]
    args += ["--server", demo_server.address, "--store", str(demo_work / "store")]
    assert recommend.main([*args, f"--{source}", str(demo_work / source)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 5
    for _rank, ad, advertiser, categories, score in rows:
        want = items.loc[int(ad)]
        assert int(advertiser) == want[schema.ADVERTISER_ID]
        shown, raw = [int(c) for c in categories.split(",")], [int(c) for c in want[schema.CATEGORIES]]
        if source == "raw":
            assert shown == raw
        else:  # the training corpus keeps the top MAX_CATEGORIES
            assert set(shown) <= set(raw) and len(shown) == min(len(raw), schema.MAX_CATEGORIES)
        float(score)


def test_without_details_the_columns_are_blank_and_json_is_unchanged(demo_work, demo_server, capsys):
    users = pd.read_parquet(demo_work / "raw" / schema.USERS.name)[schema.USER_ID].tolist()
    args = ["--user", str(users[0]), "-k", "3", "--server", demo_server.address, "--store", str(demo_work / "store")]
    assert recommend.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert [len(r) for r in rows] == [3, 3, 3]  # rank, ad, score: no details to show
    assert recommend.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["item_ids"]) == 3 and out["user_id"] == users[0]
