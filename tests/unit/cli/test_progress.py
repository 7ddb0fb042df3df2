"""Progress without a terminal: a line per tenth of a long stage in the log, nothing for short ones."""

from __future__ import annotations

import logging

import pytest

from abliterate import progress


def test_a_line_per_tenth(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    progress.enable(False)
    with caplog.at_level(logging.INFO, logger="abliterate.progress"):
        assert list(progress.track(range(25), "safety-tuning", 25, "step")) == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]  # the first item of each tenth
    assert lines[0].startswith("safety-tuning: 3/25 step (12%)")
    assert lines[-1].startswith("safety-tuning: 25/25 step (100%)")


def test_few_items_one_line_each_at_most(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    progress.enable(False)
    with caplog.at_level(logging.INFO, logger="abliterate.progress"):
        list(progress.track(range(8), "filtering", 8, "batch"))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"filtering: {k}/8 batch" for k in range(1, 9)]


def test_short_stages_stay_silent(caplog: pytest.LogCaptureFixture) -> None:
    progress.enable(False)
    with caplog.at_level(logging.INFO, logger="abliterate.progress"):
        assert list(progress.track(range(7), "quick", 7)) == list(range(7))
        assert list(progress.track(iter(range(3)), "no total")) == [0, 1, 2]
    assert not caplog.records
