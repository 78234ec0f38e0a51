"""A lean HTTP/1.1 listener for OCSP alone, so that a pre-produced answer costs a lookup and a send.

The VA's aiohttp listener (appliance/va/http.py) spends ~150 us of Python per request on request objects,
routing and middleware, which caps warm OCSP near a tenth of the HSM's sign rate. This listener parses the
little OCSP needs straight from the socket's bytes (request line, Content-Length, Connection) and answers a
request whose exact bytes the responder knows (OcspResponder.fast: pre-produced or answered before) at once,
in the same callback; keep-alive and pipelined requests are answered in order, many per write.

Everything else takes the responder's full path (aanswer: parsing, journal, HSM, budgets) in a task, and its
answer is sent in its turn. Both paths are paced to the client's request rate first (the same per-client budget
as the aiohttp listener): a request over it is held, or far over it answered tryLater after the hold.

    POST /ocsp, /ocsp/              RFC 6960 A.1 body, Content-Length only (chunked bodies are refused)
    GET  /ocsp/<base64 request>     RFC 6960 A.1 / RFC 5019, with the caching headers of http.py

Bounds, the [va] limits of the aiohttp listener applied the same way (appliance/connections.py: ConnectionGate
and Guard): at most `max_connections` connections and `max_connections_per_peer` from one address (at the cap a
connection that has not sent a whole request yet is displaced, else the newcomer gets a 503 and is closed; the
at-cap alarm is listener.va-ocsp-line.full); a request's head must arrive within `header_timeout_s` of its first
byte (and of the connection's opening), its body within `body_timeout_s` of its head, a connection idle for
`idle_timeout_s` is closed, and so is one whose client has not read its answers for `idle_timeout_s`; a request
head of at most MAX_HEAD_BYTES, a body of at most the responder's max_request_bytes (else malformedRequest and
close), at most MAX_PIPELINE requests in flight per connection (reading pauses).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from types import TracebackType
from typing import Final

from cryptography.x509 import ocsp

from appliance.alarms import Alarms
from appliance.connections import (
    DISPLACE_GRACE_S,
    FULL_CLEAR_HOLD_S,
    AcceptErrors,
    ConnectionGate,
    Guard,
    HttpLimits,
)
from appliance.va.http import _http_date, decode_get_request
from appliance.va.ocsp import MALFORMED, TRY_LATER, OcspAnswer, OcspResponder

log = logging.getLogger(__name__)

MAX_HEAD_BYTES: Final = 8192
MAX_PIPELINE: Final = 64
_POST_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\nCache-Control: no-store\r\n"
)
_CLOSE: Final = b"Connection: close\r\n"


def _post_response(der: bytes) -> bytes:
    return b"%sContent-Length: %d\r\n\r\n%s" % (_POST_HEAD, len(der), der)


def _get_response(answer: OcspAnswer, max_age_cap: int) -> bytes:
    if answer.status != ocsp.OCSPResponseStatus.SUCCESSFUL or not answer.cacheable:
        return _post_response(answer.der)
    assert answer.next_update is not None and answer.produced_at is not None
    max_age = max(0, min(max_age_cap, int(answer.next_update - time.time())))
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\n"
        f"Cache-Control: public, max-age={max_age}, no-transform, must-revalidate\r\n"
        f"ETag: {answer.etag}\r\nLast-Modified: {_http_date(answer.produced_at)}\r\n"
        f"Expires: {_http_date(answer.next_update)}\r\nContent-Length: {len(answer.der)}\r\n\r\n"
    )
    return head.encode() + answer.der


def _simple(status: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status


class _LineGuard(Guard):
    """The gate's Guard, with the request phases driven by _Conn's own parser instead of aiohttp's."""

    def _http_bytes(self) -> None:
        pass


