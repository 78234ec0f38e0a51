"""The dashboard's link to the daemon: subscribe to the event stream, read the status document, keep both
flowing into the model, and when the daemon goes away (stopped, restarting, hung) say so and connect again.

One ControlClient for the whole session: the person's login (its token) lives in it, and actions go through it.
A daemon restart ends every console session, so after a reconnect an action may be answered `unauthenticated`;
the app then asks the person to log in again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, Protocol, cast

from console import wire
from console.client import ControlClient, ControlError, ControlUnavailable
from console.dashboard.model import Model

POLL_S: Final = 1.0  # the status document, once a second (the daemon caches it for half a second)
RECONNECT_MIN_S: Final = 0.5
RECONNECT_MAX_S: Final = 5.0
EVENTS_RETRY_S: Final = 5.0  # with every event stream taken, the stream is tried again this often


class _TryEvents(Exception):
    """The daemon answers but its event streams were busy: try the stream again (not a disconnection)."""


class Feed(Protocol):
    """Where the model's data comes from: the live daemon (Link), or a recorded line (tests, screenshots)."""

    api: ControlClient | None

    async def run(self, model: Model, changed: Callable[[], None]) -> None:
        """Feed `model` until cancelled, calling `changed()` after each change."""


class Link:
    def __init__(self, socket: Path, *, poll_s: float = POLL_S) -> None:
        self.socket = socket
        self.poll_s = poll_s
        self.api: ControlClient | None = ControlClient(socket)
        self.connects = 0

    async def run(self, model: Model, changed: Callable[[], None]) -> None:
        assert self.api is not None
        delay = RECONNECT_MIN_S
        async with self.api:
            while True:
                try:
                    await self._session(model, changed)
                    why = "the daemon ended the event stream (stopping?)"
                except _TryEvents:
                    continue
                except ControlUnavailable:
                    why = f"the daemon does not answer on {self.socket}"
                except ControlError as exc:
                    why = f"{exc.code}: {exc.message}"
                except ValueError as exc:  # the stream carried something that is not JSON
                    why = f"the daemon sent what this dashboard cannot read ({exc}); connecting again"
                if model.connected:
                    delay = RECONNECT_MIN_S  # it was up: try again soon
                model.set_disconnected(why, time.monotonic())
                changed()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self, model: Model, changed: Callable[[], None]) -> None:
        """Subscribe first, then read the status: events after its `seq` are counted on top of it."""
        assert self.api is not None
        api = self.api
        events = cast(AsyncGenerator[dict[str, Any]], api.events())  # an async generator: closed below
        try:
            try:
                hello = await anext(events, None)
            except ControlError as exc:
                if exc.code != wire.ERR_BUSY:
                    raise
                await self._without_events(api, model, changed)
                return
            if hello is None or hello.get("type") != wire.EVENT_HELLO:
                return
            model.load_status(await api.status())
            model.set_connected(time.monotonic())
            self.connects += 1
            changed()
            reader = asyncio.create_task(self._read(events, model, changed))
            poller = asyncio.create_task(self._poll(api, model, changed))
            try:
                done, _ = await asyncio.wait({reader, poller}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # the other one, or both when this link is cancelled (the dashboard closing)
                for task in (reader, poller):
                    task.cancel()
                await asyncio.gather(reader, poller, return_exceptions=True)
            for task in done:
                if not task.cancelled():
                    task.result()  # a ControlError of either ends this session
        finally:
            with contextlib.suppress(ControlError, RuntimeError):
                await events.aclose()

    async def _without_events(self, api: ControlClient, model: Model, changed: Callable[[], None]) -> None:
        """Every event stream of the daemon is taken: show the status, polled, and try the stream again now and
        then (each try that fails costs one refused request)."""
        model.load_status(await api.status())
        model.set_connected(time.monotonic(), events=False)
        changed()
        for _ in range(max(1, round(EVENTS_RETRY_S / self.poll_s))):
            await asyncio.sleep(self.poll_s)
            model.load_status(await api.status())
            changed()
        raise _TryEvents

    async def _read(
        self, events: AsyncIterator[dict[str, Any]], model: Model, changed: Callable[[], None]
    ) -> None:
        async for event in events:
            if not isinstance(event, dict):
                continue  # not an event object: nothing this dashboard can show
            model.apply(event)
            changed()
            if event.get("type") == wire.EVENT_DROPPED:
                return

    async def _poll(self, api: ControlClient, model: Model, changed: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            doc: dict[str, Any] = await api.status()
            model.load_status(doc)
            changed()
