"""One contract over both transports (TLS on 127.0.0.1 and a socat pty pair): a full StationSession <->
ApplianceSession exchange through StationClient and an in-test appliance loop, and the client's retries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from stations.client import Connector, StationClient, generate_device_key, make_csr, new_request_id
from stations.codes import Code
from stations.errors import StationError
from tests.stations.fake_appliance import FakeAppliance
from tests.stations.transport_support import STATION_ID, STATION_KEY, fake_chain, serial_link, tls_link

Link = Callable[[FakeAppliance, Path], AbstractAsyncContextManager[Connector]]


@pytest.fixture(params=["tls", "serial"])
def link(request: pytest.FixtureRequest) -> Link:
    return tls_link if request.param == "tls" else serial_link


@pytest.fixture
def appliance() -> FakeAppliance:
    return FakeAppliance({STATION_ID: STATION_KEY}, fake_chain())


@pytest.fixture
async def client(link: Link, appliance: FakeAppliance, tmp_path: Path) -> AsyncIterator[StationClient]:
    async with link(appliance, tmp_path) as connector:
        c = StationClient(
            connector, station_id=STATION_ID, key=STATION_KEY, request_timeout=0.5, give_up_after=10
        )
        c.handshake_timeout = 0.5
        async with c:
            yield c


async def test_full_exchange(client: StationClient, appliance: FakeAppliance) -> None:
    await client.open()  # hello / auth
    assert client.stats.handshakes == 1
    assert await client.ca_chain() == list(fake_chain())
    csr = make_csr(generate_device_key(), "SN0001")
    rid = new_request_id()
    chain = await client.enroll("SN0001", csr, request_id=rid)
    assert chain[1:] == list(fake_chain()[:-1])
    assert appliance.issued[rid][0].csr == csr
    await client.confirm(rid, chain[0])
    assert appliance.confirmed == {rid}
    # Idempotent: the same request id gets the same certificate, nothing new is issued.
    assert await client.enroll("SN0001", csr, request_id=rid) == chain
    assert len(appliance.issued) == 1


async def test_refusals_are_station_errors(client: StationClient) -> None:
    rid = new_request_id()
    chain = await client.enroll("SN0002", b"\x30\x03csr", request_id=rid)
    with pytest.raises(StationError) as err:
        await client.confirm(rid, chain[0] + b"x")
    assert err.value.code is Code.CONFIRM_MISMATCH
    with pytest.raises(StationError) as err:
        await client.confirm(new_request_id(), chain[0])
    assert err.value.code is Code.UNKNOWN_REQUEST
    await client.confirm(rid, chain[0])  # still usable after refusals


async def test_pending_is_waited_out(client: StationClient, appliance: FakeAppliance) -> None:
    appliance.pending_first = True
    chain = await client.enroll("SN0003", b"\x30\x03csr")
    assert client.stats.pending == 1 and len(chain) == 2
    assert appliance.enroll_frames == 2


async def test_dropped_connection_retries_with_same_request_id(
    client: StationClient, appliance: FakeAppliance
) -> None:
    await client.open()
    appliance.drop_after_enroll = 1  # the appliance hangs up after reading the first ENROLL, unanswered
    rid = new_request_id()
    chain = await client.enroll("SN0004", b"\x30\x03csr", request_id=rid)
    assert appliance.enroll_frames == 2  # the retry reached it ...
    assert list(appliance.issued) == [rid]  # ... under the same request id: one certificate
    assert client.stats.handshakes == 2  # re-authenticated
    await client.confirm(rid, chain[0])


async def test_wrong_key_fails_authentication(link: Link, appliance: FakeAppliance, tmp_path: Path) -> None:
    async with link(appliance, tmp_path) as connector:
        c = StationClient(
            connector, station_id=STATION_ID, key=bytes(32), request_timeout=0.5, give_up_after=5
        )
        with pytest.raises(StationError) as err:
            await c.open()
        await c.close()
    assert err.value.code is Code.AUTH_FAILED


async def test_unknown_station(link: Link, appliance: FakeAppliance, tmp_path: Path) -> None:
    async with link(appliance, tmp_path) as connector:
        c = StationClient(connector, station_id="nobody", key=STATION_KEY, give_up_after=5)
        with pytest.raises(StationError) as err:
            await c.open()
        await c.close()
    assert err.value.code is Code.UNKNOWN_STATION


async def test_sending_on_a_closed_stream_is_channel_closed() -> None:
    """A closed writer (TLS's raises AttributeError inside asyncio) is the link gone, never another exception."""
    import asyncio
    import socket

    from stations.transports.base import ChannelClosed
    from stations.transports.stream import StreamChannel

    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    channel = StreamChannel(reader, writer, peer="pair")
    await channel.close()
    b.close()
    with pytest.raises(ChannelClosed, match="closed"):
        await channel.send(b"x")
