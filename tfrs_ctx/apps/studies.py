"""Studies behind the evaluation report's claims, each one command.

``tfrs-ctx study lift-curve --out DIR [--users N] [--strengths 0,0.25,0.5,0.75]``
    For each context strength: generate synthetic data, build TFRecords, train the baseline
    and the contextual model, evaluate; then the lift (contextual / baseline Recall@K) as a
    curve over the strengths (``lift_curve.md``, ``lift_curve.json``, ``lift_curve.png``).

``tfrs-ctx study ablation --out DIR [--users N] [--strength S]``
    One dataset; the contextual model trained under several settings (the default, no
    context dropout, no synthetic context, real request context instead of synthetic),
    each evaluated against the same baseline (``ablation.md``, ``ablation.json``).

``tfrs-ctx study corpus --out DIR [--ads 10000,1000000] [--losses auto,mixed] [--users N]``
    The same users and generator settings at each corpus size (``--ads``); per size and loss
    (``auto``: full softmax up to ``model.full_softmax_max_items`` ads, mixed negatives above)
    the baseline and the contextual model, evaluated; the lift and the context-missing row per
    point, and each point's lift against the first (``corpus.md``, ``report.json``).

``tfrs-ctx study surfaces --out DIR [--users N] [--strengths 0.75,0] [--fusions concat,cross_attention]``
    Per context strength (the related-items ``context_strength`` and the search log's
    ``search_strength`` together): one synthetic dataset with both surfaces; the baseline and one
    search-capable contextual model per fusion; each evaluated on both surfaces' held-out requests
    (related items: ``eval``; search: ``eval_search``), with the context-missing row and paired
    intervals (``surfaces.md``, ``report.json``: ``surfaces.<surface>.<fusion>.lift_recall_at_100``,
    ``.lo``, ``.hi``, ``.missing_over_baseline`` at the first strength; ``by_strength`` for all).

Every run directory, dataset and per-run report stays under ``DIR`` for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# slug (run directory) -> (what it is, overrides relative to the bundled config)
PUBLISHED = [
    "model.context_dropout=0.5",
    "model.context_drop_prob=0.5",
    "model.no_context_loss_weight=0",
    "train.context_noise=0.0",
]
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "default": ("default: synthetic context (noise 0.2), no-context loss, trust chosen on requests", []),
    "uncalibrated": ("the default, trust left at 1 (not chosen on requests)", ["train.calibration_examples=0"]),
    "no_context_loss": ("without the no-context loss", ["model.no_context_loss_weight=0"]),
    "aux1": ("no-context loss weight 1 instead of 0.3", ["model.no_context_loss_weight=1.0"]),
    "published": (
        "the published recipe: high context dropout (0.5, whole-context drop 0.5), no noise, no extra loss",
        [*PUBLISHED, "train.calibration_examples=0"],
    ),
    "published_calibrated": ("the published recipe, trust chosen on requests", PUBLISHED),
    "no_synthetic_context": (
        "no synthetic context (the context layer never sees context in training)",
        ["train.context_source=none"],
    ),
    "real_context": ("real request context instead of synthetic", ["train.context_source=real"]),
}
METRICS = ("recall@10", "recall@50", "recall@100", "recall@200", "ndcg@10")


def prepare_data(
    root: str, users: int, strength: float, max_targets: int, seed: int = 0, ads: int = 10_000, **generator
) -> str:
    """Generate + build (skipped when already there); returns the TFRecord directory.
    ``generator``: more :class:`~tfrs_ctx.sources.synthetic.SyntheticConfig` fields (e.g. ``search_strength``)."""
    from beam_pipelines import build_training_data
    from tfrs_ctx import schema
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    raw, data = os.path.join(root, "raw"), os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, schema.METADATA_FILE)):
        config = SyntheticConfig(users=users, context_strength=strength, seed=seed, items=ads, **generator)
        generate(raw, config, progress=False)
        build_training_data.run(["--input", raw, "--output", data, "--max_targets_per_user", str(max_targets)])
    return data


def train_once(config: str, data: str, run_dir: str, overrides: list[str]) -> str:
    """Train unless ``run_dir`` already holds final weights (studies resume where they stopped)."""
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training import train
    from tfrs_ctx.training.run_dir import SUMMARY_FILE

    if not os.path.exists(os.path.join(run_dir, SUMMARY_FILE)):
        cfg = load_config(config, overrides)
        cfg.train.data_dir = data
        train.train(cfg, run_dir, verbose=2)
    return run_dir


def lift_curve(args: argparse.Namespace) -> dict:
    from tfrs_ctx.evaluation import evaluate

    rows = []
    for strength in [float(s) for s in args.strengths.split(",")]:
        root = os.path.join(args.out, f"strength_{strength:g}")
        print(f"\n=== context strength {strength:g}", flush=True)
        data = prepare_data(root, args.users, strength, args.max_targets_per_user, args.seed)
        base = train_once(args.config, data, os.path.join(root, "baseline"), [*args.set, "model.use_context=false"])
        ctx = train_once(args.config, data, os.path.join(root, "contextual"), list(args.set))
        report = evaluate.evaluate_runs(data, ctx, base, os.path.join(root, "report"), args.bootstrap)
        rows.append(
            {
                "strength": strength,
                "requests": report["requests"],
                "trust": _trust(ctx),
                "lift": report["lift"],
                "rows": report["rows"],
            }
        )
    result = {"users": args.users, "points": rows}
    with open(os.path.join(args.out, "lift_curve.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# Lift over context strength ({args.users} synthetic users per point)",
        "",
        "| strength | trust | baseline R@100 | contextual R@100 | no-context R@100 | lift R@10 | lift R@100 "
        "| lift R@200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        r, lift = p["rows"], p["lift"]
        cells = [f"{r[row]['recall@100']['mean']:.4f}" for row in ("baseline", "contextual", "contextual_no_context")]
        lifts = [
            f"{lift[m]['lift']:.2f}x [{lift[m]['lo']:.2f}, {lift[m]['hi']:.2f}]"
            for m in ("recall@10", "recall@100", "recall@200")
        ]
        lines.append(f"| {p['strength']:g} | {_fmt(p['trust'])} | " + " | ".join(cells + lifts) + " |")
    _write(args.out, "lift_curve.md", lines)
    _plot_curve(rows, os.path.join(args.out, "lift_curve.png"))
    return result


def ablation(args: argparse.Namespace) -> dict:
    from tfrs_ctx.evaluation import evaluate
    from tfrs_ctx.training.run_dir import read_summary

    root = os.path.join(args.out, f"strength_{args.strength:g}")
    data = prepare_data(root, args.users, args.strength, args.max_targets_per_user, args.seed)
    base = train_once(args.config, data, os.path.join(root, "baseline"), [*args.set, "model.use_context=false"])
    results = {}
    for slug, (name, overrides) in ABLATIONS.items():
        run_dir = os.path.join(root, slug)
        chosen = not args.only or slug in args.only.split(",")
        if not chosen and not read_summary(run_dir):
            continue  # not asked for and not trained before
        print(f"\n=== ablation: {name}", flush=True)
        run = train_once(args.config, data, run_dir, [*args.set, *overrides])
        report = evaluate.evaluate_runs(data, run, base, os.path.join(root, f"report_{slug}"), args.bootstrap)
        results[slug] = {
            "setting": name,
            "overrides": overrides,
            "trust": _trust(run),
            "rows": report["rows"],
            "lift": report["lift"],
        }
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"users": args.users, "strength": args.strength, "settings": results}, f, indent=2)
    lines = [
        f"# Context dropout and synthetic context ({args.users} users, context strength {args.strength:g})",
        "",
        "| setting | trust | R@100 with context | R@100 context missing | baseline R@100 | lift R@100 "
        "| no-context / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rows = r["rows"]
        with_ctx, missing, base_r = (
            rows[k]["recall@100"]["mean"] for k in ("contextual", "contextual_no_context", "baseline")
        )
        lift = r["lift"]["recall@100"]
        lines.append(
            f"| {r['setting']} | {_fmt(r['trust'])} | {with_ctx:.4f} | {missing:.4f} | {base_r:.4f} "
            f"| {lift['lift']:.2f}x "
            f"[{lift['lo']:.2f}, {lift['hi']:.2f}] | {missing / max(base_r, 1e-12):.3f} |"
        )
    _write(args.out, "ablation.md", lines)
    return results


LIFT_TOLERANCE, MISSING_TOLERANCE = 0.15, 0.05  # issue 14: lift within 15% of the reference, missing within 5%


def corpus(args: argparse.Namespace) -> dict:
    """Lift and the context-missing row over corpus sizes (and losses), on the same users."""
    from tfrs_ctx.config import load_config
    from tfrs_ctx.evaluation import evaluate
    from tfrs_ctx.models.two_tower import resolve_loss
    from tfrs_ctx.training.run_dir import read_summary

    points: list[dict] = []
    for ads in [int(a) for a in args.ads.split(",")]:
        root = os.path.join(args.out, f"ads_{ads}")
        losses: list[str] = []
        for name in args.losses.split(","):  # auto resolved per size; a size's duplicates trained once
            loss = resolve_loss(load_config(args.config, [*args.set, f"model.loss={name}"]).model, ads)
            losses += [] if loss in losses else [loss]
        print(f"\n=== {ads} ads: {', '.join(losses)}", flush=True)
        data = prepare_data(root, args.users, args.strength, args.max_targets_per_user, args.seed, ads)
        for loss in losses:
            sets = [*args.set, f"model.loss={loss}"]
            base = train_once(
                args.config, data, os.path.join(root, f"baseline_{loss}"), [*sets, "model.use_context=false"]
            )
            ctx = train_once(args.config, data, os.path.join(root, f"contextual_{loss}"), sets)
            report = evaluate.evaluate_runs(data, ctx, base, os.path.join(root, f"report_{loss}"), args.bootstrap)
            points.append(corpus_point(ads, loss, report, read_summary(base), read_summary(ctx)))
    return write_corpus(points, args.out, args.users, args.strength, args.set)


def write_corpus(points: list[dict], out: str, users: int, strength: float, overrides: list[str]) -> dict:
    """Each point's lift against the first's; ``report.json`` and ``corpus.md`` in ``out``."""
    reference = points[0]
    for p in points:
        p["lift_vs_reference"] = _ratio_of_lifts(p["lift"], reference["lift"])
        p["lift_within_15pct"] = abs(p["lift_vs_reference"]["ratio"] - 1) <= LIFT_TOLERANCE
    result = {
        "users": users,
        "strength": strength,
        "metric": "recall@100",
        "reference": {"ads": reference["ads"], "loss": reference["loss"]},
        "overrides": overrides,
        "points": points,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    _write(out, "corpus.md", _corpus_lines(result))
    return result


def corpus_point(ads: int, loss: str, report: dict, base: dict, ctx: dict) -> dict:
    """One size's figures from its evaluation report and both runs' training summaries."""
    rows = {row: report["rows"][row]["recall@100"] for row in ("baseline", "contextual", "contextual_no_context")}
    missing = rows["contextual_no_context"]["mean"] / max(rows["baseline"]["mean"], 1e-12)
    return {
        "ads": ads,
        "loss": loss,
        "requests": report["requests"],
        "trust": report["context_trust"],
        "recall@100": rows,
        "lift": report["lift"]["recall@100"],
        "missing_over_baseline": missing,
        "missing_within_5pct": abs(missing - 1) <= MISSING_TOLERANCE,
        "training": {
            name: {k: s.get(k) for k in ("loss", "mode", "epochs_run", "steps_per_epoch", "batch_size", "seconds")}
            for name, s in (("baseline", base), ("contextual", ctx))
        },
    }


def _ratio_of_lifts(lift: dict, reference: dict) -> dict:
    """lift / reference lift; the interval combines the two (independent data sets) paired bootstrap
    intervals on the log scale, each read as normal: an approximation, stated in the report."""
    import math

    def log_se(x: dict) -> float:
        return (math.log(max(x["hi"], 1e-12)) - math.log(max(x["lo"], 1e-12))) / (2 * 1.96)

    if lift is reference:
        return {"ratio": 1.0, "lo": 1.0, "hi": 1.0}
    ratio = lift["lift"] / max(reference["lift"], 1e-12)
    half = 1.96 * math.hypot(log_se(lift), log_se(reference))
    return {"ratio": ratio, "lo": ratio * math.exp(-half), "hi": ratio * math.exp(half)}


def _corpus_lines(result: dict) -> list[str]:
    ref = result["reference"]
    lines = [
        f"# Contextual lift over corpus size ({result['users']} synthetic users, context strength "
        f"{result['strength']:g}, Recall@100)",
        "",
        "| ads | loss | requests | trust | baseline | contextual | context missing | lift | "
        f"lift / {ref['ads']:,}-ad lift | missing / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        r, lift, vs = p["recall@100"], p["lift"], p["lift_vs_reference"]
        cells = [f"{r[k]['mean']:.4f} [{r[k]['lo']:.4f}, {r[k]['hi']:.4f}]" for k in r]
        lines.append(
            f"| {p['ads']:,} | {p['loss']} | {p['requests']} | {_fmt(p['trust'])} | "
            + " | ".join(cells)
            + f" | {lift['lift']:.2f}x [{lift['lo']:.2f}, {lift['hi']:.2f}] | {vs['ratio']:.3f} "
            f"[{vs['lo']:.3f}, {vs['hi']:.3f}] | {p['missing_over_baseline']:.3f} |"
        )
    lines += [
        "",
        f"Intervals: 95% bootstrap; lift paired (the same resamples for both models); lift / reference "
        f"combines the two lifts' intervals on the log scale (independent data sets, an approximation). "
        f"Reference: {ref['ads']:,} ads, {ref['loss']}. Targets: lift within "
        f"{LIFT_TOLERANCE:.0%} of the reference, context missing within {MISSING_TOLERANCE:.0%} of the baseline.",
    ]
    return lines


SURFACES = ("related_items", "search")


def surfaces(args: argparse.Namespace) -> dict:
    """Both surfaces x each fusion x each strength: lift, context missing, trust (see the module docstring)."""
    from tfrs_ctx.evaluation import evaluate

    fusions = args.fusions.split(",")
    by_strength: dict[str, dict] = {}
    for strength in [float(x) for x in args.strengths.split(",")]:
        root = os.path.join(args.out, f"strength_{strength:g}")
        print(f"\n=== context and search strength {strength:g}", flush=True)
        data = prepare_data(root, args.users, strength, args.max_targets_per_user, args.seed, search_strength=strength)
        base = train_once(args.config, data, os.path.join(root, "baseline"), [*args.set, "model.use_context=false"])
        point: dict[str, dict] = {name: {} for name in SURFACES}
        for fusion in fusions:
            sets = [*args.set, "model.search_query=true", f"model.fusion={fusion}"]
            ctx = train_once(args.config, data, os.path.join(root, fusion), sets)
            report = evaluate.evaluate_runs(data, ctx, base, os.path.join(root, f"report_{fusion}"), args.bootstrap)
            for name, figures in report.get("surfaces", {}).items():
                point[name][fusion] = surface_point(figures, report, name)
        by_strength[f"{strength:g}"] = point
    first = next(iter(by_strength.values()))
    result = {"users": args.users, "overrides": args.set, "surfaces": first, "by_strength": by_strength}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    _write(args.out, "surfaces.md", _surface_lines(result))
    return result


def surface_point(figures: dict, report: dict, surface: str) -> dict:
    """One surface's figures of one contextual model (an evaluation report's ``surfaces`` entry)."""
    lift, missing = figures["lift"], figures.get("missing_over_baseline", {})
    trust = figures.get("trust", report.get("context_trust"))
    rows = {row: figures["rows"][row]["recall@100"] for row in ("baseline", "contextual", "contextual_no_context")}
    return {
        "requests": figures["requests"],
        "trust": trust,
        "lift_recall_at_100": lift["recall@100"]["lift"],
        "lo": lift["recall@100"]["lo"],
        "hi": lift["recall@100"]["hi"],
        "missing_over_baseline": missing.get("recall@100", {}).get("lift"),
        "missing_lo": missing.get("recall@100", {}).get("lo"),
        "missing_hi": missing.get("recall@100", {}).get("hi"),
        "lift": lift,
        "recall@100": rows,
    }


def _surface_lines(result: dict) -> list[str]:
    lines = [
        f"# Context surfaces ({result['users']} synthetic users; related items: the subject item's categories, "
        "search: the query text)",
        "",
        "| strength | surface | fusion | requests | trust | baseline R@100 | lift R@10 | lift R@100 | lift R@200 "
        "| context missing / baseline (R@100) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strength, point in result["by_strength"].items():
        for surface, fusions in point.items():
            for fusion, p in fusions.items():
                lifts = [
                    f"{p['lift'][m]['lift']:.2f}x [{p['lift'][m]['lo']:.2f}, {p['lift'][m]['hi']:.2f}]"
                    for m in ("recall@10", "recall@100", "recall@200")
                ]
                missing = "-" if p["missing_over_baseline"] is None else (
                    f"{p['missing_over_baseline']:.3f}x [{p['missing_lo']:.3f}, {p['missing_hi']:.3f}]"
                )  # fmt: skip
                lines.append(
                    f"| {strength} | {surface} | {fusion} | {p['requests']} | {_fmt(p['trust'])} | "
                    f"{p['recall@100']['baseline']['mean']:.4f} | " + " | ".join(lifts) + f" | {missing} |"
                )
    return lines


def _trust(run_dir: str) -> float | None:
    """The calibrated context trust of a run (``None``: not calibrated)."""
    from tfrs_ctx.training.run_dir import read_summary

    calibration = read_summary(run_dir).get("calibration")
    return calibration["trust"] if calibration else None


def _fmt(trust: float | None) -> str:
    return "-" if trust is None else f"{trust:.2f}"


def _write(out: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def _plot_curve(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["strength"] for p in points]
    for metric in ("recall@10", "recall@100", "recall@200"):
        ys = [p["lift"][metric]["lift"] for p in points]
        err = [
            [y - p["lift"][metric]["lo"] for y, p in zip(ys, points, strict=True)],
            [p["lift"][metric]["hi"] - y for y, p in zip(ys, points, strict=True)],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=metric)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set(xlabel="context strength", ylabel="lift (contextual / baseline)", title="Lift over context strength")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx study", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    for name in ("lift-curve", "ablation", "corpus", "surfaces"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--users", type=int, default=10_000)
        p.add_argument("--max-targets-per-user", type=int, default=5)
        p.add_argument("--config", default="synthetic")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        p.add_argument("--bootstrap", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0)
    sub.choices["lift-curve"].add_argument("--strengths", default="0,0.25,0.5,0.75")
    sub.choices["surfaces"].add_argument(
        "--strengths", default="0.75,0", help="context and search strengths (the first: report.json's surfaces)"
    )
    sub.choices["surfaces"].add_argument("--fusions", default="concat,cross_attention")
    for name in ("ablation", "corpus"):
        sub.choices[name].add_argument("--strength", type=float, default=0.75)
    sub.choices["corpus"].add_argument(
        "--ads", default="10000,1000000", help="corpus sizes; the first is the reference"
    )
    sub.choices["corpus"].add_argument(
        "--losses", default="auto", help="comma-separated model.loss values trained at every size (auto: by size)"
    )
    sub.choices["ablation"].add_argument(
        "--only", help=f"comma-separated settings to train (default: all): {', '.join(ABLATIONS)}"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    {"lift-curve": lift_curve, "ablation": ablation, "corpus": corpus, "surfaces": surfaces}[args.study](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
