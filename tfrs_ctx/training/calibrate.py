"""Context trust: ``tfrs-ctx calibrate --run RUN_DIR [--data DIR]``.

The contextual model learns what context *means* from synthetic context (the label's own
categories, dropped and swapped in training). How far the context of a real request should
be *believed* is a different question, and only real requests can answer it. So after
training, the context layer's ``trust`` (the scale of its output; 1 as trained, 0 = exactly
the no-context answer) is set to the value on a fixed grid with the highest Recall@K on
requests with real context, everything else frozen (ties: the lower trust, so a trust above
0 is kept only where it *beats* the model's own no-context recall). A direct search of the
metric, not a loss: a model trained with a softmax over synthetic context can be
over-confident by the loss and still rank better with more trust.

Which requests (``train_summary.json["calibration"]["source"]``, the first that applies):

* ``requests``: logged ``train_requests`` beyond the first ``train.validation_examples`` (used
  for early stopping), at most ``train.calibration_examples``, when at least ``MIN_HELD_OUT``.
* ``previous_event``: where the data defines a request's context as the user's previous event
  (``train.context_is_previous_event``: MovieLens, whose requests are "label = an event, subject
  = the event before it") and the log is too small: requests derived from the ``train`` split.
  Each training target keeps its label; the last event of its history becomes the context (that
  item's categories, and ``subject_item``) and the events before it the history, as the pipeline
  builds a real request (the subject's event left out of the history). The ``train`` split holds
  only events before the cutoff, so nothing at or after it is read. The labels were trained on:
  the history path's recall is in-sample, which favours lower trust (the safe side).
* ``validation``: the validation ``train_requests`` themselves (in-sample).
* ``synthetic``: no request at all and no derivation: the first training examples with their
  synthetic context, on the grid up to 1 (as trained; synthetic context is cleaner than any real
  one), **flagged "uncalibrated"**: nothing real said how far the context can be believed.
* ``off``: ``train.calibration_examples=0``: the trust stays at 1, flagged "uncalibrated".
* ``not_applicable``: ``train.context_source`` real or none (the context was never synthetic).

The search surface (``model.search_query``) has its own trust, on the query block, chosen the same
way on the logged search requests before the cutoff (``train_search_requests``, at most
``train.calibration_examples``; they are never validation examples), or flagged "uncalibrated" on
training examples with their synthetic query where the data has none
(:func:`calibrate_search`; ``calibration.search`` in the summary).

Every contextual run records its outcome (source, trust, flag, recall per grid value) in the
summary; the export copies source, trust and flag into ``model_info.json`` and the evaluation
report states them. Training calls :func:`calibrate` itself; the command re-chooses the trust of
a trained run, e.g. on a fresher request log, without retraining, and updates ``final/`` and the
summary.
"""

from __future__ import annotations

import argparse
import json
import sys

import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.config import Config
from tfrs_ctx.data import dataset
from tfrs_ctx.evaluation.metrics import recall_at_k
from tfrs_ctx.training import run_dir
from tfrs_ctx.training.search import one_surface

# 1 = as trained. Above 1: real context is more reliable than the dropped, swapped synthetic
# context the model hedged against in training.
TRUST_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
MIN_HELD_OUT = 1000  # fewer held-out requests than this: derive requests, or choose on the validation examples
UNCALIBRATED = "uncalibrated"
SOURCES = {
    "requests": "held-out train_requests",
    "previous_event": "requests derived from the training histories (context = the previous event; in-sample labels)",
    "validation": "validation examples (in-sample: too few train_requests to hold more out)",
    "synthetic": "training examples with synthetic context (NO request log: uncalibrated, trust at most 1)",
    "off": "none: calibration switched off (train.calibration_examples=0), trust as trained",
    "not_applicable": "none: the context was not synthetic in training (train.context_source)",
    "search_requests": "logged train_search_requests (real queries before the cutoff)",
    "synthetic_queries": "training examples with their synthetic query (NO search log: uncalibrated, trust at most 1)",
}
SYNTHETIC_SOURCES = ("synthetic", "synthetic_queries")  # no real request chose the trust
_SHIFTED = (*schema.HISTORY_FEATURES, schema.HISTORY_NEXT_GAP)


