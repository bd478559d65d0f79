"""Training throughput of both training modes, the contextual model and the baseline, on this machine.

    python -m benchmarks.bench_training [--users 6000] [--steps 60] [--dense_steps 20] [--json PATH]

Generates synthetic data and builds TFRecords with the Beam pipeline (no target cap: both
modes see the same corpus and targets), then times steady-state training steps (after a
warm-up that includes tracing) from the real tf.data pipeline, each variant in its own
process (so each peak RSS is its own): the per-target mode (``train.mode=per_target``, one
target per example, batch 512) and the dense mode (``train.mode=dense``, every position of a
window a target, ``train.sequence_batch_size`` windows per step), same model size and ad
corpus. ``dense`` is the bundled config's dense recipe (``train.dense_loss=mixed``: in-batch plus
``model.sampled_negatives`` corpus ads per step, shared by every target of the step;
``train.dense_no_context_share``: the no-context loss on that share of each step's targets);
``dense_full_softmax`` is dense with the per-target default's loss (full softmax at 10k ads, the
no-context loss on every target); both modes also with logQ-corrected in-batch negatives
(``model.loss=in_batch``) and with mixed negatives (``model.loss=mixed``), dense with the no-context
loss on every target (the same loss as per target). Reports targets/s (labels learned per second; a
dense target is a window position holding a conversion as its label, each conversion exactly once),
examples/s, peak RSS, and the ratios ``dense_targets_per_s`` / ``per_target_targets_per_s`` (the
recipe against the per-target default; ``..._per_cpu_s``: per CPU-second, which other jobs on the
machine disturb less than wall time), dense / per target with the same loss
(``dense_full_softmax_over_...``, ``dense_mixed_over_per_target_mixed_targets_per_s``, ...), dense
mixed / the per-target default (``dense_mixed_over_per_target_targets_per_s``, ``..._per_cpu_s``),
contextual / baseline, and the load average at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import emit

SAME_LOSS = ["train.dense_no_context_share=1"]  # dense with the per-target loss: the no-context loss on every target


class StepTimer:
    """Keras callback: wall time of each training batch after ``warmup`` batches."""

    def __init__(self, warmup: int):
        import tf_keras as keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times: list[float] = []
                self.cpu_times: list[float] = []  # this process's CPU seconds (every thread, tf.data too)
                self.start = self.cpu_start = 0.0

            def on_train_batch_begin(self, batch, logs=None):
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

            def on_train_batch_end(self, batch, logs=None):
                if batch >= warmup:
                    self.times.append(time.perf_counter() - self.start)
                    self.cpu_times.append(time.process_time() - self.cpu_start)

        self.callback = _Timer()


def measure(data_dir: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import tf_keras as keras

    from tfrs_ctx.config import MODE_DENSE, load_config
    from tfrs_ctx.data import dataset
    from tfrs_ctx.training import train
    from tfrs_ctx.training.run_dir import build_model

    cfg = load_config("synthetic", overrides)
    cfg.train.data_dir = data_dir
    meta = dataset.load_metadata(data_dir)
    ds, _ = train.training_dataset(cfg, meta["counts"])
    model = build_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate))
    timer = StepTimer(warmup)
    model.fit(ds, epochs=1, steps_per_epoch=steps + warmup, callbacks=[timer.callback], verbose=0)
    times = sorted(timer.callback.times)
    median = times[len(times) // 2]
    cpu = sorted(timer.callback.cpu_times)[len(times) // 2]
    dense = cfg.train.mode == MODE_DENSE
    batch = cfg.train.sequence_batch_size if dense else cfg.train.batch_size
    per_example = train.targets_per_example(cfg.train.mode, meta)
    return {
        "mode": cfg.train.mode,
        "batch_size": batch,
        "targets_per_example": round(per_example, 2),
        "median_step_s": round(median, 4),
        "examples_per_second": round(batch / median, 1),
        "targets_per_second": round(batch * per_example / median, 1),
        "median_step_cpu_s": round(cpu, 4),
        # robust to other jobs on the machine: labels learned per CPU-second of this process
        "targets_per_cpu_second": round(batch * per_example / cpu, 1),
        "steps_timed": len(times),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def measure_in_child(data_dir: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """:func:`measure` in a fresh process: its peak RSS is this variant's alone."""
    argv = [sys.executable, "-m", "benchmarks.bench_training", "--_measure", data_dir, "--steps", str(steps)]
    argv += ["--warmup", str(warmup), *(f"--set={o}" for o in overrides)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of the per-target mode")
    parser.add_argument("--dense_steps", type=int, default=20, help="timed steps of the dense mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)  # child process: one variant on this data dir
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(args._measure, args.set, args.steps, args.warmup)))
        return 0
    from beam_pipelines import build_training_data
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
        generate(raw, SyntheticConfig(users=args.users), progress=False)
        build_training_data.run(["--input", raw, "--output", data])
        dense_warmup = max(2, args.warmup // 2)
        result = {
            "machine": f"{os.cpu_count()} CPUs",
            "users": args.users,
            "contextual": measure_in_child(data, [], args.steps, args.warmup),
            "baseline": measure_in_child(data, ["model.use_context=false"], args.steps, args.warmup),
            # the dense recipe of the bundled config (train.dense_loss, train.dense_no_context_share)
            "dense": measure_in_child(data, ["train.mode=dense"], args.dense_steps, dense_warmup),
            "dense_baseline": measure_in_child(
                data, ["train.mode=dense", "model.use_context=false"], args.dense_steps, dense_warmup
            ),
            # dense with the per-target default's loss: the full softmax, the no-context loss on every target
            "dense_full_softmax": measure_in_child(
                data, ["train.mode=dense", "model.loss=full_softmax", *SAME_LOSS], args.dense_steps, dense_warmup
            ),
            # the same two modes with logQ-corrected in-batch negatives instead of the full softmax
            "per_target_in_batch": measure_in_child(data, ["model.loss=in_batch"], args.steps, args.warmup),
            "dense_in_batch": measure_in_child(
                data, ["train.mode=dense", "model.loss=in_batch", *SAME_LOSS], args.dense_steps, dense_warmup
            ),
            # and with mixed negatives (in-batch + model.sampled_negatives corpus ads per step, shared)
            "per_target_mixed": measure_in_child(data, ["model.loss=mixed"], args.steps, args.warmup),
            "dense_mixed": measure_in_child(
                data, ["train.mode=dense", "model.loss=mixed", *SAME_LOSS], args.dense_steps, dense_warmup
            ),
        }
    result["ratio_contextual_over_baseline_time"] = round(
        result["contextual"]["median_step_s"] / result["baseline"]["median_step_s"], 3
    )
    result["per_target_targets_per_s"] = result["contextual"]["targets_per_second"]
    result["dense_targets_per_s"] = result["dense"]["targets_per_second"]
    result["dense_over_per_target_targets_per_s"] = round(
        result["dense_targets_per_s"] / result["per_target_targets_per_s"], 2
    )
    result["dense_over_per_target_targets_per_cpu_s"] = round(
        result["dense"]["targets_per_cpu_second"] / result["contextual"]["targets_per_cpu_second"], 2
    )
    result["dense_full_softmax_over_per_target_targets_per_s"] = round(
        result["dense_full_softmax"]["targets_per_second"] / result["per_target_targets_per_s"], 2
    )
    result["dense_full_softmax_over_per_target_targets_per_cpu_s"] = round(
        result["dense_full_softmax"]["targets_per_cpu_second"] / result["contextual"]["targets_per_cpu_second"], 2
    )
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["per_target_in_batch_targets_per_s"] = result["per_target_in_batch"]["targets_per_second"]
    result["dense_in_batch_targets_per_s"] = result["dense_in_batch"]["targets_per_second"]
    result["dense_in_batch_over_per_target_targets_per_s"] = round(
        result["dense_in_batch_targets_per_s"] / result["per_target_targets_per_s"], 2
    )
    # dense mixed (the sampled path auto takes above full_softmax_max_items) vs the per-target default
    result["dense_mixed_over_per_target_targets_per_s"] = round(
        result["dense_mixed"]["targets_per_second"] / result["per_target_targets_per_s"], 2
    )
    result["dense_mixed_over_per_target_targets_per_cpu_s"] = round(
        result["dense_mixed"]["targets_per_cpu_second"] / result["contextual"]["targets_per_cpu_second"], 2
    )
    for loss in ("in_batch", "mixed"):  # dense vs per target with the same loss
        dense, per_target = result[f"dense_{loss}"], result[f"per_target_{loss}"]
        result[f"per_target_{loss}_targets_per_s"] = per_target["targets_per_second"]
        result[f"dense_{loss}_targets_per_s"] = dense["targets_per_second"]
        result[f"dense_{loss}_over_per_target_{loss}_targets_per_s"] = round(
            dense["targets_per_second"] / per_target["targets_per_second"], 2
        )
        result[f"dense_{loss}_over_per_target_{loss}_targets_per_cpu_s"] = round(
            dense["targets_per_cpu_second"] / per_target["targets_per_cpu_second"], 2
        )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
