"""Running a pipeline: runner selection, the command-line wrapper, reading the run's counters.

Runner selection is the one place that touches Beam internals: for the DirectRunner (the
default) :func:`make_runner` builds the portable ``FnApiRunner`` the DirectRunner itself falls
back to (in-process, or ``--direct_running_mode=multi_processing`` worker processes), because
Beam 2.77's DirectRunner first tries the Prism runner, which downloads a binary at run time.
It uses ``fn_runner.FnApiRunner``, ``fn_runner.ExtendedProvisionInfo``,
``JobServiceHandle.encode_pipeline_options`` and the provision proto, the way the DirectRunner
wires them; every other ``--runner`` (Dataflow, Flink, Spark, ...) is left to Beam by name.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

NAMESPACE = "tfrs_ctx"
DIRECT_RUNNERS = ("directrunner", "direct", "switchingdirectrunner")
RESOURCE_NOISE = "Resource module is not available"  # RunInference, once per batch, without torch


class _BeamResourceNoise(logging.Filter):
    """Drops RunInference's per-batch "Resource module is not available" warning, and nothing else.

    Beam 2.77's ``apache_beam.ml.inference.base`` imports ``resource`` in the same ``try`` as its
    torch-based ``ModelManager``: without torch it sets ``resource = None`` and, on every batch,
    warns on the root logger that memory usage cannot be fetched. The resource module is there;
    the warning says nothing about this pipeline.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not (str(record.msg).startswith(RESOURCE_NOISE) and path.endswith("apache_beam/ml/inference/base.py"))


def silence_beam_resource_noise() -> None:
    """Install :class:`_BeamResourceNoise` on the root logger (where Beam logs it), once per process."""
    root = logging.getLogger()
    if not any(isinstance(f, _BeamResourceNoise) for f in root.filters):
        root.addFilter(_BeamResourceNoise())


class OutputOptions(PipelineOptions):
    """``--output``, defined once for both pipelines (Beam parses every options class's flags together)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument("--output", help="directory to write: the training data, or the feature-store directory")


def make_runner(options: PipelineOptions) -> Any:
    """The runner to use: for the DirectRunner (the default), its FnApiRunner directly.

    Beam's DirectRunner first tries the Prism runner, which downloads a binary; this uses
    the same in-process / multi-process FnApiRunner the DirectRunner would fall back to.
    """
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or "DirectRunner"
    if standard.runner.lower() not in DIRECT_RUNNERS:
        return None  # Beam creates it by name
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory" and direct.direct_num_workers not in (None, 1):
        direct.direct_num_workers = 1  # in_memory has one worker; avoids Beam's warning
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def counters(result: Any) -> dict[str, int]:
    """The pipeline's ``tfrs_ctx`` counters, summed over steps."""
    totals: Counter = Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value or 0)
    return dict(totals)


def cli_main(run: Callable[[list[str]], Any], doc: str | None, argv: Sequence[str] | None) -> int:
    """A pipeline's CLI: ``--help`` prints its module docstring, anything else goes to ``run(argv)``."""
    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    run(argv)
    return 0
