"""Serving an aiohttp application behind the connection bounds of appliance.connections (the VA, CMP, metrics;
EST over TLS).

aiohttp (3.14) bounds header sizes and closes a keep-alive connection idle for keepalive_timeout, but it has no
deadline for finishing the request headers or the body, and no connection cap: an idle socket that sent half a
request line was held forever. Here every connection goes through a ConnectionGate and a Guard (caps, and the
header, body and idle deadlines); a middleware tells the Guard where each request is, and ``held(request)``
marks the time a handler holds a request to pace its client (the connection may be displaced meanwhile).

Per connection aiohttp buffers at most: the request line (8190 bytes), MAX_HEADERS header lines of at most
MAX_FIELD bytes each, and up to twice READ_BUFSIZE of body before it stops reading the socket (one read of the
socket, up to 256 KiB, may land before it stops). aiohttp's own error log (a traceback per malformed request)
goes through a rate limit, and a client that goes away in the middle of its request is no error of ours: a peer
cannot fill the log, nor put a traceback in it.

With `tls` (HTTPS: the EST listener) TLS sits between the Guard and aiohttp, admitted and deadlined like the
rest: the header deadline runs from accept and so covers the TLS handshake too, which also has its own
`handshake_timeout_s`; a refused connection is closed without a byte (a TLS client would read a plaintext 503 as
a broken handshake). The handler reaches the TLS session through the request's transport (`ssl_object`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import traceback
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from appliance.alarms import Alarms, LogOnce
from appliance.connections import (
    DISPLACE_GRACE_S,
    FULL_CLEAR_HOLD_S,
    AcceptErrors,
    ConnectionGate,
    Guard,
    HttpLimits,
    serve_guarded,
    tls_server_protocol,
)

__all__ = ["MAX_FIELD", "MAX_HEADERS", "READ_BUFSIZE", "HttpListener", "TlsServing", "gone", "held", "holder"]

MAX_HEADERS = 32  # OCSP and CMP clients send a handful
MAX_FIELD = 2048
READ_BUFSIZE = 64 * 1024  # the body stream's limit: reading pauses past twice this

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The name under which an HTTPS connection's TLS transport answers with its Guard (get_extra_info).
_GUARD_EXTRA = "birthline_guard"


@dataclass(frozen=True)
class TlsServing:
    """HTTPS: the server's TLS context (certificate, client-certificate policy) and the handshake's deadline."""

    context: ssl.SSLContext
    handshake_timeout_s: float = 10.0


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger. aiohttp logs every malformed request at ERROR with a traceback, so any peer
    could fill the log: those (HttpProcessingError: bad request line, too many or too long headers) are logged
    once a minute per kind at INFO, by kind and status only (aiohttp's message quotes the request's bytes, and a
    URL may carry a secret); a connection lost in the middle of a request (ConnectionError: the peer went away,
    or the listener closed it at a deadline) is the client's doing, logged once a minute per kind at INFO without
    a traceback; anything else (a handler's bug) once a minute per kind at ERROR with its traceback."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(f"birthline.http.{name}"), {})
        self.listener = name
        self._once = LogOnce(interval_s=60.0, max_causes=64)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(
            exc, HttpProcessingError
        ):  # its text quotes the request's bytes (a URL, a header): never logged
            self._once.log(
                self.logger, logging.INFO if level >= logging.WARNING else logging.DEBUG,
                f"peer:{type(exc).__name__}", "%s listener: malformed request refused (%s, HTTP %s)",
                self.listener, type(exc).__name__, exc.code,
            )  # fmt: skip
        elif not isinstance(exc, BaseException) or level < logging.WARNING:
            super().log(level, msg, *args, **kwargs)
        elif isinstance(exc, ConnectionError):
            self._once.log(
                self.logger, logging.INFO, f"peer:{type(exc).__name__}",
                "%s listener: a connection ended in the middle of a request (%s)",
                self.listener, type(exc).__name__,
            )  # fmt: skip
        else:
            self._once.log(
                self.logger, logging.ERROR, f"own:{type(exc).__name__}", "%s listener: %s\n%s",
                self.listener, str(msg) % args, "".join(traceback.format_exception(exc)),
            )  # fmt: skip

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


_GUARD: web.RequestKey[Guard] = web.RequestKey("birthline.guard", Guard)


def _guard(request: web.Request) -> Guard | None:
    guard = request.get(_GUARD)
    return guard if isinstance(guard, Guard) else None


@contextlib.contextmanager
def held(request: web.Request) -> Iterator[None]:
    """While a handler holds `request` to pace its client, the connection has not been served: displaceable."""
    guard = _guard(request)
    if guard is None:
        yield
        return
    guard.hold(True)
    try:
        yield
    finally:
        guard.hold(False)


def holder(request: web.Request) -> Callable[[bool], None]:
    """`held` for a handler that holds and releases its request itself: call it with True while holding."""
    guard = _guard(request)
    return guard.hold if guard is not None else (lambda _held: None)


def gone(request: web.Request) -> bool:
    """The request's connection was closed (displaced, timed out, or by the peer): nothing more to do for it."""
    guard = _guard(request)
    if guard is not None:
        return guard.gone
    return request.transport is None or request.transport.is_closing()


