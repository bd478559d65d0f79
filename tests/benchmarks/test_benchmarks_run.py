"""benchmarks.run: the sizing arithmetic and the Markdown tables, on hand-made results (no bench runs)."""

from __future__ import annotations

import sys

import pytest

from benchmarks import run


def _bench(result: dict) -> dict:
    return {"ok": True, "wall_s": 10.0, "result": result}


@pytest.fixture()
def results() -> dict:
    """A results.json as benchmarks.run writes it, with round numbers."""
    lat = {"p50_ms": 1.0, "p99_ms": 2.0}
    return {
        "mode": "quick",
        "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "cpu_affinity": 2, "ram_bytes": 8 * 1024**3},
        "store": {"bytes_per_user": 356},
        "benches": {
            "generator": _bench({"users": 1000, "events": 30000, "events_per_second_wall": 1e6, "peak_rss_gib": 0.5}),
            "beam": _bench(
                {
                    "conversions": 100_000,
                    "runs": [
                        {
                            "mode": "in_memory",
                            "workers": 1,
                            "events_per_second": 20_000,
                            "events_per_second_per_worker": 20_000,
                            "events_per_cpu_second": 25_000,
                        },
                        {
                            "mode": "multi_processing",
                            "workers": 2,
                            "events_per_second": 15_000,
                            "events_per_second_per_worker": 7_500,
                            "events_per_cpu_second": 12_500,
                        },
                    ],
                }
            ),
            "training": _bench(
                {
                    "contextual": {"batch_size": 512, "examples_per_second": 1500.0},
                    "baseline": {"batch_size": 512, "examples_per_second": 2000.0},
                    "dense": {"batch_size": 64},
                    "dense_targets_per_s": 6000.0,
                    "per_target_targets_per_s": 1500.0,
                    "dense_in_batch_targets_per_s": 18000.0,
                }
            ),
            "multi_worker": _bench(
                {
                    "workers_1": {"last_epoch_examples_per_second": 1000.0, "final_val_recall": 0.5},
                    "workers_2": {"last_epoch_examples_per_second": 400.0, "final_val_recall": 0.48},
                    "two_over_one_examples_per_second": 0.4,
                }
            ),
            "redis": _bench(
                {
                    "users": 1_000_000,
                    "materialize": {"rows": 1_000_000, "seconds": 200.0, "rows_per_second": 5000},
                    "memory": {"bytes_per_user": 500.0, "bench_process_peak_rss_mib": 4096.0},
                    "online_read": {"one_user": lat, "batch_100_users": lat},
                    "delta": {"rows": 10_000, "seconds": 20.0, "rows_per_second": 500},
                    "delta_pushed": {"rows": 10_000, "seconds": 2.0, "rows_per_second": 5000},
                }
            ),
            "feast": _bench(
                {
                    "encoder": {
                        "handler": [
                            {"xla": False, "users_per_second": 3000, "users_per_cpu_second": 4000},
                            {"xla": True, "users_per_second": 4500, "users_per_cpu_second": 5000},
                        ],
                        "pipeline_in_memory": [
                            {"xla": False, "users": 20_000, "users_per_second_per_worker": 1000},
                            {"xla": True, "users_per_second_per_worker": 1100},
                        ],
                    },
                    "materialize": {
                        "sqlite": {"user_sequence_encoding": {"rows_per_second": 5000}},
                        "redis": {"user_sequence_encoding": {"rows_per_second": 4000}},
                    },
                    "online_read": {
                        "sqlite": {"one_user": {"p50_ms": 0.2, "p99_ms": 0.4}, "batch_100_users": lat},
                        "redis": {"one_user": {"p50_ms": 0.3, "p99_ms": 0.6}, "batch_100_users": lat},
                    },
                }
            ),
            "serving": _bench(
                {
                    "cpus": 2,
                    "echo": {"p50_ms": 0.4, "p99_ms": 0.5},
                    "predict": {"p50_ms": 0.8, "p99_ms": 1.5},
                    "model_compute": {"p50_ms": 0.2, "p99_ms": 0.3},
                    "predict_over_echo_p50": 2.0,
                    "predict_over_echo_p99": 3.0,
                    "throughput": [
                        {"server_batching": False, "threads": 8, "requests_per_s": 1600.0},
                        {"server_batching": True, "threads": 8, "requests_per_s": 1200.0},
                    ],
                }
            ),
            "head_vs_full": _bench(
                {
                    "corpus": 10_000,
                    "compute_context_head": {"p50_ms": 0.2, "p99_ms": 0.4},
                    "compute_full": {"p50_ms": 2.0, "p99_ms": 3.0},
                    "predict_context_head": {"p50_ms": 0.7, "p99_ms": 1.0},
                    "predict_full": {"p50_ms": 2.8, "p99_ms": 4.0},
                    "compute_full_over_head_p50": 10.0,
                    "predict_full_over_head_p50": 4.0,
                }
            ),
            "recommend": _bench(
                {
                    "sqlite": {
                        "latency": {"p50_ms": 1.6, "p99_ms": 2.2},
                        "throughput": {"threads": 8, "requests_per_s": 250.0},
                    },
                    "redis": {
                        "latency": {"p50_ms": 2.0, "p99_ms": 4.0},
                        "throughput": {"threads": 8, "requests_per_s": 200.0},
                    },
                }
            ),
        },
    }