def choose_trust(
    model, batches: list, k: int, grid: tuple[float, ...] = TRUST_GRID, layer=None
) -> tuple[float, dict[float, float]]:
    """Set the context trust (of ``layer``, default the context layer) to the grid value with the highest
    Recall@``k`` on ``batches`` (ties: the lower trust); returns it and the recall at every grid value."""
    layer = model.context_layer if layer is None else layer
    if layer is None:
        raise ValueError("choose_trust needs the contextual model (model.use_context=true)")
    recalls = {}
    for trust in grid:
        layer.trust.assign(trust)
        recalls[trust] = recall_at_k(model, batches, k)
    best = max(grid, key=lambda trust: (recalls[trust], -trust))
    layer.trust.assign(best)
    return best, recalls


def previous_event_request(example: dict[str, tf.Tensor], categories: tf.Tensor, confidences: tf.Tensor) -> dict:
    """A ``train`` example (one, unbatched) as a request whose context is its history's last event.

    ``categories`` / ``confidences``: the corpus's ``[items, C]`` tables, row = item index -
    ``NUM_RESERVED_IDS``. The history is left-padded: its last event moves into the context and
    ``subject_item``, the rest shifts right by one; the new last event's next-event gap is its
    gap to the target (as in a request's history, which leaves the subject's event out).
    """
    out = dict(example)
    subject = example[schema.HISTORY_ITEM][-1]
    for name in _SHIFTED:
        values = example[name]
        out[name] = tf.concat([tf.zeros_like(values[:1]), values[:-1]], axis=0)
    gaps = out[schema.HISTORY_NEXT_GAP]
    out[schema.HISTORY_NEXT_GAP] = tf.concat([gaps[:-1], out[schema.HISTORY_TIME_GAP][-1:]], axis=0)
    out[schema.HISTORY_LENGTH] = example[schema.HISTORY_LENGTH] - 1
    row = subject - schema.NUM_RESERVED_IDS
    out[schema.CONTEXT_CATEGORIES] = tf.gather(categories, row)
    out[schema.CONTEXT_WEIGHTS] = tf.gather(confidences, row)
    out[schema.SUBJECT_ITEM] = subject
    return out


def derived_requests(data_dir: str, n: int) -> tf.data.Dataset:
    """Up to ``n`` previous-event requests (:func:`previous_event_request`) from the ``train`` split,
    in file order, unbatched: every training target with at least two history events."""
    corpus = dataset.load_corpus(data_dir)
    categories = tf.constant(corpus[schema.LABEL_CATEGORIES])
    confidences = tf.constant(corpus[schema.LABEL_CONFIDENCES])
    train = dataset.make_dataset(data_dir, schema.SPLIT_TRAIN, 1024).unbatch()
    train = train.filter(lambda e: e[schema.HISTORY_LENGTH] >= 2)
    return train.map(lambda e: previous_event_request(e, categories, confidences)).take(n)


def calibration_requests(cfg: Config, counts: dict[str, int], validation: list) -> tuple[list, str]:
    """The batches to choose the trust on and their source (a key of ``SOURCES``; never empty)."""
    t = cfg.train
    held_out = min(counts.get(schema.SPLIT_TRAIN_REQUESTS, 0) - t.validation_examples, t.calibration_examples)
    if held_out >= MIN_HELD_OUT:
        requests = dataset.requests_after_validation(t.data_dir, t.validation_examples)
        return list(requests.take(held_out).batch(1024)), "requests"
    if t.context_is_previous_event:
        derived = list(derived_requests(t.data_dir, t.calibration_examples).batch(1024))
        if derived:
            return derived, "previous_event"
    if validation:
        return validation, "validation"
    train = dataset.make_dataset(t.data_dir, schema.SPLIT_TRAIN, 1024).unbatch()
    return list(train.take(t.calibration_examples).batch(1024)), "synthetic"


def record(source: str, trust: float, **figures) -> dict:
    """The summary's ``calibration`` entry: where the trust comes from, the trust, the flag."""
    flagged = source in (*SYNTHETIC_SOURCES, "off")
    return {
        "source": source,
        "description": SOURCES[source],
        "trust": float(trust),
        "flagged": flagged,
        "flag": UNCALIBRATED if flagged else None,
        "in_sample": source in ("previous_event", "validation", *SYNTHETIC_SOURCES),
        **figures,
    }


def search_requests(cfg: Config, counts: dict[str, int]) -> tuple[list, str]:
    """The search-trust batches and their source: the logged search requests, else synthetic queries."""
    t = cfg.train
    n = min(counts.get(schema.SPLIT_TRAIN_SEARCH, 0), t.calibration_examples)
    if n > 0:
        logged = dataset.make_dataset(t.data_dir, schema.SPLIT_TRAIN_SEARCH, 1024).unbatch()
        return list(logged.take(n).batch(1024)), "search_requests"
    # the training input's rule, with every target a query
    train = dataset.make_dataset(t.data_dir, schema.SPLIT_TRAIN, 1024, features=schema.with_query(schema.FEATURES))
    train = train.unbatch().filter(lambda e: tf.strings.length(e[schema.CONTEXT_QUERY]) > 0)
    return [one_surface(b, 1.0, t.seed) for b in train.take(t.calibration_examples).batch(1024)], "synthetic_queries"