# What every answer of these listeners says it is: the product, not the versions of Python and aiohttp (a
# scanner's first question, and nothing a client needs). aiohttp's own answers to requests it cannot parse
# (before any application runs) still carry its default.
SERVER_HEADER = "birthline"


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


@web.middleware
async def _request_phases(request: web.Request, handler: _Handler) -> web.StreamResponse:
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, Guard) and transport is not None:
        guard = transport.get_extra_info(_GUARD_EXTRA)  # HTTPS: TLS is between the Guard and aiohttp
    if not isinstance(guard, Guard):
        if transport is None:
            # The connection ended before its handler ran (displaced at the cap, closed at a deadline or by the
            # peer): aiohttp has dropped the transport, its body reader would raise RuntimeError("Connection
            # closed."), and no answer can reach anyone. The listener counted and logged the close.
            return web.Response(status=400)
        return await handler(request)
    request[_GUARD] = guard
    guard.request_started(request.content if request.body_exists else None)
    try:
        return await handler(request)
    except (ConnectionError, RuntimeError) as exc:
        # aiohttp's body reader raises RuntimeError("Connection closed.") once its protocol saw the connection
        # lost, which can come before the Guard sees its transport closing; any other RuntimeError is a defect.
        if not (guard.gone or (isinstance(exc, RuntimeError) and str(exc) == "Connection closed.")):
            raise
        # The connection ended under the handler (reading a body the peer stopped sending, closed at its
        # deadline or displaced; aiohttp's body reader says RuntimeError "Connection closed." when the close
        # comes from our side): the listener counted and logged that; no answer can reach anyone.
        return web.Response(status=400)
    finally:
        guard.request_finished()


class _GuardedSite(web.TCPSite):
    """aiohttp's TCPSite with the Guard as every connection's protocol, in front of aiohttp's handler."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, gate: ConnectionGate, tls: TlsServing | None
    ) -> None:
        super().__init__(runner, host, port)
        self.gate = gate
        self.tls = tls

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        tls = self.tls

        def inner(guard: Guard) -> asyncio.BaseProtocol:
            if tls is None:
                return server()
            return tls_server_protocol(
                server(), tls.context, tls.handshake_timeout_s, extra={_GUARD_EXTRA: guard}
            )

        self._server = await serve_guarded(
            self.gate, inner, self._host or "", self._port, buffered=tls is not None
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


class HttpListener:
    """Serve an app on host:port (port 0: any free one) until exit, within `limits`; over TLS with `tls`.
    `address` is the bound (host, port); `gate` holds the connection counts."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        limits: HttpLimits | None = None,
        name: str = "http",
        section: str | None = None,
        alarms: Alarms | None = None,
        accept_errors: AcceptErrors | None = None,
        grace_s: float = DISPLACE_GRACE_S,
        tls: TlsServing | None = None,
        clear_hold_s: float = FULL_CLEAR_HOLD_S,
    ) -> None:
        """`name` names the listener in alarms and the log; `section` is the configuration section holding its
        limits (None: they are fixed), which the at-cap alarm's advice names; `grace_s` see ConnectionGate."""
        self.app = app
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        if section is not None:
            advice = (
                f"raise [{section}] max_connections (or max_connections_per_peer) if these clients are"
                " legitimate; otherwise find the peer holding them"
            )
        else:
            advice = (
                f"the {name} listener's caps are fixed ({self.limits.max_connections} connections,"
                f" {self.limits.max_connections_per_peer} per address): find the peer holding them"
            )
        self.tls = tls
        self.gate = ConnectionGate(
            name, self.limits.caps, http=self.limits, alarms=alarms, accept_errors=accept_errors, advice=advice,
            grace_s=grace_s, tls=tls is not None, clear_hold_s=clear_hold_s,
        )  # fmt: skip
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HttpListener:
        self.app.middlewares.append(_request_phases)
        self.app.on_response_prepare.append(_server_header)
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.limits.idle_timeout_s,
            max_headers=MAX_HEADERS, max_field_size=MAX_FIELD, read_bufsize=READ_BUFSIZE,
            lingering_time=min(self.limits.body_timeout_s, 10.0), logger=_ServerLog(self.gate.name),
        )  # fmt: skip
        await self._runner.setup()
        try:
            await _GuardedSite(self._runner, self.host, self.port, self.gate, self.tls).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def address(self) -> tuple[str, int]:
        assert self._runner is not None, "the HTTP listener is not running"
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}"
