"""The OCSP line listener (appliance/va/fastpath.py) is bounded like every other listener: a cap per address and
in all (at the cap an unproven connection is displaced, else a 503), a deadline for a request's head from its
first byte and for its body from its head however slowly the bytes trickle in, an idle deadline, and a deadline
for a client that does not read its answers."""

from __future__ import annotations

import asyncio
import time

from cryptography.x509 import ocsp

from appliance.alarms import Alarms
from appliance.connections import HttpLimits
from appliance.va.fastpath import OcspListener
from appliance.va.ocsp import OcspResponder
from tests.appliance.va.conftest import Va
from tests.ports import free_ports

WAIT_S = 60.0  # generous: a loaded 2-core machine; every wait below ends on a condition


def _post(body: bytes) -> bytes:
    return b"POST /ocsp HTTP/1.1\r\nHost: va\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h[15:]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


async def _until(what: str, condition: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


async def _responder(va: Va, **kw: float) -> OcspResponder:
    responder = OcspResponder(va.journal, va.token, va.audit, request_rate=1e6, request_burst=10**6, **kw)
    await asyncio.to_thread(responder.load)
    return responder


async def _trickle_until_closed(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, byte: bytes
) -> int:
    """Send `byte` every 50 ms until the listener closes the connection; how many were sent. Ends on its own only
    if the listener's deadline holds however the bytes keep coming."""
    closed = asyncio.ensure_future(reader.read())
    sent, deadline = 0, time.monotonic() + WAIT_S
    while not closed.done():
        assert time.monotonic() < deadline, "a trickling client was never closed"
        try:
            writer.write(byte)
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.wait([closed], timeout=0.05)
    assert await closed == b""  # closed without an answer
    return sent


async def test_cap_per_address_refuses_with_503_and_keeps_the_clients(va: Va) -> None:
    responder = await _responder(va)
    limits = HttpLimits(max_connections=8, max_connections_per_peer=2)
    async with OcspListener(responder, "127.0.0.1", free_ports(1), limits) as server:
        clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for reader, writer in clients:
            writer.write(_post(va.request("SN-0001")))
            _, body = await _answer(reader)
            assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        refused = await reader.read()
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After:" in refused
        assert server.gate.counters["refused_peer"] == 1 and server.gate.open == 2
        writer.close()
        for reader, writer in clients:  # the two clients are served as before
            writer.write(_post(va.request("SN-0002")))
            _, body = await _answer(reader)
            assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
            writer.close()


async def test_at_the_cap_a_connection_without_a_request_is_displaced_and_the_alarm_raised(va: Va) -> None:
    responder = await _responder(va)
    alarms = Alarms()
    # Every test connection comes from 127.0.0.1: a per-address cap above the whole cap lets the whole one act.
    limits = HttpLimits(max_connections=2, max_connections_per_peer=3)
    async with OcspListener(
        responder, "127.0.0.1", free_ports(1), limits, alarms=alarms, grace_s=0.0
    ) as server:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await _until("both admitted", lambda: server.gate.open == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_post(va.request("SN-0003")))
        _, body = await _answer(reader)
        assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
        assert server.gate.counters["displaced"] == 1
        assert await silent[0][0].read() == b""  # the longest-waiting silent connection made room
        assert "listener.va-ocsp-line.full" in {a.cause for a in alarms.active()}
        for _, w in [*silent, (reader, writer)]:
            w.close()


async def test_a_head_trickled_byte_by_byte_is_closed_at_its_deadline(va: Va) -> None:
    responder = await _responder(va)
    limits = HttpLimits(header_timeout_s=0.5, idle_timeout_s=60.0)
    async with OcspListener(responder, "127.0.0.1", free_ports(1), limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /ocsp HTTP/1.1\r\nX-Slow: ")
        await _trickle_until_closed(writer, reader, b"a")
        assert server.gate.counters.get("timeout_headers") == 1
        await _until("released", lambda: server.gate.open == 0)


async def test_a_body_trickled_byte_by_byte_is_closed_at_its_deadline(va: Va) -> None:
    responder = await _responder(va)
    limits = HttpLimits(header_timeout_s=60.0, body_timeout_s=0.5, idle_timeout_s=60.0)
    async with OcspListener(responder, "127.0.0.1", free_ports(1), limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /ocsp HTTP/1.1\r\nContent-Length: 4000\r\n\r\n0")
        await _trickle_until_closed(writer, reader, b"0")
        assert server.gate.counters.get("timeout_body") == 1
        assert server.gate.counters.get("timeout_headers") is None


async def test_an_idle_connection_is_closed_after_its_answers(va: Va) -> None:
    responder = await _responder(va)
    limits = HttpLimits(idle_timeout_s=0.3)
    async with OcspListener(responder, "127.0.0.1", free_ports(1), limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_post(va.request("SN-0001")) * 3)
        for _ in range(3):
            await _answer(reader)
        assert await reader.read() == b""
        assert server.gate.counters.get("timeout_idle") == 1
        writer.close()


async def test_a_client_that_never_reads_is_closed(va: Va) -> None:
    """Pipelined requests, answers never read: reading stops (the answers are not piled up in memory), and once
    the client has not read for the idle time its connection ends."""
    responder = await _responder(va)
    limits = HttpLimits(idle_timeout_s=0.5)
    request = _post(va.request("SN-0000"))
    async with OcspListener(responder, "127.0.0.1", free_ports(1), limits) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1024)
        writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
        writer.write(request * 20_000)
        await _until("the non-reading client closed", lambda: server.gate.counters.get("timeout_send") == 1)
        await _until("released", lambda: server.gate.open == 0 and not server.conns)
        assert server.requests < 20_000
        writer.transport.abort()
