"""``tfrs-ctx``: one entry point, one subcommand per stage of the data flow.

Each subcommand lives in its own module with a ``main(argv)``; it is imported only when
run, so ``tfrs-ctx generate`` never pays for importing TensorFlow.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("tfrs_ctx.sources.synthetic", "write Pinterest-shaped synthetic raw tables"),
    "import-movielens": ("tfrs_ctx.sources.movielens", "convert MovieLens-100k into the raw tables"),
    "validate": ("tfrs_ctx.data.validation", "validate every raw table of a directory"),
    "build-data": ("beam_pipelines.build_training_data", "Beam: raw tables -> TFRecords + vocabularies"),
    "train": ("tfrs_ctx.training.train", "train the contextual sequential two-tower model"),
    "calibrate": ("tfrs_ctx.training.calibrate", "re-choose a trained run's context trust on real request context"),
    "evaluate": ("tfrs_ctx.evaluation.evaluate", "full-ranking evaluation report on held-out requests"),
    "export": ("tfrs_ctx.export", "hybrid export: encoder, context_head, full SavedModels"),
    "study": ("tfrs_ctx.apps.studies", "lift over context strength or corpus size; context ablations"),
    "daily": ("tfrs_ctx.apps.daily", "the daily job: Beam-encode users with new activity, materialize Feast"),
    "recommend": ("tfrs_ctx.apps.recommend", "candidate ads for one request via Feast + gRPC Predict"),
    "demo": ("tfrs_ctx.apps.demo", "the end-to-end demo on the embedded synthetic default"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: tfrs-ctx <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tfrs-ctx: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
