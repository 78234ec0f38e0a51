"""Alarms: one log line per cause, a count for the rest, cleared once; LogOnce bounds memory and log volume."""

from __future__ import annotations

import logging

import pytest

from appliance.alarms import Alarms, LogOnce


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_raise_logs_once_per_cause_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    alarms = Alarms(clock)
    events: list[tuple[str, str]] = []
    alarms.subscribe(lambda ev, a: events.append((ev, a.cause)))
    with caplog.at_level(logging.WARNING, logger="birthline.alarms"):
        assert alarms.raise_alarm("journal.unavailable", "disk full", "free space", code=13)
        for _ in range(500):
            clock.t += 1
            assert not alarms.raise_alarm("journal.unavailable", "disk full", "free space", code=13)
    assert len([r for r in caplog.records if "ALARM journal.unavailable" in r.getMessage()]) == 1
    (a,) = alarms.active()
    assert (a.count, a.raised_at, a.last_seen, a.code) == (501, 1000.0, 1500.0, 13)
    assert alarms.acknowledge("journal.unavailable", "alice") is not None
    assert alarms.get("journal.unavailable").acknowledged_by == "alice"  # type: ignore[union-attr]
    assert alarms.clear("journal.unavailable")
    assert not alarms.clear("journal.unavailable")
    assert alarms.active() == []
    assert events == [("raised", "journal.unavailable"), ("cleared", "journal.unavailable")]


def test_critical_alarms_sort_first() -> None:
    clock = Clock()
    alarms = Alarms(clock)
    alarms.raise_alarm("a.warning", "w", "x", severity="warning")
    clock.t += 1
    alarms.raise_alarm("b.critical", "c", "x")
    assert [a.cause for a in alarms.active()] == ["b.critical", "a.warning"]


def test_log_once_suppresses_within_interval_then_reports_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = LogOnce(interval_s=60, max_causes=4, clock=clock)
    logger = logging.getLogger("test.logonce")
    with caplog.at_level(logging.INFO, logger="test.logonce"):
        assert limiter.log(logger, logging.WARNING, "bad-tag:s1", "bad tag from %s", "s1")
        for _ in range(99):
            assert not limiter.log(logger, logging.WARNING, "bad-tag:s1", "bad tag from %s", "s1")
        clock.t += 61
        assert limiter.log(logger, logging.WARNING, "bad-tag:s1", "bad tag from %s", "s1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad tag from s1", "bad tag from s1 (99 more like this since the last report)"]
    for i in range(100):  # hostile input choosing new causes: memory stays bounded
        limiter.log(logger, logging.DEBUG, f"cause-{i}", "x")
    assert len(limiter._seen) == 4
