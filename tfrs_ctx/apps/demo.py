"""``tfrs-ctx demo``: every stage end to end on the embedded synthetic default (or MovieLens).

generate (or import MovieLens) -> Beam TFRecords -> train the sequence-only baseline and the
contextual model -> full-ranking evaluation report -> hybrid export -> Beam-encode users
into Feast (apply + materialize) -> start the model server -> recommend for sample users
while the subject item changes -> stop the server. Each stage prints its progress and time;
the run ends with where the report, models, feature store and data are. Re-running starts
clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

DEFAULT_ML100K = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "shared", "datasets", "ml-100k"
)


class Stages:
    """Numbered, timed stage banners."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def run(self, title: str, fn, *args, **kwargs):
        self.done += 1
        print(f"\n==> [{self.done}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        print(f"    done in {time.perf_counter() - t0:.1f}s", flush=True)
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo_work", help="everything the demo writes goes here")
    parser.add_argument("--data", choices=("synthetic", "movielens"), default="synthetic")
    parser.add_argument("--ml100k", default=os.environ.get("TFRS_CTX_ML100K", DEFAULT_ML100K))
    parser.add_argument("--users", type=int, default=8000, help="synthetic users")
    parser.add_argument("--context-strength", type=float, default=0.75)
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--max-targets-per-user", type=int, default=8, help="training examples kept per user")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)

    from beam_pipelines import build_training_data
    from tfrs_ctx.config import load_config
    from tfrs_ctx.evaluation import evaluate
    from tfrs_ctx.training import train
    from tfrs_ctx.training.run_dir import load_trained

    work = os.path.abspath(args.workdir)
    raw, data, runs, report_dir, models, store = (
        os.path.join(work, d) for d in ("raw", "data", "runs", "report", "models", "store")
    )
    for d in (raw, data, runs, report_dir, models, store):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    stages = Stages(10)

    if args.data == "synthetic":
        from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

        cfg_raw = SyntheticConfig(users=args.users, context_strength=args.context_strength)
        summary = stages.run(f"generate synthetic raw tables ({args.users} users)", generate, raw, cfg_raw)
    else:
        from tfrs_ctx.sources.movielens import import_movielens

        summary = stages.run(f"import MovieLens-100k from {args.ml100k}", import_movielens, args.ml100k, raw)
    print(f"    rows: {json.dumps(summary.get('rows', summary))}")

    beam_args = ["--input", raw, "--output", data, "--max_targets_per_user", str(args.max_targets_per_user)]
    stages.run("Beam: raw tables -> TFRecords, vocabularies (DirectRunner)", build_training_data.run, beam_args)

    overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    trained = {}
    for name, extra in (("baseline", ["model.use_context=false"]), ("contextual", [])):
        cfg = load_config(args.data, overrides + extra)
        cfg.train.data_dir = data
        trained[name] = stages.run(f"train the {name} model", train.train, cfg, os.path.join(runs, name), 2)

    report = stages.run(
        "evaluate on held-out related-items requests (full ranking)",
        evaluate.evaluate_runs,
        data,
        os.path.join(runs, "contextual"),
        os.path.join(runs, "baseline"),
        report_dir,
        args.bootstrap,
    )
    with open(os.path.join(report_dir, "report.md")) as f:
        print("\n" + f.read())
    lift = report["lift"]["recall@100"]
    print(f"Recall@100 lift contextual/baseline: {lift['lift']:.2f}x [{lift['lo']:.2f}, {lift['hi']:.2f}]")

    from tfrs_ctx import export
    from tfrs_ctx.apps import daily

    model, _ = load_trained(os.path.join(runs, "contextual"), data)
    exported = stages.run(
        "export encoder / context_head / full SavedModels",
        export.export_all,
        model,
        data,
        models,
        calibration=trained["contextual"]["calibration"],
    )
    print(f"    model version {exported['version']}: " + ", ".join(exported["paths"].values()))
    stages.run(
        "Beam: encode users -> Feast offline store; feast apply + materialize",
        daily.run,
        ["--raw", raw, "--models", models, "--store", store, "--full"],
    )

    from serving.launcher import start_server

    server = stages.run(
        "start the model server (TF Serving if installed, else the compatible server)", start_server, models
    )
    try:
        server.wait_ready(300)
        print(f"    {server.kind} model server on 127.0.0.1:{server.port}")
        shown = stages.run(
            "recommend while the subject item changes (Feast read + gRPC Predict)",
            show_recommendations,
            f"127.0.0.1:{server.port}",
            raw,
            store,
        )
    finally:
        stages.run("stop the model server", server.stop)
    with open(os.path.join(work, "recommendations.json"), "w") as f:
        json.dump(shown, f, indent=2)

    print(f"\nfinished in {stages.elapsed / 60:.1f} min")
    print(f"  report:   {report_dir}/report.md  (and report.json, recall_at_k.png)")
    print(f"  models:   {models}  (TF Serving layout; serve with: python -m serving.launcher --models_dir {models})")
    print(f"  store:    {store}  (Feast: TFRS_CTX_STORE={store} feast -c feature_repo ...)")
    print(f"  runs:     {runs}/baseline, {runs}/contextual  (TensorBoard logs under */logs)")
    print(f"  data:     {data}  (TFRecords, vocabularies, metadata.json)")
    return 0


def show_recommendations(target: str, raw: str, store: str, users: int = 3, subjects: int = 3, k: int = 10) -> list:
    """For a few users, the top-k ads as the subject item changes; how many follow the subject."""
    import pandas as pd

    from serving.client.candidates import AdRequest, CandidateClient
    from serving.client.features import FeastFeatureReader
    from tfrs_ctx import schema
    from tfrs_ctx.apps.recommend import ad_details

    details = ad_details(raw)
    reader = FeastFeatureReader.open(store)
    conversions = pd.read_parquet(os.path.join(raw, schema.CONVERSIONS.name), columns=[schema.USER_ID])
    sample_users = conversions[schema.USER_ID].value_counts().index[:users].tolist()
    items = pd.read_parquet(os.path.join(raw, schema.SUBJECT_ITEMS.name))
    items["top"] = [int(c[0]) for c in items[schema.CATEGORIES]]  # the subject's leaf interest
    distinct = items.drop_duplicates("top")
    picked = distinct.iloc[:: max(1, len(distinct) // subjects)].head(subjects)  # spread over the taxonomy
    shown = []
    with CandidateClient(target, reader) as client:
        for user in sample_users:
            requests = [AdRequest(int(user), int(i)) for i in picked[schema.ITEM_ID]]
            for request, top, rec in zip(requests, picked["top"], client.recommend(requests), strict=True):
                follows = sum(details.get(a, {}).get(schema.CATEGORIES, [None])[0] == top for a in rec.item_ids[:k])
                print(
                    f"    user {user:>6}  subject {request.subject_item_id} (top category {top}): "
                    f"{follows}/{k} of the top {k} ads share it; top 5: {rec.item_ids[:5]}"
                )
                shown.append(
                    {
                        "user": int(user),
                        "subject_item": request.subject_item_id,
                        "top_category": top,
                        "ads": rec.item_ids[:k],
                        "scores": rec.scores[:k],
                        "follow_subject": follows,
                        "model_version": rec.model_version,
                    }
                )
    return shown


if __name__ == "__main__":
    sys.exit(main())
