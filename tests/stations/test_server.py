"""stations.server over real sockets (a socketpair), with a small in-test Enroller."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from stations.codes import Code
from stations.errors import StationError
from stations.messages import Cert, Confirm, Confirmed, Enroll, Error, Pending, Ping, Pong
from stations.server import MAX_REQUESTS_IN_FLIGHT, EnrollPending, StationServer, clean_text
from stations.session import Authenticated, Closed, Received
from stations.transports.stream import StreamChannel
from tests.stations.station_link import Link, request_id

KEYS = {"st-a": os.urandom(32), "st-b": os.urandom(32)}


@dataclass
class SlowEnroller:
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0
    issued: dict[bytes, bytes] = field(default_factory=dict)

    async def ca_chain(self, station: str) -> list[bytes]:
        return [b"ca"]

    async def enroll(
        self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
    ) -> list[bytes]:
        self.calls += 1
        if device_serial == "PENDING":
            raise EnrollPending(250)
        if device_serial == "REFUSE":
            raise StationError(Code.DEVICE_ALREADY_ISSUED, "already\x1b[31m issued")
        if device_serial == "CRASH":
            raise RuntimeError("secret internals")
        await self.gate.wait()
        cert = b"cert-" + device_serial.encode()
        self.issued[request_id] = cert
        return [cert, b"ca"]

    async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
        if request_id not in self.issued:
            raise StationError(Code.UNKNOWN_REQUEST, "unknown")
        if hashlib.sha256(self.issued[request_id]).digest() != cert_sha256:
            raise StationError(Code.CONFIRM_MISMATCH, "mismatch")


@dataclass
class Rig:
    server: StationServer
    enroller: SlowEnroller
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self, name: str, *, bound: str | None = None, close_on_timeout: bool = True) -> Link:
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        self.tasks.append(
            asyncio.create_task(
                self.server.serve(
                    StreamChannel(ra, wa, peer=f"pair-{name}"),
                    KEYS.get,
                    station=bound,
                    close_on_timeout=close_on_timeout,
                )
            )
        )
        return Link(StreamChannel(rb, wb), name, KEYS.get(name, bytes(32)))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    enroller = SlowEnroller()
    r = Rig(StationServer(enroller, handshake_timeout=0.3, idle_timeout=0.4), enroller)
    yield r
    for t in r.tasks:
        t.cancel()
    await asyncio.gather(*r.tasks, return_exceptions=True)


def _enroll(serial: str, rid: bytes | None = None) -> Enroll:
    return Enroll(rid or request_id(), serial, b"csr")


async def test_slow_enrol_blocks_neither_the_connection_nor_other_stations(rig: Rig) -> None:
    a = await rig.connect("st-a")
    b = await rig.connect("st-b")
    assert isinstance(await a.handshake(), Authenticated)
    assert isinstance(await b.handshake(), Authenticated)
    rid = request_id()
    await a.send(_enroll("SN1", rid))
    assert isinstance(await a.request(Ping(5)), Pong)  # the enrolment is still running
    dup = await a.request(_enroll("SN1", rid))
    assert isinstance(dup, Pending) and dup.request_id == rid
    assert isinstance(await b.request(Ping(6)), Pong)
    assert rig.server.states["st-a"].enrolling == 1
    rig.enroller.gate.set()
    cert = (await a.events())[0]
    assert isinstance(cert, type(cert)) and isinstance(getattr(cert, "message", None), Cert)
    ok = await a.request(Confirm(rid, hashlib.sha256(b"cert-SN1").digest()))
    assert isinstance(ok, Confirmed)
    assert rig.server.states["st-a"].snapshot()["enrolling"] == 0


async def test_requests_in_flight_per_connection_are_capped_and_the_excess_answered_busy() -> None:
    """A station pipelining requests (the spec asks for one at a time) holds at most MAX_REQUESTS_IN_FLIGHT
    tasks; the rest are answered BUSY at once instead of queueing without bound."""
    enroller = SlowEnroller()
    # Session timers far beyond the test's steps: only the cap decides what is answered.
    rig = Rig(StationServer(enroller, handshake_timeout=60, idle_timeout=60), enroller)
    a = await rig.connect("st-a")
    assert isinstance(await a.handshake(), Authenticated)
    extra = 4
    rids = [request_id() for _ in range(MAX_REQUESTS_IN_FLIGHT + extra)]
    for i, rid in enumerate(rids):
        await a.send(_enroll(f"SN{i}", rid))
    busy = [await a.events() for _ in range(extra)]
    replies = [e[0].message for e in busy if isinstance(e[0], Received)]
    assert [r.code for r in replies if isinstance(r, Error)] == [Code.BUSY] * extra
    assert {r.request_id for r in replies if isinstance(r, Error)} == set(rids[MAX_REQUESTS_IN_FLIGHT:])
    assert rig.server.states["st-a"].enrolling == MAX_REQUESTS_IN_FLIGHT
    assert isinstance(await a.request(Ping(7)), Pong)  # the link itself stays responsive
    rig.enroller.gate.set()
    certs = [(await a.events())[0] for _ in range(MAX_REQUESTS_IN_FLIGHT)]
    assert {
        e.message.request_id for e in certs if isinstance(e, Received) and isinstance(e.message, Cert)
    } == set(rids[:MAX_REQUESTS_IN_FLIGHT])
    for t in rig.tasks:
        t.cancel()
    await asyncio.gather(*rig.tasks, return_exceptions=True)


async def test_refusals_are_coded_and_escaped_and_internal_errors_hide_details(rig: Rig) -> None:
    a = await rig.connect("st-a")
    assert isinstance(await a.handshake(), Authenticated)
    pending = await a.request(_enroll("PENDING"))
    assert isinstance(pending, Pending) and pending.retry_after_ms == 250
    refused = await a.request(_enroll("REFUSE"))
    assert isinstance(refused, Error) and refused.code == Code.DEVICE_ALREADY_ISSUED
    assert "\x1b" not in refused.text and "\\x1b" in refused.text
    crash = await a.request(_enroll("CRASH"))
    assert isinstance(crash, Error) and crash.code == Code.INTERNAL and "secret" not in crash.text
    mismatch = await a.request(Confirm(request_id(), bytes(32)))
    assert isinstance(mismatch, Error) and mismatch.code == Code.UNKNOWN_REQUEST
    assert rig.server.states["st-a"].last_error is not None


async def test_idle_session_is_forgotten(rig: Rig) -> None:
    a = await rig.connect("st-a", bound="st-a", close_on_timeout=False)
    assert isinstance(await a.handshake(), Authenticated)
    await asyncio.sleep(0.6)
    events = await a.request(Ping(1))
    # The appliance answers a sealed frame without a session with plain NO_SESSION: the station starts over.
    assert isinstance(events, Closed) and events.code == Code.NO_SESSION
    assert rig.server.states["st-a"].counters["idle_timeout"] == 1
    assert isinstance(await a.handshake(), Authenticated)


async def test_half_open_handshake_expires_and_connection_closes(rig: Rig) -> None:
    a = await rig.connect("st-a")
    with pytest.raises(Exception):  # noqa: B017 - the server closes the connection
        async with asyncio.timeout(2):
            await a.channel.recv()
    assert rig.server.unattributed.counters["handshake_timeout"] == 1


async def test_drop_ends_the_session_with_bye(rig: Rig) -> None:
    a = await rig.connect("st-a")
    assert isinstance(await a.handshake(), Authenticated)
    assert rig.server.drop("st-a") == 1
    events = await a.events()
    assert isinstance(events[0], Closed) and events[0].code == Code.STATION_DISABLED
    await asyncio.sleep(0.05)
    assert rig.server.connected("st-a") == 0 and not rig.server.states["st-a"].connected


def test_clean_text_escapes_controls_and_bidi() -> None:
    assert clean_text("a\x00b\u202ec\n") == "a\\x00b\\u202ec\\n"
