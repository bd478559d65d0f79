"""Context trust: ``tfrs-ctx calibrate --run RUN_DIR [--data DIR]``.

The contextual model learns what context *means* from synthetic context (the label's own
categories, dropped and swapped in training). How far the context of a real request should
be *believed* is a different question, and only real requests can answer it. So after
training, the context layer's ``trust`` (the scale of its output; 1 as trained, 0 = no
context) is set to the value on a fixed grid with the highest Recall@K on logged
``train_requests`` with their real context, everything else frozen. A direct search of the
metric, not a loss: a model trained with a softmax over synthetic context can be
over-confident by the loss and still rank better with more trust.

Which requests: those beyond the first ``train.validation_examples`` (used for early
stopping), at most ``train.calibration_examples``; where the log is too small for that
(MovieLens-100k), the validation examples themselves, reported as in-sample.

Training calls :func:`calibrate` itself; the command re-chooses the trust of a trained run,
e.g. on a fresher request log, without retraining, and updates ``final/`` and the summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from tfrs_ctx import schema
from tfrs_ctx.config import Config
from tfrs_ctx.data import dataset
from tfrs_ctx.evaluation.metrics import recall_at_k
from tfrs_ctx.training import run_dir

# 1 = as trained. Above 1: real context is more reliable than the dropped, swapped synthetic
# context the model hedged against in training.
TRUST_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
MIN_HELD_OUT = 1000  # fewer held-out requests than this: choose on the validation examples


def choose_trust(
    model, batches: list, k: int, grid: tuple[float, ...] = TRUST_GRID
) -> tuple[float, dict[float, float]]:
    """Set the context trust to the grid value with the highest Recall@``k`` on ``batches``
    (ties: the lower trust); returns it and the recall at every grid value."""
    if model.context_layer is None:
        raise ValueError("choose_trust needs the contextual model (model.use_context=true)")
    recalls = {}
    for trust in grid:
        model.context_layer.trust.assign(trust)
        recalls[trust] = recall_at_k(model, batches, k)
    best = max(grid, key=lambda trust: (recalls[trust], -trust))
    model.context_layer.trust.assign(best)
    return best, recalls


def calibration_requests(cfg: Config, counts: dict[str, int], validation: list) -> tuple[list, str] | None:
    """The batches to choose the trust on and where they come from (``None``: no requests)."""
    t = cfg.train
    held_out = min(counts.get(schema.SPLIT_TRAIN_REQUESTS, 0) - t.validation_examples, t.calibration_examples)
    if held_out >= MIN_HELD_OUT:
        requests = dataset.requests_after_validation(t.data_dir, t.validation_examples)
        return list(requests.take(held_out).batch(1024)), "held-out train_requests"
    if validation:
        return validation, "validation examples (in-sample: too few train_requests to hold more out)"
    return None


def calibrate(model, cfg: Config, counts: dict[str, int], validation: list) -> dict | None:
    """Choose the context trust on real request context (``None`` when off or not applicable)."""
    t = cfg.train
    if not cfg.model.use_context or t.calibration_examples <= 0 or t.context_source != "synthetic":
        return None
    requests = calibration_requests(cfg, counts, validation)
    if requests is None:
        print("context calibration skipped: the data has no train_requests")
        return None
    batches, source = requests
    model.context_layer.trust.assign(1.0)
    before = recall_at_k(model, validation, t.early_stopping_k)
    trust, recalls = choose_trust(model, batches, t.early_stopping_k)
    after = recall_at_k(model, validation, t.early_stopping_k)
    examples = sum(int(b[schema.LABEL_ITEM].shape[0]) for b in batches)
    print(
        f"context trust {trust:g} (Recall@{t.early_stopping_k} on {examples} {source}: "
        f"{recalls[1.0]:.4f} as trained -> {recalls[trust]:.4f})"
    )
    return {
        "trust": trust,
        "examples": examples,
        "source": source,
        "recall_by_trust": {f"{g:g}": r for g, r in recalls.items()},
        "val_recall_before": before,
        "val_recall_after": after,
    }


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
        print("nothing to calibrate: a baseline, a real-context run, or calibration switched off", file=sys.stderr)
        return 1
    run_dir.save_final(model, args.run)
    run_dir.write_summary(args.run, {**run_dir.read_summary(args.run), "calibration": result})
    print(json.dumps({k: v for k, v in result.items() if k != "recall_by_trust"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
