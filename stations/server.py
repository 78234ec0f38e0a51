"""The appliance's station server: one session loop per connection (serial port or TLS connection).

The loop reads frames from a FrameChannel, feeds them to an ApplianceSession, writes its replies and hands
authenticated requests to an ``Enroller``, the narrow interface the appliance implements. Each request runs in
its own task, so a slow issuance never stalls the connection (PING, duplicate requests) and one station never
delays another. The server keeps a ``StationState`` per station for a control API or dashboard.

This package never imports the appliance: the Enroller protocol is all it knows of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from stations.codec import DecodeEvent, Frame
from stations.codes import Code
from stations.errors import SessionError, StationError
from stations.limits import DEFAULT_FAILURE_LIMIT, DEFAULT_FAILURE_WINDOW, FailureLimiter
from stations.messages import (
    NO_REQUEST,
    CaChain,
    Cert,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Message,
    Pending,
    Pong,
)
from stations.session import (
    ApplianceSession,
    Authenticated,
    Closed,
    HandshakeFailed,
    KeyLookup,
    Received,
    Rejected,
    plain_frame,
)
from stations.transports.base import ChannelClosed, FrameChannel

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 90.0
# Frames refused as forged or replayed: evidence of tampering (or a broken station), counted like a failed
# handshake. Noise never gets here: the CRC drops it before the tag is checked.
FORGED = frozenset({Code.BAD_TAG, Code.REPLAY})
BLOCKED_PAUSE = 1.0  # at most one frame a second is read from a connection whose station is blocked
DUPLICATE_RETRY_MS = 1000  # PENDING answer to an ENROLL whose request id is still being worked on
CLOSE_SEND_TIMEOUT = (
    1.0  # a last frame (BYE, ERROR TIMEOUT) to a peer that does not read is given up after this
)
# Requests of one connection being worked on at once. Each is a task holding its message (a CSR is up to 8 KiB);
# past this a request is answered BUSY at once, so a peer pipelining requests cannot grow the task set.
MAX_REQUESTS_IN_FLIGHT = 8


class EnrollPending(StationError):
    """Raised by an Enroller to answer PENDING(retry_after_ms): accepted, not finished (e.g. the HSM is busy)."""

    def __init__(self, retry_after_ms: int, text: str = "in progress") -> None:
        super().__init__(Code.BUSY, text)
        self.retry_after_ms = max(0, min(int(retry_after_ms), 0xFFFFFFFF))


class Enroller(Protocol):
    """What the server needs from the appliance. Raise StationError(code, text) to refuse a request."""

    async def ca_chain(self, station: str, profile: str | None) -> list[bytes]:
        """DER certificates of the CA that issues ``profile`` (None: the default profile), issuing CA first,
        root last. Raise StationError(UNKNOWN_PROFILE) for a profile the appliance does not serve."""
        ...

    async def enroll(
        self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
    ) -> list[bytes]:
        """Device certificate DER first, then its issuers. Raise EnrollPending to answer PENDING."""
        ...

    async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
        """Record delivery; StationError(UNKNOWN_REQUEST / CONFIRM_MISMATCH) to refuse."""
        ...


@dataclass(frozen=True)
class LinkFailure:
    """A failed handshake or a frame refused as forged or replayed (BAD_TAG, REPLAY): what the appliance
    audits, and alarms on when a station keeps failing."""

    station: str  # the station the port or certificate is bound to; else the id claimed in HELLO; else ""
    peer: str  # the transport's peer: a port path, or host:port
    code: Code
    text: str  # ours, never the peer's
    claimed: str = ""  # the station id the peer sent in HELLO, when it sent one
    blocked_s: float = 0.0  # > 0: this failure reached the limit; the station's handshakes get BUSY this long


class LinkMonitor(Protocol):
    """What the server reports to the appliance about failing links (the appliance audits them in bounded
    space, logs each cause once per interval and raises alarms). Called on the event loop; must not block."""

    def link_failed(self, failure: LinkFailure) -> None: ...

    def link_authenticated(self, station: str, peer: str) -> None: ...


@dataclass
class StationState:
    """What the appliance knows of one station right now (for the control API and the dashboard)."""

    name: str
    connections: int = 0
    peer: str | None = None
    authenticated: bool = False
    enrolling: int = 0
    last_device_serial: str | None = None
    last_error: str | None = None
    last_seen: float | None = None  # time.time() of the last valid frame
    counters: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def connected(self) -> bool:
        return self.connections > 0

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name, "connected": self.connected, "connections": self.connections, "peer": self.peer,
            "authenticated": self.authenticated, "enrolling": self.enrolling,
            "last_device_serial": self.last_device_serial, "last_error": self.last_error,
            "last_seen": self.last_seen, "counters": dict(self.counters),
        }  # fmt: skip


def clean_text(text: str, limit: int = 200) -> str:
    """Escape control, format (bidi) and other non-printing characters so the text is safe on any screen."""
    out = []
    for ch in text[:limit]:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Cs", "Co"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class StationServer:
    """Runs station sessions over any FrameChannel. ``serve()`` once per connection, each in its own task.

    Failed handshakes and forged or replayed frames (BAD_TAG, REPLAY) count against the station the port or
    certificate is bound to (``limits.FailureLimiter``: ``failure_limit`` within ``failure_window_s``); past
    the limit its session ends with BYE BUSY and its HELLOs are answered BUSY, before any key lookup or
    derivation, until the window has passed, and a connection of a blocked station is read at most once per
    ``blocked_pause_s``. Each of them is reported to ``monitor``. Peer-caused conditions
    are logged at DEBUG only: the monitor decides what reaches the log, so a flood cannot fill it.
    """

    def __init__(
        self,
        enroller: Enroller,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        failure_limit: int = DEFAULT_FAILURE_LIMIT,
        failure_window_s: float = DEFAULT_FAILURE_WINDOW,
        monitor: LinkMonitor | None = None,
        blocked_pause_s: float = BLOCKED_PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enroller = enroller
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.limiter = FailureLimiter(failure_limit, failure_window_s)
        self.monitor = monitor
        self.blocked_pause_s = blocked_pause_s
        self.clock = clock
        self.states: dict[str, StationState] = {}
        self.unattributed = StationState(
            ""
        )  # decode events and refusals of connections with no known station
        self._connections: dict[str, set[_Connection]] = collections.defaultdict(set)

    def state(self, name: str) -> StationState:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = StationState(name)
        return st

    def connected(self, name: str) -> int:
        return len(self._connections.get(name, ()))

    def drop(self, name: str, code: Code = Code.STATION_DISABLED) -> int:
        """End every connection of a station (disabled, key rotated). Returns how many were dropped."""
        conns = list(self._connections.get(name, ()))
        for conn in conns:
            conn.drop(code)
        return len(conns)

    async def serve(
        self,
        channel: FrameChannel,
        lookup: KeyLookup,
        *,
        station: str | None = None,
        close_on_timeout: bool = True,
        on_authenticated: Callable[[], None] | None = None,
    ) -> None:
        """Run one connection until the peer goes away or the station is dropped; never raises ChannelClosed.

        ``station`` is the station the transport has already bound (the TLS certificate's or the port's owner);
        ``lookup`` must refuse every other id. The timers (docs/station-protocol.md section 9) tell the station
        what ended: a handshake not completed in ``handshake_timeout`` gets a plain ERROR TIMEOUT, a session
        idle for ``idle_timeout`` a sealed BYE TIMEOUT. ``close_on_timeout`` (TLS) then ends the connection,
        and its handshake timer runs from the moment it opens; a serial port (False) stays open, forgets the
        session, and times only a handshake it has answered with a CHALLENGE.
        ``on_authenticated`` is called at each completed handshake (the listener's bound on unauthenticated
        connections).
        """
        conn = _Connection(self, channel, lookup, station, close_on_timeout)
        conn.on_authenticated = on_authenticated
        conn.task = asyncio.create_task(conn.run(), name=f"station-conn {channel.peer}")
        try:
            await asyncio.shield(conn.task)
        except asyncio.CancelledError:
            # Our caller is being cancelled (daemon shutdown): end the connection with BYE BUSY.
            conn.drop(Code.BUSY)
            with contextlib.suppress(BaseException):
                await conn.task
            raise
        finally:
            await conn.finish()


class _Connection:
    def __init__(
        self,
        server: StationServer,
        channel: FrameChannel,
        lookup: KeyLookup,
        station: str | None,
        close_on_timeout: bool,
    ) -> None:
        self.server = server
        self.channel = channel
        self._lookup = lookup
        self.session = ApplianceSession(self._guarded_lookup)
        self.bound = station
        self.station: str | None = None  # the authenticated station id
        self.close_on_timeout = close_on_timeout
        self.task: asyncio.Task[None] | None = None
        self.on_authenticated: Callable[[], None] | None = None
        self.drop_code: Code | None = None
        self._lock = asyncio.Lock()
        self._requests: set[asyncio.Task[None]] = set()
        self._inflight: set[bytes] = set()
        now = server.clock()
        # The handshake timer restarts with every CHALLENGE that starts a new handshake (a HELLO with a new
        # nonce) and whenever a session ends, so each of a station's handshake rounds gets the whole limit.
        self._handshake_started = now
        self._last_valid = now
        if station is not None:
            self._attach(station)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _attach(self, name: str) -> None:
        if self.station == name or (self.bound == name and self in self.server._connections[name]):
            self.station = name
            return
        if self.station is not None:
            self._detach(self.station)
        self.station = name
        self.server._connections[name].add(self)
        st = self.server.state(name)
        st.connections += 1
        st.peer = self.channel.peer

    def _detach(self, name: str) -> None:
        conns = self.server._connections.get(name)
        if conns is not None and self in conns:
            conns.discard(self)
            if not conns:
                del self.server._connections[name]
            st = self.server.state(name)
            st.connections -= 1
            if st.connections == 0:
                st.authenticated = False

    @property
    def state(self) -> StationState:
        name = self.station or self.bound
        return self.server.state(name) if name else self.server.unattributed

    def drop(self, code: Code) -> None:
        if self.drop_code is None:
            self.drop_code = code
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def finish(self) -> None:
        for t in list(self._requests):
            t.cancel()
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)
        if self.drop_code is not None:
            with contextlib.suppress(StationError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_SEND_TIMEOUT):
                    await self.channel.send(self.session.close(self.drop_code))
        if self.station is not None:
            self._detach(self.station)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.channel.close()

    # -- the loop ----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._loop()
        except ChannelClosed as exc:
            log.debug("station connection %s closed: %s", self.channel.peer, exc)
        except asyncio.CancelledError:
            if self.drop_code is None:
                raise
            log.info(
                "station %s dropped (%s)",
                self.station or self.bound or self.channel.peer,
                self.drop_code.name,
            )

    def _deadline(self) -> float | None:
        if self.session.established:
            return self._last_valid + self.server.idle_timeout
        if self.close_on_timeout or self._challenged():
            return self._handshake_started + self.server.handshake_timeout
        return None  # a serial port with no handshake pending: nothing to time

    async def _loop(self) -> None:
        while True:
            deadline = self._deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.server.clock())
            try:
                async with asyncio.timeout(timeout):
                    item = await self.channel.recv()
            except TimeoutError:
                if await self._on_timeout():
                    return
                continue
            if isinstance(item, DecodeEvent):
                self.state.counters[item.kind.value] += 1
                continue
            if await self._on_frame(item):
                return

    async def _on_timeout(self) -> bool:
        """A timer expired: tell the station (sealed BYE TIMEOUT for a session, which it can trust; plain ERROR
        TIMEOUT for a handshake, which has no key yet). True ends the connection."""
        st = self.state
        async with self._lock:
            if self.session.established:
                st.counters["idle_timeout"] += 1
                log.debug(
                    "station %s: session idle for %.1f s, ended", self.station, self.server.idle_timeout
                )
                wire = self.session.close(Code.TIMEOUT)
            else:
                st.counters["handshake_timeout"] += 1
                self.session.reset()
                wire = plain_frame(Error(Code.TIMEOUT, "handshake not completed in time"))
            st.authenticated = False
            self._handshake_started = self.server.clock()
            with contextlib.suppress(StationError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_SEND_TIMEOUT):
                    await self.channel.send(wire)
        return self.close_on_timeout

    async def _on_frame(self, frame: Frame) -> bool:
        """Handle one frame. True ends the connection."""
        handshakes = self.session.handshakes
        async with self._lock:
            step = self.session.receive(frame)
            for wire in step.send:
                await self.channel.send(wire)
        valid = True
        blocked = 0.0
        for event in step.events:
            if isinstance(event, Authenticated):
                self._attach(event.station_id)
                st = self.server.state(event.station_id)
                st.authenticated = True
                st.peer = self.channel.peer
                st.counters["sessions"] += 1
                self.server.limiter.succeeded(self._limit_key(event.station_id))
                if self.server.monitor is not None:
                    self.server.monitor.link_authenticated(event.station_id, self.channel.peer)
                if self.on_authenticated is not None:
                    self.on_authenticated()
            elif isinstance(event, HandshakeFailed):
                valid = False
                blocked = max(blocked, self._on_handshake_failed(event))
            elif isinstance(event, Rejected):
                valid = False
                code = Code(event.code)
                self.state.counters[f"rejected_{code.name.lower()}"] += 1
                log.debug("station %s: frame rejected: %s", self.station or self.channel.peer, event.text)
                if code in FORGED:
                    blocked = max(blocked, self._failed(code, event.text, self.station or ""))
            elif isinstance(event, Closed):
                self.state.authenticated = False
                self._handshake_started = self.server.clock()
            elif isinstance(event, Received):
                msg = event.message
                if isinstance(msg, Enroll) and msg.request_id in self._inflight:
                    # The same request id still being worked on (sent again before its answer): PENDING, never a
                    # second answer of another kind for one request id.
                    await self._reply(Pending(msg.request_id, DUPLICATE_RETRY_MS))
                elif len(self._requests) >= MAX_REQUESTS_IN_FLIGHT and not isinstance(msg, Pong):
                    self.state.counters["busy_in_flight"] += 1
                    rid = getattr(event.message, "request_id", NO_REQUEST)
                    await self._reply(Error(Code.BUSY, "too many requests in flight on this connection", rid))
                else:
                    self._dispatch(event.message)
        if self.session.handshakes != handshakes:
            self._handshake_started = self.server.clock()
        if valid:
            self._last_valid = self.server.clock()
            if self.session.established:
                self.state.last_seen = time.time()
        for event in step.events:
            if isinstance(event, HandshakeFailed) and event.code == Code.BUSY:
                # A station told BUSY for its failures that asks again at once is not listening: read its
                # next frame no sooner than blocked_pause_s, so a loop of HELLOs costs the appliance next to
                # nothing.
                wait = self.server.limiter.blocked(self._limit_key(event.station_id), self.server.clock())
                if wait:
                    await asyncio.sleep(min(wait, self.server.blocked_pause_s))
        if not blocked:
            return False
        # Over the limit: end the session (authentically, so the station knows why) and, on TLS, the
        # connection; its next HELLOs get BUSY until the window has passed.
        async with self._lock:
            wire = self.session.close(Code.BUSY) if self.session.established else b""
            self.state.authenticated = False
            self._handshake_started = self.server.clock()
            if wire:
                with contextlib.suppress(StationError, OSError, TimeoutError):
                    async with asyncio.timeout(CLOSE_SEND_TIMEOUT):
                        await self.channel.send(wire)
        return self.close_on_timeout

    def _challenged(self) -> bool:
        return not self.session.established and self.session.station_id is not None

    def _on_handshake_failed(self, event: HandshakeFailed) -> float:
        """Count, report and limit a failed handshake; returns the blocking time if it reached the limit."""
        code = Code(event.code)
        name = event.station_id if event.station_id in self.server.states else None
        st = self.server.state(self.bound) if self.bound else (self.server.state(name) if name else None)
        st = st or self.server.unattributed
        st.counters["auth_failed" if code is Code.AUTH_FAILED else f"refused_{code.name.lower()}"] += 1
        st.last_error = f"{code.name}: {clean_text(event.text)}"
        log.debug(
            "station handshake refused on %s: %s (%s) for station id %r",
            self.channel.peer, code.name, clean_text(event.text), clean_text(event.station_id, 64),
        )  # fmt: skip
        return self._failed(code, event.text, event.station_id)

    def _limit_key(self, claimed: str) -> str:
        # The port or certificate a connection is bound to is the station; an unbound connection (not used by
        # the daemon) is limited by the id it claims.
        return self.bound or claimed or f"peer:{self.channel.peer}"

    def _failed(self, code: Code, text: str, claimed: str) -> float:
        """Count a failure against the station (unless it is the BUSY of an earlier block) and report it."""
        key = self._limit_key(claimed)
        blocked = 0.0
        if code is not Code.BUSY:
            blocked = self.server.limiter.failed(key, self.server.clock()) or 0.0
        if blocked:
            self.state.counters["blocked"] += 1
        if self.server.monitor is not None:
            self.server.monitor.link_failed(
                LinkFailure(key, self.channel.peer, code, clean_text(text), claimed, blocked)
            )
        return blocked

    def _guarded_lookup(self, station_id: str) -> bytes | None:
        """The key lookup behind the limit: a blocked station is refused before any lookup or derivation."""
        wait = self.server.limiter.blocked(self._limit_key(station_id), self.server.clock())
        if wait is not None:
            raise StationError(Code.BUSY, f"too many failed attempts: try again in {math.ceil(wait)} s")
        return self._lookup(station_id)

    # -- requests ----------------------------------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Enroll):
            # In flight from now, not from when its task first runs: frames read in one go are all dispatched
            # before any task starts, and a copy among them must be seen as one.
            self._inflight.add(message.request_id)
            self._spawn(self._enroll(message))
        elif isinstance(message, Confirm):
            self._spawn(self._confirm(message))
        elif isinstance(message, GetCaChain):
            self._spawn(self._ca_chain(message.profile or None))
        # PONG: nothing to do; the frame already counted as traffic.

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _reply(self, message: Message) -> None:
        async with self._lock:
            try:
                wire = self.session.send(message)
            except SessionError:
                return  # the session ended meanwhile; the station repeats the request in its next session
            with contextlib.suppress(ChannelClosed):
                await self.channel.send(wire)

    def _fail(self, exc: StationError, request_id: bytes, what: str) -> Message:
        st = self.state
        text = clean_text(exc.text)
        st.last_error = f"{Code(exc.code).name}: {text}"
        st.counters[f"{what}_refused"] += 1
        return Error(exc.code, text, request_id)

    async def _enroll(self, msg: Enroll) -> None:
        name = self.station or ""
        st = self.state
        st.enrolling += 1
        st.last_device_serial = msg.device_serial
        reply: Message
        try:
            chain = await self.server.enroller.enroll(
                name, msg.request_id, msg.device_serial, msg.csr, msg.profile or None
            )
            reply = Cert(msg.request_id, tuple(chain))
            st.counters["enrolled"] += 1
        except EnrollPending as exc:
            reply = Pending(msg.request_id, exc.retry_after_ms)
        except StationError as exc:
            reply = self._fail(exc, msg.request_id, "enroll")
        except Exception:
            log.exception("station %s: enrolment of %r failed", name, clean_text(msg.device_serial, 64))
            reply = self._fail(StationError(Code.INTERNAL, "internal error"), msg.request_id, "enroll")
        finally:
            st.enrolling -= 1
            self._inflight.discard(msg.request_id)
        await self._reply(reply)

    async def _confirm(self, msg: Confirm) -> None:
        reply: Message
        try:
            await self.server.enroller.confirm(self.station or "", msg.request_id, msg.cert_sha256)
            reply = Confirmed(msg.request_id)
            self.state.counters["confirmed"] += 1
        except StationError as exc:
            reply = self._fail(exc, msg.request_id, "confirm")
        except Exception:
            log.exception("station %s: confirm failed", self.station)
            reply = self._fail(StationError(Code.INTERNAL, "internal error"), msg.request_id, "confirm")
        await self._reply(reply)

    async def _ca_chain(self, profile: str | None) -> None:
        reply: Message
        try:
            reply = CaChain(tuple(await self.server.enroller.ca_chain(self.station or "", profile)))
        except StationError as exc:
            reply = self._fail(exc, bytes(16), "ca_chain")
        except Exception:
            log.exception("station %s: CA chain failed", self.station)
            reply = self._fail(StationError(Code.INTERNAL, "internal error"), bytes(16), "ca_chain")
        await self._reply(reply)
