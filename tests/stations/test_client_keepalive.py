"""StationClient's keepalive against the real StationServer, over TCP on 127.0.0.1 and a socat pty pair.

The appliance end of each connection goes through ``PingGate``, which can stop PINGs from reaching the server
(the server then never answers them) or hang up when one arrives, so the client's failure path is exercised
against the real server rather than a fake."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from stations.client import Connector, StationClient
from stations.codec import DecodeEvent, Frame
from stations.messages import PING
from stations.server import StationServer, StationState
from stations.simulator import PtyPair
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.serial import SerialChannel
from stations.transports.stream import StreamChannel
from tests.stations.transport_support import STATION_ID, STATION_KEY

Mode = Literal["answer", "mute", "hang_up"]


class InstantEnroller:
    async def ca_chain(self, station: str, profile: str | None) -> list[bytes]:
        return [b"ca"]

    async def enroll(
        self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
    ) -> list[bytes]:
        return [b"cert-" + device_serial.encode(), b"ca"]

    async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
        return None


@dataclass
class Rig:
    server: StationServer
    connector: Connector | None = None
    mode: Mode = "answer"  # what the appliance end does with the station's PINGs (all connections)
    pings: int = 0  # PINGs that reached the appliance end
    pinged: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> StationState:
        return self.server.state(STATION_ID)

    def client(self, *, keepalive_s: float | None, request_timeout: float = 1.0) -> StationClient:
        assert self.connector is not None
        c = StationClient(
            self.connector,
            station_id=STATION_ID,
            key=STATION_KEY,
            request_timeout=request_timeout,
            handshake_timeout=0.5,
            give_up_after=10,
            keepalive_s=keepalive_s,
        )
        return c


class PingGate:
    """The appliance's end of one link: passes everything, except that sealed PINGs are dropped before the
    server sees them (``mute``) or end the connection (``hang_up``) while the rig says so."""

    def __init__(self, inner: FrameChannel, rig: Rig) -> None:
        self._inner = inner
        self._rig = rig

    @property
    def peer(self) -> str:
        return self._inner.peer

    async def recv(self) -> Frame | DecodeEvent:
        while True:
            item = await self._inner.recv()
            if isinstance(item, Frame) and item.sealed and item.kind == PING:
                self._rig.pings += 1
                self._rig.pinged.set()
                if self._rig.mode == "mute":
                    continue
                if self._rig.mode == "hang_up":
                    await self._inner.close()
                    raise ChannelClosed("hung up on a PING")
            return item

    async def send(self, data: bytes) -> None:
        await self._inner.send(data)

    async def close(self) -> None:
        await self._inner.close()


@contextlib.asynccontextmanager
async def appliance(kind: str, tmp: Path, *, idle_timeout: float) -> AsyncIterator[Rig]:
    """A StationServer (instant enroller) behind a TCP listener or a pty pair, the way the daemon runs it:
    TCP connections end on an idle timeout, a serial port stays open and only forgets the session."""
    rig = Rig(StationServer(InstantEnroller(), handshake_timeout=2.0, idle_timeout=idle_timeout))
    lookup = {STATION_ID: STATION_KEY}.get
    tasks: set[asyncio.Task[None]] = set()
    if kind == "tcp":

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            # Teardown cancels the handler; Python 3.11's start_server logs an ERROR for a handler that ends
            # cancelled, which would hide the ones these tests look for.
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await rig.server.serve(
                        PingGate(StreamChannel(reader, writer), rig), lookup, station=STATION_ID
                    )
            finally:
                tasks.discard(task)

        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]

        async def tcp_connector() -> FrameChannel:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            return StreamChannel(reader, writer)

        rig.connector = tcp_connector
        try:
            yield rig
        finally:
            listener.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await listener.wait_closed()
        return

    pair = PtyPair(tmp / "appliance-port", tmp / "fixture-port").start()
    opened = asyncio.Event()

    async def port_loop() -> None:  # like the daemon: reopen the registered port after every drop
        while True:
            try:
                channel = await SerialChannel.open(pair.a)
            except ChannelClosed:
                await asyncio.sleep(0.05)
                continue
            opened.set()
            await rig.server.serve(PingGate(channel, rig), lookup, station=STATION_ID, close_on_timeout=False)

    async def serial_connector() -> FrameChannel:
        return await SerialChannel.open(pair.b)

    loop_task = asyncio.create_task(port_loop())
    rig.connector = serial_connector
    try:
        await asyncio.wait_for(opened.wait(), 5)  # bytes written before the appliance opens its end are lost
        yield rig
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        pair.stop()


def keepalive_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("station-keepalive")]


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", ["tcp", "serial"])
@pytest.mark.parametrize(
    ("keepalive_s", "sessions"), [(0.2, 1), (None, 2)], ids=["keepalive", "keepalive-off"]
)
async def test_idle_client_keeps_its_session(
    kind: str, keepalive_s: float | None, sessions: int, tmp_path: Path
) -> None:
    async with (
        appliance(kind, tmp_path, idle_timeout=0.6) as rig,
        rig.client(keepalive_s=keepalive_s) as client,
    ):
        await client.open()
        await asyncio.sleep(2.0)  # idle: more than three of the appliance's idle timeouts
        assert await client.enroll("SN-IDLE", b"csr") == [b"cert-SN-IDLE", b"ca"]
        # Without keepalive the appliance forgot the session and the enrol paid a second handshake
        # (TCP: after a reconnect; serial: after a NO_SESSION round); with it, one session throughout.
        assert rig.state.counters["sessions"] == sessions
        assert client.stats.handshakes == sessions
        if keepalive_s:
            assert rig.state.counters["idle_timeout"] == 0
            assert client.stats.keepalives >= 5 and client.stats.keepalives == rig.pings
            assert client.stats.keepalive_failures == 0 and client.stats.connects == 1
        else:
            assert rig.state.counters["idle_timeout"] == 1
            assert rig.pings == 0 and not keepalive_tasks()


@pytest.mark.parametrize("mode", ["mute", "hang_up"])
async def test_unanswered_ping_drops_the_link_quietly(
    mode: Mode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        appliance("tcp", tmp_path, idle_timeout=30) as rig,
        rig.client(keepalive_s=0.2, request_timeout=0.3) as client,
    ):
        await client.open()
        [task] = keepalive_tasks()
        rig.mode = mode
        await until(lambda: client.channel is None)
        await until(task.done)
        assert task.result() is None  # ended on its own, nothing raised
        assert (client.stats.keepalives, client.stats.keepalive_failures) == (0, 1)
        assert client.stats.rejected == 0
        rig.mode = "answer"
        assert await client.enroll("SN-AFTER", b"csr") == [b"cert-SN-AFTER", b"ca"]
        assert client.stats.connects == 2 and rig.state.counters["sessions"] == 2
        assert len(keepalive_tasks()) == 1  # the new session has its own keepalive
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_keepalive_and_requests_take_turns(tmp_path: Path) -> None:
    async with (
        appliance("tcp", tmp_path, idle_timeout=30) as rig,
        rig.client(keepalive_s=0.005) as client,
    ):
        await client.open()
        end = time.monotonic() + 0.5
        async with asyncio.timeout(5):  # two readers on one channel could also just hang
            while time.monotonic() < end:
                await asyncio.gather(*(client.ca_chain() for _ in range(3)))
                await asyncio.sleep(0.01)
        # A PING answered in the middle of a request (or the reverse) would show as a resend or a
        # rejected frame; neither happens, and the keepalive did run between the requests.
        assert client.stats.keepalives > 0 and client.stats.keepalives == rig.pings
        assert (client.stats.resends, client.stats.rejected, client.stats.keepalive_failures) == (0, 0, 0)
        assert rig.state.counters["sessions"] == 1


async def test_close_during_keepalive_is_prompt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with appliance("tcp", tmp_path, idle_timeout=30) as rig:
        rig.mode = "mute"
        client = rig.client(keepalive_s=0.1, request_timeout=10.0)
        await client.open()
        await asyncio.wait_for(rig.pinged.wait(), 2)  # the PING is out; the client waits up to 10 s for PONG
        await asyncio.sleep(0.05)
        [task] = keepalive_tasks()
        assert not task.done()
        started = time.monotonic()
        await asyncio.wait_for(client.close(), 2)
        assert time.monotonic() - started < 0.5
        assert task.cancelled() and not keepalive_tasks()
        assert client.stats.keepalive_failures == 0  # cancelled, not failed
        await until(lambda: not rig.state.authenticated)  # the BYE after the PING was accepted
        assert rig.state.counters["rejected_replay"] == rig.state.counters["rejected_bad_tag"] == 0
    gc.collect()
    assert not [r for r in caplog.records if "destroyed" in r.getMessage() or r.levelno >= logging.ERROR]
