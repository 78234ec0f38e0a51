"""The dashboard's model: the status document plus the events after its `seq`, each counted once; a bounded
log; and nothing the daemon sends, in whatever shape, breaks it."""

from __future__ import annotations

from typing import Any

import pytest

from console.dashboard.model import LOG_FLUSH_MAX, LOG_MAX, REPLAY_MAX, Model


def station(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "lan", "enabled": True, "line": "L1", "state": "idle", "connected": True,
            "issued": 0, "refused": 0, "confirmed": 0, "paused": None, "last_refusal": None, **kw}  # fmt: skip


def status(seq: int, issued: int = 0, wo_issued: int = 0, **kw: Any) -> dict[str, Any]:
    return {
        "api": 1, "seq": seq, "time": 1000.0 + seq,
        "issuance": {"issued": issued, "refused": 0, "confirmed": 0, "rate_per_s": 1.5,
                     "per_minute_last_hour": [0] * 59 + [issued]},
        "lines": [{"name": "L1", "stations": [station("st-1", issued=issued), station("st-2")],
                   "work_orders": ["WO-1"]}],
        "work_orders": [{"id": "WO-1", "state": "active", "planned": 10, "issued": wo_issued,
                         "remaining": 10 - wo_issued}],
        "alarms": [], **kw,
    }  # fmt: skip


def issued(seq: int, st: str = "st-1", serial: str | None = None) -> dict[str, Any]:
    return {"type": "issued", "seq": seq, "time": 1000.0 + seq, "station": st,
            "device_serial": serial or f"SN-{seq}", "work_order": "WO-1", "reused": False}  # fmt: skip


def test_events_after_the_status_are_counted_once_across_status_documents() -> None:
    m = Model()
    m.load_status(status(seq=10, issued=3, wo_issued=3))
    m.apply(issued(9))  # already in the document (seq <= 10): logged, not counted
    m.apply(issued(11))
    m.apply(issued(12))
    st = m.stations["st-1"]
    assert (st.issued, m.summary.issued, m.work_orders["WO-1"].issued, m.work_orders["WO-1"].remaining) == (
        5, 5, 5, 5)  # fmt: skip
    assert st.last_device_serial == "SN-12" and st.state == "issuing"
    # The next document was built after event 11 but before 12: 12 is applied again on top of it.
    m.load_status(status(seq=11, issued=4, wo_issued=4))
    assert (m.stations["st-1"].issued, m.summary.issued, m.work_orders["WO-1"].issued) == (5, 5, 5)
    # And one that includes everything: nothing is left to re-apply.
    m.load_status(status(seq=12, issued=5, wo_issued=5))
    m.load_status(status(seq=12, issued=5, wo_issued=5))
    assert (m.stations["st-1"].issued, m.summary.issued) == (5, 5)
    entries, skipped = m.take_log()
    assert [e.subject for e in entries if e.kind == "issued"] == ["SN-9", "SN-11", "SN-12"] and skipped == 0


def test_station_states_follow_the_events() -> None:
    m = Model()
    m.load_status(status(seq=1))
    ev = {"seq": 2, "time": 1002.0, "station": "st-2"}
    m.apply({**ev, "type": "refused", "code": "NOT_AUTHORISED", "reason": "not in the allowlist",
             "device_serial": "X-1"})  # fmt: skip
    st = m.stations["st-2"]
    assert st.state == "error" and st.refused == 1 and st.last_refusal is not None
    assert st.last_refusal.code == "NOT_AUTHORISED" and st.last_device_serial == "X-1"
    m.apply({**ev, "seq": 3, "type": "station", "state": "paused", "by": "olga", "reason": "jam"})
    assert st.state == "paused" and st.paused is not None and st.paused.by == "olga"
    m.apply({**ev, "seq": 4, "type": "refused", "code": "STATION_PAUSED", "reason": "paused"})
    assert st.state == "paused"  # refused because paused: still paused, not an error
    m.apply({**ev, "seq": 5, "type": "station", "state": "resumed", "by": "olga"})
    assert st.state == "idle" and st.paused is None
    m.apply({**ev, "seq": 6, "type": "station", "state": "disconnected"})
    assert st.state == "disconnected" and not st.connected
    m.apply({**ev, "seq": 7, "type": "station", "state": "connected", "peer": "127.0.0.1:5"})
    assert st.state == "idle" and st.connected and st.peer == "127.0.0.1:5"
    m.apply({**ev, "seq": 8, "type": "confirmed", "cert_serial": "0a"})
    assert st.confirmed == 1 and m.summary.confirmed == 1
    log = [e.kind for e in m.take_log()[0]]
    assert "confirmed" not in log and log.count("station") == 4  # confirmations are counted, not listed


