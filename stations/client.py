"""The fixture library: what test-station software imports to get a device's birth certificate.

    async with await StationClient.connect_serial("/dev/serial/by-path/...", 115200,
                                                  station_id="line1-st03", key=key) as client:
        request_id = new_request_id()          # store it with the device serial BEFORE sending
        chain = await client.enroll("SN0001", csr_der, request_id=request_id)
        ...write chain[0] (and the chain) to the device, read it back...
        await client.confirm(request_id, stored_der)

Only the station retransmits (docs/station-protocol.md section 9): a request that gets no answer in
``request_timeout`` is sent again (same body, new counter); after ``max_tries`` unanswered tries the client
starts a new handshake; a dropped connection is reopened and re-authenticated. Every retry keeps the SAME
request id, so a lost answer yields the same certificate, never a second one. PENDING is waited out,
retryable refusals (BUSY, HSM/journal/audit unavailable, ...) are backed off (1 s doubling, cap 30 s), and
anything else is raised as ``StationError(code, text)``. Giving up after ``give_up_after`` raises ``GaveUp``
(code TIMEOUT) naming the last answer the client was retrying on, e.g. "gave up after 20 s; last answer
JOURNAL_UNAVAILABLE (13): journal unavailable while ...".

While a session is open the client keeps it alive (section 9, keepalive): after ``keepalive_s`` without a frame
sent it sends a PING and expects the PONG within ``request_timeout``; if none comes it drops the channel
quietly and the next request reconnects.

Synchronous helpers for fixture scripts that are not async: ``enroll_device`` and ``fetch_ca_chain``.
Credentials come from the bundle that ``birthline station add --out DIR`` writes (``load_credentials``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stations import crypto
from stations.codec import DecodeEvent, Frame
from stations.codes import RETRYABLE, Code
from stations.errors import GaveUp, SessionError, StationError
from stations.messages import (
    NO_REQUEST,
    REQUEST_ID_LEN,
    CaChain,
    Cert,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Message,
    Pending,
    Ping,
    Pong,
)
from stations.session import Authenticated, Closed, HandshakeFailed, Received, StationSession
from stations.tls import apply_tls_policy
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.serial import SerialChannel, wire_time
from stations.transports.stream import StreamChannel

log = logging.getLogger(__name__)

Connector = Callable[[], Awaitable[FrameChannel]]
_T = TypeVar("_T")

# docs/station-protocol.md section 9
HANDSHAKE_STEP_TIMEOUT = 2.0
# getaddrinfo's answers that a name does not exist (permanent), as against EAI_AGAIN (try again).
_NO_SUCH_NAME = frozenset(
    e for e in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if e is not None
)
HANDSHAKE_TRIES = 3
HANDSHAKE_PAUSE = 2.0  # a round (3 tries 2 s apart, then this) ends within the appliance's 10 s limit
REQUEST_TIMEOUT = 5.0
REQUEST_TRIES = 3
BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
KEEPALIVE = 30.0  # well inside the appliance's 90 s idle timer, so an idle fixture keeps its session

# The frame, not the request, was refused: resend at once under a new counter.
RESEND_NOW = frozenset({Code.REPLAY, Code.BAD_TAG})


def new_request_id(now_ms: int | None = None) -> bytes:
    """A fresh 16-byte request id: a UUIDv7 (RFC 9562 5.7), the Unix time in milliseconds (`now_ms`, default the
    wall clock), then 74 bits from the CSPRNG. Store it with the device serial before sending.

    Ids made later sort after earlier ones, so the appliance's index of a station's request ids, which holds
    years of them, grows at its end: random ids put every device on a random page of it, which the disk must read
    and write back (docs/performance.md "Ten years of journal"). The random bits keep ids unique and unguessable;
    the time says no more than the request itself. Never all zeros (the version bits are set)."""
    ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return value.to_bytes(REQUEST_ID_LEN, "big")


class _SessionLost(Exception):
    """The appliance ended or forgot the session: handshake again on the same channel, or on a new connection
    after a BYE on TCP/TLS (the appliance closes a LAN connection after its BYE)."""

    def __init__(self, text: str, *, bye: bool = False) -> None:
        super().__init__(text)
        self.bye = bye


class _Unanswered(Exception):
    """``REQUEST_TRIES`` tries went unanswered: new handshake (new nonce), then resend."""


@dataclass
class ClientStats:
    connects: int = 0
    handshakes: int = 0
    resends: int = 0
    pending: int = 0
    backoffs: int = 0
    decode_events: int = 0
    rejected: int = 0
    keepalives: int = 0  # PINGs answered by their PONG
    keepalive_failures: int = 0  # PINGs that cost the channel (no PONG in time, link lost)


class StationClient:
    """One station's link to the appliance. Use ``connect_tcp``/``connect_serial``; one request at a time.

    ``give_up_after`` bounds the total time one call spends retrying (reconnects, back-offs, PENDING); on
    expiry it raises ``GaveUp`` (a ``StationError`` with code TIMEOUT whose text names the last answer or link
    error it was retrying on) and the caller may retry later with the same request id.
    ``keepalive_s`` (default 30 s; None or 0: off) is the idle time after which a background task PINGs the
    open session.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        station_id: str,
        key: bytes,
        request_timeout: float = REQUEST_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_STEP_TIMEOUT,
        give_up_after: float = 300.0,
        reconnect_delay: float = 0.2,
        keepalive_s: float | None = KEEPALIVE,
    ) -> None:
        if len(key) != crypto.STATION_KEY_LEN:
            raise ValueError("station key must be 32 bytes")
        self._connector = connector
        self.station_id = station_id
        self._key = key
        self.request_timeout = request_timeout
        self.handshake_timeout = handshake_timeout
        self.give_up_after = give_up_after
        self.reconnect_delay = reconnect_delay
        self.keepalive_s = keepalive_s
        self.handshake_pause = HANDSHAKE_PAUSE
        self._channel: FrameChannel | None = None
        self._session = StationSession(station_id, key)
        # Held for every exchange on the channel (requests, handshakes, keepalive PINGs): they never interleave.
        self._lock = asyncio.Lock()
        self._last_sent = time.monotonic()
        self._keepalive_task: asyncio.Task[None] | None = None
        self.last_request_id: bytes | None = None
        self.stats = ClientStats()
        # What the current call is retrying on, for the error it raises if it gives up: the last answer (as
        # shown, its code, the appliance's text) and a link failure since.
        self._last_answer: tuple[str, Code | int | None, str] | None = None
        self._last_link_error: str | None = None

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        *,
        station_id: str,
        key: bytes,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        give_up_after: float = 300.0,
        keepalive_s: float | None = KEEPALIVE,
    ) -> StationClient:
        """Connect over TCP (+TLS when ``ssl_context`` is given; the factory LAN always uses TLS)."""

        async def connector() -> FrameChannel:
            try:
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=(server_hostname or host) if ssl_context is not None else None,
                )
            except ssl.SSLCertVerificationError as exc:
                # Permanent: retrying meets the same certificate. Said at once, not after give_up_after.
                raise StationError(
                    Code.AUTH_FAILED,
                    f"{host}:{port}: TLS: the appliance's certificate is refused ({exc.verify_message or exc}):"
                    " connect by one of the names it carries ([appliance] names; `birthline tls reissue` after"
                    " changing them) with the bundle's CA",
                ) from None
            except socket.gaierror as exc:
                if exc.errno not in _NO_SUCH_NAME:  # a resolver that did not answer: retried like a lost link
                    raise ChannelClosed(f"{host}:{port}: {exc}") from exc
                raise StationError(
                    Code.BAD_REQUEST,
                    f"{host}: DNS: no such host ({exc.strerror}): check --host or the bundle's",
                ) from None
            except (OSError, ssl.SSLError) as exc:
                raise ChannelClosed(f"{host}:{port}: {exc}") from exc
            return StreamChannel(reader, writer, peer=f"{host}:{port}")

        client = cls(
            connector,
            station_id=station_id,
            key=key,
            request_timeout=request_timeout,
            give_up_after=give_up_after,
            keepalive_s=keepalive_s,
        )
        await client.open()
        return client

    @classmethod
    async def connect_serial(
        cls,
        path: str,
        baud: int = 115200,
        *,
        station_id: str,
        key: bytes,
        pace: bool = False,
        pace_reads: bool = False,
        request_timeout: float | None = None,
        give_up_after: float = 300.0,
        keepalive_s: float | None = KEEPALIVE,
    ) -> StationClient:
        """Open a serial port (``/dev/serial/by-path/...`` in production) and authenticate."""

        async def connector() -> FrameChannel:
            return await SerialChannel.open(path, baud, pace=pace, pace_reads=pace_reads)

        if request_timeout is None:
            # 5 s at 115200; on slower lines add the line time of the largest frames (section 9).
            request_timeout = REQUEST_TIMEOUT + max(
                0.0, wire_time(2 * 16394, baud) - wire_time(2 * 16394, 115200)
            )
        client = cls(
            connector,
            station_id=station_id,
            key=key,
            request_timeout=request_timeout,
            give_up_after=give_up_after,
            keepalive_s=keepalive_s,
        )
        await client.open()
        return client

    async def __aenter__(self) -> StationClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def channel(self) -> FrameChannel | None:
        """The current channel (None between connections), e.g. to read a SerialChannel's byte counters."""
        return self._channel

    # -- public requests ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and authenticate now (otherwise the first request does it)."""
        async with self._lock:
            deadline = time.monotonic() + self.give_up_after
            self._last_answer = self._last_link_error = None
            await self._with_retries(deadline, self._ensure_session)

    async def ca_chain(self, profile: str = "") -> list[bytes]:
        """The CA chain for ``profile`` (empty: the station's default), issuing CA first, root last."""
        reply = await self._request(GetCaChain(profile), NO_REQUEST, (CaChain,))
        assert isinstance(reply, CaChain)
        return list(reply.chain)

    async def enroll(
        self,
        device_serial: str,
        csr_der: bytes,
        *,
        request_id: bytes | None = None,
        profile: str | None = None,
    ) -> list[bytes]:
        """Enrol one device: the device certificate first, then its issuers.

        Without ``request_id`` a fresh one is drawn (read it back from ``last_request_id``); pass your own,
        stored with the device serial, so that a fixture restart can retry with the same id."""
        rid = request_id or new_request_id()
        self.last_request_id = rid
        message = Enroll(rid, device_serial, csr_der, profile or "")
        message.encode()  # local validation (serial, profile, CSR size) before anything goes out
        reply = await self._request(message, rid, (Cert,))
        assert isinstance(reply, Cert)
        return list(reply.chain)

    async def confirm(self, request_id: bytes, cert_der: bytes) -> None:
        """Report that the device stored ``cert_der`` (the DER as read back from the device)."""
        message = Confirm(request_id, hashlib.sha256(cert_der).digest())
        await self._request(message, request_id, (Confirmed,))

    async def confirm_and_enroll(
        self,
        confirm_id: bytes,
        cert_der: bytes,
        device_serial: str,
        csr_der: bytes,
        *,
        request_id: bytes | None = None,
        profile: str | None = None,
    ) -> list[bytes]:
        """``confirm(confirm_id, cert_der)`` for the device just written, and ``enroll(device_serial, csr_der)``
        for the next one, without waiting in between: both frames go out back to back and both answers are
        awaited (protocol section 1: the appliance works on the requests of a session at once). The appliance's
        commit of the confirmation then overlaps the next ENROLL on the line instead of adding a round trip per
        device. Returns the new device's chain, as enroll() does.

        Only the answers CONFIRMED and CERT are taken from the pair. Any other outcome (ERROR, PENDING, a lost
        link or session, no answer in time) sends that request again alone, as confirm() and enroll() would,
        with its same request id (both are idempotent, section 7), and raises as they would; the confirmation is
        settled first. If it raises for the confirmation, the new device's request id is in last_request_id:
        its ENROLL may have been answered, so send it again with that id."""
        confirm = Confirm(confirm_id, hashlib.sha256(cert_der).digest())
        rid = request_id or new_request_id()
        self.last_request_id = rid
        enroll = Enroll(rid, device_serial, csr_der, profile or "")
        enroll.encode()  # local validation before anything goes out, as enroll() does
        async with self._lock:
            got = await self._pair(confirm, confirm_id, Confirmed, enroll, rid, Cert)
            if Confirmed not in got:
                await self._request_locked(confirm, confirm_id, (Confirmed,))
            reply = got.get(Cert) or await self._request_locked(enroll, rid, (Cert,))
        assert isinstance(reply, Cert)
        return list(reply.chain)

    async def close(self) -> None:
        """Stop the keepalive, say BYE (best effort) and close the channel."""
        await self._stop_keepalive()  # first, so no PING goes out after (or interleaved with) the BYE
        channel, self._channel = self._channel, None
        if channel is None:
            return
        if self._session.established:
            with contextlib.suppress(StationError, OSError):
                await asyncio.wait_for(self._send(channel, self._session.close()), 1.0)
        self._session.reset()
        with contextlib.suppress(StationError, OSError):
            await channel.close()

    # -- machinery ---------------------------------------------------------------------------------------

    async def _request(
        self, message: Message, request_id: bytes, wanted: tuple[type[Message], ...]
    ) -> Message:
        async with self._lock:
            return await self._request_locked(message, request_id, wanted)

    async def _request_locked(
        self, message: Message, request_id: bytes, wanted: tuple[type[Message], ...]
    ) -> Message:
        deadline = time.monotonic() + self.give_up_after
        backoff = BACKOFF_START
        self._last_answer = self._last_link_error = None
        while True:
            reply = await self._with_retries(deadline, lambda: self._exchange(message, request_id, wanted))
            if isinstance(reply, Pending):
                self.stats.pending += 1
                self._last_answer = (f"PENDING (retry after {reply.retry_after_ms} ms)", None, "")
                self._last_link_error = None
                await self._sleep_until(deadline, reply.retry_after_ms / 1000)
                continue
            if isinstance(reply, Error):
                self._answered(reply.code, reply.text)
                if reply.code in RESEND_NOW:
                    self.stats.resends += 1
                    continue
                if reply.code in RETRYABLE:
                    self.stats.backoffs += 1
                    await self._sleep_until(deadline, backoff)
                    backoff = min(backoff * 2, BACKOFF_CAP)
                    continue
                code = reply.code if isinstance(reply.code, Code) else Code.INTERNAL
                raise StationError(code, _printable(reply.text) or f"code {reply.code}")
            return reply

    async def _pair(
        self,
        first: Message,
        first_id: bytes,
        first_type: type[Message],
        second: Message,
        second_id: bytes,
        second_type: type[Message],
    ) -> dict[type[Message], Message]:
        """Send two requests back to back and return the ones answered with their wanted message, by type.
        Whatever else happens is left to the one-at-a-time path, which meets it again and deals with it (a lost
        link or session, an ERROR, PENDING, no answer in time)."""
        got: dict[type[Message], Message] = {}
        try:
            await self._ensure_session()
            channel = self._channel
            assert channel is not None
            await self._send(channel, self._session.send(first))
            await self._send(channel, self._session.send(second))
            answered: set[bytes] = set()
            while len(answered) < 2:
                reply = await self._await_reply(
                    channel,
                    lambda m: _matches(m, first_id, (first_type,)) or _matches(m, second_id, (second_type,)),
                )
                rid = getattr(reply, "request_id", NO_REQUEST)
                if reply is None or rid == NO_REQUEST:
                    break  # no answer in time, or an ERROR about no request in particular
                answered.add(rid)
                for wanted, wanted_id in ((first_type, first_id), (second_type, second_id)):
                    if isinstance(reply, wanted) and rid == wanted_id:
                        got[wanted] = reply
        except (ChannelClosed, _SessionLost, SessionError, StationError):
            pass
        return got

    def _answered(self, code: Code | int, text: str) -> None:
        """Remember an ERROR the client retries on: the error it gives up with names it."""
        text = _printable(text)
        name = code.name if isinstance(code, Code) else "code"
        self._last_answer = (f"{name} ({int(code)}): {text}", code, text)
        self._last_link_error = None  # the link worked after whatever failed before

    def _gave_up(self) -> GaveUp:
        text = f"gave up after {self.give_up_after:.0f} s"
        code: Code | int | None = None
        last = ""
        if self._last_answer is not None:
            shown, code, last = self._last_answer
            text += f"; last answer {shown}"
        if self._last_link_error is not None:
            text += f"; {'then ' if self._last_answer else ''}{self._last_link_error}"
        elif self._last_answer is None:
            text += "; no answer from the appliance"
        return GaveUp(text, code, last)

    async def _sleep_until(self, deadline: float, delay: float) -> None:
        if time.monotonic() + delay > deadline:
            raise self._gave_up()
        await asyncio.sleep(delay)

    async def _with_retries(self, deadline: float, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``op`` until it succeeds, reconnecting on a dropped channel and re-handshaking on a lost
        session, until ``deadline``."""
        delay = self.reconnect_delay
        while True:
            try:
                return await op()
            except _SessionLost as exc:
                self._last_link_error = f"session ended by the appliance: {_printable(str(exc))}"
                if exc.bye and isinstance(self._channel, StreamChannel):
                    await self._drop_channel()
                self._session.reset()
            except _Unanswered:
                self._last_link_error = f"no answer to {REQUEST_TRIES} tries"
                self._session.reset()
            except ChannelClosed as exc:
                log.info("station %s: link lost: %s", self.station_id, exc)
                self._last_link_error = f"link lost: {_printable(exc.text)}"
                await self._drop_channel()
                await self._sleep_until(deadline, delay)
                delay = min(delay * 2, 5.0)
            if time.monotonic() > deadline:
                raise self._gave_up()

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._session.reset()
        if channel is not None:
            with contextlib.suppress(StationError, OSError):
                await channel.close()

    async def _ensure_session(self) -> None:
        if self._channel is None:
            self._channel = await self._connector()
            self.stats.connects += 1
            self._session.reset()
        if not self._session.established:
            await self._handshake(self._channel)
            self._start_keepalive()

    async def _send(self, channel: FrameChannel, wire: bytes) -> None:
        """Every frame goes out here, so the keepalive knows when the appliance last heard from us."""
        await channel.send(wire)
        self._last_sent = time.monotonic()

    async def _handshake(self, channel: FrameChannel) -> None:
        """HELLO/CHALLENGE/AUTH/AUTH_OK with the section 9 timers: each step's frame is resent identically
        after ``handshake_timeout`` (3 tries), then a pause and a new HELLO with a fresh nonce (3 rounds)."""
        for round_ in range(HANDSHAKE_TRIES):
            if round_:
                await asyncio.sleep(self.handshake_pause)
            self.stats.handshakes += 1
            await self._send(channel, self._session.hello())
            tries = 1
            deadline = time.monotonic() + self.handshake_timeout
            while True:
                item = await self._recv(channel, deadline - time.monotonic())
                if item is None:
                    wire = self._session.resend()
                    if wire is None or tries >= HANDSHAKE_TRIES:
                        break
                    tries += 1
                    await self._send(channel, wire)
                    deadline = time.monotonic() + self.handshake_timeout
                    continue
                step = self._session.receive(item)
                for wire in step.send:
                    await self._send(channel, wire)
                    tries = 1  # the next step's frame is out; its own timer starts
                    deadline = time.monotonic() + self.handshake_timeout
                failed = False
                for event in step.events:
                    if isinstance(event, Authenticated):
                        return
                    if isinstance(event, HandshakeFailed):
                        self._handshake_failed(event)  # raises unless worth another round
                        failed = True
                if failed:
                    break
        raise StationError(Code.TIMEOUT, "handshake did not complete")

    def _handshake_failed(self, event: HandshakeFailed) -> None:
        code = event.code if isinstance(event.code, Code) else Code.INTERNAL
        if code in (Code.BUSY, Code.INTERNAL, Code.TIMEOUT):
            self._answered(event.code, event.text)
            self._session.reset()
            return
        raise StationError(code, _printable(event.text))

    async def _recv(self, channel: FrameChannel, timeout: float) -> Frame | None:
        """The next frame (decode events are counted and skipped); None on timeout."""
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            try:
                # Not wait_for: on Python 3.11 it loses a cancel (close() stopping the keepalive) that races a
                # frame arriving; asyncio.timeout never does.
                async with asyncio.timeout(remaining):
                    item = await channel.recv()
            except TimeoutError:
                return None
            if isinstance(item, DecodeEvent):
                self.stats.decode_events += 1
                continue
            return item

    async def _exchange(
        self, message: Message, request_id: bytes, wanted: tuple[type[Message], ...]
    ) -> Message:
        """Send ``message`` (re-sealed on every try) and return the matching answer: one of ``wanted``,
        PENDING, or an ERROR about this request."""
        await self._ensure_session()
        channel = self._channel
        assert channel is not None
        for attempt in range(REQUEST_TRIES):
            if attempt:
                self.stats.resends += 1
            await self._send(channel, self._session.send(message))
            reply = await self._await_reply(channel, lambda m: _matches(m, request_id, wanted))
            if reply is not None:
                return reply
        raise _Unanswered()

    async def _await_reply(self, channel: FrameChannel, match: Callable[[Message], bool]) -> Message | None:
        """The first received message `match` accepts within ``request_timeout``, or None. Anything else is
        stale (a late answer to an earlier try, a PONG of another token) and skipped."""
        deadline = time.monotonic() + self.request_timeout
        while True:
            item = await self._recv(channel, deadline - time.monotonic())
            if item is None:
                return None
            step = self._session.receive(item)
            for wire in step.send:
                await self._send(channel, wire)
            for event in step.events:
                if isinstance(event, Closed):
                    raise _SessionLost(event.text, bye=event.bye)
                if not isinstance(event, Received):
                    self.stats.rejected += 1
                elif match(event.message):
                    return event.message

    # -- keepalive ---------------------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        if self.keepalive_s and (self._keepalive_task is None or self._keepalive_task.done()):
            self._keepalive_task = asyncio.create_task(
                self._keepalive(self.keepalive_s), name=f"station-keepalive {self.station_id}"
            )

    async def _stop_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        # wait() neither raises the task's outcome nor swallows a cancellation of close() itself. Cancel again
        # until it ends: the transports' own wait_for can still lose one cancel on Python 3.11.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)

    async def _keepalive(self, interval: float) -> None:
        """Background task from a handshake until the session is gone (the next handshake starts a new one)
        or ``close()``: PING after ``interval`` without a frame sent. A failed PING drops the channel and
        never raises: the appliance has (or soon will have) forgotten the session, and the next request
        reconnects and authenticates as it would after any other lost link."""
        while True:
            await asyncio.sleep(self._last_sent + interval - time.monotonic())
            async with self._lock:
                channel = self._channel
                if channel is None or not self._session.established:
                    return
                if time.monotonic() - self._last_sent < interval:
                    continue  # a request went out while we slept or waited for the lock
                try:
                    await self._ping(channel)
                except (_Unanswered, _SessionLost, StationError, OSError) as exc:
                    log.info("station %s: keepalive failed (%r); dropping the link", self.station_id, exc)
                except Exception:
                    log.exception("station %s: keepalive failed; dropping the link", self.station_id)
                else:
                    self.stats.keepalives += 1
                    continue
                self.stats.keepalive_failures += 1
                await self._drop_channel()
                return

    async def _ping(self, channel: FrameChannel) -> None:
        """One PING and its PONG (same token) within ``request_timeout``; one try, no resend."""
        token = int.from_bytes(os.urandom(4), "big")
        await self._send(channel, self._session.send(Ping(token)))
        if await self._await_reply(channel, lambda m: isinstance(m, Pong) and m.token == token) is None:
            raise _Unanswered()


def _matches(reply: Message, request_id: bytes, wanted: tuple[type[Message], ...]) -> bool:
    if isinstance(reply, Error):
        return reply.request_id in (request_id, NO_REQUEST)
    if isinstance(reply, (*wanted, Pending)):
        rid = getattr(reply, "request_id", NO_REQUEST)
        return request_id in (NO_REQUEST, rid)
    return False


def _printable(text: str) -> str:
    """Escape control characters before showing appliance text (section 5, ERROR)."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


# -- credentials -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StationCredentials:
    """What one fixture needs to talk to the appliance, from a ``birthline station add --out DIR`` bundle."""

    name: str
    kind: Literal["serial", "lan"]
    key: bytes = field(repr=False)
    port: str | None = None  # serial: the port path (by-path) on the fixture's side
    host: str | None = None  # lan: appliance host
    tcp_port: int | None = None  # lan: appliance port
    baud: int = 115200
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    server_hostname: str | None = None


def client_ssl_context(
    cert_file: str | Path, key_file: str | Path, ca_file: str | Path, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """Client context under the link's TLS policy (stations.tls: TLS 1.2 with ECDHE AEAD suites, or 1.3):
    presents the station's certificate and verifies the appliance's server certificate against ``ca_file``
    (the CA that signed it). Hostname checking stays on unless asked off."""
    ctx = apply_tls_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = check_hostname
    ctx.load_verify_locations(cafile=str(ca_file))
    # ca_file's CA is the trust anchor even when it is not self-signed (a management CA under the organisation's
    # root): only the server certificates it issued are accepted, not those of other CAs under that root.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def read_station_key(path: str | Path) -> bytes:
    text = Path(path).read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{path}: station key must be 64 hex characters") from exc
    if len(key) != crypto.STATION_KEY_LEN:
        raise ValueError(f"{path}: station key must be 64 hex characters")
    return key


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; ``default_port`` when no port is given."""
    host, sep, port = value.rpartition(":")
    if not sep or (host.count(":") and not host.endswith("]")):
        if default_port is None:
            raise ValueError(f"{value!r}: expected HOST:PORT")
        return value.strip("[]"), default_port
    return host.strip("[]"), int(port)


def _first(meta: dict[str, object], *names: str) -> object:
    for name in names:
        if meta.get(name):
            return meta[name]
    raise ValueError(f"station.json: missing {names[0]}")


def load_credentials(bundle_dir: str | Path) -> StationCredentials:
    """Read DIR/station.json and DIR/station.key (and for LAN the TLS files it names, relative to DIR).

    station.json: ``{"name", "kind": "serial"|"lan", "port" (serial) or "host" (lan, "H:P"),
    "key_file": "station.key", "baud"?, "tls_cert"|"tls_cert_file", "tls_key"|"tls_key_file",
    "ca_file"|"server_ca_file" (lan: the CA that signed the appliance's TLS server certificate),
    "check_hostname"? (default true), "server_name"?}``. ``host`` may be absent (give it when connecting) or a
    bare host with a separate numeric ``tcp_port``."""
    base = Path(bundle_dir)
    meta = json.loads((base / "station.json").read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind not in ("serial", "lan"):
        raise ValueError(f"{base}/station.json: kind must be 'serial' or 'lan', not {kind!r}")
    key = read_station_key(base / str(meta.get("key_file") or "station.key"))
    name = str(meta["name"])
    baud = int(meta.get("baud") or 115200)
    if kind == "serial":
        return StationCredentials(
            name, "serial", key, port=str(meta["port"]) if meta.get("port") else None, baud=baud
        )
    host: str | None = None
    tcp_port: int | None = meta.get("tcp_port")
    if meta.get("host"):
        host, tcp_port = split_host_port(str(meta["host"]), tcp_port)
    ctx = client_ssl_context(
        base / str(_first(meta, "tls_cert", "tls_cert_file")),
        base / str(_first(meta, "tls_key", "tls_key_file")),
        base / str(_first(meta, "ca_file", "server_ca_file")),
        check_hostname=bool(meta.get("check_hostname", True)),
    )
    return StationCredentials(
        name,
        "lan",
        key,
        host=host,
        tcp_port=tcp_port,
        ssl_context=ctx,
        server_hostname=meta.get("server_name"),
        baud=baud,
    )


async def connect(
    creds: StationCredentials,
    *,
    port: str | None = None,
    host: str | None = None,
    baud: int | None = None,
    pace: bool = False,
    give_up_after: float = 300.0,
) -> StationClient:
    """Connect with a credentials bundle; ``port``/``host`` ("H:P") override where it points."""
    if host is not None or (port is None and creds.kind == "lan"):
        if host is not None:
            h, p = split_host_port(host, creds.tcp_port)
        elif creds.host is not None and creds.tcp_port is not None:
            h, p = creds.host, creds.tcp_port
        else:
            raise ValueError("no appliance host: give --host or put it in station.json")
        return await StationClient.connect_tcp(
            h,
            p,
            station_id=creds.name,
            key=creds.key,
            ssl_context=creds.ssl_context,
            server_hostname=creds.server_hostname,
            give_up_after=give_up_after,
        )
    path = port or creds.port
    if path is None:
        raise ValueError("no serial port: give --port or put it in station.json")
    return await StationClient.connect_serial(
        path, baud or creds.baud, station_id=creds.name, key=creds.key, pace=pace, give_up_after=give_up_after
    )


# -- device keys -------------------------------------------------------------------------------------------


def generate_device_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 device key (for fixtures whose device cannot make its own; normally the device does)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, device_serial: str) -> bytes:
    """A DER PKCS#10 request with the device serial as subject serialNumber (and CN), signed by ``key``."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_serial),
            x509.NameAttribute(NameOID.COMMON_NAME, device_serial),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def chain_pem(chain: list[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM) for der in chain
    )


# -- synchronous wrappers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolledDevice:
    device_serial: str
    request_id: bytes
    chain: list[bytes]  # device certificate first
    key_pem: bytes | None  # only when the key was generated here


def enroll_device(
    bundle_dir: str | Path,
    device_serial: str,
    csr_der: bytes | None = None,
    *,
    request_id: bytes | None = None,
    profile: str | None = None,
    port: str | None = None,
    host: str | None = None,
    baud: int | None = None,
    confirm: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> EnrolledDevice:
    """Blocking: enrol one device with the bundle in ``bundle_dir`` and (by default) confirm it.

    Without ``csr_der`` a P-256 key is generated (or ``key`` used) and its CSR made here. ``confirm=True``
    assumes the caller stores exactly the returned certificate; a fixture that writes to a device should
    pass ``confirm=False`` and call ``confirm_device`` with the DER read back from the device."""
    creds = load_credentials(bundle_dir)
    private = None
    if csr_der is None:
        private = key or generate_device_key()
        csr_der = make_csr(private, device_serial)
    rid = request_id or new_request_id()
    csr = csr_der

    async def run() -> list[bytes]:
        async with await connect(creds, port=port, host=host, baud=baud) as client:
            chain = await client.enroll(device_serial, csr, request_id=rid, profile=profile)
            if confirm:
                await client.confirm(rid, chain[0])
            return chain

    chain = asyncio.run(run())
    return EnrolledDevice(device_serial, rid, chain, key_pem(private) if private is not None else None)


def confirm_device(
    bundle_dir: str | Path,
    request_id: bytes,
    cert_der: bytes,
    *,
    port: str | None = None,
    host: str | None = None,
) -> None:
    """Blocking CONFIRM for a certificate the device has stored."""
    creds = load_credentials(bundle_dir)

    async def run() -> None:
        async with await connect(creds, port=port, host=host) as client:
            await client.confirm(request_id, cert_der)

    asyncio.run(run())


def fetch_ca_chain(
    bundle_dir: str | Path, profile: str = "", *, port: str | None = None, host: str | None = None
) -> list[bytes]:
    """Blocking GET_CA_CHAIN."""
    creds = load_credentials(bundle_dir)

    async def run() -> list[bytes]:
        async with await connect(creds, port=port, host=host) as client:
            return await client.ca_chain(profile)

    return asyncio.run(run())
