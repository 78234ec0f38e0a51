"""An asyncio client for the control API (docs/control-api.md), over the daemon's Unix socket.

    async with ControlClient(control_socket(Path("/etc/birthline/birthline.toml"))) as api:
        status = await api.status()
        async for event in api.events():          # "hello" first; ends if the daemon drops the stream
            ...
        await api.login("olga", password)         # once per console session
        await api.pause_station("L1-st1", "fixture jammed")
        await api.close_work_order("WO-1001", confirm=Credentials("sam", supervisor_password))

Standard library and aiohttp only: a console never imports the appliance. Every failure is a ControlError with
the API's error code; ControlUnavailable when the daemon cannot be reached (not running, restarting). The
password is sent in a JSON body and never kept; the session token is sent in the Authorization header.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from console import wire

SSE_LINE_MAX = 1024 * 1024


class ControlError(Exception):
    """The API refused (`status`, `code` from console.wire ERR_*), or the daemon could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ControlUnavailable(ControlError):
    """The daemon is not answering on the socket (stopped, restarting) or the connection broke."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


@dataclass(frozen=True)
class Credentials:
    """A person's name and password for a privileged action's confirmation (never printed)."""

    user: str
    password: str = field(repr=False)


class ControlClient:
    def __init__(self, socket_path: Path | str, *, timeout_s: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self.token: str | None = None
        self.user: dict[str, Any] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._dir_fd: int | None = None

    async def __aenter__(self) -> ControlClient:
        path = str(self.socket_path)
        if len(os.fsencode(path)) >= 100:  # longer than sun_path allows: through the directory's descriptor
            self._dir_fd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
            path = f"/proc/self/fd/{self._dir_fd}/{self.socket_path.name}"
        self._http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path), base_url="http://birthline",
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s),
        )  # fmt: skip
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {wire.AUTH_HEADER: f"{wire.AUTH_SCHEME} {self.token}"} if self.token else {}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._http is not None, "use ControlClient as an async context manager"
        try:
            async with self._http.request(
                method, path, json=body, headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:  # fmt: skip
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
            raise ControlUnavailable(f"the daemon does not answer on {self.socket_path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ControlError(status, wire.ERR_INTERNAL, f"not JSON: {text[:200]!r}") from None
        if status >= 400 or not isinstance(data, dict):
            err = data if isinstance(data, dict) else {}
            raise ControlError(
                status, str(err.get("error", wire.ERR_INTERNAL)), str(err.get("message", text[:200]))
            )
        return data

    # -- read ------------------------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        return await self._call("GET", wire.STATUS)

    async def alarms(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", wire.ALARMS))["alarms"])

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The event stream: each event as its JSON object ("type", "seq", "time", ...), "hello" first. Ends
        (returns) when the daemon ends the stream; ControlUnavailable if the connection breaks."""
        assert self._http is not None, "use ControlClient as an async context manager"
        try:
            async with self._http.get(
                wire.EVENTS, headers={"Accept": "text/event-stream"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=60.0),
                read_bufsize=SSE_LINE_MAX,
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    text = await resp.text()
                    with contextlib.suppress(json.JSONDecodeError):
                        err = json.loads(text)
                        raise ControlError(resp.status, str(err.get("error")), str(err.get("message")))
                    raise ControlError(resp.status, wire.ERR_INTERNAL, text[:200])
                buffer = b""
                while True:
                    chunk = await resp.content.readany()  # whatever arrived: the daemon writes in batches
                    if not chunk:
                        return
                    buffer += chunk
                    if len(buffer) > SSE_LINE_MAX:
                        raise ControlError(
                            resp.status, wire.ERR_INTERNAL, "an event larger than the client allows"
                        )
                    *blocks, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
                    for block in blocks:
                        data = [
                            line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
                        ]
                        if data:
                            yield json.loads(b"\n".join(data))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
            raise ControlUnavailable(f"the event stream from {self.socket_path} broke: {exc}") from exc

    # -- session ---------------------------------------------------------------------------------------------------
    async def login(self, user: str, password: str) -> dict[str, Any]:
        """Log in for this console session; later actions carry the token."""
        data = await self._call("POST", wire.LOGIN, {"user": user, "password": password})
        self.token = str(data.pop("token"))
        self.user = data
        return data

    async def logout(self) -> None:
        if self.token is not None:
            with contextlib.suppress(ControlError):
                await self._call("POST", wire.LOGOUT)
        self.token = None
        self.user = None

    async def session(self) -> dict[str, Any]:
        return await self._call("GET", wire.SESSION)

    # -- actions ---------------------------------------------------------------------------------------------------
    async def action(
        self, name: str, fields: dict[str, Any], confirm: Credentials | None = None
    ) -> dict[str, Any]:
        body = dict(fields)
        if confirm is not None:
            body["confirm"] = {"user": confirm.user, "password": confirm.password}
        return await self._call("POST", f"{wire.ACTIONS}/{name}", body)

    async def pause_station(self, station: str, reason: str = "") -> dict[str, Any]:
        return await self.action(
            wire.ACTION_STATION_PAUSE, {"station": station, **({"reason": reason} if reason else {})}
        )

    async def resume_station(self, station: str) -> dict[str, Any]:
        return await self.action(wire.ACTION_STATION_RESUME, {"station": station})

    async def acknowledge_alarm(self, cause: str) -> dict[str, Any]:
        return await self.action(wire.ACTION_ALARM_ACKNOWLEDGE, {"cause": cause})

    async def activate_work_order(self, work_order: str, *, confirm: Credentials) -> dict[str, Any]:
        return await self.action(wire.ACTION_WORKORDER_ACTIVATE, {"work_order": work_order}, confirm)

    async def close_work_order(self, work_order: str, *, confirm: Credentials) -> dict[str, Any]:
        return await self.action(wire.ACTION_WORKORDER_CLOSE, {"work_order": work_order}, confirm)

    async def scrap_device(self, device_serial: str, reason: str, *, confirm: Credentials) -> dict[str, Any]:
        return await self.action(
            wire.ACTION_DEVICE_SCRAP, {"device_serial": device_serial, "reason": reason}, confirm
        )

    async def rework_device(self, device_serial: str, reason: str, *, confirm: Credentials) -> dict[str, Any]:
        return await self.action(
            wire.ACTION_DEVICE_REWORK, {"device_serial": device_serial, "reason": reason}, confirm
        )
