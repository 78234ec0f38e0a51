"""FrameChannel over an asyncio stream (TCP, TLS, a Unix socket or a socketpair in tests)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

from stations.codec import DecodeEvent, Frame, FrameDecoder
from stations.transports.base import ChannelClosed

READ_CHUNK = 4096


class StreamChannel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        decoder: FrameDecoder | None = None,
        peer: str | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder or FrameDecoder()
        self._pending: collections.deque[Frame | DecodeEvent] = collections.deque()
        name = writer.get_extra_info("peername")
        self._peer = peer or (f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name or "stream"))

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    async def recv(self) -> Frame | DecodeEvent:
        while not self._pending:
            # A partial frame followed by silence is expired by the decoder's own timeout, so wait at most
            # that long for more bytes before asking it to expire.
            timeout = self._decoder.frame_timeout if self._decoder.buffered else None
            try:
                data = await asyncio.wait_for(self._reader.read(READ_CHUNK), timeout)
            except TimeoutError:
                self._pending.extend(self._decoder.expire(time.monotonic()))
                continue
            except (ConnectionError, OSError) as exc:
                raise ChannelClosed(f"{self._peer}: {exc}") from exc
            if not data:
                raise ChannelClosed(f"{self._peer}: closed by peer")
            self._pending.extend(self._decoder.feed(data, time.monotonic()))
        return self._pending.popleft()

    async def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            # asyncio's TLS transport fails with an AttributeError, not an OSError, once it has been closed.
            raise ChannelClosed(f"{self._peer}: the connection is closed")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"{self._peer}: {exc}") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
