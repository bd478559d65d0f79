"""Pinterest-shaped synthetic raw tables: the embedded default data source.

The world
---------
* A two-level interest taxonomy: ``num_top`` top-level interests, each with
  ``leaves_per_top`` leaf interests (category ids ``top*1000`` and ``top*1000 + leaf``).
* The ad corpus (``items``): each ad belongs to one leaf, has an advertiser (advertisers
  specialise in one top-level interest) and 3-5 categories with confidences (its leaf,
  its parent, sibling leaves). Popularity within a leaf is skewed (an ad's conversion share
  falls with its rank ``r`` in the leaf as ``r^-0.6``), on top of the Zipf-like popularity of
  leaves, so most ads of a large corpus are a long tail that is rarely or never converted.
  ``--ads N`` goes up to 10M: advertisers (``N / 20``) and leaves per top-level interest
  (``15 sqrt(N / 10k)``) scale with it unless given.
* ``subject_items``: what a user can be looking at on a related-items surface, built the
  same way as ads but a separate corpus: none of them is an ad (``ad_id`` null in every row).
* Users hold a few long-term interests (leaves), each of which may drift to another leaf at
  a random time; every conversion picks an interest by weight and an ad of that leaf.
* The related-items request log: a user views a subject item (from their own interests with
  probability ``subject_from_interest``, else anywhere); the delivered-and-converted ad comes
  from the subject item's leaf with probability ``context_strength`` and from the user's
  current interests otherwise. The context (subject item) is real and never derived from the
  label. Each request's conversion also enters the conversion log.

Everything is vectorised per chunk of users (and of ads) and written chunk by chunk, so memory
stays bounded whatever ``--users`` and ``--ads`` are (per ad only its leaf and advertiser stay in
memory, 12 bytes); the output depends only on the arguments (``chunk_users`` and ``chunk_items``
included: each chunk draws from its own seeded stream) and the seed. Subject items are not
ads: their ids start at ``SUBJECT_ID_OFFSET`` so they never collide with ad ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

from tfrs_ctx import schema
from tfrs_ctx.data.rawio import TableWriter
from tfrs_ctx.sources.search_log import SearchWorld

START_TIMESTAMP = 1_704_067_200  # 2024-01-01 UTC
SUBJECT_ID_OFFSET = 10_000_000
MAX_LEAVES_PER_TOP = 998  # category ids are top * 1000 + leaf + 1
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "MX", "CA", "JP", "IN", "AU", "ES", "IT", "NL", "SE", "PL")
GENDERS = ("female", "male", "unspecified")
EVENT_TYPE_PROBS = (0.35, 0.3, 0.1, 0.05, 0.2)  # aligned with schema.EVENT_TYPES


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    users: int = 20_000
    seed: int = 0
    items: int = 10_000  # the ad corpus (``--ads``); up to SUBJECT_ID_OFFSET
    subject_items: int = 20_000
    advertisers: int = 0  # 0: scale with the corpus, items / 20 (500 at 10k ads)
    num_top: int = 20
    leaves_per_top: int = 0  # 0: scale with the corpus, 15 sqrt(items / 10k), at least 15
    interests_per_user: int = 3
    events_per_user: float = 25.0
    requests_per_user: float = 3.0
    drift: float = 0.5  # probability that an interest moves to another leaf during the span
    context_strength: float = 0.75
    subject_from_interest: float = 0.2
    days: int = 180
    missing_demographic: float = 0.05
    search_requests_per_user: float = 2.5  # the search surface's log (~10k eval search requests at 20k users)
    search_strength: float = 0.75  # share of search conversions that follow the query's intent
    search_from_interest: float = 0.5  # share of queries about one of the user's own interests
    typo_rate: float = 0.08  # share of query words (4+ letters) misspelt
    chunk_users: int = 50_000
    chunk_items: int = 500_000  # ads (and subject items) drawn and written per Parquet part

    def resolved(self) -> SyntheticConfig:
        """This config with the corpus-scaled defaults (``0``) filled in, and checked."""
        advertisers = self.advertisers or max(self.num_top, self.items // 20)
        leaves = self.leaves_per_top or int(min(MAX_LEAVES_PER_TOP, max(15, round(15 * (self.items / 1e4) ** 0.5))))
        if not 2 < leaves <= MAX_LEAVES_PER_TOP:
            raise ValueError(f"leaves_per_top must be in [3, {MAX_LEAVES_PER_TOP}], got {leaves}")
        if not 0 < self.items <= SUBJECT_ID_OFFSET:
            raise ValueError(
                f"items must be in [1, {SUBJECT_ID_OFFSET:,}] (subject item ids start above), got {self.items}"
            )
        return dataclasses.replace(self, advertisers=advertisers, leaves_per_top=leaves)


class _World:
    """The taxonomy and both item corpora (small; shared by every user chunk)."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.num_leaves = cfg.num_top * cfg.leaves_per_top
        self.leaf_top = np.arange(self.num_leaves) // cfg.leaves_per_top
        self.leaf_index = np.arange(self.num_leaves) % cfg.leaves_per_top
        # Zipf-like popularity over leaves (what users tend to like and look at).
        pop = 1.0 / np.arange(1, self.num_leaves + 1) ** 0.7
        self.leaf_pop = rng.permutation(pop / pop.sum())
        top_adv = rng.integers(0, cfg.num_top, size=cfg.advertisers)
        top_adv[: cfg.num_top] = np.arange(cfg.num_top)  # every top interest has an advertiser
        self.advertisers_of_top = [np.flatnonzero(top_adv == t) for t in range(cfg.num_top)]
        self.ads = self._corpus(cfg.items, rng, with_advertiser=True)
        self.subjects = self._corpus(cfg.subject_items, rng, with_advertiser=False)
        # its own stream, so the other tables do not depend on the search surface's words
        self.search = SearchWorld(cfg.num_top, cfg.leaves_per_top, np.random.default_rng([cfg.seed, 4]))

    def category_id(self, leaf: np.ndarray) -> np.ndarray:
        return (self.leaf_top[leaf] + 1) * 1000 + self.leaf_index[leaf] + 1

    def top_category_id(self, leaf: np.ndarray) -> np.ndarray:
        return (self.leaf_top[leaf] + 1) * 1000

    def _corpus(self, n: int, rng: np.random.Generator, with_advertiser: bool) -> dict:
        """Leaf (sorted, so each leaf's entries are contiguous) and advertiser of ``n`` entries.

        Every leaf gets at least one entry; the rest follow leaf popularity (flattened). The
        categories are drawn per chunk when written (:meth:`categories`), never all held.
        """
        if n < self.num_leaves:
            raise ValueError(f"{n} items cannot cover {self.num_leaves} leaf interests (one each at least)")
        weights = np.sqrt(self.leaf_pop)
        leaf = np.concatenate(
            [np.arange(self.num_leaves), rng.choice(self.num_leaves, n - self.num_leaves, p=weights / weights.sum())]
        )
        leaf = np.sort(leaf).astype(np.int32)
        corpus = {"leaf": leaf, "offsets": np.searchsorted(leaf, np.arange(self.num_leaves + 1))}
        if with_advertiser:
            adv = np.empty(n, dtype=np.int64)
            top = self.leaf_top[leaf]
            for t in range(self.cfg.num_top):
                idx = np.flatnonzero(top == t)
                adv[idx] = rng.choice(self.advertisers_of_top[t], size=len(idx))
            corpus["advertiser"] = adv + 1
        return corpus

    def categories(self, leaf: np.ndarray, rng: np.random.Generator) -> tuple[pa.Array, pa.Array]:
        """3-5 categories per entry, by confidence: its leaf, its parent, then sibling leaves.

        Vectorised: the siblings are distinct uniform draws among the parent's other leaves
        (the j-th from ``m - j`` values, shifted past the earlier draws in ascending order).
        """
        n, c = len(leaf), schema.MAX_CATEGORIES
        n_cats = rng.integers(3, c + 1, size=n)
        m = self.cfg.leaves_per_top - 1
        others = np.empty((n, c - 2), dtype=np.int64)
        for j in range(c - 2):
            x = rng.integers(0, m - j, size=n)
            for prev in np.sort(others[:, :j], axis=1).T:  # skip earlier picks, smallest first
                x += x >= prev
            others[:, j] = x
        others = others + (others >= self.leaf_index[leaf][:, None])  # skip the own leaf
        sib_leaves = self.leaf_top[leaf][:, None] * self.cfg.leaves_per_top + others
        cats = np.concatenate(
            [self.category_id(leaf)[:, None], self.top_category_id(leaf)[:, None], self.category_id(sib_leaves)],
            axis=1,
        ).astype(np.int64)
        minor = -np.sort(-rng.uniform(0.05, 0.3, (n, c - 2)), axis=1)  # descending
        conf = np.concatenate([rng.uniform(0.6, 0.95, (n, 1)), rng.uniform(0.3, 0.6, (n, 1)), minor], axis=1)
        conf = np.round(conf, 4).astype(np.float32)  # leaf > parent > siblings: already by confidence
        keep = np.arange(c)[None, :] < n_cats[:, None]
        offsets = np.concatenate([[0], np.cumsum(n_cats)]).astype(np.int32)
        return (
            pa.ListArray.from_arrays(offsets, pa.array(cats[keep], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(conf[keep], pa.float32())),
        )

    def pick(self, corpus: dict, leaf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One entry of ``corpus`` per leaf, skewed towards each leaf's popular entries."""
        lo, hi = corpus["offsets"][leaf], corpus["offsets"][leaf + 1]
        return lo + np.floor((hi - lo) * rng.random(len(leaf)) ** 2.5).astype(np.int64)

    def random_leaves(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.num_leaves, size=n, p=self.leaf_pop)


def _user_chunk(world: _World, cfg: SyntheticConfig, first_user: int, n: int, rng: np.random.Generator) -> dict:
    span = cfg.days * 86400
    k = cfg.interests_per_user
    users = np.arange(first_user, first_user + n, dtype=np.int64) + 1
    early = world.random_leaves(n * k, rng).reshape(n, k)
    late = world.random_leaves(n * k, rng).reshape(n, k)
    switch = np.where(rng.random((n, k)) < cfg.drift, rng.uniform(0, span, (n, k)), np.inf)
    weights = rng.dirichlet(np.ones(k), size=n)
    start = rng.uniform(0, 0.3 * span, n)

    def interest_leaf(owner: np.ndarray, t: np.ndarray, r: np.random.Generator = rng) -> np.ndarray:
        cum = np.cumsum(weights[owner], axis=1)
        slot = np.minimum((r.random(len(owner))[:, None] > cum).sum(1), k - 1)
        moved = t >= switch[owner, slot]
        return np.where(moved, late[owner, slot], early[owner, slot])

    # Conversions from long-term (drifting) interests.
    n_events = 2 + rng.geometric(1.0 / max(cfg.events_per_user - 2.0, 1.0), n)
    owner = np.repeat(np.arange(n), n_events)
    t = start[owner] + rng.random(len(owner)) * (span - start[owner])
    ads = world.pick(world.ads, interest_leaf(owner, t), rng)
    etype = rng.choice(len(schema.EVENT_TYPES), size=len(owner), p=EVENT_TYPE_PROBS)

    # Related-items requests: a real subject item, an ad that depends on it and on the user.
    n_req = rng.poisson(cfg.requests_per_user, n)
    r_owner = np.repeat(np.arange(n), n_req)
    r_t = start[r_owner] + rng.random(len(r_owner)) * (span - start[r_owner])
    own = interest_leaf(r_owner, r_t)
    subject_leaf = np.where(
        rng.random(len(r_owner)) < cfg.subject_from_interest, own, world.random_leaves(len(r_owner), rng)
    )
    subject = world.pick(world.subjects, subject_leaf, rng)
    from_context = rng.random(len(r_owner)) < cfg.context_strength
    label = world.pick(world.ads, np.where(from_context, subject_leaf, interest_leaf(r_owner, r_t)), rng)

    # Search requests (own stream: the other tables are the same with or without them).
    srng = np.random.default_rng([cfg.seed, 3, first_user])
    s_owner = np.repeat(np.arange(n), srng.poisson(cfg.search_requests_per_user, n))
    s_t = start[s_owner] + srng.random(len(s_owner)) * (span - start[s_owner])
    intent = np.where(
        srng.random(len(s_owner)) < cfg.search_from_interest,
        interest_leaf(s_owner, s_t, srng),
        world.random_leaves(len(s_owner), srng),
    )
    queries, query_leaf = world.search.queries(intent, world.leaf_pop, cfg.typo_rate, srng)
    s_from_query = srng.random(len(s_owner)) < cfg.search_strength
    s_label = world.pick(world.ads, np.where(s_from_query, query_leaf, interest_leaf(s_owner, s_t, srng)), srng)

    # The requests' conversions join the log (checkouts at the request time).
    all_owner = np.concatenate([owner, r_owner, s_owner])
    all_t = np.concatenate([t, r_t, s_t]).astype(np.int64) + START_TIMESTAMP
    all_ads = np.concatenate([ads, label, s_label])
    checkout = schema.EVENT_TYPES.index(schema.EVENT_CHECKOUT)
    all_type = np.concatenate([etype, np.full(len(r_owner) + len(s_owner), checkout, dtype=np.int64)])
    order = np.lexsort((all_t, all_owner))
    conversions = {
        schema.USER_ID: users[all_owner[order]],
        schema.TIMESTAMP: all_t[order],
        schema.ITEM_ID: all_ads[order] + 1,
        schema.ADVERTISER_ID: world.ads["advertiser"][all_ads[order]],
        schema.EVENT_TYPE: np.asarray(schema.EVENT_TYPES)[all_type[order]].tolist(),
    }
    r_order = np.lexsort((r_t, r_owner))
    requests = {
        schema.REQUEST_ID: None,  # numbered by the caller
        schema.USER_ID: users[r_owner[r_order]],
        schema.TIMESTAMP: r_t[r_order].astype(np.int64) + START_TIMESTAMP,
        schema.SUBJECT_ITEM_ID: subject[r_order] + SUBJECT_ID_OFFSET + 1,
        schema.ITEM_ID: label[r_order] + 1,
    }

    s_order = np.lexsort((s_t, s_owner))
    search = {
        schema.REQUEST_ID: None,  # numbered by the caller
        schema.USER_ID: users[s_owner[s_order]],
        schema.TIMESTAMP: s_t[s_order].astype(np.int64) + START_TIMESTAMP,
        schema.QUERY: [queries[i] for i in s_order],
        schema.ITEM_ID: s_label[s_order] + 1,
    }

    def demographic(values: tuple[str, ...]) -> list:
        picked = np.asarray(values, dtype=object)[rng.integers(0, len(values), n)]
        picked[rng.random(n) < cfg.missing_demographic] = None
        return picked.tolist()

    users_table = {
        schema.USER_ID: users,
        schema.AGE_BUCKET: demographic(AGE_BUCKETS),
        schema.COUNTRY: demographic(COUNTRIES),
        schema.GENDER: demographic(GENDERS),
    }
    return {"conversions": conversions, "requests": requests, "users": users_table, "search_requests": search}


def generate(out_dir: str, cfg: SyntheticConfig, progress: bool = True) -> dict:
    """Write the raw tables under ``out_dir``; returns a summary (row counts, timings)."""
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    tables = [*schema.RAW_TABLES.values(), schema.CATEGORY_NAMES]
    if cfg.search_requests_per_user > 0:
        tables.append(schema.SEARCH_REQUESTS)
    writers = {t.name: TableWriter(out_dir, t) for t in tables}
    writers[schema.CATEGORY_NAMES.name].write(world.search.category_names(world.category_id))
    for stream, (name, corpus, n, first_id) in enumerate(
        (
            ("items", world.ads, cfg.items, 1),
            ("subject_items", world.subjects, cfg.subject_items, SUBJECT_ID_OFFSET + 1),
        )
    ):
        for start in range(0, n, cfg.chunk_items):
            stop = min(n, start + cfg.chunk_items)
            cats, confs = world.categories(
                corpus["leaf"][start:stop], np.random.default_rng([cfg.seed, 1 + stream, start])
            )
            columns = {schema.ITEM_ID: np.arange(start, stop, dtype=np.int64) + first_id}
            if "advertiser" in corpus:
                columns[schema.ADVERTISER_ID] = corpus["advertiser"][start:stop]
            else:  # subject items are a corpus of their own (ids above SUBJECT_ID_OFFSET): none is an ad
                columns[schema.AD_ID] = pa.nulls(stop - start, pa.int64())
            writers[name].write({**columns, schema.CATEGORIES: cats, schema.CONFIDENCES: confs})
    from tqdm import tqdm

    numbered = {"requests": 0, "search_requests": 0}  # request ids so far, per request log
    bar = tqdm(total=cfg.users, desc="generate users", unit="user", disable=not progress, file=sys.stderr)
    for first in range(0, cfg.users, cfg.chunk_users):
        n = min(cfg.chunk_users, cfg.users - first)
        chunk = _user_chunk(world, cfg, first, n, np.random.default_rng([cfg.seed, first]))
        for log, done in numbered.items():
            count = len(chunk[log][schema.USER_ID])
            chunk[log][schema.REQUEST_ID] = np.arange(done, done + count) + 1
            numbered[log] += count
        for name in ("conversions", "requests", "users", "search_requests"):
            if name in writers:
                writers[name].write(chunk[name])
        bar.update(n)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {
        "source": "synthetic",
        "config": dataclasses.asdict(cfg),
        "rows": {name: w.rows for name, w in writers.items()},
        "seconds": round(seconds, 3),
        "events_per_second": round(writers["conversions"].rows / max(seconds, 1e-9)),
    }
    with open(os.path.join(out_dir, "source.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SyntheticConfig()
    parser.add_argument("--out", required=True, help="directory for the raw tables")
    for field in dataclasses.fields(SyntheticConfig):
        flags = ["--" + field.name.replace("_", "-")] + (["--ads"] if field.name == "items" else [])
        parser.add_argument(*flags, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    summary = generate(args.out, cfg, progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("rows", "seconds", "events_per_second")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
