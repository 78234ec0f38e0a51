"""Admission and deadlines for every connection a listener accepts (the station TLS port, the VA, CMP, metrics).

Each listener is an asyncio server whose protocol is a ``Guard``. At accept, before anything else is
allocated for the connection (no TLS object, no HTTP parser, no task), the listener's ``ConnectionGate``
counts it against a global cap and a cap per peer address. At the global cap it displaces a connection that
is not yet a proven client, chosen so that a flood displaces its own connections first (see ConnectionGate);
over the per-peer cap, or when nothing can be displaced, it is refused cheaply (an HTTP listener writes a fixed
503 with ``Connection: close``, the TLS listener just closes) and counted; refusals, displacements and timeouts
are logged once per listener, kind and minute with their count and the addresses seen most (never once per
address); at the global cap an alarm is raised.
An admitted connection gets its real protocol (aiohttp's request handler, or TLS in front of the station
stream) with the Guard in front of it, which keeps one deadline per connection and aborts the connection when
it passes:

    HTTP   request headers complete within header_timeout_s of connect (or of the first byte of a following
           request); the body complete within body_timeout_s of its headers; a keep-alive connection idle (or a
           response unread) for idle_timeout_s after the last response
    TLS    the station listener sets its own deadline (no authenticated session within auth_timeout_s)

The counts live in memory only and are per listener. ``ensure_fd_budget`` checks at start that the caps of all
listeners together, plus a reserve, fit under the process's file-descriptor limit (RLIMIT_NOFILE), raising the
soft limit when the hard one allows, so a flood is refused by a cap, never by EMFILE. ``AcceptErrors`` turns
asyncio's accept failures (EMFILE and the like, after which asyncio pauses that listener for a second and tries
again) into one alarm instead of a traceback a second.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import resource
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.alarms import Alarms, LogTally
from appliance.errors import ConfigError, Problem

log = logging.getLogger(__name__)

__all__ = [
    "ACCEPTS_IN_FLIGHT",
    "ACCEPT_BACKLOG",
    "DISPLACE_GRACE_S",
    "FD_RESERVE",
    "AcceptErrors",
    "ConnectionCaps",
    "ConnectionGate",
    "Guard",
    "HttpLimits",
    "ensure_fd_budget",
    "serve_guarded",
    "tls_server_protocol",
]

# Descriptors the process keeps beyond its listeners: the journal and its -wal/-shm, the HSM library's files,
# prepare-worker pipes, serial ports, the upstream forwarder's connections, the listening sockets.
FD_RESERVE = 128
# The kernel's queue of connections not yet accepted, per listener; also how many asyncio accepts in one turn of
# the event loop.
ACCEPT_BACKLOG = 64
# A connection holds its descriptor from accept() before the gate has seen it: asyncio builds its transport in a
# task (the next turn), which calls connection_made (the turn after), and a refused or displaced connection is
# closed a turn later still, while each turn may accept another backlog. So beyond its cap a flooded listener
# holds up to four backlogs of descriptors in flight; the descriptor budget counts them.
ACCEPTS_IN_FLIGHT = 4 * ACCEPT_BACKLOG

# The TLS read buffer asyncio allocates per connection is 256 KiB (asyncio.sslproto.SSLProtocol.max_size).
# One TLS record is at most 16 KiB of plaintext plus 2 KiB of expansion, so 32 KiB reads whole records; a flood
# of connections then costs an eighth of the memory, and glibc keeps less of it once they are gone.
TLS_READ_BUFFER = 32 * 1024
# Ciphertext buffered while the station session does not read (its stream reader is full): past this the
# socket is no longer read and TCP pushes back on the peer.
TLS_INCOMING_HIGH_WATER = 32 * 1024

# The at-cap alarm clears once the listener has drained AND has not been at its cap for this long: a flood that
# fills the listener in waves (64 addresses reconnecting) raised and cleared it 15-17 times in 30 s, two log lines
# and two alarm events each, where an operator needs one alarm for the whole flood.
FULL_CLEAR_HOLD_S = 10.0
# An address's only unproven connection (see ConnectionGate) is not displaced in its first DISPLACE_GRACE_S:
# time to finish a TLS handshake or send request headers, on a daemon busy with a flood.
DISPLACE_GRACE_S = 1.0
# Station listener: connections vouched for by one station's TLS certificate at once (a station reconnecting
# while its old connection lingers needs two).
VOUCHED_PER_STATION = 2
# Station listener: addresses where a station authenticated, remembered (the least recent forgotten first).
KNOWN_PEERS = 1024

# After this many connections were open at once, the listener's count falling to a quarter of that peak ends
# a burst: the memory its connections freed is handed back to the OS (glibc keeps freed heap memory otherwise,
# and a daemon's RSS would stay at its highest flood for good).
TRIM_AFTER_PEAK = 64

_REFUSED_TEXT = b"too many connections: retry\n"
REFUSED_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_REFUSED_TEXT), _REFUSED_TEXT)
)


@dataclass(frozen=True)
class ConnectionCaps:
    max_connections: int
    max_per_peer: int


@dataclass(frozen=True)
class HttpLimits:
    """The bounds of one aiohttp listener (VA, CMP). Field names are the config keys of its section."""

    max_connections: int = 256
    max_connections_per_peer: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0

    @property
    def caps(self) -> ConnectionCaps:
        return ConnectionCaps(self.max_connections, self.max_connections_per_peer)


class ConnectionGate:
    """One listener's connection counts: admission against the caps, release on close, refusal counters.

    A connection that has not shown it is a real client yet is *unproven*: a station connection before its TLS
    handshake completed with a registered station's certificate (*vouched*, see ``vouch``) or its session is
    authenticated; an HTTP connection waiting for request headers, receiving a body, held by pacing, or idle
    between requests. Only unproven connections are ever displaced. At the global cap a new connection takes
    the place of, in this order:

    1. the longest-waiting *surplus* unproven connection: one whose address holds a newer unproven connection
       (each address's newest unproven connection is its *lone* one, every other is surplus), whatever its age;
    2. the longest-waiting lone connection, but only once it has been unproven for ``grace_s`` (a connection
       gets that long to show it is a client: finish its TLS handshake, send its request headers), and never
       one from a *known* address (one where a station authenticated, the last KNOWN_PEERS of them: the station
       listener only);
    3. for a newcomer from a known address: the longest-waiting lone connection of an address that is not
       known, young or not; else of a known one, past its grace;

    or else it is refused. So a flood from fewer addresses than the connections it holds only displaces itself
    (an address's lone connection is displaced only when no address holds two), a station's address that is
    known gets in whenever an unknown address holds an unproven connection, and a flood from unknown addresses
    never displaces a known address's connection. The cap per peer address is checked first and never
    displaces anything.

    Single-threaded (the event loop's). The per-peer tables hold only peers with an open connection, and the
    known addresses at most KNOWN_PEERS, so they are bounded whatever addresses a flood uses.
    """

    def __init__(
        self,
        name: str,
        caps: ConnectionCaps,
        *,
        http: HttpLimits | None = None,
        alarms: Alarms | None = None,
        accept_errors: AcceptErrors | None = None,
        advice: str = "",
        grace_s: float = DISPLACE_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
        tls: bool = False,
        clear_hold_s: float = FULL_CLEAR_HOLD_S,
    ) -> None:
        self.name = name
        self.caps = caps
        self.http = http
        self.alarms = alarms
        self.accept_errors = accept_errors
        self.advice = advice or f"find the peer holding the {name} listener's connections"
        self.grace_s = grace_s
        self.clock = clock
        # What a refused connection is told before it is closed: a plain HTTP listener's 503; nothing on a TLS
        # port (HTTPS included), whose client would read plaintext as a broken handshake.
        self.refusal = REFUSED_503 if http is not None and not tls else b""
        self.open = 0
        self.peers: dict[str, int] = {}
        self.counters: dict[str, int] = {
            "accepted": 0, "refused_full": 0, "refused_peer": 0, "displaced": 0,
        }  # fmt: skip
        self._admitted: set[Guard] = set()
        # Unproven connections: per peer, oldest first; each peer's newest is in _lone, the others in _surplus
        # (both in the order they got there, the longest-waiting first). _since: when each became unproven.
        self._unproven: dict[str, dict[Guard, None]] = {}
        self._lone: dict[Guard, None] = {}
        self._surplus: dict[Guard, None] = {}
        self._since: dict[Guard, float] = {}
        # The station listener: station name -> its vouched connections, oldest first; and the reverse.
        self._vouched: dict[str, dict[Guard, None]] = {}
        self._vouch_of: dict[Guard, str] = {}
        self._known: dict[str, None] = {}  # addresses where a station authenticated, least recent first
        self._peak = 0  # most connections open at once since the last trim
        self._full = False
        self.clear_hold_s = clear_hold_s
        self._last_at_cap = 0.0
        self._clear_timer: asyncio.TimerHandle | None = None
        self._log = LogTally(interval_s=60.0, clock=clock)

    @property
    def cause(self) -> str:
        return f"listener.{self.name}.full"

    @property
    def unproven(self) -> int:
        return len(self._since)

    def admit(self, guard: Guard) -> bool:
        if self.accept_errors is not None:
            self.accept_errors.accepted()
        peer = guard.peer
        held = self.peers.get(peer, 0)
        if held >= self.caps.max_per_peer:
            self.counters["refused_peer"] += 1
            self._log.add(
                log, logging.WARNING, "refused_peer", peer,
                "%s listener: refused a connection from %s, which holds %d, its cap per address",
                self.name, peer, held,
            )  # fmt: skip
            return False
        if self.open >= self.caps.max_connections:
            self._at_cap()
            victim = self._victim(peer)
            if victim is None:
                self.counters["refused_full"] += 1
                self._log.add(
                    log, logging.WARNING, "refused_full", peer,
                    "%s listener: refused a connection from %s: all %d connections are clients or still in"
                    " their first %g s", self.name, peer, self.caps.max_connections, self.grace_s,
                )  # fmt: skip
                return False
            self.counters["displaced"] += 1
            self._log.add(
                log, logging.INFO, "displaced", victim.peer,
                "%s listener: at its cap, closed an unproven connection from %s for a new one",
                self.name, victim.peer,
            )  # fmt: skip
            victim.displace()
        self.peers[peer] = self.peers.get(peer, 0) + 1
        self._admitted.add(guard)
        self.open += 1
        self._peak = max(self._peak, self.open)
        self.counters["accepted"] += 1
        return True

    def _victim(self, newcomer: str) -> Guard | None:
        if self._surplus:
            return next(iter(self._surplus))
        known = self._known
        if newcomer in known:
            # Any other address's lone connection, young or not; else a known one past its grace.
            first_known = None
            for guard in self._lone:
                if guard.peer not in known:
                    return guard
                if first_known is None:
                    first_known = guard
            if first_known is not None and self.clock() - self._since[first_known] >= self.grace_s:
                return first_known
            return None
        # The longest-waiting lone connection of an address that is not known, once past its grace. (The scan
        # passes over known addresses' connections only: a station's few.)
        for guard in self._lone:
            if guard.peer not in known:
                return guard if self.clock() - self._since[guard] >= self.grace_s else None
        return None

    def _at_cap(self) -> None:
        self._last_at_cap = self.clock()
        if self._full:
            return
        self._full = True
        message = (
            f"the {self.name} listener is at its cap of {self.caps.max_connections} connections: new ones"
            " displace connections that have not shown they are clients, or are refused"
        )
        if self.alarms is not None:
            self.alarms.raise_alarm(self.cause, message, self.advice, severity="warning")
        else:
            log.warning("%s (%s)", message, self.advice)

    def release(self, guard: Guard, *, displaced: bool = False) -> None:
        self.displaceable(guard, False)
        self._admitted.discard(guard)
        self.open -= 1
        held = self.peers.get(guard.peer, 0) - 1
        if held > 0:
            self.peers[guard.peer] = held
        else:
            self.peers.pop(guard.peer, None)
        if displaced:
            return  # its place is taken at once: the listener is as full as before
        if self._peak >= TRIM_AFTER_PEAK and self.open <= self._peak // 4:
            self._peak = self.open
            trim_heap()
        self._maybe_clear()

    def _maybe_clear(self, *, timer: bool = False) -> None:
        """Clear the at-cap alarm once the listener has drained (three quarters of its cap or fewer open: a
        listener hovering at its cap would otherwise raise and clear on every connection) and has not been at its
        cap for clear_hold_s; drained sooner, look again when the hold has passed."""
        if timer:
            self._clear_timer = None
        if not self._full or self.open > self.caps.max_connections * 3 // 4:
            return
        wait = self._last_at_cap + self.clear_hold_s - self.clock()
        if wait <= 0:
            self._full = False
            if self.alarms is not None:
                self.alarms.clear(self.cause, f"{self.open} connections open")
            return
        if self._clear_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (the gate driven by hand): the next release looks again
                return
            self._clear_timer = loop.call_later(wait, lambda: self._maybe_clear(timer=True))

    def abort_all(self) -> None:
        """Shutdown: end every admitted connection at once (those in a TLS handshake have no handler to do it)."""
        if self._clear_timer is not None:
            self._clear_timer.cancel()
            self._clear_timer = None
        for guard in list(self._admitted):
            guard.displace()

    def displaceable(self, guard: Guard, flag: bool) -> None:
        """Mark `guard` unproven (again: it becomes its address's newest, its grace counted from now) or not."""
        self._unvouch(guard)
        peer = guard.peer
        mine = self._unproven.get(peer)
        if mine is not None and guard in mine:
            del mine[guard]
            del self._since[guard]
            if guard in self._lone:
                del self._lone[guard]
                if mine:  # the newest of the rest becomes the address's lone connection
                    newest = next(reversed(mine))
                    del self._surplus[newest]
                    self._lone[newest] = None
            else:
                del self._surplus[guard]
            if not mine:
                del self._unproven[peer]
        if not flag:
            return
        mine = self._unproven.setdefault(peer, {})
        if mine:
            previous = next(reversed(mine))
            del self._lone[previous]
            self._surplus[previous] = None
        mine[guard] = None
        self._lone[guard] = None
        self._since[guard] = self.clock()

    def vouch(self, guard: Guard, station: str) -> None:
        """The station listener: `guard`'s TLS handshake completed with the certificate of registered station
        `station`. Not displaced from now on (its deadline still runs). At most VOUCHED_PER_STATION connections
        per station are vouched for at once: beyond, the oldest is unproven again."""
        if guard not in self._admitted or guard in self._vouch_of:
            return
        self.displaceable(guard, False)
        mine = self._vouched.setdefault(station, {})
        mine[guard] = None
        self._vouch_of[guard] = station
        while len(mine) > VOUCHED_PER_STATION:
            self.displaceable(next(iter(mine)), True)

    def _unvouch(self, guard: Guard) -> None:
        station = self._vouch_of.pop(guard, None)
        if station is not None:
            mine = self._vouched[station]
            del mine[guard]
            if not mine:
                del self._vouched[station]

    def authenticated(self, guard: Guard) -> None:
        """A station authenticated on `guard`: never displaced, and its address is known from now on."""
        self.displaceable(guard, False)
        self._known.pop(guard.peer, None)
        self._known[guard.peer] = None
        while len(self._known) > KNOWN_PEERS:
            del self._known[next(iter(self._known))]

    def timed_out(self, why: str, peer: str) -> None:
        key = f"timeout_{why}"
        self.counters[key] = self.counters.get(key, 0) + 1
        self._log.add(
            log, logging.INFO, key, peer, "%s listener: closed a connection from %s (%s timeout)",
            self.name, peer, why,
        )  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "open": self.open, "peers": len(self.peers), "unproven": self.unproven,
            "vouched": len(self._vouch_of), **self.counters,
        }  # fmt: skip


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do
    return trim


_malloc_trim = _load_malloc_trim()


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc malloc_trim; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _peer_host(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and name:
        return str(name[0])
    return str(name or "?")


class Guard(asyncio.Protocol):
    """The protocol of every accepted connection: admission, then the real protocol behind one deadline.

    ``make_inner(guard)`` builds the real protocol only once the connection is admitted. A new connection is
    unproven (displaceable, see ConnectionGate) until ``vouched()`` or ``authenticated()`` (the station
    listener), or until its request headers and body are in (HTTP; unproven again while the application holds
    the request for pacing, see ``hold``, and whenever the connection is idle).
    """

    def __init__(self, gate: ConnectionGate, make_inner: Callable[[Guard], asyncio.BaseProtocol]) -> None:
        self.gate = gate
        self._make_inner = make_inner
        self.inner: asyncio.BaseProtocol | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.why = ""  # what the deadline waits for: headers, body, idle, or the listener's own reason
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = 0  # HTTP requests between their headers and their response
        self._payload: Any = None  # HTTP: the body being received (aiohttp StreamReader)
        self._last_payload: Any = None  # HTTP: the body of the latest request, read to its end or not

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.peer = _peer_host(transport)
        if not self.gate.admit(self):
            if self.gate.refusal:
                transport.write(self.gate.refusal)
            transport.close()
            return
        self.transport = transport
        self.gate.displaceable(self, True)
        if self.gate.http is not None:
            self.set_deadline(self.gate.http.header_timeout_s, "headers")
        self.inner = self._make_inner(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is None:
            return
        inner.data_received(data)  # type: ignore[attr-defined]
        if self.gate.http is not None:
            self._http_bytes()

    def eof_received(self) -> bool | None:
        inner = self.inner
        if inner is None:
            return False
        result: bool | None = inner.eof_received()  # type: ignore[attr-defined]
        return result

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.clear_deadline()
        inner, self.inner = self.inner, None
        self._payload = None
        last, self._last_payload = self._last_payload, None
        if self.transport is not None:  # admitted, and not displaced (which released it already)
            self.transport = None
            self.gate.release(self)
        if inner is not None:
            inner.connection_lost(exc)
        if not self._busy and last is not None and not last.is_eof():
            # aiohttp reads the unread rest of a body after its response ("lingering", up to lingering_time)
            # and is not woken when the connection ends: its task, the request and the buffered body would stay
            # in memory that long, for every connection closed meanwhile (at a flood's rate, far beyond the
            # caps). The response is out and no handler reads this body: end it here.
            last.feed_eof()

    def displace(self) -> None:
        """Make room for a new connection: released now, aborted (connection_lost follows)."""
        transport, self.transport = self.transport, None
        self.clear_deadline()
        self.gate.release(self, displaced=True)
        if transport is not None:
            transport.abort()

    def vouched(self, station: str) -> None:
        """The station listener: the TLS handshake completed with registered station `station`'s certificate.
        Not displaced from now on; the listener's deadline still runs."""
        if self.transport is not None:
            self.gate.vouch(self, station)

    def authenticated(self) -> None:
        """The station listener's peer proved who it is: no deadline, never displaced."""
        self.clear_deadline()
        if self.transport is not None:
            self.gate.authenticated(self)

    @property
    def gone(self) -> bool:
        """The connection was closed, aborted or displaced: nothing written to it arrives."""
        return self.transport is None or self.transport.is_closing()

    # -- the deadline -------------------------------------------------------------------------------------------
    def set_deadline(self, seconds: float, why: str) -> None:
        """Abort the connection `seconds` from now unless the deadline is moved or cleared before."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        self.why = why
        if self._timer is not None and self._timer.when() <= self._deadline:
            return  # the pending timer fires first and re-arms itself for the later deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._deadline, self._expire)

    def clear_deadline(self) -> None:
        self._deadline = None
        self.why = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        if self.why == "body" and self._payload is not None and self._payload.is_eof():
            self._body_complete()
            return
        self.gate.timed_out(self.why, self.peer)
        transport = self.transport
        self.clear_deadline()
        transport.abort()

    # -- HTTP request phases (called by the aiohttp middleware of appliance.httplisten) ----------------------
    def _http_bytes(self) -> None:
        limits = self.gate.http
        assert limits is not None
        if self._busy:
            if self._payload is not None and self._payload.is_eof():
                self._body_complete()
        elif self.why == "idle":
            # The first bytes of the next request: its headers get header_timeout_s, but never more than the
            # idle time that was left.
            loop = asyncio.get_running_loop()
            if self._deadline is None or loop.time() + limits.header_timeout_s < self._deadline:
                self.set_deadline(limits.header_timeout_s, "headers")
            else:
                self.why = "headers"

    def _body_complete(self) -> None:
        self._payload = None
        self.clear_deadline()
        if self.transport is not None:
            self.gate.displaceable(self, False)  # the request is in: served from now on

    def request_started(self, payload: Any) -> None:
        """Headers complete. `payload` is the body stream, or None without a body. A request still receiving
        its body has not shown it is a client yet: it stays displaceable until the body is in."""
        limits = self.gate.http
        assert limits is not None
        self._busy += 1
        self._last_payload = payload
        if self.transport is None:
            return
        if payload is not None and not payload.is_eof():
            self._payload = payload
            self.set_deadline(limits.body_timeout_s, "body")
            self.gate.displaceable(self, True)
        else:
            self.clear_deadline()
            self.gate.displaceable(self, False)

    def hold(self, held: bool) -> None:
        """The application holds the request (pacing a client over its rate) or releases it. A held request
        has not been served: its connection is displaceable meanwhile."""
        if self.transport is None or not self._busy:
            return
        self.gate.displaceable(self, held or self._payload is not None)

    def request_finished(self) -> None:
        """The handler returned its response (written next): the connection is idle from now on."""
        limits = self.gate.http
        assert limits is not None
        self._busy -= 1
        self._payload = None
        if not self._busy and self.transport is not None:
            self.set_deadline(limits.idle_timeout_s, "idle")
            self.gate.displaceable(self, True)


class BufferedGuard(Guard, asyncio.BufferedProtocol):
    """A Guard in front of a buffered protocol (asyncio's TLS): the transport reads into the inner buffer."""

    _scratch = bytearray(1024)  # handed to the transport for a refused connection, whose bytes are ignored

    def get_buffer(self, sizehint: int) -> Any:
        inner = self.inner
        if isinstance(inner, asyncio.BufferedProtocol):
            return inner.get_buffer(sizehint)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        inner = self.inner
        if isinstance(inner, asyncio.BufferedProtocol):
            inner.buffer_updated(nbytes)
            if self.gate.http is not None:
                self._http_bytes()  # HTTPS: bytes of the next request after idle (ciphertext: any byte counts)


async def serve_guarded(
    gate: ConnectionGate,
    make_inner: Callable[[Guard], asyncio.BaseProtocol],
    host: str,
    port: int,
    *,
    buffered: bool = False,
    backlog: int = ACCEPT_BACKLOG,
) -> asyncio.Server:
    """A listening asyncio server whose connections go through `gate`. `buffered`: the inner protocol is an
    asyncio.BufferedProtocol (TLS)."""
    loop = asyncio.get_running_loop()
    cls = BufferedGuard if buffered else Guard
    return await loop.create_server(lambda: cls(gate, make_inner), host, port, backlog=backlog)


class _BoundedSSLProtocol(sslproto.SSLProtocol):
    max_size = TLS_READ_BUFFER


def tls_server_protocol(
    app_protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    handshake_timeout_s: float,
    *,
    extra: Mapping[str, Any] | None = None,
) -> asyncio.BufferedProtocol:
    """Server-side TLS in front of `app_protocol`, as asyncio's create_server(ssl=...) builds it, with a 32 KiB
    read buffer instead of 256 KiB and the incoming ciphertext bounded the same way. `handshake_timeout_s`
    bounds the closing handshake too (asyncio waits 30 s for a peer's close_notify otherwise, the connection
    counted against the caps all the while). `extra`: more names the application's transport answers in
    get_extra_info (an HTTPS listener finds the connection's Guard this way)."""
    loop = asyncio.get_running_loop()
    # No waiter (asyncio passes none either when nothing awaits the handshake; a future would hold the
    # exception of every failed handshake unretrieved). typeshed types waiter and the handshake timeout too
    # narrowly.
    proto = _BoundedSSLProtocol(
        loop, app_protocol, context, None,  # type: ignore[arg-type]
        server_side=True, ssl_handshake_timeout=handshake_timeout_s,  # type: ignore[arg-type]
        ssl_shutdown_timeout=handshake_timeout_s,
    )  # fmt: skip
    proto._set_read_buffer_limits(high=TLS_INCOMING_HIGH_WATER)  # type: ignore[attr-defined]
    if extra:
        proto._extra.update(extra)  # what the app transport's get_extra_info looks in first
    return proto


def fd_needed(
    caps: Mapping[str, int], reserve: int = FD_RESERVE, *, fixed: Mapping[str, int] | None = None
) -> int:
    """The descriptors the listeners' caps need: each cap, ACCEPTS_IN_FLIGHT per listener, plus `reserve`. Pure,
    so the systemd unit's LimitNOFILE= can be checked against it (tests/systemd/test_units.py)."""
    fixed = fixed or {}
    return sum(caps.values()) + sum(fixed.values()) + ACCEPTS_IN_FLIGHT * (len(caps) + len(fixed)) + reserve


def ensure_fd_budget(
    caps: Mapping[str, int], reserve: int = FD_RESERVE, *, fixed: Mapping[str, int] | None = None
) -> tuple[int, int]:
    """Check that the listeners' caps (config key -> cap; `fixed`: listeners whose cap is not configurable, name ->
    cap), each with ACCEPTS_IN_FLIGHT, plus `reserve` fit under RLIMIT_NOFILE, raising the soft limit up to the
    hard one when that is enough. Returns (limit, needed); ConfigError when impossible."""
    fixed = fixed or {}
    in_flight = ACCEPTS_IN_FLIGHT * (len(caps) + len(fixed))
    total = sum(caps.values()) + sum(fixed.values())
    needed = fd_needed(caps, reserve, fixed=fixed)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > soft and (hard == resource.RLIM_INFINITY or needed <= hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            soft = needed
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file-descriptor limit from %d to %d: %s", soft, needed, exc)
    if needed > soft:
        keys = " + ".join(caps)
        also = "".join(f", {name} {cap}" for name, cap in fixed.items())
        raise ConfigError([
            Problem(
                keys,
                f"the connection caps add up to {total} ({', '.join(f'{k} {v}' for k, v in caps.items())}{also});"
                f" with {in_flight} for connections being accepted or refused and {reserve} for the journal,"
                f" HSM and ports that is {needed}, above this process's file-descriptor limit of {soft}"
                f" (RLIMIT_NOFILE, hard limit {hard}): lower the caps or raise LimitNOFILE=",
            )
        ])  # fmt: skip
    log.info(
        "file descriptors: limit %d, needed %d: listener caps %s = %d, plus %d being accepted, plus %d reserved",
        soft, needed, ", ".join(f"{k} {v}" for k, v in {**caps, **fixed}.items()), total, in_flight, reserve,
    )  # fmt: skip
    return soft, needed


_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptErrors:
    """An event-loop exception handler for accept() failing for lack of descriptors or memory.

    asyncio already survives them (it stops reading that listening socket for a second, then accepts again) but
    reports each one with a traceback; here the first raises an alarm and later ones only count. At the limit
    accepts alternate between failing and succeeding (each freed descriptor is taken by the next waiting
    connection), so the alarm clears only at a connection admitted `quiet_s` after the last failure. Other
    contexts go to the handler that was installed before.
    """

    CAUSE = "listener.accept-failing"

    def __init__(self, alarms: Alarms, quiet_s: float = 10.0) -> None:
        self.alarms = alarms
        self.quiet_s = quiet_s
        self.count = 0
        self._active = False
        self._last_failure = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in _ACCEPT_ERRNOS
            and "accept" in str(context.get("message"))
        ):
            self.count += 1
            self._active = True
            self._last_failure = loop.time()
            self.alarms.raise_alarm(
                self.CAUSE,
                f"accepting connections fails: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
                " (out of file descriptors or memory); listeners retry every second",
                "check what holds descriptors (ls /proc/PID/fd); the budget checked at start counts [stations],"
                " [va], [cmp], [scep] and [control] max_connections, the metrics listener's 64 and 256 per listener for"
                " connections being accepted: raise LimitNOFILE= in the unit or lower those caps",
                code=None,
            )
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def accepted(self) -> None:
        if self._active and self._loop is not None and self._loop.time() - self._last_failure >= self.quiet_s:
            self._active = False
            self.alarms.clear(self.CAUSE, "a connection was accepted again")
