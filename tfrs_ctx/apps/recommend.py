"""``tfrs-ctx recommend``: candidate ads for one request, through the online path.

    tfrs-ctx recommend --user 42 --subject-item 10000123 [-k 10] [--json]
        [--server 127.0.0.1:8500] [--store STORE_DIR] [--online sqlite|redis] [--raw RAW_DIR]
    tfrs-ctx recommend --user 42 --categories 3001:0.9,3000:0.4 [--data DATA_DIR]  # explicit context

Reads the user's stored encoding and demographics and the subject item's categories (and the ad
it is, ``ad_id``: sent as ``subject_ad_id`` where the served model takes it) from the Feast online
store, calls ``context_head`` over gRPC (TF Serving or the compatible
server), prints rank, ad, advertiser, categories and score, or JSON with ``--json``. The
advertiser and categories of each ad come from ``--raw`` (the raw ``items`` table) or, without
it, from ``--data`` (the ``build-data`` output the model was trained on: its ad corpus and
vocabularies); with neither those columns are blank. With ``--data`` the client also knows the
category vocabulary and notes ``--categories`` ids the model does not know (they still count,
as its out-of-vocabulary id).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from tfrs_ctx import schema


def parse_categories(text: str) -> tuple[list[int], list[float]]:
    """``"3001:0.9,3000:0.4"`` -> ids and confidences (a bare id gets confidence 1)."""
    ids, weights = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        cid, _, weight = part.partition(":")
        ids.append(int(cid))
        weights.append(float(weight) if weight else 1.0)
    return ids, weights


def ad_details(raw_dir: str | None = None, data_dir: str | None = None) -> dict[int, dict]:
    """Advertiser and categories (raw ids) per ad: from the raw ``items`` table, else from the training
    data's ad corpus (``corpus.parquet``, its ids mapped back through the vocabularies; an id the
    vocabulary did not know is shown as ``?``); ``{}`` without either."""
    if raw_dir:
        from tfrs_ctx.data.rawio import read_table

        items = read_table(raw_dir, schema.ITEMS)
        return {
            int(row[schema.ITEM_ID]): {
                schema.ADVERTISER_ID: int(row[schema.ADVERTISER_ID]),
                schema.CATEGORIES: [int(c) for c in row[schema.CATEGORIES]],
            }
            for row in items.to_dict("records")
        }
    if data_dir:
        import os

        import pandas as pd

        from tfrs_ctx.data.vocab import load_vocab

        advertisers = load_vocab(data_dir, schema.VOCAB_ADVERTISER)
        categories = load_vocab(data_dir, schema.VOCAB_CATEGORY)

        def raw(vocab: list[str], index: int) -> int | str:
            return int(vocab[index - schema.NUM_RESERVED_IDS]) if index >= schema.NUM_RESERVED_IDS else "?"

        corpus = pd.read_parquet(os.path.join(data_dir, schema.CORPUS_FILE))
        return {
            int(row[schema.ITEM_ID]): {
                schema.ADVERTISER_ID: raw(advertisers, int(row[schema.LABEL_ADVERTISER])),
                schema.CATEGORIES: [
                    raw(categories, int(c)) for c in row[schema.LABEL_CATEGORIES] if c != schema.PAD_ID
                ],
            }
            for row in corpus.to_dict("records")
        }
    return {}


def format_table(rec, details: dict[int, dict], k: int) -> str:
    lines = [
        f"user {rec.user_id}  model version {rec.model_version}  history: {'yes' if rec.history_used else 'no'}"
        f"  context: {'yes' if rec.context_used else 'no'}",
        *[f"  note: {n}" for n in rec.notes],
        f"{'rank':>4}  {'ad':>10}  {'advertiser':>10}  {'categories':<28}  score",
    ]
    for rank, (item, score) in enumerate(zip(rec.item_ids[:k], rec.scores[:k], strict=True), 1):
        d = details.get(item, {})
        cats = ",".join(str(c) for c in d.get(schema.CATEGORIES, []))
        lines.append(f"{rank:>4}  {item:>10}  {d.get(schema.ADVERTISER_ID, ''):>10}  {cats:<28}  {score:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx recommend", description=__doc__.split("\n")[0])
    parser.add_argument("--user", type=int, required=True)
    context = parser.add_mutually_exclusive_group()
    context.add_argument("--subject-item", type=int, help="the item the user is looking at")
    context.add_argument("--categories", help="explicit context: id:confidence,... (e.g. a search surface)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--server", default="127.0.0.1:8500", help="host:port of the model server")
    parser.add_argument("--store", help="store directory (default: $TFRS_CTX_STORE)")
    parser.add_argument("--repo", help="Feast repo directory (default: the bundled feature_repo)")
    parser.add_argument("--online", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--raw", help="raw-table directory: ad details from its items table")
    parser.add_argument(
        "--data",
        help="training data directory: ad details from its corpus (without --raw); its category vocabulary, "
        "to note unknown --categories",
    )
    parser.add_argument("--deadline", type=float, default=1.0, help="seconds per Predict attempt")
    parser.add_argument("--version-policy", choices=("refuse", "cold_start"), default="refuse")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from serving.client.candidates import AdRequest, CandidateClient, ClientError
    from serving.client.features import FeastFeatureReader
    from tfrs_ctx import feature_store as fs
    from tfrs_ctx.data.vocab import load_vocab

    store_dir = args.store or fs.store_dir_from_env()
    reader = FeastFeatureReader.open(store_dir, args.repo, str(fs.repo_yaml(args.repo, args.online)))
    cats = parse_categories(args.categories) if args.categories else (None, None)
    request = AdRequest(args.user, args.subject_item, cats[0], cats[1])
    known = None
    if args.data and args.categories:
        known = load_vocab(args.data, schema.VOCAB_CATEGORY)
    try:
        with CandidateClient(
            args.server, reader, deadline_s=args.deadline, version_policy=args.version_policy, known_categories=known
        ) as client:
            rec = client.recommend([request])[0]
    except ClientError as e:
        print(f"tfrs-ctx recommend: {e}", file=sys.stderr)
        return 1
    if args.json:
        out = dataclasses.asdict(rec)
        out["item_ids"], out["scores"] = rec.item_ids[: args.k], rec.scores[: args.k]
        print(json.dumps(out, indent=2))
    else:
        print(format_table(rec, ad_details(args.raw, args.data), args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