def test_sizing_by_hand(results):
    s = run.sizing(results)
    # 100M users x 20% active = 20M histories; 5000 users/core-s (XLA, the better) -> 4000 s.
    assert s["encoder_users_per_core_s"] == 5000
    assert s["encoder_core_hours"] == pytest.approx(4000 / 3600)
    assert s["encoder_pipeline_core_hours"] == pytest.approx(20_000 / 3600)  # 20M / 1000 per worker-s
    # 100M x 30 events = 3B events at 25k events/CPU-s = 120,000 s.
    assert s["beam_events"] == 3e9
    assert s["beam_core_hours"] == pytest.approx(120_000 / 3600)
    # 100M users x 2 versions x 356 B (measured).
    assert s["store_row_bytes_measured"] is True
    assert s["store_bytes"] == pytest.approx(71.2e9)
    # 10M x 64 x 4 B; 0.2 ms at 10k ads -> 200 ms at 10M; x 10k QPS = 2000 core-seconds/s.
    assert s["corpus_bytes"] == 2.56e9
    assert s["bruteforce_ms_per_request"] == pytest.approx(200.0)
    assert s["bruteforce_cores"] == pytest.approx(2000.0)
    # 1600 req/s on 2 cores = 800 per core; 10k / 800 / 0.6 = 20.83 cores -> 3 replicas of 8.
    assert s["serving_rps_per_core"] == 800
    assert s["serving_cores"] == pytest.approx(10_000 / 800 / 0.6)
    assert s["serving_replicas"] == 3
    # recommend: best 250 req/s on 2 cores = 125 per core; 10k / 125 / 0.6 = 133.3 cores.
    assert s["recommend_cores"] == pytest.approx(10_000 / 125 / 0.6)


def test_sizing_training_workers_and_memory_by_hand(results):
    s = run.sizing(results)
    # 1500 examples/s on 2 cores = 750 per core; 100M x 30 x 8 epochs = 24B examples -> 8,888.9 core-hours;
    # per worker 16 cores x 0.7 = 11.2 effective cores over 12 h -> ceil(8888.9 / 134.4) = 67 workers.
    assert s["training_examples_per_core_s"] == 750
    assert s["training_examples"] == 24e9
    assert s["training_core_hours"] == pytest.approx(24e9 / 750 / 3600)
    assert s["training_workers"] == 67
    assert s["training_mwms_measured"]["two_over_one_examples_per_second"] == 0.4
    # Mirrored on every worker: 10M x 64 x 4 B = 2.56 GB, x3 with Adam = 7.68 GB, + 10M x 76 B corpus features.
    assert s["item_table_bytes"] == 2.56e9
    assert s["item_table_with_adam_bytes"] == pytest.approx(7.68e9)
    assert s["training_worker_state_bytes"] == pytest.approx(7.68e9 + 0.76e9)
    assert s["mirrored_state_fits"] is True  # 8.44 GB <= 32 GiB (half of 64 GiB)
    assert s["ads_at_mirrored_limit"] == pytest.approx(32 * 2**30 / (64 * 4 * 3 + 76))
    assert run.sizing(results, {"ads": 100e6})["mirrored_state_fits"] is False  # 84 GB
    note = "\n".join(run.sizing_note(s))
    assert "67 workers" in note and "ParameterServerStrategy" in note and "0.40x" in note


