"""A child service that logs a lot never blocks on an undrained pipe; a failed start says why."""

import pytest

from cipherfeed.devprocess import start_service


def test_a_chatty_child_runs_to_completion_and_its_log_is_kept(tmp_path):
    log_path = tmp_path / "chatty.log"
    proc = start_service("tests.chatty_service", {}, log_path=log_path)
    assert proc.wait(timeout=60) == 0  # with stderr on a pipe nobody reads, it would block forever
    lines = log_path.read_text().splitlines()
    assert len(lines) == 4096 and lines[-1].startswith("log line 04095")


def test_a_child_that_does_not_start_reports_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="No module named"):
        start_service("tests.no_such_service_module", {}, log_path=tmp_path / "missing.log")
