"""The shared runner module: Beam's RunInference "Resource module is not available" noise is dropped, narrowly."""

from __future__ import annotations

import logging

import pytest
from apache_beam.ml.inference import base

import beam_pipelines.encode_users  # noqa: F401  (installs the filter at import, as in Beam's workers)


def test_runinference_resource_warning_is_silenced_and_nothing_else(caplog):
    if base.resource is not None:
        pytest.skip("this Beam install has its ModelManager (torch): RunInference does not log the warning")
    with caplog.at_level(logging.WARNING):
        assert base._get_current_process_memory_in_bytes() == 0  # the call that logs it, once per batch
        logging.warning("Resource module is not available, says someone else")  # not Beam's: kept
        logging.getLogger("apache_beam").warning("another Beam warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Resource module is not available, says someone else", "another Beam warning"]