class _Conn(asyncio.Protocol):
    def __init__(self, server: OcspListener, guard: Guard) -> None:
        self.server = server
        self.guard = guard
        self.limits = server.limits
        self.responder = server.responder
        self.buf = bytearray()
        self.slots: collections.deque[bytes | asyncio.Future[bytes]] = collections.deque()
        self.waiting = 0  # futures among the slots: answers on the full path, not yet sent
        self.transport: asyncio.Transport | None = None
        self.peer = guard.peer or "unknown"
        self.closing = False
        self.reading = True
        self.writable = True
        self.phase = (
            "headers"  # what the guard's deadline waits for: headers, body, idle, send, or "" (serving)
        )

    # -- connection --------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Admitted by the gate, which set the first request's header deadline.
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        self.closing = True
        for slot in self.slots:
            if isinstance(slot, asyncio.Future):
                slot.cancel()
        self.slots.clear()

    def pause_writing(self) -> None:
        # A client that sends but does not read: stop reading its requests, or its answers (ten times the size
        # of its requests) would pile up in our memory; and if it does not read for the idle time, close.
        self.writable = False
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        self._phase("send")

    def resume_writing(self) -> None:
        self.writable = True
        self._flush()
        self._settle()

    def _phase(self, phase: str) -> None:
        """Move the guard's deadline to what the connection waits for now (unchanged if it already waits for
        that: a head trickled byte by byte keeps the deadline of its first byte)."""
        if phase == self.phase or self.guard.transport is None:
            return  # unchanged, or the connection is gone (released: the gate must not list it again)
        self.phase = phase
        guard, limits = self.guard, self.limits
        if phase == "":
            guard.clear_deadline()
            self.server.gate.displaceable(guard, False)
            return
        seconds = {
            "headers": limits.header_timeout_s, "body": limits.body_timeout_s, "idle": limits.idle_timeout_s,
            "send": limits.idle_timeout_s,
        }[phase]  # fmt: skip
        guard.set_deadline(seconds, phase)
        # A connection that has not sent a whole request is not a client yet: displaceable at the cap.
        self.server.gate.displaceable(guard, phase != "send")

    def _settle(self) -> None:
        """After reading or sending: the phase the connection is in."""
        if self.closing or self.transport is None:
            return
        if not self.writable:
            self._phase("send")
        elif self.buf:
            if self.phase not in ("headers", "body"):
                self._phase("headers")
        elif self.slots:
            self._phase("")
        else:
            self._phase("idle")

    # -- requests ----------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.phase == "idle":
            self._phase("headers")  # the first bytes of the next request
        self.buf += data
        self._parse()
        self._flush()
        self._settle()

    def _parse(self) -> None:
        while not self.closing:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    self._finish(_simple(b"431 Request Header Fields Too Large"))
                return
            if head_end > MAX_HEAD_BYTES:
                self._finish(_simple(b"431 Request Header Fields Too Large"))
                return
            lines = bytes(self.buf[:head_end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                self._finish(_simple(b"400 Bad Request"))
                return
            method, target, version = parts
            length, close, chunked = 0, version == b"HTTP/1.0", False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    value = value.strip()
                    if not value.isdigit() or len(value) > 9:
                        self._finish(_simple(b"400 Bad Request"))
                        return
                    length = int(value)
                elif name == b"connection":
                    token = value.strip().lower()
                    close = token == b"close" or (close and token != b"keep-alive")
                elif name == b"transfer-encoding":
                    chunked = True
            if method == b"POST" and target in (b"/ocsp", b"/ocsp/"):
                if chunked or length > self.responder.max_request_bytes:
                    # The body is never read: the answer says why, and the connection ends.
                    self._finish(_post_response(MALFORMED.der), close=True)
                    return
                if len(self.buf) < head_end + 4 + length:
                    self._phase("body")  # the rest of the body is still on its way
                    return
                body = bytes(self.buf[head_end + 4 : head_end + 4 + length])
                del self.buf[: head_end + 4 + length]
                self._phase("")
                self._request(body, get=False)
            elif method == b"GET" and target.startswith(b"/ocsp/") and length == 0 and not chunked:
                del self.buf[: head_end + 4]
                self._phase("")
                der = decode_get_request(target[6:].decode("latin-1"), self.responder.max_request_bytes)
                if der is None:
                    self._queue(_post_response(MALFORMED.der))
                else:
                    self._request(der, get=True)
            else:
                self._finish(_simple(b"404 Not Found"))
                return
            if close:
                self._finish(b"")
                return

    def _request(self, body: bytes, *, get: bool) -> None:
        self.server.requests += 1
        delay = self.responder.pace(self.peer)
        if delay == 0.0 and not self.waiting:
            answer = self.responder.fast(body)
            if answer is not None:
                self.server.fast += 1
                self._queue(_get_response(answer, self.server.max_age) if get else _post_response(answer.der))
                return
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue(future)
        task = asyncio.ensure_future(self._slow(body, get, delay, future))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)
        if len(self.slots) >= MAX_PIPELINE and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    async def _slow(self, body: bytes, get: bool, delay: float | None, future: asyncio.Future[bytes]) -> None:
        try:
            if delay is None:  # far over the client's rate: held all the same, then tryLater
                await asyncio.sleep(self.responder.pace_max_delay_s)
                answer = TRY_LATER
            else:
                if delay > 0:
                    await asyncio.sleep(delay)
                answer = self.responder.fast(body) or await self.responder.aanswer(body, self.peer)
            if not future.done():
                future.set_result(
                    _get_response(answer, self.server.max_age) if get else _post_response(answer.der)
                )
        except asyncio.CancelledError:
            raise
        finally:
            if not future.done():
                future.cancel()
            self._flush()
            self._settle()

    def _queue(self, slot: bytes | asyncio.Future[bytes]) -> None:
        if isinstance(slot, asyncio.Future):
            self.waiting += 1
        self.slots.append(slot)

    def _finish(self, last: bytes, *, close: bool = True) -> None:
        """Answer what came before in order, then `last`, then close."""
        if last:
            self._queue(last)
        self.closing = close
        if self.transport is not None and self.reading:
            self.transport.pause_reading()
            self.reading = False
        self._flush()

    def _flush(self) -> None:
        out = []
        while self.slots:
            head = self.slots[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    break
                if head.cancelled():
                    self.slots.clear()
                    self.waiting = 0
                    self.closing = True
                    break
                self.waiting -= 1
                out.append(head.result())
            else:
                out.append(head)
            self.slots.popleft()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if out:
            transport.write(b"".join(out))
        if self.closing and not self.slots:
            transport.close()
        elif not self.reading and self.writable and len(self.slots) < MAX_PIPELINE // 2 and not self.closing:
            self.reading = True
            transport.resume_reading()


class OcspListener:
    """`async with OcspListener(responder, host, port, limits):` serves OCSP at http://host:port/ocsp."""

    def __init__(
        self,
        responder: OcspResponder,
        host: str,
        port: int,
        limits: HttpLimits | None = None,
        *,
        max_age: int = 300,
        alarms: Alarms | None = None,
        accept_errors: AcceptErrors | None = None,
        grace_s: float = DISPLACE_GRACE_S,
        clear_hold_s: float = FULL_CLEAR_HOLD_S,
    ) -> None:
        self.responder = responder
        self.host, self.port = host, port
        self.limits = limits or HttpLimits()
        self.max_age = max_age
        self.gate = ConnectionGate(
            "va-ocsp-line", self.limits.caps, http=self.limits, alarms=alarms, accept_errors=accept_errors,
            advice="raise [va] max_connections (or max_connections_per_peer) if these OCSP clients are"
            " legitimate; otherwise find the peer holding them",
            grace_s=grace_s, clear_hold_s=clear_hold_s,
        )  # fmt: skip
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Future[None]] = set()
        self.requests = 0
        self.fast = 0  # answered from their bytes alone (OcspResponder.fast)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> OcspListener:
        def inner(guard: Guard) -> asyncio.BaseProtocol:
            return _Conn(self, guard)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _LineGuard(self.gate, inner), self.host, self.port,
                                                backlog=1024)  # fmt: skip
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        self.gate.abort_all()
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