def test_sizing_redis_by_hand(results):
    s = run.sizing(results)
    # 100M users x 2 versions x 500 B = 100 GB; nodes of 64 GiB x 0.7 -> ceil(100e9 / 48.1e9) = 3.
    assert s["redis_bytes"] == pytest.approx(100e9)
    assert s["redis_nodes"] == 3
    # 5000 rows/s: 100M in 5.56 h; 20M daily = 1.11 process-hours -> 1 process within 2 h.
    assert s["redis_full_materialize_hours"] == pytest.approx(1e8 / 5000 / 3600)
    assert s["redis_daily_materialize_core_hours"] == pytest.approx(2e7 / 5000 / 3600)
    assert s["redis_daily_materialize_processes"] == 1
    # 4 GiB peak RSS for 1M rows = 4,295 B/row: 16 GiB -> 4M rows per process; 20M daily rows -> 5 chunks.
    assert s["materialize_rss_bytes_per_row"] == pytest.approx(4 * 2**30 / 1e6)
    assert s["materialize_rows_per_process"] == pytest.approx(4e6)
    assert s["materialize_daily_chunks"] == 5
    note = "\n".join(run.sizing_note(s))
    assert "Redis online store" in note and "3 nodes" in note and "Redis materialization" in note
    assert "at least 5 chunks" in note and "write_to_online_store" in note


def test_sizing_states_assumptions_and_tolerates_missing_benches():
    s = run.sizing({"benches": {}}, {"users": 1e6, "versions_kept": 1})
    assert s["assumptions"]["users"] == 1e6
    assert s["encoder_core_hours"] is None and s["beam_core_hours"] is None and s["serving_replicas"] is None
    assert s["training_workers"] is None and s["redis_nodes"] is None and s["redis_full_materialize_hours"] is None
    assert s["item_table_with_adam_bytes"] == 10e6 * 64 * 4 * 3  # arithmetic on the assumptions alone
    assert s["store_row_bytes_measured"] is False
    assert s["store_bytes"] == 1e6 * (64 * 4 + 100)  # stated: the vector plus 100 B per row
    assert "Online store" in "\n".join(run.sizing_note(s))


def test_markdown_has_headlines_ratios_and_sizing(results):
    results["sizing"] = run.sizing(results)
    text = run.render_markdown(results)
    ratios = {row[0]: row[1] for row in run.ratio_rows(results)}
    assert ratios == {
        "Predict / echo, p50": "2.00x",
        "Predict / echo, p99": "3.00x",
        "full / context_head compute, p50": "10.00x",
        "full / context_head Predict, p50": "4.00x",
        "contextual / baseline training ex/s": "0.75x",
        "dense / per-target training targets/s": "4.00x",
        "dense (in-batch) / per-target training targets/s": "12.00x",
        "Redis / SQLite online read p50, 1 user": "1.50x",
        "Redis / SQLite online read p50, 100 users": "1.00x",
        "Redis / SQLite recommend p50": "1.25x",
        "Redis / SQLite materialize rows/s, user encodings": "0.80x",
        "XLA / no-XLA encoder users/CPU-s": "1.25x",
        "multi-process / in-process Beam events/s": "0.75x",
        "multi-process / in-process Beam events/CPU-s": "0.50x",
    }
    for name, value in ratios.items():
        assert f"| {name} | {value} |" in text
    assert "| Predict vs bare gRPC echo, batch 1 | p50/p99 0.80 / 1.50 ms vs 0.40 / 0.50 ms" in text
    assert "1,500 examples/s (baseline 2,000)" in text
    assert "5.6 worker-core-hours for the whole Beam job at this run's 1,000 users/worker-s on 20,000 users" in text
    assert "71.20 GB" in text and "2.56 GB" in text and "3 replicas" in text
    assert "Failed" not in text
    assert "Wall time per bench: generator 10 s, beam 10 s" in text


def test_markdown_leaves_out_missing_and_lists_failed(results):
    results["benches"]["serving"] = {"ok": False, "error": "exit status 1", "log": "serving.log", "wall_s": 3.0}
    text = run.render_markdown(results)
    assert "Predict / echo" not in text
    assert "- serving: exit status 1 (log: `serving.log`)" in text
    assert "full / context_head compute, p50" in text


def test_get_walks_dicts_and_lists(results):
    assert run.get(results, "beam", "runs", 1, "workers") == 2
    assert run.get(results, "beam", "runs", 5, "workers") is None
    assert run.get(results, "missing", "x") is None


def test_run_step_records_a_failure_with_its_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    record = run.run_step("bad", cmd, tmp_path, 60, tmp_path / "bad.json")
    assert not record["ok"] and record["returncode"] == 3 and record["error"] == "exit status 3"
    assert "boom" in record["log_tail"] and (tmp_path / "bad.log").exists()
    assert record["leftover_processes_killed"] is False and record["cpu_s"] >= 0


def test_run_step_kills_a_bench_past_its_timeout(tmp_path):
    record = run.run_step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, 0.5, None)
    assert not record["ok"] and record["error"] == "timed out after 0.5 s" and record["wall_s"] < 30
    assert record["leftover_processes_killed"] is True
