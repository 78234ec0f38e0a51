"""A minimal station for the server tests: StationSession over a StreamChannel, no retransmission logic."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

from stations.codec import DecodeEvent, Frame
from stations.messages import Message
from stations.session import Authenticated, Closed, HandshakeFailed, Received, SessionEvent, StationSession
from stations.transports.stream import StreamChannel


def tls_client_context(bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(bundle / "ca.crt"))
    ctx.load_cert_chain(str(bundle / "tls-client.crt"), str(bundle / "tls-client.key"))
    return ctx


class Link:
    """One station connection. ``recorded`` keeps every sealed frame sent (for replay tests)."""

    def __init__(self, channel: StreamChannel, name: str, key: bytes) -> None:
        self.channel = channel
        self.session = StationSession(name, key)
        self.recorded: list[bytes] = []

    @classmethod
    async def tls(cls, addr: tuple[str, int], bundle: Path, name: str | None = None) -> Link:
        reader, writer = await asyncio.open_connection(*addr, ssl=tls_client_context(bundle))
        key = bytes.fromhex((bundle / "station.key").read_text().strip())
        return cls(StreamChannel(reader, writer), name or bundle.name, key)

    async def events(self, timeout: float = 5.0) -> list[SessionEvent]:
        """Read frames until the session produces events."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.channel.recv()
                if isinstance(item, DecodeEvent):
                    continue
                step = self.session.receive(item)
                for wire in step.send:
                    await self.channel.send(wire)
                if step.events:
                    return list(step.events)

    async def handshake(self) -> SessionEvent:
        await self.channel.send(self.session.hello())
        while True:
            for event in await self.events():
                if isinstance(event, Authenticated | HandshakeFailed | Closed):
                    return event

    async def send(self, message: Message) -> None:
        wire = self.session.send(message)
        self.recorded.append(wire)
        await self.channel.send(wire)

    async def request(self, message: Message, timeout: float = 5.0) -> Message | SessionEvent:
        await self.send(message)
        for event in await self.events(timeout):
            return event.message if isinstance(event, Received) else event
        raise AssertionError("no event")

    async def close(self) -> None:
        await self.channel.close()


def request_id() -> bytes:
    return os.urandom(16)


__all__ = ["Frame", "Link", "request_id", "tls_client_context"]
