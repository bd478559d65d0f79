"""Running a pipeline: runner selection, the Dask cluster, the command-line wrapper.

Runner selection is the one place that touches Beam internals:

* **DirectRunner** (the default): :func:`make_runner` builds the portable ``FnApiRunner`` the
  DirectRunner itself falls back to (in-process, or ``--direct_running_mode=multi_processing``
  worker processes), because Beam 2.77's DirectRunner first tries the Prism runner, which
  downloads a binary at run time. It uses ``fn_runner.FnApiRunner``,
  ``fn_runner.ExtendedProvisionInfo``, ``JobServiceHandle.encode_pipeline_options`` and the
  provision proto, the way the DirectRunner wires them.
* **DaskRunner** (``--runner DaskRunner``; Beam knows it only by its full path
  ``apache_beam.runners.dask.dask_runner.DaskRunner``): :func:`run_pipeline` connects it to
  ``--dask_client_address tcp://...`` (a running scheduler), or else starts a
  ``dask.distributed.LocalCluster`` of ``--dask_workers`` processes (``processes=True``, one
  thread each: the runner's per-transform receiver lists are shared by threads of one process,
  so threaded workers duplicate outputs; dashboard off) and stops it afterwards. It relies on
  ``DaskOptions``' destinations (``address``, ``npartitions``: set here when the flags are
  absent; ``--dask_npartitions`` defaults to 2 per worker), and on ``DaskRunnerResult.client``,
  the ``distributed.Client`` the runner opens and never closes (closed here). The pipelines
  themselves only use what that runner translates (:mod:`beam_pipelines.portable`).
* Every other ``--runner`` (Dataflow, Flink, Spark, ...) is left to Beam by name.

Counts never come from ``result.metrics()`` (the DaskRunner raises ``NotImplementedError``):
the pipelines compute them as data and write them themselves.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

NAMESPACE = "tfrs_ctx"
DIRECT_RUNNERS = ("directrunner", "direct", "switchingdirectrunner")
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DASK_RUNNERS = ("daskrunner", "dask", DASK_RUNNER.lower())
PARTITIONS_PER_WORKER = 2
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
    """``--output`` and ``--dask_workers``, defined once for both pipelines (Beam parses all flags together)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument("--output", help="directory to write: the training data, or the feature-store directory")
        parser.add_argument(
            "--dask_workers", type=int, default=2, help="DaskRunner, no --dask_client_address: local worker processes"
        )


def is_dask(options: PipelineOptions) -> bool:
    """Whether ``--runner`` names the DaskRunner (short or full name)."""
    return (options.view_as(StandardOptions).runner or "").lower() in DASK_RUNNERS


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


def quiet_dask_logs() -> None:
    """``distributed`` logs every worker start and stop at INFO; keep its warnings only."""
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def dask_scheduler(options: PipelineOptions) -> Iterator[str]:
    """The scheduler address to run on: ``--dask_client_address``, or a local cluster started (and stopped) here.

    Also sets ``--dask_npartitions`` (when neither it nor ``--dask_partition_size`` is given) to
    ``PARTITIONS_PER_WORKER`` per worker, and the runner option to the DaskRunner's full path.
    """
    from apache_beam.runners.dask.dask_runner import DaskOptions
    from distributed import Client, LocalCluster

    quiet_dask_logs()
    options.view_as(StandardOptions).runner = DASK_RUNNER
    dask = options.view_as(DaskOptions)
    workers = options.view_as(OutputOptions).dask_workers
    cluster = None
    if not dask.address:
        if workers < 1:
            raise ValueError("--dask_workers must be >= 1")
        cluster = LocalCluster(
            n_workers=workers,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        dask.address = cluster.scheduler_address
    try:
        if not dask.npartitions and not dask.partition_size:
            if cluster is None:
                with Client(dask.address, timeout=dask.timeout or 30) as client:
                    workers = len(client.scheduler_info().get("workers", {})) or workers
            dask.npartitions = PARTITIONS_PER_WORKER * workers
        yield dask.address
    finally:
        if cluster is not None:
            cluster.close()


def bounded_dask_runner() -> Any:
    """Beam's ``DaskRunner`` whose Flatten keeps at most ``--dask_npartitions`` partitions.

    The stock translation of Flatten concatenates its inputs' partitions and GroupByKey keeps
    its input's, so every join or sink (a Flatten before a GroupByKey) adds partitions: the
    training-data pipeline reached 541 partitions and a 28,000-task graph on 4-partition
    inputs. This swaps the Flatten entry of ``transform_evaluator.TRANSLATIONS`` (the table
    the runner's visitor reads while it translates) for one that repartitions the
    concatenation, for the duration of one ``run_pipeline``.
    """
    from apache_beam.runners.dask import transform_evaluator as te
    from apache_beam.runners.dask.dask_runner import DaskRunner
    from apache_beam.runners.dask.overrides import _Flatten

    class BoundedFlatten(te.Flatten):
        def apply(self, input_bag: Any, side_inputs: Any = None) -> Any:
            bag = super().apply(input_bag, side_inputs)
            limit = self.bag_kwargs.get("npartitions")
            return bag.repartition(npartitions=limit) if limit and bag.npartitions > limit else bag

    class BoundedDaskRunner(DaskRunner):
        def run_pipeline(self, pipeline: Any, options: Any) -> Any:
            stock = te.TRANSLATIONS[_Flatten]
            te.TRANSLATIONS[_Flatten] = BoundedFlatten
            try:
                return super().run_pipeline(pipeline, options)
            finally:
                te.TRANSLATIONS[_Flatten] = stock

    return BoundedDaskRunner()


def run_pipeline(options: PipelineOptions, build: Callable[[Any], Any]) -> None:
    """Build the pipeline with ``build(pipeline)`` and run it to completion on the runner ``options`` name."""
    import apache_beam as beam

    if not is_dask(options):
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        build(pipeline)
        pipeline.run().wait_until_finish()
        return
    with dask_scheduler(options):
        pipeline = beam.Pipeline(runner=bounded_dask_runner(), options=options)
        build(pipeline)
        result = pipeline.run()
        try:
            result.wait_until_finish()
        finally:
            result.client.close()


def cli_main(run: Callable[[list[str]], Any], doc: str | None, argv: Sequence[str] | None) -> int:
    """A pipeline's CLI: ``--help`` prints its module docstring, anything else goes to ``run(argv)``."""
    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    run(argv)
    return 0
