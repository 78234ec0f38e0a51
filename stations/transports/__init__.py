"""Thin adapters between a byte pipe and the pure codec: TCP/TLS streams and serial ports.

Both sides (the appliance's station server and the fixture client) talk to a FrameChannel and never to a
socket or a serial port directly, so one contract test covers every transport.
"""

from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.stream import StreamChannel

__all__ = ["ChannelClosed", "FrameChannel", "StreamChannel"]
