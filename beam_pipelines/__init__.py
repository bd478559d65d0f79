"""Apache Beam pipelines: training data (TFRecords) and offline user encoding."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import tfrs_ctx  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)


def cli_main(run: Callable[[list[str]], Any], doc: str | None, argv: Sequence[str] | None) -> int:
    """A pipeline's CLI: ``--help`` prints its module docstring, anything else goes to ``run(argv)``."""
    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    run(argv)
    return 0
