"""``tfrs-ctx study corpus``: the lift over corpus sizes, on real generated data, Beam and training."""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY_MODEL

from tfrs_ctx.apps import studies


def test_ratio_of_lifts_combines_both_intervals_on_the_log_scale():
    reference = {"lift": 3.0, "lo": 3.0 / math.e**0.1, "hi": 3.0 * math.e**0.1}
    other = {"lift": 2.4, "lo": 2.4 / math.e**0.2, "hi": 2.4 * math.e**0.2}
    vs = studies._ratio_of_lifts(other, reference)
    assert vs["ratio"] == pytest.approx(0.8)
    half = math.hypot(0.1, 0.2)  # each interval is +-1.96 se on the log scale
    assert vs["lo"] == pytest.approx(0.8 * math.exp(-half)) and vs["hi"] == pytest.approx(0.8 * math.exp(half))
    assert studies._ratio_of_lifts(reference, reference) == {"ratio": 1.0, "lo": 1.0, "hi": 1.0}


@pytest.mark.slow
def test_corpus_study_trains_each_size_with_its_loss_and_compares_the_lifts(tmp_path):
    out = tmp_path / "corpus"
    tiny = [f"--set={o}" for o in TINY_MODEL if not o.startswith("train.epochs")]
    argv = ["corpus", "--out", str(out), "--ads", "400,2000", "--users", "150", "--bootstrap", "50"]
    argv += [*tiny, "--set=train.epochs=1", "--set=train.steps_per_epoch=4", "--set=model.full_softmax_max_items=1000"]
    assert studies.main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    small, large = report["points"]
    assert (small["ads"], small["loss"]) == (400, "full_softmax")  # auto, at most full_softmax_max_items
    assert (large["ads"], large["loss"]) == (2000, "mixed")  # auto, above it
    assert report["reference"] == {"ads": 400, "loss": "full_softmax"}
    for point in (small, large):
        assert point["requests"] > 0
        assert point["training"]["contextual"]["loss"] == point["loss"] == point["training"]["baseline"]["loss"]
        lift, r = point["lift"], point["recall@100"]
        assert lift["lo"] <= lift["lift"] <= lift["hi"]
        assert lift["lift"] == pytest.approx(r["contextual"]["mean"] / r["baseline"]["mean"])
        assert point["missing_over_baseline"] == pytest.approx(
            r["contextual_no_context"]["mean"] / r["baseline"]["mean"]
        )
    assert small["lift_vs_reference"]["ratio"] == 1.0
    vs = large["lift_vs_reference"]
    assert vs["ratio"] == pytest.approx(large["lift"]["lift"] / small["lift"]["lift"])
    assert vs["lo"] < vs["ratio"] < vs["hi"]
    assert large["lift_within_15pct"] == (abs(vs["ratio"] - 1) <= 0.15)
    table = (out / "corpus.md").read_text()
    assert "| 400 | full_softmax |" in table and "| 2,000 | mixed |" in table
