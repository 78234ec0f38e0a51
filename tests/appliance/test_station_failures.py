"""LinkFailures: station link failures in the audit log in bounded space, one log line per cause, an alarm for a
station over its limit that clears when it authenticates. A real journal and audit log; a fake clock."""

from __future__ import annotations

import json
import logging

import pytest
from pytest_mock import MockerFixture

from appliance.alarms import Alarms
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.station_failures import ALARM_CAUSE, LinkFailures


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _entries(audit: AuditLog, event: str) -> list[dict[str, object]]:
    return [json.loads(e.data) for e in audit.entries() if e.event == event]


async def test_a_flood_costs_a_burst_of_entries_and_one_summary_per_window(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    audit, alarms = AuditLog(journal), Alarms()
    with caplog.at_level(logging.INFO):
        async with LinkFailures(audit, alarms, burst=5, window_s=60, poll_s=3600, clock=clock) as failures:
            for _ in range(650):
                failures.failed(station="line1-st3", peer="/dev/ttyUSB0", code="AUTH_FAILED",
                                text="station proof does not verify", claimed="line1-st3")  # fmt: skip
            for _ in range(2400):
                failures.failed(station="line1-st4", peer="10.0.0.4:5000", code="BAD_TAG",
                                text="frame tag does not verify")  # fmt: skip
            clock.t += 61  # both windows close; the next pass audits their summaries
            failures.nudge()
    full = [item for e in _entries(audit, "station.link-refused") for item in e["items"]]  # type: ignore[attr-defined]
    assert sorted({(i["station"], i["code"]) for i in full}) == [
        ("line1-st3", "AUTH_FAILED"), ("line1-st4", "BAD_TAG"),
    ]  # fmt: skip
    assert len(full) == 10 and all(i["reason"] for i in full)
    summaries = [item for e in _entries(audit, "station.link-refused-summary") for item in e["items"]]  # type: ignore[attr-defined]
    assert {s["station"]: s["suppressed"] for s in summaries} == {
        "line1-st3": {"AUTH_FAILED": 645}, "line1-st4": {"BAD_TAG": 2395},
    }  # fmt: skip
    # 3,050 failures, two log lines (one per cause): the flood does not reach the log.
    lines = [r for r in caplog.records if r.name == "appliance.station_failures"]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    assert failures.stats == {"failed": 3050, "audited": 10, "suppressed": 3040}


async def test_a_station_over_its_limit_raises_an_alarm_cleared_by_its_next_session(journal: Journal) -> None:
    alarms = Alarms()
    async with LinkFailures(AuditLog(journal), alarms, poll_s=3600) as failures:
        failures.failed(station="st-1", peer="p", code="AUTH_FAILED", text="station proof does not verify")
        assert alarms.get(ALARM_CAUSE + "st-1") is None  # one failure is not an alarm
        failures.failed(station="st-1", peer="p", code="AUTH_FAILED", text="x", blocked_s=60)
        alarm = alarms.get(ALARM_CAUSE + "st-1")
        assert alarm is not None and alarm.severity == "warning" and "AUTH_FAILED" in alarm.message
        failures.authenticated("st-2")
        assert alarms.get(ALARM_CAUSE + "st-1") is not None
        failures.authenticated("st-1")
        assert alarms.get(ALARM_CAUSE + "st-1") is None


async def test_a_peer_with_no_station_is_not_said_to_be_refused_busy(journal: Journal) -> None:
    """A certificate no station owns is refused UNKNOWN_STATION before any handshake, limit or not: the alarm
    says so (and where from), not that handshakes get BUSY."""
    alarms = Alarms()
    async with LinkFailures(AuditLog(journal), alarms, poll_s=3600) as failures:
        failures.failed(
            station="tls-cert:0123456789abcdef", peer="10.0.0.7:5000", code="UNKNOWN_STATION",
            text="TLS certificate of no registered station", blocked_s=60,
        )  # fmt: skip
        alarm = alarms.get(ALARM_CAUSE + "tls-cert:0123456789abcdef")
        assert alarm is not None and "BUSY" not in alarm.message and "certificate" in alarm.message


async def test_entries_wait_for_a_journal_that_cannot_be_written(
    journal: Journal, mocker: MockerFixture
) -> None:
    """A failed write keeps the entries (within the bound) for the next pass instead of losing them."""
    from appliance.audit.log import AuditError

    audit = AuditLog(journal)
    async with LinkFailures(audit, Alarms(), poll_s=3600) as failures:
        real = audit.append
        broken = mocker.patch.object(audit, "append", side_effect=AuditError("disk full"))
        failures.failed(station="st-1", peer="p", code="BAD_TAG", text="frame tag does not verify")
        await failures._flush()
        assert broken.called and _entries(audit, "station.link-refused") == []
        mocker.patch.object(audit, "append", side_effect=real)
    (entry,) = _entries(audit, "station.link-refused")
    assert [i["code"] for i in entry["items"]] == ["BAD_TAG"]  # type: ignore[index]
