"""When StationClient gives up (give_up_after), its error names what it was retrying on: the last answer's
code and text, PENDING, or the link failure. Real StationServer over TCP on 127.0.0.1; the enroller refuses the
way the appliance's core does while its journal is full."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from stations.client import StationClient
from stations.codes import Code
from stations.errors import GaveUp, StationError
from stations.server import EnrollPending, StationServer
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.stream import StreamChannel
from tests.stations.transport_support import STATION_ID, STATION_KEY

JOURNAL_TEXT = "journal unavailable while recording intents: disk full"


class Refusing:
    """An enroller whose every ENROLL fails with `fail()` (a StationError or EnrollPending)."""

    def __init__(self, fail: Callable[[], Exception]) -> None:
        self.fail = fail
        self.enrolls = 0

    async def ca_chain(self, station: str) -> list[bytes]:
        return [b"ca"]

    async def enroll(
        self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
    ) -> list[bytes]:
        self.enrolls += 1
        raise self.fail()

    async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
        return None


def _connector(port: int) -> Callable[[], asyncio.Future[FrameChannel]]:
    async def connect() -> FrameChannel:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            raise ChannelClosed(f"127.0.0.1:{port}: {exc}") from exc
        return StreamChannel(reader, writer)

    return connect  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def serving(enroller: Refusing) -> AsyncIterator[int]:
    server = StationServer(enroller, handshake_timeout=5.0, idle_timeout=30.0)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await server.serve(
                    StreamChannel(reader, writer), {STATION_ID: STATION_KEY}.get, station=STATION_ID
                )
        finally:
            tasks.discard(task)

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await listener.wait_closed()


def _client(port: int, give_up_after: float) -> StationClient:
    return StationClient(
        _connector(port),
        station_id=STATION_ID,
        key=STATION_KEY,
        give_up_after=give_up_after,
        keepalive_s=None,
    )


async def test_giving_up_on_a_retryable_refusal_names_its_code_and_text() -> None:
    enroller = Refusing(lambda: StationError(Code.JOURNAL_UNAVAILABLE, JOURNAL_TEXT))
    async with serving(enroller) as port:
        client = _client(port, give_up_after=2.5)
        try:
            with pytest.raises(GaveUp) as info:
                await client.enroll("SN-1", b"\x30\x03\x02\x01\x00")
        finally:
            await client.close()
    err = info.value
    assert isinstance(err, StationError) and err.code is Code.TIMEOUT
    assert err.text == f"gave up after 2 s; last answer JOURNAL_UNAVAILABLE (13): {JOURNAL_TEXT}"
    assert (err.last_code, err.last_text) == (Code.JOURNAL_UNAVAILABLE, JOURNAL_TEXT)
    assert enroller.enrolls >= 2  # it did retry (back-off 1 s, 2 s) before giving up


async def test_giving_up_while_pending_says_so() -> None:
    enroller = Refusing(lambda: EnrollPending(200, "the upstream CA has not issued yet"))
    async with serving(enroller) as port:
        client = _client(port, give_up_after=1.0)
        try:
            with pytest.raises(GaveUp) as info:
                await client.enroll("SN-1", b"\x30\x03\x02\x01\x00")
        finally:
            await client.close()
    assert info.value.text == "gave up after 1 s; last answer PENDING (retry after 200 ms)"
    assert info.value.last_code is None


async def test_giving_up_on_an_appliance_that_is_not_there_names_the_link_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(GaveUp) as info:
        await _client(port, give_up_after=1.0).open()
    assert info.value.text.startswith(f"gave up after 1 s; link lost: 127.0.0.1:{port}: ")
    assert "Connect call failed" in info.value.text


async def test_a_final_refusal_is_raised_at_once_with_its_own_code() -> None:
    enroller = Refusing(lambda: StationError(Code.NOT_AUTHORISED, "device serial not in the work order"))
    async with serving(enroller) as port:
        client = _client(port, give_up_after=30.0)
        try:
            with pytest.raises(StationError) as info:
                await client.enroll("SN-1", b"\x30\x03\x02\x01\x00")
        finally:
            await client.close()
    assert not isinstance(info.value, GaveUp)
    assert (info.value.code, info.value.text) == (Code.NOT_AUTHORISED, "device serial not in the work order")
    assert enroller.enrolls == 1
