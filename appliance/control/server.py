"""The control API over HTTP/1.1 on the control socket (docs/control-api.md is the contract).

    GET  /v1/status              the status document
    GET  /v1/alarms              the open alarms
    GET  /v1/events              server-sent events (text/event-stream)
    POST /v1/login               {"user", "password"} -> {"token", "user", "role", "expires_at"}
    POST /v1/logout              (session)
    GET  /v1/session             (session) who is logged in, until when
    POST /v1/actions/<action>    (session) an action; privileged ones carry "confirm": {"user", "password"}

Reading needs only access to the socket (its mode and group); actions need a session token in the
Authorization header. Nothing is served on TCP. Request bodies are JSON objects of at most max_body_bytes;
bodies and passwords are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from appliance.alarms import LogOnce
from appliance.config import ControlSection
from appliance.control.actions import ActionError, Actions, bad_request
from appliance.control.events import Event
from appliance.control.hub import ControlHub
from appliance.control.sessions import ConsoleSession, Sessions
from appliance.control.status import StatusBuilder
from appliance.control.unix import CappedProtocol, Gate, bind_control_socket, capped_factory, open_for_group
from appliance.text import load_json
from console import wire

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # an event stream with nothing to say sends a comment this often (dead consoles show up)
WRITE_TIMEOUT_S = 10.0
BATCH_S = 0.05  # events are written at most this late, together  # a console that does not read its stream for this long is dropped

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False, default=str)


def sse(event: Event) -> bytes:
    """One server-sent event (on the hot path once per event and stream: the encoder is built once)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event["seq"],
        str(event["type"]).encode(),
        _ENCODER.encode(event).encode(),
    )


class ControlApi:
    """The handlers, over the hub (events, counters), the status builder, the sessions and the actions."""

    def __init__(
        self,
        settings: ControlSection,
        hub: ControlHub,
        status: StatusBuilder,
        sessions: Sessions,
        actions: Actions,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.status = status
        self.sessions = sessions
        self.actions = actions
        self.defects = LogOnce(300.0)

    # -- plumbing ------------------------------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        transport = request.transport
        proto = transport.get_protocol() if transport is not None else None
        capped = proto if isinstance(proto, CappedProtocol) else None
        if capped is not None:
            capped.request_started()
        try:
            if "password" in request.rel_url.query_string.lower():
                raise bad_request("a password never travels in a URL: send it in the JSON body")
            return await handler(request)
        except ActionError as exc:
            return error(exc.status, exc.code, exc.message)
        except web.HTTPRequestEntityTooLarge:
            return error(
                413, wire.ERR_TOO_LARGE, f"the body is larger than {self.settings.max_body_bytes} bytes"
            )
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return error(
                405, wire.ERR_METHOD_NOT_ALLOWED, f"{request.method} is not allowed here (only {allowed})"
            )
        except web.HTTPException as exc:
            code = wire.ERR_NOT_FOUND if exc.status == 404 else wire.ERR_BAD_REQUEST
            return error(exc.status, code, exc.reason)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a defect answers 500 and is logged once per type, not per request
            self.defects.log(log, logging.ERROR, type(exc).__name__, "control API: %s %s failed\n%s",
                             request.method, request.path, "".join(traceback.format_exception(exc)))  # fmt: skip
            return error(500, wire.ERR_INTERNAL, "internal error (logged)")
        finally:
            if capped is not None:
                capped.request_finished()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise bad_request("the body did not arrive in time") from None
        if not raw:
            return {}
        try:
            body = load_json(
                raw.decode("utf-8")
            )  # bounded: too deep a nesting is a 400, not a RecursionError
        except UnicodeDecodeError:
            raise bad_request("the body is not JSON (not UTF-8)") from None
        except ValueError as exc:
            raise bad_request(f"the body is {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    def _token(self, request: web.Request) -> str:
        value = request.headers.get(wire.AUTH_HEADER, "")
        scheme, _, token = value.partition(" ")
        if scheme != wire.AUTH_SCHEME or not token.strip():
            raise ActionError(
                401, wire.ERR_UNAUTHENTICATED, "log in first: no session token in the Authorization header"
            )
        return token.strip()

    def _session(self, request: web.Request) -> ConsoleSession:
        session = self.sessions.get(self._token(request))
        if session is None:
            raise ActionError(
                401, wire.ERR_UNAUTHENTICATED, "the session expired or does not exist: log in again"
            )
        return session

    # -- read --------------------------------------------------------------------------------------------------------
    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status.document(), dumps=_dumps)

    async def get_alarms(self, request: web.Request) -> web.Response:
        return web.json_response({"alarms": [a.snapshot() for a in self.hub.alarms.active()]}, dumps=_dumps)

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        sub = self.hub.bus.subscribe()
        if sub is None:
            return error(503, wire.ERR_BUSY, f"{self.hub.bus.max_subscribers} event streams are open already")
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})  # fmt: skip
            await resp.prepare(request)
            hello = {"type": wire.EVENT_HELLO, "seq": self.hub.bus.last_seq, "api": wire.API_VERSION,
                     "time": time.time()}  # fmt: skip
            await self._write(resp, sse(hello))
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        event = await sub.next_event()
                except TimeoutError:
                    await self._write(resp, b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                # Events come in bursts (a group commit answers a batch): gather what arrives within
                # BATCH_S and write it at once, so a busy line costs a few writes a second, not one per event.
                await asyncio.sleep(BATCH_S)
                chunk, end = [sse(event)], False
                while not sub.queue.empty():
                    more = sub.queue.get_nowait()
                    if more is None:
                        end = True
                        break
                    chunk.append(sse(more))
                await self._write(resp, b"".join(chunk))
                if end:
                    break
        except TimeoutError:
            self.hub.bus.stalled(sub)  # the console stopped reading: closed, and counted as dropped
        except ConnectionError:
            pass  # the console went away: its stream ends here
        finally:
            sub.close()
        return resp

    @staticmethod
    async def _write(resp: web.StreamResponse, data: bytes) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await resp.write(data)

    # -- sessions and actions ----------------------------------------------------------------------------------------
    async def post_login(self, request: web.Request) -> web.Response:
        token, session = await self.actions.login(await self._body(request))
        return web.json_response({"token": token, **session.public()})

    async def post_logout(self, request: web.Request) -> web.Response:
        session = self.sessions.close(self._token(request))
        return web.json_response({"logged_out": session.user.name if session else None})

    async def get_session(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).public())

    async def post_action(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await self._body(request)
        result = await self.actions.perform(request.match_info["action"], session, body)
        return web.json_response({"ok": True, **result}, dumps=_dumps)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self.middleware])
        app.router.add_get(wire.STATUS, self.get_status)
        app.router.add_get(wire.ALARMS, self.get_alarms)
        app.router.add_get(wire.EVENTS, self.get_events)
        app.router.add_post(wire.LOGIN, self.post_login)
        app.router.add_post(wire.LOGOUT, self.post_logout)
        app.router.add_get(wire.SESSION, self.get_session)
        app.router.add_post(wire.ACTIONS + "/{action}", self.post_action)
        return app


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


