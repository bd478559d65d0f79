"""Training throughput (examples/s) of the contextual model and the baseline on this machine.

    python -m benchmarks.bench_training [--users 6000] [--steps 60] [--json PATH]

Generates synthetic data, builds TFRecords with the Beam pipeline, then times steady-state
training steps (after a warm-up that includes tracing) of each variant in one process, from
the real tf.data pipeline. Reports examples/s and the contextual/baseline ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks import emit


class StepTimer:
    """Keras callback: wall time of each training batch after ``warmup`` batches."""

    def __init__(self, warmup: int):
        import tf_keras as keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times: list[float] = []
                self.start = 0.0

            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                if batch >= warmup:
                    self.times.append(time.perf_counter() - self.start)

        self.callback = _Timer()


def measure(data_dir: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import tf_keras as keras

    from tfrs_ctx.config import load_config
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
    return {
        "batch_size": cfg.train.batch_size,
        "median_step_s": round(median, 4),
        "examples_per_second": round(cfg.train.batch_size / median, 1),
        "steps_timed": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from beam_pipelines import build_training_data
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
        generate(raw, SyntheticConfig(users=args.users), progress=False)
        build_training_data.run(["--input", raw, "--output", data, "--max_targets_per_user", "5"])
        result = {
            "machine": f"{os.cpu_count()} CPUs",
            "contextual": measure(data, [], args.steps, args.warmup),
            "baseline": measure(data, ["model.use_context=false"], args.steps, args.warmup),
        }
    result["ratio_contextual_over_baseline_time"] = round(
        result["contextual"]["median_step_s"] / result["baseline"]["median_step_s"], 3
    )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
