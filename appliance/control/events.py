"""The event stream's fan-out: every event goes to each subscriber's bounded queue, never waiting for one.

`publish()` runs on the event loop, on the issuance hot path: with no subscriber it costs a counter increment;
with subscribers, one dict and a `put_nowait` each. A subscriber whose queue is full has fallen behind (a
console that stopped reading, a frozen terminal): it is dropped at once (its queue emptied, so its memory goes
with it) and its stream ends with a `dropped` event; the others, and issuance, never wait for it.

Events from other threads (alarms are raised on the journal and PKCS#11 threads) go through
`publish_threadsafe`, which hands them to the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any

from console import wire

log = logging.getLogger(__name__)

Event = dict[str, Any]


class Subscriber:
    """One open event stream. Read with `await next_event()`; None means the stream is over (dropped)."""

    def __init__(self, bus: EventBus, size: int) -> None:
        self.bus = bus
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self.dropped = False
        self.delivered = 0

    async def next_event(self) -> Event | None:
        event = await self.queue.get()
        if event is not None:
            self.delivered += 1
        return event

    def close(self) -> None:
        self.bus.unsubscribe(self)


class EventBus:
    def __init__(self, queue_size: int = 2048, max_subscribers: int = 8) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._subscribers: list[Subscriber] = []
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.published = 0
        self.dropped_subscribers = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self) -> Subscriber | None:
        """A new subscriber, or None when max_subscribers are open."""
        if len(self._subscribers) >= self.max_subscribers:
            return None
        sub = Subscriber(self, self.queue_size)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def skip(self) -> None:
        """An event nobody is subscribed to: numbered (so `seq` counts every event), not built."""
        self.published += 1
        self.last_seq = next(self._seq)

    def publish(self, kind: str, data: Mapping[str, Any]) -> None:
        """Number the event and queue it for every subscriber (event loop thread only)."""
        self.published += 1
        self.last_seq = seq = next(self._seq)
        if not self._subscribers:
            return
        event: Event = {"type": kind, "seq": seq, "time": time.time(), **data}
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(sub)

    def publish_threadsafe(self, kind: str, data: Mapping[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.publish(kind, data)
        else:
            loop.call_soon_threadsafe(self.publish, kind, dict(data))

    def close_all(self) -> None:
        """End every stream (the daemon is stopping)."""
        for sub in list(self._subscribers):
            self.unsubscribe(sub)
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)

    def stalled(self, sub: Subscriber) -> None:
        """The subscriber's socket accepted nothing for the write timeout: its stream is closed (no `dropped`
        event can reach a reader that does not read), and counted with the dropped ones."""
        if not sub.dropped:
            sub.dropped = True
            self.dropped_subscribers += 1
            log.warning("control API: an event stream accepted nothing for a while and was closed")
        self.unsubscribe(sub)

    def _drop(self, sub: Subscriber) -> None:
        """The subscriber fell queue_size events behind: end its stream rather than slow anyone down."""
        self.unsubscribe(sub)
        sub.dropped = True
        self.dropped_subscribers += 1
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait({"type": wire.EVENT_DROPPED, "seq": self.last_seq, "time": time.time(),
                              "reason": f"this stream fell {self.queue_size} events behind"})  # fmt: skip
        sub.queue.put_nowait(None)
        log.warning("control API: an event stream fell %d events behind and was dropped", self.queue_size)
