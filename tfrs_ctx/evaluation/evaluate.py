"""Full-ranking evaluation report on the held-out related-items requests.

``tfrs-ctx evaluate --data DATA_DIR --contextual RUN --baseline RUN --out REPORT_DIR``

Every row ranks the *whole* ad corpus for the same held-out requests (no sampled
negatives): Recall@10/50/100/200 and NDCG@10 with 95% bootstrap intervals, and the lift
(contextual / baseline) per K with a paired bootstrap interval. Rows:

* ``popularity``: ads ranked by training conversions;
* ``baseline``: the sequence-only production model (context switched off);
* ``contextual``: the contextual model with the request's real context;
* ``contextual_no_context``: the contextual model with the context missing;
* ``baseline_subject_as_history``: the baseline given the subject item as a fresh history
  event (a reference for how much the context carries; only where subject items are ads);
* ``contextual_served_index`` (with ``--models DIR``, an export of the contextual run): what is
  served: the ``full`` SavedModel's top-K through its exported corpus index (exact or IVF). The
  rank is the label's position in the returned top-K (history ads dropped when excluded); a label
  beyond K is not retrieved, so its Recall@K' is meaningful for K' <= the exported K only.

Writes ``report.json`` (every figure), ``report.md`` and ``recall_at_k.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from tfrs_ctx import schema
from tfrs_ctx.evaluation.metrics import (
    KS,
    NDCG_K,
    bootstrap_indices,
    interval,
    label_ranks,
    paired_lift,
    per_request,
    ranks_from_scores,
)

ROWS = ("popularity", "baseline", "contextual", "contextual_no_context", "baseline_subject_as_history")
LIFT_OF = ("contextual", "baseline")
MISSING = "contextual_no_context"


# ---- scoring the rows ----------------------------------------------------------------
def _subject_as_history(batch: dict, corpus_advertiser: np.ndarray, event_type_index: int) -> dict:
    """Append the subject item to each history as the most recent event (a page visit)."""
    import tensorflow as tf

    out = dict(batch)
    subject = batch[schema.SUBJECT_ITEM]
    is_ad = subject >= schema.NUM_RESERVED_IDS
    advertiser = tf.gather(corpus_advertiser, tf.maximum(subject - schema.NUM_RESERVED_IDS, 0))
    newest = {
        schema.HISTORY_ITEM: subject,
        schema.HISTORY_ADVERTISER: advertiser,
        schema.HISTORY_EVENT_TYPE: tf.fill(tf.shape(subject), tf.constant(event_type_index, tf.int64)),
        schema.HISTORY_TIME_GAP: tf.fill(tf.shape(subject), tf.constant(schema.time_gap_bucket(0), tf.int64)),
        # next-event gaps: the old last event's next event is now the subject item, at the request time:
        # the same gap as before, and the subject's own gap to the request is 0.
        schema.HISTORY_NEXT_GAP: tf.fill(tf.shape(subject), tf.constant(schema.time_gap_bucket(0), tf.int64)),
    }
    for name, value in newest.items():
        shifted = tf.concat([batch[name][:, 1:], value[:, None]], axis=1)
        out[name] = tf.where(is_ad[:, None], shifted, batch[name])
    length = batch[schema.HISTORY_LENGTH]
    out[schema.HISTORY_LENGTH] = tf.where(is_ad, tf.minimum(length + 1, schema.MAX_HISTORY), length)
    return out


def item_popularity(data_dir: str, item_ids: np.ndarray) -> np.ndarray:
    """Training conversions per ad, aligned with ``item_ids`` (0 for ads never converted)."""
    import pandas as pd

    path = os.path.join(data_dir, schema.ITEM_COUNTS_FILE)
    counts = pd.read_csv(path, sep="\t", header=None, names=["item", "count"], dtype={"item": np.int64})
    lookup = dict(zip(counts["item"].tolist(), counts["count"].tolist(), strict=True))
    return np.asarray([lookup.get(int(i), 0) for i in item_ids], dtype=np.float32)


EXCLUDE_RULE = (
    "Ads the user converted on strictly before the request are excluded from every row's ranking "
    "(all of them, not only the last {max_history} history events; never the label itself): "
    "train.exclude_history is on, the data says repeats do not happen."
)
EXCLUDE_RULE_HISTORY_ONLY = (
    "Only the ads of the request's kept history (its last {max_history} events) are excluded: this data "
    "directory has no {consumed}/ (built before it existed; rebuild it for the full rule)."
)


def load_consumed(data_dir: str, directory: str = schema.EVAL_CONSUMED_DIR) -> dict[int, np.ndarray] | None:
    """Eval request id -> item indices its user converted on before it (``None`` if the data has none)."""
    import glob

    files = sorted(glob.glob(os.path.join(data_dir, directory, "part*")))
    if not files:
        return None
    out = {}
    for path in files:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    out[int(row[schema.REQUEST_ID])] = np.asarray(row[schema.CONSUMED_ITEMS], dtype=np.int64)
    return out


def consumed_matrix(request_ids: np.ndarray, consumed: dict[int, np.ndarray]) -> np.ndarray:
    """``[B, M]`` item indices to exclude per request, padded with ``PAD_ID`` (never excluded)."""
    rows = [consumed.get(int(r), np.zeros(0, np.int64)) for r in request_ids]
    out = np.zeros((len(rows), max([1, *(len(r) for r in rows)])), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def score_rows(
    data_dir: str,
    contextual,
    baseline,
    exclude_history: bool,
    max_requests: int | None = None,
    notes=None,
    split: str = schema.SPLIT_EVAL,
) -> dict:
    """Ranks of every held-out request's label under each row; returns ``{row: ranks}``.

    With ``exclude_history`` every ad the user converted on before the request is dropped from
    the ranking (the data's ``eval_consumed``; older data: the kept history). ``notes``: a list
    the rule applied is appended to. ``split``: the eval split of a surface (``eval_search``: the
    search requests, with their query as the context).
    """
    from tfrs_ctx.data import dataset, vocab
    from tfrs_ctx.models.two_tower import without_context

    corpus = dataset.load_corpus(data_dir)
    popularity = item_popularity(data_dir, corpus[schema.ITEM_ID])
    event_types = vocab.load_vocab(data_dir, schema.VOCAB_EVENT_TYPE)
    page_visit = schema.EVENT_PAGE_VISIT
    visit_index = (
        event_types.index(page_visit) + schema.NUM_RESERVED_IDS if page_visit in event_types else schema.OOV_ID
    )
    ctx_corpus = contextual.corpus_embeddings().numpy()
    base_corpus = baseline.corpus_embeddings().numpy()
    consumed_dir = schema.EVAL_SEARCH_CONSUMED_DIR if split == schema.SPLIT_EVAL_SEARCH else schema.EVAL_CONSUMED_DIR
    consumed = load_consumed(data_dir, consumed_dir) if exclude_history else None
    if exclude_history and notes is not None:
        rule = EXCLUDE_RULE if consumed is not None else EXCLUDE_RULE_HISTORY_ONLY
        notes.append(rule.format(max_history=schema.MAX_HISTORY, consumed=schema.EVAL_CONSUMED_DIR))
    ranks: dict[str, list[np.ndarray]] = {row: [] for row in ROWS}
    subject_is_ad = []
    ds = dataset.make_dataset(data_dir, split, 1024)
    if max_requests:
        ds = ds.unbatch().take(max_requests).batch(1024)
    for batch in ds:
        labels = batch[schema.LABEL_ITEM].numpy()
        exclude = None
        if exclude_history:
            ids = batch[schema.EX_REQUEST_ID].numpy()
            exclude = consumed_matrix(ids, consumed) if consumed is not None else batch[schema.HISTORY_ITEM].numpy()
        pop_scores = np.broadcast_to(popularity, (len(labels), len(popularity)))
        ranks["popularity"].append(ranks_from_scores(pop_scores, labels, exclude))
        ranks["baseline"].append(label_ranks(baseline.query_embedding(batch), base_corpus, labels, exclude))
        ranks["contextual"].append(label_ranks(contextual.query_embedding(batch), ctx_corpus, labels, exclude))
        no_ctx = contextual.query_embedding(without_context(batch))
        ranks["contextual_no_context"].append(label_ranks(no_ctx, ctx_corpus, labels, exclude))
        fresh = _subject_as_history(batch, corpus[schema.LABEL_ADVERTISER], visit_index)
        ranks["baseline_subject_as_history"].append(
            label_ranks(baseline.query_embedding(fresh), base_corpus, labels, exclude)
        )
        subject_is_ad.append(batch[schema.SUBJECT_ITEM].numpy() >= schema.NUM_RESERVED_IDS)
    out = {row: np.concatenate(r) if r else np.zeros(0, np.int64) for row, r in ranks.items()}
    if not any(flags.any() for flags in subject_is_ad):
        del out["baseline_subject_as_history"]  # subject items are not ads: nothing to append
    return out


def raw_inputs(batch: dict, data_dir: str) -> dict[str, np.ndarray]:
    """Vocab indices of a dataset batch -> the raw values the exported signatures take (PAD/OOV -> 0 / "")."""
    from tfrs_ctx import signatures
    from tfrs_ctx.data import vocab

    out = {}
    for name, spec in signatures.full_inputs_spec().items():
        value = np.asarray(batch[name])
        if spec.vocab:
            table = np.asarray(["", "", *vocab.load_vocab(data_dir, spec.vocab)], object)[value]
            if spec.dtype == "int64":
                value = np.asarray([int(v) if v else 0 for v in table.ravel()], np.int64).reshape(value.shape)
            else:
                value = table.astype(bytes).astype(object)
        out[name] = value if spec.dtype == "string" else value.astype(spec.numpy_dtype)
    return out


def raw_subject_ads(subject: np.ndarray, corpus_ids: np.ndarray) -> np.ndarray:
    """Subject ad indices (``SUBJECT_ITEM``) -> the raw ad ids the head takes (``NO_SUBJECT_AD`` where none)."""
    subject = np.asarray(subject, np.int64).reshape(-1)
    rows = np.clip(subject - schema.NUM_RESERVED_IDS, 0, max(len(corpus_ids) - 1, 0))
    return np.where(subject >= schema.NUM_RESERVED_IDS, corpus_ids[rows], schema.NO_SUBJECT_AD).astype(np.int64)


def served_index_ranks(
    models_dir: str, data_dir: str, exclude_history: bool, max_requests: int | None = None
) -> tuple[np.ndarray, dict]:
    """Ranks of the held-out labels in the exported ``full`` model's top-K (its latest version);
    ``K`` (the exported max) when not retrieved. Returns the ranks and the export's model_info."""
    import tensorflow as tf

    from tfrs_ctx.data import dataset

    base = os.path.join(models_dir, schema.MODEL_FULL)
    version = max(int(v) for v in os.listdir(base) if v.isdigit())
    path = os.path.join(base, str(version))
    with open(os.path.join(path, "assets.extra", schema.MODEL_INFO_FILE)) as f:
        info = json.load(f)
    k = int(info["top_k"])
    fn = tf.saved_model.load(path).signatures["serving_default"]
    corpus_ids = dataset.load_corpus(data_dir)[schema.ITEM_ID].astype(np.int64)
    order = np.argsort(corpus_ids)
    ranks = []
    ds = dataset.make_dataset(data_dir, schema.SPLIT_EVAL, 256)
    if max_requests:
        ds = ds.unbatch().take(max_requests).batch(256)
    for batch in ds:
        batch = {name: v.numpy() for name, v in batch.items()}
        raw = {name: tf.constant(v) for name, v in raw_inputs(batch, data_dir).items()}
        if schema.SUBJECT_AD in fn.structured_input_signature[1]:  # a model that reads the subject ad
            raw[schema.SUBJECT_AD] = tf.constant(raw_subject_ads(batch[schema.SUBJECT_ITEM], corpus_ids))
        ids = fn(**raw, k=tf.constant([k], tf.int64))[schema.TOP_K_IDS].numpy()
        pos = np.searchsorted(corpus_ids, ids, sorter=order).clip(0, len(corpus_ids) - 1)
        index = np.where(ids >= 0, order[pos] + schema.NUM_RESERVED_IDS, -1)  # raw id -> item index
        for row, label in enumerate(batch[schema.LABEL_ITEM]):
            got = index[row]
            if exclude_history:
                history = batch[schema.HISTORY_ITEM][row]
                got = got[~np.isin(got, history[(history >= schema.NUM_RESERVED_IDS) & (history != label)])]
            hit = np.flatnonzero(got == label)
            ranks.append(int(hit[0]) if len(hit) else max(k, len(corpus_ids)))
    return np.asarray(ranks, np.int64), info


def build_report(ranks: dict[str, np.ndarray], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Figures with 95% bootstrap intervals and the paired lift per K."""
    n = len(next(iter(ranks.values())))
    if n == 0:
        raise ValueError("no held-out requests to evaluate (is the eval split empty?)")
    idx = bootstrap_indices(n, bootstrap, seed)
    values = {row: per_request(r) for row, r in ranks.items()}
    report = {
        "requests": n,
        "bootstrap_samples": bootstrap,
        "rows": {row: {m: interval(v, idx) for m, v in metrics.items()} for row, metrics in values.items()},
        "lift": {},
    }
    a, b = LIFT_OF
    if a in values and b in values:
        report["lift"] = {m: paired_lift(values[a][m], values[b][m], idx) for m in values[a]}
    if MISSING in values and b in values:  # the context-missing path against the baseline, paired
        report["missing_over_baseline"] = {m: paired_lift(values[MISSING][m], values[b][m], idx) for m in values[b]}
    return report


def write_report(report: dict, out_dir: str, title: str = "tfrs-ctx evaluation") -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# {title}", "", *_figure_lines(report)]
    search = report.get("surfaces", {}).get(SURFACE_SEARCH)
    if search:
        lines += ["", "## Search surface (eval_search: the query as the context)", "", *_figure_lines(search)]
    extra = report.get("notes")
    if extra:
        lines += ["", *extra]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_recall(report, os.path.join(out_dir, "recall_at_k.png"), title)


def _figure_lines(report: dict) -> list[str]:
    """A report's (or a surface's) rows and lift as markdown tables."""
    metrics = [f"recall@{k}" for k in KS] + [f"ndcg@{NDCG_K}"]
    lines = [
        f"{report['requests']} held-out requests, full ranking over the whole ad corpus; "
        f"95% bootstrap intervals ({report['bootstrap_samples']} resamples).",
        "",
        "| row | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for row, figures in report["rows"].items():
        cells = [f"{figures[m]['mean']:.4f} [{figures[m]['lo']:.4f}, {figures[m]['hi']:.4f}]" for m in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if report["lift"]:
        lines += ["", f"Lift {LIFT_OF[0]} / {LIFT_OF[1]} (paired bootstrap 95% interval):", ""]
        lines += ["| metric | lift | interval |", "|---|---|---|"]
        for m in metrics:
            lift = report["lift"][m]
            lines.append(f"| {m} | {lift['lift']:.2f}x | [{lift['lo']:.2f}, {lift['hi']:.2f}] |")
    missing = report.get("missing_over_baseline")
    if missing:
        cells = [f"{m} {missing[m]['lift']:.3f}x [{missing[m]['lo']:.3f}, {missing[m]['hi']:.3f}]" for m in metrics]
        lines += ["", f"{MISSING} / baseline (paired bootstrap 95% interval): " + ", ".join(cells) + "."]
    return lines


def plot_recall(report: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row, figures in report["rows"].items():
        mean = [figures[f"recall@{k}"]["mean"] for k in KS]
        err = [
            [m - figures[f"recall@{k}"]["lo"] for k, m in zip(KS, mean, strict=True)],
            [figures[f"recall@{k}"]["hi"] - m for k, m in zip(KS, mean, strict=True)],
        ]
        left.errorbar(KS, mean, yerr=err, marker="o", capsize=3, label=row)
    left.set(xscale="log", xticks=KS, xticklabels=[str(k) for k in KS], xlabel="K", ylabel="Recall@K", title=title)
    left.legend(fontsize=8)
    if report["lift"]:
        lifts = [report["lift"][f"recall@{k}"] for k in KS]
        right.bar([str(k) for k in KS], [x["lift"] for x in lifts], color="tab:green")
        right.errorbar(
            [str(k) for k in KS],
            [x["lift"] for x in lifts],
            yerr=[[x["lift"] - x["lo"] for x in lifts], [x["hi"] - x["lift"] for x in lifts]],
            fmt="none",
            c="k",
            capsize=4,
        )
        right.axhline(1.0, color="grey", lw=1, ls="--")
        right.set(xlabel="K", ylabel="lift", title=f"Recall@K lift: {LIFT_OF[0]} / {LIFT_OF[1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_line(trust: float, calibration: dict | None) -> dict:
    """Where the contextual model's trust comes from (``train_summary.json["calibration"]``), as
    ``{source, trust, flagged, note}``; the note is the report's line (loud when flagged)."""
    c = calibration or {"source": "unknown", "flagged": True}
    # summaries of older runs lack the flag and the description
    source, flagged = c.get("source", "requests"), bool(c.get("flagged", False))
    chosen = f"chosen on {c.get('examples', '?')} {c.get('description', source)}"
    if not calibration or c.get("examples") == 0:  # none, or switched off: nothing chose it
        chosen = c.get("description", "not calibrated")
    note = f"Context trust of the contextual model: {trust:g} (1 = as trained, 0 = context ignored); {chosen}."
    if flagged:
        note = (
            f"**UNCALIBRATED context trust {trust:g}**: no request with real context chose it ({chosen}); "
            "the contextual row may lose to the baseline on real traffic: calibrate on a request log "
            "(`tfrs-ctx calibrate --run RUN --data DATA`) before trusting it."
        )
    return {"source": source, "trust": trust, "flagged": flagged, "note": note}


SURFACE_RELATED_ITEMS, SURFACE_SEARCH = "related_items", "search"


def _split_count(data_dir: str, split: str) -> int:
    """Examples of a split by the data's metadata (0 where the data has none)."""
    from tfrs_ctx.data import dataset

    return int(dataset.load_metadata(data_dir).get("counts", {}).get(split, 0) or 0)


def _surface_summary(report: dict) -> dict:
    """The related-items figures (the report's top level) as one entry of ``surfaces``."""
    keys = ("requests", "bootstrap_samples", "rows", "lift", "missing_over_baseline")
    return {key: report[key] for key in keys if key in report}


def evaluate_runs(
    data_dir: str,
    contextual_run: str,
    baseline_run: str,
    out_dir: str | None = None,
    bootstrap: int = 1000,
    exclude_history: bool | None = None,
    max_requests: int | None = None,
    models_dir: str | None = None,
) -> dict:
    """Load both trained runs, score every row on the same requests, write the report.

    ``models_dir``: an export of the contextual run: adds the ``contextual_served_index`` row."""
    from tfrs_ctx.training.run_dir import load_trained, read_summary

    contextual, cfg = load_trained(contextual_run, data_dir)
    baseline, _ = load_trained(baseline_run, data_dir)
    if contextual.context_layer is None:
        raise ValueError(f"{contextual_run} was trained with model.use_context=false: it is a baseline")
    exclude = cfg.train.exclude_history if exclude_history is None else exclude_history
    notes: list[str] = []
    ranks = score_rows(data_dir, contextual, baseline, exclude, max_requests, notes)
    served = None
    if models_dir:
        ranks["contextual_served_index"], served = served_index_ranks(models_dir, data_dir, exclude, max_requests)
    report = build_report(ranks, bootstrap)
    report["notes"] = notes
    report["data_dir"], report["exclude_history"] = os.path.abspath(data_dir), exclude
    report["runs"] = {"contextual": os.path.abspath(contextual_run), "baseline": os.path.abspath(baseline_run)}
    report["context_trust"] = trust = float(contextual.context_layer.trust.numpy())
    calibration = read_summary(contextual_run).get("calibration")
    report["calibration"] = calibration_line(trust, calibration)
    report.setdefault("notes", []).append(report["calibration"]["note"])
    search_layer = getattr(contextual, "query_layer", None)
    if search_layer is not None and _split_count(data_dir, schema.SPLIT_EVAL_SEARCH):
        search_ranks = score_rows(data_dir, contextual, baseline, exclude, max_requests, split=schema.SPLIT_EVAL_SEARCH)
        search = build_report(search_ranks, bootstrap)
        search["trust"] = float(search_layer.trust.numpy())
        search["calibration"] = calibration_line(search["trust"], (calibration or {}).get("search"))
        report["surfaces"] = {SURFACE_RELATED_ITEMS: _surface_summary(report), SURFACE_SEARCH: search}
        report["notes"].append("Search surface: " + search["calibration"]["note"].replace("Context trust", "trust"))
    if served:
        r = served.get("retrieval", {})
        report["served_index"] = {"models_dir": os.path.abspath(models_dir), "top_k": served["top_k"], **r}
        report["notes"].append(
            f"contextual_served_index: the exported full model's top-{served['top_k']} through its "
            f"{r.get('mode', '?')} index (P={r.get('n_partitions')}, nprobe={r.get('nprobe')}, "
            f"{r.get('quantization')}); contextual is scored exactly. A label beyond the exported K is not "
            f"retrieved: its Recall@K is meaningful for K <= {served['top_k']} only, NDCG from the same ranks."
        )
    if out_dir:
        write_report(report, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="TFRecord directory (its eval split)")
    parser.add_argument("--contextual", required=True, help="run directory of the contextual model")
    parser.add_argument("--baseline", required=True, help="run directory of the sequence-only baseline")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--exclude-history", choices=("yes", "no"), help="default: the contextual run's config")
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--models", help="an export of the contextual run: adds the contextual_served_index row")
    args = parser.parse_args(argv)
    exclude = None if args.exclude_history is None else args.exclude_history == "yes"
    report = evaluate_runs(
        args.data, args.contextual, args.baseline, args.out, args.bootstrap, exclude, args.max_requests, args.models
    )
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read())
    return 0 if report["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
