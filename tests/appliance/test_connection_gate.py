"""The displacement policy of appliance.connections.ConnectionGate, on the gate alone with stand-in connections
and a clock the test moves: which unproven connection makes room at the cap (surplus before lone, the grace, known
addresses, vouched connections), and that its tables stay bounded whatever addresses a flood rotates through.
The same policy against real sockets: test_http_listener.py, test_lan_listener.py, test_listener_policy.py."""

from __future__ import annotations

import logging
from typing import cast

import pytest

from appliance.alarms import Alarms
from appliance.connections import (
    FULL_CLEAR_HOLD_S,
    KNOWN_PEERS,
    VOUCHED_PER_STATION,
    ConnectionCaps,
    ConnectionGate,
    Guard,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Conn:
    """What the gate needs of a Guard: its peer, and displace() releasing it."""

    def __init__(self, gate: ConnectionGate, peer: str) -> None:
        self.gate = gate
        self.peer = peer
        self.displaced = False

    def displace(self) -> None:
        self.displaced = True
        self.gate.release(cast(Guard, self), displaced=True)


def gate_of(
    cap: int, per_peer: int = 100, grace_s: float = 1.0, alarms: Alarms | None = None
) -> tuple[ConnectionGate, Clock]:
    clock = Clock()
    gate = ConnectionGate("t", ConnectionCaps(cap, per_peer), grace_s=grace_s, clock=clock, alarms=alarms)
    return gate, clock


def connect(gate: ConnectionGate, peer: str) -> Conn | None:
    """Accept a connection as Guard.connection_made does: admitted, then unproven."""
    conn = Conn(gate, peer)
    if not gate.admit(cast(Guard, conn)):
        return None
    gate.displaceable(cast(Guard, conn), True)
    return conn


def g(conn: Conn | None) -> Guard:
    assert conn is not None
    return cast(Guard, conn)


def test_surplus_goes_first_whatever_its_age_and_a_lone_connection_has_its_grace() -> None:
    gate, clock = gate_of(4)
    lone = connect(gate, "10.0.0.1")
    clock.now += 5
    flood = [connect(gate, "10.0.0.2") for _ in range(3)]
    assert gate.open == 4
    # The flood's address holds three: its two older ones are surplus, displaced before the older lone one,
    # though they are younger than the grace.
    for i in range(2):
        assert connect(gate, f"10.0.0.{3 + i}") is not None
        assert g(flood[i]) and cast(Conn, flood[i]).displaced
    assert lone is not None and not lone.displaced
    # Now every address holds one unproven connection, all young but the first: it is past its grace, so it
    # goes; then nothing is past its grace and a newcomer is refused.
    assert connect(gate, "10.0.0.5") is not None and lone.displaced
    assert connect(gate, "10.0.0.6") is None
    assert gate.counters["refused_full"] == 1 and gate.counters["displaced"] == 3
    clock.now += 1.0
    assert connect(gate, "10.0.0.6") is not None  # the grace is over for the longest-waiting
    assert flood[2] is not None and flood[2].displaced


def test_proven_connections_are_never_displaced() -> None:
    gate, clock = gate_of(2)
    served = connect(gate, "10.0.0.1")
    gate.displaceable(g(served), False)  # e.g. an HTTP request being served
    station = connect(gate, "10.0.0.2")
    gate.authenticated(g(station))
    clock.now += 100
    assert connect(gate, "10.0.0.3") is None
    assert served is not None and station is not None and not served.displaced and not station.displaced


def test_a_known_address_gets_in_and_unknown_ones_never_displace_it() -> None:
    gate, clock = gate_of(3)
    station = connect(gate, "10.0.0.9")
    gate.authenticated(g(station))  # the address is known from now on
    gate.release(g(station))
    flood = [connect(gate, f"10.1.0.{i}") for i in range(3)]  # one each: all lone, all within the grace
    assert connect(gate, "10.2.0.1") is None  # an unknown newcomer is refused
    back = connect(gate, "10.0.0.9")  # the station reconnects: it displaces the longest-waiting unknown one
    assert back is not None and flood[0] is not None and flood[0].displaced
    for i in range(5):  # each past the grace in turn: unknown newcomers displace unknown connections only
        clock.now += 1.0
        assert connect(gate, f"10.3.0.{i}") is not None
    assert not back.displaced and gate.counters["displaced"] == 6


def test_a_known_newcomer_displaces_a_known_connection_only_past_its_grace() -> None:
    gate, clock = gate_of(1)
    first = connect(gate, "10.0.0.9")
    gate.authenticated(g(first))
    gate.displaceable(g(first), True)  # unproven again (e.g. its session ended, the socket not yet closed)
    assert connect(gate, "10.0.0.9") is None
    clock.now += 1.0
    assert connect(gate, "10.0.0.9") is not None and first is not None and first.displaced


def test_vouched_connections_are_not_displaced_and_a_station_has_at_most_a_few() -> None:
    gate, clock = gate_of(VOUCHED_PER_STATION + 1)
    vouched = [connect(gate, f"10.0.0.{i}") for i in range(VOUCHED_PER_STATION + 1)]
    for conn in vouched:
        gate.vouch(g(conn), "st1")  # the last one unvouches the oldest: unproven again, its grace anew
    clock.now += 5
    assert connect(gate, "10.9.0.1") is not None
    assert vouched[0] is not None and vouched[0].displaced
    assert all(c is not None and not c.displaced for c in vouched[1:])
    assert connect(gate, "10.9.0.2") is None  # the newcomer is within its grace, the others vouched


def test_tables_and_the_log_stay_bounded_whatever_addresses_a_flood_rotates_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100,000 addresses, each opening three connections over its cap of two (the third refused), one in
    fourteen authenticating (and leaving): one log line per kind (refused per address, displaced) a minute,
    each with its count and the addresses seen most; tables no larger than the cap and KNOWN_PEERS."""
    caplog.set_level(logging.INFO)
    gate, clock = gate_of(64, per_peer=2, grace_s=0.05)
    for i in range(100_000):
        peer = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        conns = [connect(gate, peer) for _ in range(3)]
        assert conns[2] is None
        if i % 14 == 1 and conns[0] is not None and not conns[0].displaced:  # (and leaves: i is odd)
            gate.authenticated(g(conns[0]))
        clock.now += 0.006  # 600 s in all
        if i % 2:  # half of them leave at once
            for conn in conns:
                if conn is not None and not conn.displaced:
                    gate.release(g(conn))
    assert gate.open <= 64 and len(gate.peers) <= 64 and gate.unproven <= 64
    assert len(gate._known) <= KNOWN_PEERS
    assert len(gate._unproven) <= 64 and len(gate._lone) + len(gate._surplus) == gate.unproven
    assert gate.counters["refused_peer"] > 0 and gate.counters["displaced"] > 1000
    assert gate.counters["refused_peer"] + gate.counters["refused_full"] >= 100_000
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.connections"]
    for kind in ("which holds 2, its cap per address", "closed an unproven connection"):
        mine = [line for line in lines if kind in line]
        assert 2 <= len(mine) <= 11, (kind, len(mine))  # 600 s: the first line, then one a minute at most
        assert "like this since the last report, most from 10." in mine[-1]


def test_a_flood_in_waves_is_one_alarm_cleared_once_it_has_stayed_away() -> None:
    """A flood that fills the listener in waves raised and cleared the at-cap alarm 15-17 times in 30 s (two log
    lines and two alarm events each). The alarm now clears only once the listener has drained and has not been
    at its cap for FULL_CLEAR_HOLD_S: one alarm for the whole flood."""
    alarms = Alarms()
    events: list[str] = []
    alarms.subscribe(lambda kind, alarm: events.append(kind))
    gate, clock = gate_of(4, per_peer=1, grace_s=100.0, alarms=alarms)
    for wave in range(5):
        conns = [connect(gate, f"10.0.{wave}.{i}") for i in range(4)]
        assert connect(gate, f"10.1.{wave}.0") is None  # at the cap: every lone connection is in its grace
        for conn in conns:
            gate.release(g(conn))  # the wave goes: the listener has drained
        assert alarms.get(gate.cause) is not None, wave  # ... but it was at its cap a moment ago
        clock.now += FULL_CLEAR_HOLD_S / 4
    assert events == ["raised"]
    clock.now += FULL_CLEAR_HOLD_S
    last = connect(gate, "10.2.0.0")
    gate.release(g(last))  # the next release past the hold clears it (a timer does when none comes)
    assert alarms.get(gate.cause) is None
    assert events == ["raised", "cleared"]
