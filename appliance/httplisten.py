"""Serving an aiohttp application behind the connection bounds of appliance.connections (the VA and CMP).

aiohttp (3.14) bounds header sizes and closes a keep-alive connection idle for keepalive_timeout, but it has no
deadline for finishing the request headers or the body, and no connection cap: an idle socket that sent half a
request line was held forever. Here every connection goes through a ConnectionGate and a Guard (caps, and the
header, body and idle deadlines); a middleware tells the Guard where each request is.

Per connection aiohttp buffers at most: the request line (8190 bytes), MAX_HEADERS header lines of at most
MAX_FIELD bytes each, and up to twice READ_BUFSIZE of body before it stops reading the socket. aiohttp's own
error log (a traceback per malformed request) goes through a rate limit: a peer cannot fill the log.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from appliance.alarms import Alarms, LogOnce
from appliance.connections import AcceptErrors, ConnectionGate, Guard, HttpLimits, serve_guarded

__all__ = ["MAX_FIELD", "MAX_HEADERS", "READ_BUFSIZE", "HttpListener"]

MAX_HEADERS = 32  # OCSP and CMP clients send a handful
MAX_FIELD = 2048
READ_BUFSIZE = 64 * 1024  # the body stream's limit: reading pauses past twice this

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger. aiohttp logs every malformed request at ERROR with a traceback, so any peer
    could fill the log: those (HttpProcessingError: bad request line, too many or too long headers) are logged
    once a minute per kind at INFO, by kind and status only (aiohttp's message quotes the request's bytes, and a
    URL may carry a secret), and anything else (a handler's bug) once a minute per kind at ERROR with
    its traceback."""

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
        else:
            self._once.log(
                self.logger, logging.ERROR, f"own:{type(exc).__name__}", "%s listener: %s\n%s",
                self.listener, str(msg) % args, "".join(traceback.format_exception(exc)),
            )  # fmt: skip

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


@web.middleware
async def _request_phases(request: web.Request, handler: _Handler) -> web.StreamResponse:
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, Guard):
        return await handler(request)
    guard.request_started(request.content if request.body_exists else None)
    try:
        return await handler(request)
    finally:
        guard.request_finished()


class _GuardedSite(web.TCPSite):
    """aiohttp's TCPSite with the Guard as every connection's protocol, in front of aiohttp's handler."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: ConnectionGate) -> None:
        super().__init__(runner, host, port)
        self.gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await serve_guarded(self.gate, lambda _guard: server(), self._host or "", self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1]


class HttpListener:
    """Serve an app on host:port (port 0: any free one) until exit, within `limits`. `address` is the bound
    (host, port); `gate` holds the connection counts."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        limits: HttpLimits | None = None,
        name: str = "http",
        alarms: Alarms | None = None,
        accept_errors: AcceptErrors | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        self.gate = ConnectionGate(
            name, self.limits.caps, http=self.limits, alarms=alarms, accept_errors=accept_errors,
            advice=f"raise [{name}] max_connections (or max_connections_per_peer) if these clients are"
            " legitimate; otherwise find the peer holding them",
        )  # fmt: skip
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HttpListener:
        self.app.middlewares.append(_request_phases)
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.limits.idle_timeout_s,
            max_headers=MAX_HEADERS, max_field_size=MAX_FIELD, read_bufsize=READ_BUFSIZE,
            lingering_time=min(self.limits.body_timeout_s, 10.0), logger=_ServerLog(self.gate.name),
        )  # fmt: skip
        await self._runner.setup()
        try:
            await _GuardedSite(self._runner, self.host, self.port, self.gate).start()
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
        return f"http://{host}:{port}"