MALFORMED_LOG_S = 300.0  # a malformed request is logged once per kind this often (docs/control-api.md)


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, except for requests it cannot parse (a request line or header too long,
    bad syntax): aiohttp logs each with a traceback whose message holds the request's bytes (a URL may carry a
    password) and answers text/plain. Here they are answered in JSON and logged once per kind every
    MALFORMED_LOG_S, by type and status only: never the request's bytes."""

    once = LogOnce(MALFORMED_LOG_S, max_causes=64)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        kind = type(exc).__name__ if exc is not None else "error"
        self.once.log(log, logging.WARNING if status < 500 else logging.ERROR, f"{status}:{kind}",
                      "control API: a request refused before it was read (HTTP %d, %s); its bytes are not logged",
                      status, kind)  # fmt: skip
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was being sent already: the connection is closed")
        if status >= 500:
            resp = error(500, wire.ERR_INTERNAL, "internal error (logged)")
        else:
            text = (
                "the request line or a header is too long"
                if "too long" in str(exc) or "Got more than" in str(exc)
                else "the request is not valid HTTP/1.1"
            )
            resp = error(status, wire.ERR_BAD_REQUEST, text)
        resp.force_close()
        return resp


class _Site(web.BaseSite):
    """aiohttp's site on an already bound socket, with the Gate's protocol in front of every connection."""

    def __init__(self, runner: web.AppRunner, sock: Any, gate: Gate, path: Path) -> None:
        super().__init__(runner)
        self._sock = sock
        self._gate = gate
        self._path = path

    @property
    def name(self) -> str:
        return f"unix:{self._path}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def handler() -> RequestHandler:
            # As aiohttp's Server.__call__ (3.14), with the handler that never logs a request's bytes.
            return _JsonErrors(server, loop=loop, **server._kwargs)

        self._server = await loop.create_unix_server(capped_factory(self._gate, handler), sock=self._sock)


class ControlServer:
    """Serve the control API on the socket `path` until exit; the socket file is removed on exit."""

    def __init__(self, api: ControlApi, path: Path, settings: ControlSection) -> None:
        self.api = api
        self.path = path
        self.settings = settings
        self.gate = Gate(settings.max_connections, settings.request_timeout_s)
        self._runner: web.AppRunner | None = None
        self._inode: int | None = None

    async def __aenter__(self) -> ControlServer:
        sock = bind_control_socket(self.path, self.settings.group)
        self._inode = os.stat(self.path).st_ino
        if self.settings.group:
            open_for_group(self.path.parent, self.settings.group)
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0,
                                     keepalive_timeout=self.settings.request_timeout_s)  # fmt: skip
        try:
            await self._runner.setup()
            await _Site(self._runner, sock, self.gate, self.path).start()
        except BaseException:
            await self._runner.cleanup()
            sock.close()
            raise
        log.info("control API on %s", self.path)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        self.api.hub.bus.close_all()  # open event streams end now, not after aiohttp's shutdown timeout
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
