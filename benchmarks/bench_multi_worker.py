"""Multi-worker training throughput: one process vs two MultiWorkerMirroredStrategy workers on loopback.

    python -m benchmarks.bench_multi_worker [--users 600] [--steps 30] [--epochs 2] [--json PATH]

Synthetic data (``--users``) through the Beam pipeline, then ``tfrs-ctx train`` with the production
model size (``configs/synthetic.yaml``, global batch ``train.batch_size``) for ``--epochs`` of
``--steps``: once as one process (the default strategy) and once as two workers of one cluster on
this machine (``tfrs_ctx.testing.run_training_cluster``). Reports examples/s of the last epoch
(global examples / its wall time, so tracing in epoch 1 is left out), the whole fit's examples/s,
the last validation Recall@K and loss, for each.

Two workers on the same cores compete for them and add a gradient all-reduce per step: on a small
shared machine expect them *slower* than one process. The figure says what the strategy costs here,
not how it scales across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks import emit, scratch_dir


def _summary(run: str, wall_s: float) -> dict[str, Any]:
    with open(os.path.join(run, "train_summary.json")) as f:
        s = json.load(f)
    h = s["history"]
    last = s["steps_per_epoch"] * s["batch_size"] / h["epoch_seconds"][-1]
    return {
        "workers": s["workers"],
        "batch_size": s["batch_size"],
        "steps_per_epoch": s["steps_per_epoch"],
        "epochs_run": s["epochs_run"],
        "last_epoch_examples_per_second": round(last, 1),
        "fit_examples_per_second": s["examples_per_second"],
        "final_val_recall": h["val_recall"][-1],
        "final_loss": round(h["loss"][-1], 4),
        "wall_s_with_startup": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the 2-worker run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from beam_pipelines import build_training_data
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate
    from tfrs_ctx.testing import run_training_cluster

    report: dict[str, Any] = {"users": args.users, "cpu_count": os.cpu_count(), "config": "synthetic"}
    with scratch_dir(args.workdir, "bench_multi_worker_") as work:
        with contextlib.redirect_stdout(sys.stderr):
            raw, data = os.path.join(work, "raw"), os.path.join(work, "data")
            generate(raw, SyntheticConfig(users=args.users, seed=5), progress=False)
            build_training_data.run(["--input", raw, "--output", data], save_main_session=False)
        sets = [f"train.steps_per_epoch={args.steps}", f"train.epochs={args.epochs}", "train.calibration_examples=0"]
        argv_ = ["--config", "synthetic", "--data", data, *(f"--set={o}" for o in sets)]

        one = os.path.join(work, "one")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "tfrs_ctx.training.train", *argv_, "--out", one],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        if proc.returncode:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        report["workers_1"] = _summary(one, time.perf_counter() - start)

        two = os.path.join(work, "two")
        start = time.perf_counter()
        results = run_training_cluster([*argv_, "--out", two], 2, args.timeout)
        for i, r in enumerate(results):
            if r.returncode != 0:
                raise RuntimeError(f"worker {i} rc {r.returncode} killed={r.killed}:\n{r.output[-3000:]}")
        report["workers_2"] = _summary(two, time.perf_counter() - start)
        report["two_over_one_examples_per_second"] = round(
            report["workers_2"]["last_epoch_examples_per_second"]
            / report["workers_1"]["last_epoch_examples_per_second"],
            3,
        )
        report["load_average_1min"] = round(os.getloadavg()[0], 2)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
