"""stations.server over real sockets (a socketpair), with a small in-test Enroller."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from stations.codec import Frame
from stations.codes import Code
from stations.errors import StationError
from stations.messages import (
    CHALLENGE,
    AuthOk,
    Cert,
    Challenge,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    Message,
    Pending,
    Ping,
    Pong,
    decode_message,
)
from stations.server import MAX_REQUESTS_IN_FLIGHT, EnrollPending, LinkFailure, StationServer, clean_text
from stations.session import Authenticated, Closed, HandshakeFailed, Received, StationSession
from stations.transports.base import ChannelClosed
from stations.transports.stream import StreamChannel
from tests.stations.station_link import Link, request_id

KEYS = {"st-a": os.urandom(32), "st-b": os.urandom(32)}


@dataclass
class SlowEnroller:
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0
    issued: dict[bytes, bytes] = field(default_factory=dict)

    async def ca_chain(self, station: str, profile: str | None) -> list[bytes]:
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


async def test_copies_of_a_request_read_in_one_go_are_one_request_and_the_copies_pending(rig: Rig) -> None:
    """Identical ENROLLs arriving together (one write, so all are read before any is worked on) are one request:
    the first is answered CERT, every copy PENDING (protocol section 14), never two CERTs or a BUSY."""
    a = await rig.connect("st-a")
    assert isinstance(await a.handshake(), Authenticated)
    rid = request_id()
    wires = [a.session.send(_enroll("SN-DUP", rid)) for _ in range(5)]
    await a.channel.send(b"".join(wires))
    pending = [await a.events() for _ in range(4)]
    assert all(
        isinstance(e[0], Received) and isinstance(e[0].message, Pending) and e[0].message.request_id == rid
        for e in pending
    )
    assert rig.server.states["st-a"].enrolling == 1
    rig.enroller.gate.set()
    (cert,) = await a.events()
    assert isinstance(cert, Received) and isinstance(cert.message, Cert)
    assert rig.enroller.calls == 1


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


async def _plain_frames_then_close(link: Link, timeout: float = 10.0) -> list[Message]:
    """Every plain message the appliance sends until it closes the connection."""
    out: list[Message] = []
    with pytest.raises(ChannelClosed):
        async with asyncio.timeout(timeout):
            while True:
                item = await link.channel.recv()
                if isinstance(item, Frame) and not item.sealed:
                    out.append(decode_message(item.kind, item.payload))
    return out


async def test_idle_session_ends_with_a_sealed_bye_timeout_and_the_port_stays_open(rig: Rig) -> None:
    a = await rig.connect("st-a", bound="st-a", close_on_timeout=False)
    assert isinstance(await a.handshake(), Authenticated)
    # Nothing sent: the appliance says why it ends the session, authentically, on its own.
    (closed,) = await a.events()
    assert isinstance(closed, Closed) and closed.code == Code.TIMEOUT and closed.bye
    assert rig.server.states["st-a"].counters["idle_timeout"] == 1
    # A serial port stays open: the station authenticates again on the same line.
    assert isinstance(await a.handshake(), Authenticated)
    assert isinstance(await a.request(Ping(3)), Pong)


async def test_idle_session_on_tls_ends_with_bye_timeout_then_the_connection_closes(rig: Rig) -> None:
    a = await rig.connect("st-a", bound="st-a")
    assert isinstance(await a.handshake(), Authenticated)
    (closed,) = await a.events()
    assert isinstance(closed, Closed) and closed.code == Code.TIMEOUT and closed.bye
    with pytest.raises(ChannelClosed):
        async with asyncio.timeout(5):
            await a.channel.recv()


async def test_connection_without_handshake_gets_timeout_then_closes(rig: Rig) -> None:
    a = await rig.connect("st-a")
    (error,) = await _plain_frames_then_close(a)
    assert isinstance(error, Error) and error.code == Code.TIMEOUT and error.request_id == bytes(16)
    assert rig.server.unattributed.counters["handshake_timeout"] == 1


async def test_unanswered_challenge_on_a_serial_port_gets_timeout_and_is_forgotten(rig: Rig) -> None:
    b = await rig.connect("st-a", bound="st-a", close_on_timeout=False)
    await b.channel.send(b.session.hello())
    challenge = await _next_plain(b)
    assert isinstance(challenge, Challenge)
    # The station never sends its AUTH: the appliance gives up on the handshake and says so, in plain.
    timeout = await _next_plain(b)
    assert isinstance(timeout, Error) and timeout.code == Code.TIMEOUT
    assert rig.server.states["st-a"].counters["handshake_timeout"] == 1
    # The port stays open; the late AUTH finds no handshake, and a new HELLO works.
    step = b.session.receive(Frame(CHALLENGE, challenge.encode()))
    await b.channel.send(step.send[0])
    late = await _next_plain(b)
    assert isinstance(late, Error) and late.code == Code.UNEXPECTED_MESSAGE
    assert isinstance(await b.handshake(), Authenticated)


async def _next_plain(link: Link, timeout: float = 10.0) -> Message:
    async with asyncio.timeout(timeout):
        while True:
            item = await link.channel.recv()
            if isinstance(item, Frame) and not item.sealed:
                return decode_message(item.kind, item.payload)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_every_new_handshake_gets_the_whole_handshake_time() -> None:
    """A station that starts a new round (new nonce) late in the handshake time still gets the whole limit
    for it. The server's clock is a fake, so nothing here depends on how fast the machine is."""
    clock = _Clock()
    server = StationServer(SlowEnroller(), handshake_timeout=100.0, idle_timeout=1000.0, clock=clock)
    a_sock, b_sock = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a_sock)
    rb, wb = await asyncio.open_connection(sock=b_sock)
    task = asyncio.create_task(server.serve(StreamChannel(ra, wa, peer="pair"), KEYS.get, station="st-a"))
    link = Link(StreamChannel(rb, wb), "st-a", KEYS["st-a"])
    try:
        clock.now += 60  # connected 60 s ago: 40 s of the first handshake time left
        first = link.session.hello()
        await link.channel.send(first)
        assert isinstance(await _next_plain(link), Challenge)
        clock.now += 90  # the first round ran out of time on the station's side; a new round, new nonce
        link.session.reset()
        second = link.session.hello()
        assert second != first
        await link.channel.send(second)
        challenge = await _next_plain(link)
        assert isinstance(challenge, Challenge)
        clock.now += 90  # 240 s after connecting, 90 s into the second round: still within it
        await link.channel.send(link.session.resend() or b"")  # the identical HELLO again: a no-op
        assert await _next_plain(link) == challenge
        step = link.session.receive(Frame(CHALLENGE, challenge.encode()))
        await link.channel.send(step.send[0])
        ok = await _next_plain(link)
        assert isinstance(ok, AuthOk)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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


