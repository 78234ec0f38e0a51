"""The transport contract."""

from __future__ import annotations

from typing import Protocol

from stations.codec import DecodeEvent, Frame
from stations.codes import Code
from stations.errors import StationError


class ChannelClosed(StationError):
    """The peer went away (socket closed, port unplugged). Whatever was half-received is dropped."""

    def __init__(self, text: str = "channel closed") -> None:
        super().__init__(Code.BAD_FRAME, text)


class FrameChannel(Protocol):
    """A framed, bidirectional channel. `recv` yields whole frames and decoder events (for counters);
    partial frames never surface: the decoder drops them after its per-frame timeout."""

    @property
    def peer(self) -> str: ...

    async def recv(self) -> Frame | DecodeEvent:
        """The next frame or decode event; raises ChannelClosed when the peer is gone."""
        ...

    async def send(self, data: bytes) -> None:
        """Write one or more already-encoded frames; raises ChannelClosed."""
        ...

    async def close(self) -> None: ...
