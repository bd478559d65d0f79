"""Pinterest-shaped synthetic raw tables: the embedded default data source.

The world
---------
* A two-level interest taxonomy: ``num_top`` top-level interests, each with
  ``leaves_per_top`` leaf interests (category ids ``top*1000`` and ``top*1000 + leaf``).
* The ad corpus (``items``): each ad belongs to one leaf, has an advertiser (advertisers
  specialise in one top-level interest) and 3-5 categories with confidences (its leaf,
  its parent, sibling leaves). Popularity within a leaf is skewed.
* ``subject_items``: what a user can be looking at on a related-items surface, built the
  same way as ads but a separate corpus.
* Users hold a few long-term interests (leaves), each of which may drift to another leaf at
  a random time; every conversion picks an interest by weight and an ad of that leaf.
* The related-items request log: a user views a subject item (from their own interests with
  probability ``subject_from_interest``, else anywhere); the delivered-and-converted ad comes
  from the subject item's leaf with probability ``context_strength`` and from the user's
  current interests otherwise. The context (subject item) is real and never derived from the
  label. Each request's conversion also enters the conversion log.

Everything is vectorised per chunk of users and written chunk by chunk, so memory stays
bounded whatever ``--users`` is; the output depends only on the arguments (``chunk_users``
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

from tfrs_ctx import schema
from tfrs_ctx.data.rawio import TableWriter

START_TIMESTAMP = 1_704_067_200  # 2024-01-01 UTC
SUBJECT_ID_OFFSET = 10_000_000
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "MX", "CA", "JP", "IN", "AU", "ES", "IT", "NL", "SE", "PL")
GENDERS = ("female", "male", "unspecified")
EVENT_TYPE_PROBS = (0.35, 0.3, 0.1, 0.05, 0.2)  # aligned with schema.EVENT_TYPES


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    users: int = 20_000
    seed: int = 0
    items: int = 10_000
    subject_items: int = 20_000
    advertisers: int = 500
    num_top: int = 20
    leaves_per_top: int = 15
    interests_per_user: int = 3
    events_per_user: float = 25.0
    requests_per_user: float = 3.0
    drift: float = 0.5  # probability that an interest moves to another leaf during the span
    context_strength: float = 0.75
    subject_from_interest: float = 0.2
    days: int = 180
    missing_demographic: float = 0.05
    chunk_users: int = 50_000


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

    def category_id(self, leaf: np.ndarray) -> np.ndarray:
        return (self.leaf_top[leaf] + 1) * 1000 + self.leaf_index[leaf] + 1

    def top_category_id(self, leaf: np.ndarray) -> np.ndarray:
        return (self.leaf_top[leaf] + 1) * 1000

    def _corpus(self, n: int, rng: np.random.Generator, with_advertiser: bool) -> dict:
        # Every leaf gets at least one entry; the rest follow leaf popularity (flattened).
        weights = np.sqrt(self.leaf_pop)
        leaf = np.concatenate(
            [np.arange(self.num_leaves), rng.choice(self.num_leaves, n - self.num_leaves, p=weights / weights.sum())]
        )
        leaf = np.sort(leaf)
        offsets = np.searchsorted(leaf, np.arange(self.num_leaves + 1))
        cats, confs = [], []
        n_cats = rng.integers(3, schema.MAX_CATEGORIES + 1, size=n)
        for i in range(n):
            lf = int(leaf[i])
            siblings = rng.choice(self.cfg.leaves_per_top - 1, n_cats[i] - 2, replace=False)
            siblings = siblings + (siblings >= self.leaf_index[lf])  # skip the own leaf
            sib_leaves = self.leaf_top[lf] * self.cfg.leaves_per_top + siblings
            c = [int(self.category_id(lf)), int(self.top_category_id(lf))] + [
                int(x) for x in self.category_id(sib_leaves)
            ]
            minor = sorted(rng.uniform(0.05, 0.3, n_cats[i] - 2), reverse=True)
            w = [rng.uniform(0.6, 0.95), rng.uniform(0.3, 0.6), *minor]
            order = np.argsort(w)[::-1]
            cats.append([c[j] for j in order])
            confs.append([round(float(w[j]), 4) for j in order])
        corpus = {"leaf": leaf, "offsets": offsets, "categories": cats, "confidences": confs}
        if with_advertiser:
            adv = np.empty(n, dtype=np.int64)
            for t in range(self.cfg.num_top):
                idx = np.flatnonzero(self.leaf_top[leaf] == t)
                adv[idx] = rng.choice(self.advertisers_of_top[t], size=len(idx))
            corpus["advertiser"] = adv + 1
        return corpus

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

    def interest_leaf(owner: np.ndarray, t: np.ndarray) -> np.ndarray:
        cum = np.cumsum(weights[owner], axis=1)
        slot = np.minimum((rng.random(len(owner))[:, None] > cum).sum(1), k - 1)
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

    # The requests' conversions join the log (checkouts at the request time).
    all_owner = np.concatenate([owner, r_owner])
    all_t = np.concatenate([t, r_t]).astype(np.int64) + START_TIMESTAMP
    all_ads = np.concatenate([ads, label])
    checkout = schema.EVENT_TYPES.index(schema.EVENT_CHECKOUT)
    all_type = np.concatenate([etype, np.full(len(r_owner), checkout, dtype=np.int64)])
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
    return {"conversions": conversions, "requests": requests, "users": users_table}


def generate(out_dir: str, cfg: SyntheticConfig, progress: bool = True) -> dict:
    """Write the raw tables under ``out_dir``; returns a summary (row counts, timings)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    writers = {t.name: TableWriter(out_dir, t) for t in schema.RAW_TABLES.values()}
    writers["items"].write(
        {
            schema.ITEM_ID: np.arange(cfg.items, dtype=np.int64) + 1,
            schema.ADVERTISER_ID: world.ads["advertiser"],
            schema.CATEGORIES: world.ads["categories"],
            schema.CONFIDENCES: world.ads["confidences"],
        }
    )
    writers["subject_items"].write(
        {
            schema.ITEM_ID: np.arange(cfg.subject_items, dtype=np.int64) + SUBJECT_ID_OFFSET + 1,
            schema.CATEGORIES: world.subjects["categories"],
            schema.CONFIDENCES: world.subjects["confidences"],
        }
    )
    from tqdm import tqdm

    n_requests = 0
    bar = tqdm(total=cfg.users, desc="generate users", unit="user", disable=not progress, file=sys.stderr)
    for first in range(0, cfg.users, cfg.chunk_users):
        n = min(cfg.chunk_users, cfg.users - first)
        chunk = _user_chunk(world, cfg, first, n, np.random.default_rng([cfg.seed, first]))
        chunk["requests"][schema.REQUEST_ID] = (
            np.arange(n_requests, n_requests + len(chunk["requests"][schema.USER_ID])) + 1
        )
        n_requests += len(chunk["requests"][schema.USER_ID])
        for name in ("conversions", "requests", "users"):
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
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
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
