"""Training on real TFRecords: loss falls, checkpoints resume, context sources, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfrs_ctx import schema
from tfrs_ctx.config import load_config
from tfrs_ctx.data import dataset
from tfrs_ctx.evaluation import evaluate, metrics
from tfrs_ctx.training import train
from tfrs_ctx.training.run_dir import FINAL_DIR, SUMMARY_FILE, build_model, load_trained, save_final


def test_training_lowers_the_loss_and_writes_its_summary(tiny_runs, small_data):
    batches = list(dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN, 256).take(4))
    for run in tiny_runs.values():
        trained, cfg = load_trained(str(run), str(small_data))
        untrained = build_model(cfg)
        loss = {
            name: np.mean([float(m.compute_loss(b, training=False)) for b in batches])
            for name, m in (("trained", trained), ("untrained", untrained))
        }
        assert loss["trained"] < loss["untrained"] - 0.2, loss
        summary = json.loads((run / SUMMARY_FILE).read_text())
        assert summary["examples_per_second"] > 0 and len(summary["history"]["loss"]) == summary["epochs_run"]
        assert 0.0 <= summary["best_val_recall"] <= 1.0
        assert (run / FINAL_DIR).is_dir() and (run / "logs").is_dir()
        if trained.context_layer is None:
            assert summary["calibration"] is None
        else:  # the calibrated trust is what the final weights hold
            calibration = summary["calibration"]
            assert calibration["examples"] > 0 and calibration["source"]
            best = max(calibration["recall_by_trust"].values())
            assert calibration["recall_by_trust"][f"{calibration['trust']:g}"] == best
            assert float(trained.context_layer.trust.numpy()) == pytest.approx(summary["calibration"]["trust"])


def test_resume_continues_from_the_last_epoch(small_data, tmp_path):
    from conftest import TINY_MODEL

    cfg = load_config("synthetic", [*TINY_MODEL, "train.epochs=1"])
    cfg.train.data_dir = str(small_data)
    first = train.train(cfg, str(tmp_path), verbose=0)
    assert first["epochs_run"] == 1
    cfg.train.epochs = 2
    second = train.train(cfg, str(tmp_path), verbose=0)
    assert second["epochs_run"] == 1  # only epoch 2 ran: epoch 1 came from the checkpoint
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(tmp_path / train.CHECKPOINT_DIR))
    assert latest.endswith("ckpt-2")
    epoch = tf.train.load_variable(latest, "epoch/.ATTRIBUTES/VARIABLE_VALUE")
    assert int(epoch) == 2


@pytest.mark.parametrize("source", ["synthetic", "none", "real"])
def test_context_sources(small_data, source):
    overrides = [f"train.context_source={source}", "train.batch_size=256", "train.context_noise=0"]
    cfg = load_config("synthetic", [*overrides, "train.validation_examples=40"])
    cfg.train.data_dir = str(small_data)
    meta = dataset.load_metadata(str(small_data))
    ds, per_epoch = train.training_dataset(cfg, meta["counts"])
    batches = list(ds.take(40))
    weights = np.concatenate([b[schema.CONTEXT_WEIGHTS].numpy() for b in batches])
    has_ctx = (weights > 0).any(axis=1).mean()
    if source == "synthetic":
        assert has_ctx > 0.5 and per_epoch == meta["counts"][schema.SPLIT_TRAIN]
    elif source == "none":
        assert has_ctx == 0.0
    else:  # organic conversions lose their context; logged requests keep their real one
        assert 0.0 < has_ctx < 1.0
        validation = cfg.train.validation_examples
        requests = meta["counts"][schema.SPLIT_TRAIN_REQUESTS]
        assert per_epoch == meta["counts"][schema.SPLIT_TRAIN] + requests - validation
        held_out = {int(r) for b in ds.take(200) for r in b[schema.EX_REQUEST_ID].numpy() if r >= 0}
        validating = {
            int(r)
            for b in dataset.validation_requests(str(small_data), meta["counts"], validation)
            for r in b[schema.EX_REQUEST_ID]
        }
        assert len(validating) == validation and len(held_out) == requests - validation  # every one, once seen
        assert not held_out & validating  # early stopping never scores examples it trained on


def test_context_noise_swaps_contexts_within_the_batch(small_data):
    import tensorflow as tf

    batch = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN, 256)))
    mixed = train.mix_context(batch, noise=1.0, seed=1)
    before = {tuple(r) for r in batch[schema.CONTEXT_CATEGORIES].numpy().tolist()}
    after = mixed[schema.CONTEXT_CATEGORIES].numpy()
    assert all(tuple(r) in before for r in after.tolist())  # contexts of the same batch
    moved = np.mean(np.any(after != batch[schema.CONTEXT_CATEGORIES].numpy(), axis=1))
    assert moved > 0.5
    assert tf.reduce_all(mixed[schema.LABEL_ITEM] == batch[schema.LABEL_ITEM])
    same = train.mix_context(batch, noise=0.0, seed=1)
    assert np.array_equal(same[schema.CONTEXT_CATEGORIES].numpy(), batch[schema.CONTEXT_CATEGORIES].numpy())


def test_evaluation_report_has_every_row_and_figure(small_data, tiny_runs, tmp_path):
    report = evaluate.evaluate_runs(
        str(small_data), str(tiny_runs["contextual"]), str(tiny_runs["baseline"]), str(tmp_path), bootstrap=200
    )
    assert report["requests"] == dataset.load_metadata(str(small_data))["counts"][schema.SPLIT_EVAL]
    # Synthetic subject items are not ads: the subject-as-history reference does not apply.
    assert set(report["rows"]) == {"popularity", "baseline", "contextual", "contextual_no_context"}
    for figures in report["rows"].values():
        for k in metrics.KS:
            ci = figures[f"recall@{k}"]
            assert ci["lo"] <= ci["mean"] <= ci["hi"]
        assert [figures[f"recall@{k}"]["mean"] for k in metrics.KS] == sorted(
            figures[f"recall@{k}"]["mean"] for k in metrics.KS
        )
    assert set(report["lift"]) == {f"recall@{k}" for k in metrics.KS} | {"ndcg@10"}
    summary = json.loads((tiny_runs["contextual"] / SUMMARY_FILE).read_text())
    assert report["context_trust"] == pytest.approx(summary["calibration"]["trust"])
    assert f"Context trust of the contextual model: {report['context_trust']:g}" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert (tmp_path / "recall_at_k.png").exists() and "| popularity |" in (tmp_path / "report.md").read_text()


def test_evaluate_refuses_a_baseline_as_the_contextual_run(small_data, tiny_runs):
    with pytest.raises(ValueError, match="use_context=false"):
        evaluate.evaluate_runs(str(small_data), str(tiny_runs["baseline"]), str(tiny_runs["baseline"]), None, 10)


def test_calibrate_command_rechooses_the_trust_of_a_trained_run(tiny_runs, small_data, tmp_path, capsys):
    import shutil

    from tfrs_ctx.training import calibrate

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["contextual"], run)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    trained, _ = load_trained(str(run), str(small_data))
    trained.context_layer.trust.assign(0.0)  # a run whose trust was lost or set by hand
    save_final(trained, str(run))

    assert calibrate.main(["--run", str(run), "--data", str(small_data)]) == 0
    after = json.loads((run / SUMMARY_FILE).read_text())
    assert after["calibration"]["trust"] == summary["calibration"]["trust"]  # same requests, same choice
    assert after["history"] == summary["history"]  # the rest of the summary is kept
    reloaded, _ = load_trained(str(run), str(small_data))
    assert float(reloaded.context_layer.trust.numpy()) == pytest.approx(after["calibration"]["trust"])

    assert calibrate.main(["--run", str(tiny_runs["baseline"]), "--data", str(small_data)]) == 1
    assert "nothing to calibrate" in capsys.readouterr().err


def test_configs_of_older_runs_load_with_the_retired_calibration_keys(tmp_path, caplog):
    from tfrs_ctx.config import TrainConfig

    old = tmp_path / "config.yaml"
    for steps, expected in ((200, TrainConfig.calibration_examples), (0, 0)):
        old.write_text(f"train:\n  calibration_steps: {steps}\n  calibration_learning_rate: 0.05\n")
        assert load_config(str(old)).train.calibration_examples == expected
    assert "calibration_steps is retired" in caplog.text
    old.write_text("train:\n  calibration_stepz: 5\n")
    with pytest.raises(ValueError, match="calibration_stepz"):  # other unknown keys still fail
        load_config(str(old))


def test_dense_training_learns_from_every_target_and_says_so(small_data, tmp_path):
    from conftest import train_tiny

    run = train_tiny(small_data, tmp_path / "dense", "train.mode=dense")
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["mode"] == "dense" and summary["time_gap"] == schema.TIME_GAP_NEXT_EVENT
    meta = dataset.load_metadata(str(small_data))
    per_window = meta["train_sequence_targets"] / meta["counts"][schema.SPLIT_TRAIN_SEQUENCES]
    assert summary["targets_per_second"] == pytest.approx(summary["examples_per_second"] * per_window, rel=0.01)
    trained, cfg = load_trained(str(run), str(small_data))
    assert cfg.model.time_gap == schema.TIME_GAP_NEXT_EVENT
    sequences = list(dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN_SEQUENCES, 32).take(3))
    untrained = build_model(cfg)
    trained_loss = np.mean([float(trained.compute_loss(b)) for b in sequences])
    assert trained_loss < np.mean([float(untrained.compute_loss(b)) for b in sequences]) - 0.2
    with pytest.raises(ValueError, match="next_event"):
        load_config("synthetic", ["train.mode=dense", "model.time_gap=to_target"])


def test_no_request_before_the_cutoff_trains_without_validation_and_writes_valid_json(small_raw, tmp_path, capsys):
    from conftest import train_tiny

    from beam_pipelines import build_training_data
    from tfrs_ctx.data import rawio

    first_request = int(rawio.read_table(str(small_raw), schema.REQUESTS)[schema.TIMESTAMP].min())
    data = tmp_path / "data"
    build_training_data.run(["--input", str(small_raw), "--output", str(data), f"--cutoff={first_request}"])
    assert dataset.load_metadata(str(data))["counts"][schema.SPLIT_TRAIN_REQUESTS] == 0
    run = train_tiny(data, tmp_path / "run", "train.epochs=1")
    assert "NO VALIDATION" in capsys.readouterr().err
    text = (run / SUMMARY_FILE).read_text()
    assert "NaN" not in text
    summary = json.loads(text)
    assert summary["best_val_recall"] is None and summary["validation"].startswith("none")
    assert summary["epochs_run"] == 1  # no request log: the trust is flagged (tests/training/test_calibration.py)
    assert summary["calibration"]["source"] == "synthetic" and summary["calibration"]["flagged"]


def test_exclude_history_drops_every_ad_consumed_before_the_request_and_says_so(small_data, tiny_runs, tmp_path):
    consumed = evaluate.load_consumed(str(small_data))
    ev = next(iter(dataset.make_dataset(str(small_data), schema.SPLIT_EVAL, 4096)))
    ids = ev[schema.EX_REQUEST_ID].numpy()
    matrix = evaluate.consumed_matrix(ids, consumed)
    kept = ev[schema.HISTORY_ITEM].numpy()
    for i, request in enumerate(ids):  # the full set: the kept history and more
        assert set(kept[i][kept[i] > 0].tolist()) <= set(matrix[i].tolist()) | {0}
        assert sorted(set(matrix[i][matrix[i] > 0].tolist())) == consumed[int(request)].tolist()
    runs = (str(tiny_runs["contextual"]), str(tiny_runs["baseline"]))
    report = evaluate.evaluate_runs(str(small_data), *runs, str(tmp_path), bootstrap=50, exclude_history=True)
    assert report["exclude_history"] and any("strictly before the request" in n for n in report["notes"])
    assert "strictly before the request" in (tmp_path / "report.md").read_text()
    plain = evaluate.evaluate_runs(str(small_data), *runs, None, bootstrap=50, exclude_history=False)
    assert not any("excluded" in n for n in plain["notes"])
    # the label is never excluded, so excluding only lifts recall
    for row in ("baseline", "contextual"):
        assert report["rows"][row]["recall@100"]["mean"] >= plain["rows"][row]["recall@100"]["mean"]


@pytest.mark.parametrize("mode", ["per_target", "dense"])
def test_training_with_mixed_negatives_lowers_the_loss(small_data, tmp_path, mode):
    from conftest import train_tiny

    run = train_tiny(
        small_data, tmp_path / mode, f"train.mode={mode}", "model.loss=mixed", "model.sampled_negatives=256"
    )
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["loss"] == "mixed" and not summary["full_softmax"]
    trained, cfg = load_trained(str(run), str(small_data))
    assert trained.negatives is not None and trained.negatives.count == 256
    split = schema.SPLIT_TRAIN_SEQUENCES if mode == "dense" else schema.SPLIT_TRAIN
    batches = list(dataset.make_dataset(str(small_data), split, 32 if mode == "dense" else 256).take(3))
    untrained = build_model(cfg)
    trained_loss = np.mean([float(trained.compute_loss(b)) for b in batches])
    assert trained_loss < np.mean([float(untrained.compute_loss(b)) for b in batches]) - 0.2


def tie_window() -> dict:
    """One hand-built window: 6 inputs at positions 4..9 of L = 10 ... as left-padded MAX_HISTORY arrays."""
    L = schema.MAX_HISTORY
    labels = np.zeros((1, L), np.int64)
    stamps = np.zeros((1, L), np.int64)
    # inputs at L-6..L-1; targets at L-7 (the first event, empty history) .. L-1; timestamps of those targets:
    # events e0..e6 at 10, 20, 20, 20, 30, 30, 40 (e6: the last position's target, after the last input)
    stamps[0, L - 7 :] = [10, 20, 20, 20, 30, 30, 40]
    labels[0, L - 7 :] = 5
    return {
        schema.SEQ_LABEL_ITEM: labels,
        schema.SEQ_LABEL_TIMESTAMP: stamps,
        schema.HISTORY_LENGTH: np.array([6], np.int64),
    }


def test_strict_history_scores_a_target_from_the_last_event_strictly_before_it():
    import tensorflow as tf

    from tfrs_ctx.training.dense import strict_state_positions

    L = schema.MAX_HISTORY
    window = {k: tf.constant(v) for k, v in tie_window().items()}
    got = strict_state_positions(window).numpy()[0, L - 7 :]
    # inputs e0..e5 sit at positions L-6..L-1 (e_i at L-6+i); target e_{i} belongs to position L-7+i
    e = [L - 6 + i for i in range(6)]
    # e0 (t=10): empty history (L-7); e1 (20): after e0; e2, e3 (20): still e0 (e1, e2 share their second);
    # e4 (30): e3; e5 (30): e3; e6 (40): e5
    assert got.tolist() == [L - 7, e[0], e[0], e[0], e[3], e[3], e[5]]
    # a later window's inputs before its first target carry no timestamp: counted as strictly earlier
    later = tie_window()
    later[schema.SEQ_LABEL_ITEM][0, : L - 5] = 0
    later[schema.SEQ_LABEL_TIMESTAMP][0, : L - 5] = 0
    got = strict_state_positions({k: tf.constant(v) for k, v in later.items()}).numpy()[0, L - 5 :]
    assert got.tolist() == [e[1], e[1], e[3], e[3], e[5]]  # e2, e3 sit after e1's (unknown) stamp


def test_strict_history_on_real_sequences_never_sees_an_event_of_the_targets_second(small_data):
    from tfrs_ctx.training.dense import strict_state_positions

    L = schema.MAX_HISTORY
    checked = 0
    for batch in dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN_SEQUENCES, 256).take(2):
        state = strict_state_positions(batch).numpy()
        labels, stamps = batch[schema.SEQ_LABEL_ITEM].numpy(), batch[schema.SEQ_LABEL_TIMESTAMP].numpy()
        first = L - batch[schema.HISTORY_LENGTH].numpy()
        for row, q in np.argwhere(labels != schema.PAD_ID):
            p = state[row, q]
            assert first[row] - 1 <= p <= q
            for j in range(max(p, first[row]), q + 1):  # the inputs p..q: event j is position j-1's target
                if j >= 1 and labels[row, j - 1] != schema.PAD_ID:
                    assert (stamps[row, j - 1] < stamps[row, q]) == (j == p), (row, q, j)
            checked += 1
    assert checked > 1000


def test_user_target_weights_count_each_user_as_at_most_k_targets(small_data):
    from tfrs_ctx.models.two_tower import SEQ_TARGET_WEIGHT
    from tfrs_ctx.training.dense import UserTargetWeights

    weights = UserTargetWeights(str(small_data), 10)
    meta = dataset.load_metadata(str(small_data))
    assert weights.counts.sum() == meta["train_sequence_targets"] and weights.counts.max() > 10
    total: dict[int, float] = {}
    for batch in dataset.make_dataset(str(small_data), schema.SPLIT_TRAIN_SEQUENCES, 512):
        w = weights(batch)[SEQ_TARGET_WEIGHT].numpy()
        assert (w[batch[schema.SEQ_LABEL_ITEM].numpy() == schema.PAD_ID] == 0).all()
        for user, s in zip(batch[schema.EX_USER_ID].numpy().tolist(), w.sum(axis=1).tolist(), strict=True):
            total[user] = total.get(user, 0.0) + s
    per_user = np.array([total[u] for u in weights.users.tolist()]) / weights.scale
    np.testing.assert_allclose(per_user, np.minimum(weights.counts, 10), rtol=1e-5)
    assert sum(total.values()) == pytest.approx(meta["train_sequence_targets"], rel=1e-5)  # mean weight 1


def test_dense_training_with_strict_history_and_user_weights_lowers_the_loss(small_data, tmp_path):
    from conftest import train_tiny

    options = ("train.mode=dense", "train.dense_strict_history=true", "train.dense_user_targets=10")
    run = train_tiny(small_data, tmp_path / "dense", *options, "train.epochs=2")
    trained, cfg = load_trained(str(run), str(small_data))
    assert cfg.train.dense_strict_history and cfg.train.dense_user_targets == 10
    sequences = list(train.sequence_dataset(cfg, dataset.load_metadata(str(small_data))["counts"])[0].take(3))
    untrained = build_model(cfg)
    trained_loss = np.mean([float(trained.compute_loss(b)) for b in sequences])
    assert trained_loss < np.mean([float(untrained.compute_loss(b)) for b in sequences]) - 0.2
    with pytest.raises(ValueError, match="dense_user_targets"):
        load_config("synthetic", ["train.mode=dense", "train.dense_user_targets=-1"])


def test_the_dense_recipe_keys_apply_to_dense_mode_only():
    dense = load_config("synthetic", ["train.mode=dense", "train.dense_loss=mixed"])
    assert dense.model.loss == "mixed"
    assert load_config("synthetic", ["train.dense_loss=mixed"]).model.loss == "auto"  # per target: untouched
    explicit = load_config("synthetic", ["train.mode=dense", "train.dense_loss=mixed", "model.loss=full_softmax"])
    assert explicit.model.loss == "full_softmax"  # an explicit model.loss wins
    for bad in ("train.dense_no_context_share=0", "train.dense_no_context_share=1.5", "train.dense_loss=sampled"):
        with pytest.raises(ValueError, match="dense_"):
            load_config("synthetic", [bad])
