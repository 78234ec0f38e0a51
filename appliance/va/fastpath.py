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

Bounds: at most `max_connections` connections (more are closed at once), a request head of at most
MAX_HEAD_BYTES, a body of at most the responder's max_request_bytes (else malformedRequest and close), at most
MAX_PIPELINE requests in flight per connection (reading pauses), and a connection idle for `idle_s` is closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from types import TracebackType
from typing import Final

from cryptography.x509 import ocsp

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


class _Conn(asyncio.Protocol):
    def __init__(self, server: OcspListener) -> None:
        self.server = server
        self.responder = server.responder
        self.buf = bytearray()
        self.slots: collections.deque[bytes | asyncio.Future[bytes]] = collections.deque()
        self.waiting = 0  # futures among the slots: answers on the full path, not yet sent
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.closing = False
        self.reading = True
        self.writable = True
        self.last_seen = time.monotonic()

    # -- connection --------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server.conns) >= self.server.max_connections:
            self.server.refused += 1
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "unknown"
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
        # of its requests) would pile up in our memory.
        self.writable = False
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        self._flush()

    # -- requests ----------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_seen = time.monotonic()
        self.buf += data
        self._parse()
        self._flush()

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
                    return  # the rest of the body is still on its way
                body = bytes(self.buf[head_end + 4 : head_end + 4 + length])
                del self.buf[: head_end + 4 + length]
                self._request(body, get=False)
            elif method == b"GET" and target.startswith(b"/ocsp/") and length == 0 and not chunked:
                del self.buf[: head_end + 4]
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

    def idle_for(self, now: float) -> float:
        return 0.0 if self.slots else now - self.last_seen


class OcspListener:
    """`async with OcspListener(responder, host, port):` serves OCSP at http://host:port/ocsp."""

    def __init__(
        self,
        responder: OcspResponder,
        host: str,
        port: int,
        *,
        max_connections: int = 1024,
        idle_s: float = 30.0,
        max_age: int = 300,
    ) -> None:
        self.responder = responder
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.max_age = max_age
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Future[None]] = set()
        self.requests = 0
        self.fast = 0  # answered from their bytes alone (OcspResponder.fast)
        self.refused = 0  # connections closed at once: max_connections reached
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> OcspListener:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), self.host, self.port, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._reaper = asyncio.create_task(self._reap(), name="va-ocsp-line-idle")
        return self

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.idle_s / 4))
            now = time.monotonic()
            for conn in [c for c in self.conns if c.idle_for(now) >= self.idle_s]:
                if conn.transport is not None:
                    conn.transport.close()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