def test_alarms_are_raised_acknowledged_and_cleared() -> None:
    m = Model()
    m.load_status(status(seq=1))
    alarm = {"cause": "disk.low", "severity": "critical", "message": "m", "advice": "a", "raised_at": 1.0}
    m.apply({"type": "alarm", "seq": 2, "action": "raised", "alarm": alarm})
    m.apply(
        {
            "type": "alarm",
            "seq": 3,
            "action": "raised",
            "alarm": {**alarm, "cause": "x", "severity": "warning"},
        }
    )
    assert [a.cause for a in m.alarm_order()] == ["disk.low", "x"]  # critical first
    m.apply(
        {"type": "alarm", "seq": 4, "action": "acknowledged", "alarm": {**alarm, "acknowledged_by": "olga"}}
    )
    assert m.alarms["disk.low"].acknowledged_by == "olga"
    m.apply({"type": "alarm", "seq": 5, "action": "cleared", "alarm": alarm})
    assert list(m.alarms) == ["x"]


def test_the_log_and_the_replay_buffer_are_bounded_and_a_burst_is_counted() -> None:
    m = Model()
    m.load_status(status(seq=0))
    n = REPLAY_MAX + 5000
    for seq in range(1, n + 1):
        m.apply(issued(seq, serial="SN"))
    assert len(m.log) == LOG_MAX and len(m._replay) == REPLAY_MAX
    entries, skipped = m.take_log()
    assert len(entries) == LOG_FLUSH_MAX and skipped == n - LOG_FLUSH_MAX
    assert entries[-1].time == 1000.0 + n  # the newest are the ones shown
    assert m.take_log() == ([], 0)
    assert m.stations["st-1"].issued == n


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {
            "seq": "x",
            "lines": "L1",
            "work_orders": {"a": 1},
            "alarms": [None, 5, "x"],
            "appliance": [],
            "issuance": {"per_minute_last_hour": "x", "issued": "many"},
            "upstream": {"queue_depth": "deep"},
        },
        {
            "lines": [
                {"name": "L1", "stations": [{"name": "s", "last_refusal": "x", "paused": 5, "issued": None}]}
            ]
        },
    ],
)
def test_status_documents_of_another_shape_do_not_break_it(doc: dict[str, Any]) -> None:
    m = Model()
    m.load_status(doc)
    m.load_status(status(seq=1))
    assert "st-1" in m.stations


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"type": "issued", "seq": "x", "station": 5, "work_order": ["a"]},
        {"type": "alarm", "seq": 2, "alarm": "not an object"},
        {"type": "station", "seq": 3, "station": "st-1", "state": None},
        {"type": "refused", "seq": 4, "station": "st-1", "code": None, "reason": {"x": 1}},
        {"type": "from-a-later-version", "seq": 5, "anything": [1, 2]},
    ],
)
def test_events_of_another_shape_do_not_break_it(event: dict[str, Any]) -> None:
    m = Model()
    m.load_status(status(seq=1))
    m.apply(event)
    m.take_log()
    m.apply(issued(10))
    assert m.stations["st-1"].issued == 1


def test_the_log_names_the_front_end_of_an_issuance_that_did_not_come_from_a_station() -> None:
    m = Model()
    m.load_status(status(seq=1))
    m.apply({**issued(2), "front_end": "scep"})
    m.apply({**issued(3), "front_end": "station"})
    m.apply({"type": "refused", "seq": 4, "time": 1004.0, "station": "st-1", "device_serial": "SN-4",
             "code": "BAD_REQUEST", "reason": "no", "front_end": "cmp"})  # fmt: skip
    details = [e.detail for e in m.take_log()[0]]
    assert details == ["WO-1 via scep", "WO-1", "BAD_REQUEST: no via cmp"]


def test_link_lines_carry_the_local_clock_and_unknown_stays_unknown() -> None:
    """A link line says when the dashboard saw the change (this computer's clock), not the last daemon time
    it had seen; before any status document the clock's state is unknown, not ok."""
    import time

    from console.dashboard.model import Model

    model = Model()
    assert model.summary.clock_trusted is None
    model.load_status({"seq": 0})
    assert model.summary.clock_trusted is None
    model.set_connected(0.0)
    model.apply({"type": "issued", "seq": 1, "time": 1_000.0, "station": "st"})  # a daemon time long ago
    before = time.time()
    model.set_disconnected("gone", 1.0)
    line = model.log[-1]
    assert line.kind == "link" and line.time is not None and line.time >= before