def calibrate_search(model, cfg: Config, counts: dict[str, int]) -> dict | None:
    """Choose the query block's trust on search requests (see the module docstring); ``None`` without one."""
    layer = getattr(model, "query_layer", None)
    if layer is None:
        return None
    t = cfg.train
    if t.context_source != "synthetic" or t.calibration_examples <= 0:
        source = "not_applicable" if t.context_source != "synthetic" else "off"
        return record(source, float(layer.trust.numpy()), examples=0)
    batches, source = search_requests(cfg, counts)
    trust, recalls = choose_trust(model, batches, t.early_stopping_k, _grid(source), layer=layer)
    return _chosen("search trust", "without a query", "no search log", source, batches, t, trust, recalls)


def calibrate(model, cfg: Config, counts: dict[str, int], validation: list) -> dict | None:
    """Choose the context trust (see the module docstring) and, for a search model, the query's
    (``["search"]``); ``None`` for a baseline."""
    if model.context_layer is None:
        return None
    result = _calibrate_categories(model, cfg, counts, validation)
    search = calibrate_search(model, cfg, counts)
    return result if search is None else {**result, "search": search}


def _calibrate_categories(model, cfg: Config, counts: dict[str, int], validation: list) -> dict:
    t = cfg.train
    trust_now = float(model.context_layer.trust.numpy())
    if t.context_source != "synthetic":
        return record("not_applicable", trust_now, examples=0)
    if t.calibration_examples <= 0:
        return record("off", trust_now, examples=0)
    batches, source = calibration_requests(cfg, counts, validation)
    model.context_layer.trust.assign(1.0)
    before = recall_at_k(model, validation, t.early_stopping_k)
    trust, recalls = choose_trust(model, batches, t.early_stopping_k, _grid(source))
    after = recall_at_k(model, validation, t.early_stopping_k)
    return _chosen(
        "context trust", "without context", "no request log", source, batches, t, trust, recalls,
        val_recall_before=before, val_recall_after=after,
    )  # fmt: skip


def _grid(source: str) -> tuple[float, ...]:
    """The trust grid: up to 1 (as trained) where only synthetic context chose it, else the whole grid."""
    return tuple(g for g in TRUST_GRID if g <= 1.0) if source in SYNTHETIC_SOURCES else TRUST_GRID


def _chosen(
    what: str, without: str, missing: str, source: str, batches: list, t, trust: float, recalls: dict, **figures
) -> dict:
    """The summary entry of a chosen trust (:func:`record`), printed (to stderr when flagged)."""
    examples = sum(int(b[schema.LABEL_ITEM].shape[0]) for b in batches)
    result = record(
        source,
        trust,
        examples=examples,
        recall_by_trust={f"{g:g}": r for g, r in recalls.items()},
        no_context_recall=recalls[0.0],
        **figures,
    )
    flag = f" [{UNCALIBRATED.upper()}: {missing}]" if result["flagged"] else ""
    print(
        f"{what} {trust:g}{flag} (Recall@{t.early_stopping_k} on {examples} {SOURCES[source]}: "
        f"{recalls[1.0]:.4f} as trained, {recalls[0.0]:.4f} {without} -> {recalls[trust]:.4f})",
        file=sys.stderr if result["flagged"] else sys.stdout,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="trained run directory (its final/ weights are updated)")
    parser.add_argument("--data", help="TFRecord directory with train_requests (default: the run's)")
    args = parser.parse_args(argv)
    model, cfg = run_dir.load_trained(args.run, args.data)
    counts = dataset.load_metadata(cfg.train.data_dir)["counts"]
    validation = dataset.validation_requests(cfg.train.data_dir, counts, cfg.train.validation_examples)
    result = calibrate(model, cfg, counts, validation)
    if result is None:
        print("nothing to calibrate: the run is a baseline (model.use_context=false)", file=sys.stderr)
        return 1
    run_dir.save_final(model, args.run)
    run_dir.write_summary(args.run, {**run_dir.read_summary(args.run), "calibration": result})
    print(json.dumps({k: v for k, v in result.items() if k != "recall_by_trust"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
