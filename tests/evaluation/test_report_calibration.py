"""The report's calibration line: where the contextual model's trust comes from, loud when flagged."""

from __future__ import annotations

from tfrs_ctx.evaluation.evaluate import calibration_line
from tfrs_ctx.training import calibrate


def test_a_trust_chosen_on_requests_is_stated_plainly():
    line = calibration_line(2.5, calibrate.record("requests", 2.5, examples=10_000))
    assert not line["flagged"] and line["source"] == "requests"
    assert "2.5" in line["note"] and "10000 held-out train_requests" in line["note"]
    assert "UNCALIBRATED" not in line["note"]


def test_an_uncalibrated_trust_is_flagged_loudly():
    for record in (calibrate.record("synthetic", 1.0, examples=500), calibrate.record("off", 1.0, examples=0), None):
        line = calibration_line(1.0, record)
        assert line["flagged"] and line["note"].startswith("**UNCALIBRATED context trust 1**"), line
    assert "switched off" in calibration_line(1.0, calibrate.record("off", 1.0, examples=0))["note"]
    assert calibration_line(1.0, None)["source"] == "unknown"


def test_summaries_of_older_runs_read_as_chosen_on_requests():
    line = calibration_line(3.0, {"trust": 3.0, "examples": 900, "source": "held-out train_requests"})
    assert not line["flagged"] and "chosen on 900 held-out train_requests" in line["note"]


def test_a_trust_chosen_on_derived_previous_event_requests_says_so_unflagged():
    line = calibration_line(0.1, calibrate.record("previous_event", 0.1, examples=4000))
    assert not line["flagged"] and line["source"] == "previous_event"
    assert "derived from the training histories" in line["note"] and "UNCALIBRATED" not in line["note"]