@dataclass
class Monitor:
    """The appliance's side of the hook: records what the server reports."""

    failures: list[LinkFailure] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def link_failed(self, failure: LinkFailure) -> None:
        self.failures.append(failure)

    def link_authenticated(self, station: str, peer: str) -> None:
        self.sessions.append(station)


class CountingLookup:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, station_id: str) -> bytes | None:
        self.calls += 1
        return KEYS.get(station_id)


@contextlib.asynccontextmanager
async def _limited(
    limit: int, close_on_timeout: bool
) -> AsyncIterator[tuple[StationServer, Monitor, CountingLookup, Link]]:
    """One station link on port "/dev/ttyUSB7" bound to st-a, with a failure limit and a recording monitor."""
    monitor, lookup = Monitor(), CountingLookup()
    server = StationServer(
        SlowEnroller(), failure_limit=limit, failure_window_s=600, monitor=monitor, blocked_pause_s=0.01
    )
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    channel = StreamChannel(ra, wa, peer="/dev/ttyUSB7")
    task = asyncio.create_task(
        server.serve(channel, lookup, station="st-a", close_on_timeout=close_on_timeout)
    )
    try:
        yield server, monitor, lookup, Link(StreamChannel(rb, wb), "st-a", KEYS["st-a"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_station_over_its_failure_limit_gets_busy_without_any_key_derivation() -> None:
    async with _limited(limit=4, close_on_timeout=False) as (server, monitor, lookup, link):
        await _over_the_limit(server, monitor, lookup, link)


async def _over_the_limit(
    server: StationServer, monitor: Monitor, lookup: CountingLookup, link: Link
) -> None:
    link.session = StationSession("st-a", bytes(32))  # the wrong key
    for _ in range(4):
        failed = await link.handshake()
        assert isinstance(failed, HandshakeFailed) and failed.code == Code.AUTH_FAILED
    assert lookup.calls == 4
    for _ in range(5):
        busy = await link.handshake()
        assert isinstance(busy, HandshakeFailed) and busy.code == Code.BUSY and "try again in" in busy.text
    assert lookup.calls == 4  # refused before the key lookup, so before any key derivation
    # Every failure was reported, the one that reached the limit with its blocking time.
    assert [(f.code, f.blocked_s) for f in monitor.failures] == [
        *[(Code.AUTH_FAILED, 0.0)] * 3, (Code.AUTH_FAILED, 600.0), *[(Code.BUSY, 0.0)] * 5,
    ]  # fmt: skip
    assert {(f.station, f.peer, f.claimed) for f in monitor.failures} == {("st-a", "/dev/ttyUSB7", "st-a")}
    # The right key is refused too until the window has passed: the block is on the station, not the key.
    link.session = StationSession("st-a", KEYS["st-a"])
    assert isinstance(await link.handshake(), HandshakeFailed)
    assert server.states["st-a"].counters["blocked"] == 1 and not monitor.sessions


async def test_forged_frames_count_too_and_end_the_session_with_bye_busy() -> None:
    async with _limited(limit=3, close_on_timeout=True) as (server, monitor, _, link):
        await _forged(server, monitor, link)


async def _forged(server: StationServer, monitor: Monitor, link: Link) -> None:
    assert isinstance(await link.handshake(), Authenticated)
    assert monitor.sessions == ["st-a"]
    for i in range(2):
        wire = bytearray(link.session.send(Ping(i)))
        wire[-5] ^= 0x01  # the last tag byte; then a CRC that matches, as a tamperer (not noise) would send
        forged = bytes(wire[:-4]) + zlib.crc32(bytes(wire[:-4])).to_bytes(4, "big")
        await link.channel.send(forged)
        (reply,) = await link.events()
        assert isinstance(reply, Received) and isinstance(reply.message, Error)
        assert reply.message.code == Code.BAD_TAG
    assert isinstance(await link.request(Ping(9)), Pong)  # a genuine frame...
    await link.channel.send(link.recorded[-1])  # ...replayed: the third failure
    events = []
    with contextlib.suppress(ChannelClosed):
        async with asyncio.timeout(5):
            while True:
                events.extend(await link.events())
    assert isinstance(events[0], Received) and events[0].message.code == Code.REPLAY  # type: ignore[attr-defined]
    assert isinstance(events[1], Closed) and events[1].bye and events[1].code == Code.BUSY
    assert [f.code for f in monitor.failures] == [Code.BAD_TAG, Code.BAD_TAG, Code.REPLAY]
    assert monitor.failures[-1].blocked_s == 600
    assert server.connected("st-a") == 0  # TLS: the connection is closed with it


async def test_a_blocked_station_that_keeps_asking_is_read_once_per_pause() -> None:
    """Told BUSY, a station that sends HELLO after HELLO gets its answers no faster than one per pause: the
    pause only makes answers later, so a slow machine cannot make this fail."""
    monitor, lookup = Monitor(), CountingLookup()
    server = StationServer(
        SlowEnroller(), failure_limit=1, failure_window_s=600, monitor=monitor, blocked_pause_s=0.3
    )
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    task = asyncio.create_task(
        server.serve(StreamChannel(ra, wa, peer="p"), lookup, station="st-a", close_on_timeout=False)
    )
    try:
        link = Link(StreamChannel(rb, wb), "st-a", bytes(32))
        failed = await link.handshake()
        assert isinstance(failed, HandshakeFailed) and failed.code == Code.AUTH_FAILED
        start = time.monotonic()
        for _ in range(4):
            await link.channel.send(link.session.hello())
        answers = [await _next_plain(link) for _ in range(4)]
        assert all(isinstance(e, Error) and e.code == Code.BUSY for e in answers)
        assert time.monotonic() - start >= 3 * 0.3
        assert lookup.calls == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
