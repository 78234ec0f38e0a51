"""The upstream forwarder through a real TCP proxy that misbehaves on the wire, between the forwarder's HTTP client
and a second Birthline acting as the upstream CA (real CMP server, SoftHSM, journals):

- hang: takes the request and never answers;        - reset: takes the request and resets the connection (RST);
- slow: answers a few bytes at a time;              - garbage: answers HTTP 200 with random bytes;
- twice: sends every request to the upstream twice (a retransmission) and writes both answers back.

While the fault lasts the forwarder runs on its own (as in the daemon): every pass fails the same way, the queue
alarm (limit 0 here) and the pass's record says why, the outbox keeps its rows (no new row per attempt) and
their bytes. When the proxy passes traffic again the queue drains: every record reaches the upstream and is
done once, the upstream issued each device once, and the bytes sent on the retry are those of the first try.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from pytest_mock import MockerFixture

from appliance.alarms import Alarms
from appliance.cmp.forwarder import Forwarder
from appliance.issuance.policy import IssueRequest
from tests.appliance.cmp.upstream_support import Local, Upstream, device_csr, settings
from tests.appliance.test_component_alarms import until

DEVICES = ("SN-0001", "SN-0002", "SN-0003")


async def _read_http(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 message (headers and Content-Length body), as bytes; b"" at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@dataclass
class FaultyProxy:
    upstream: tuple[str, int]
    mode: str = "pass"
    requests: int = 0  # requests the proxy took from the forwarder
    to_upstream: list[bytes] = field(default_factory=list)  # request bodies it passed on
    url: str = ""
    _hung: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _exchange(self, request: bytes) -> bytes:
        r, w = await asyncio.open_connection(*self.upstream)
        try:
            w.write(request)
            await w.drain()
            self.to_upstream.append(request.split(b"\r\n\r\n", 1)[1])
            return await _read_http(r)
        finally:
            w.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await _read_http(reader):
                self.requests += 1
                mode = self.mode
                if mode == "hang":
                    self._hung.append(writer)  # kept open, never answered, closed with the proxy
                    return
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode == "garbage":
                    body = os.urandom(700)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/pkixcmp\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                elif mode in ("twice", "twice-second"):
                    first = await self._exchange(request)
                    second = await self._exchange(request)
                    # twice-second: the first answer is lost on the way back; only the second arrives.
                    writer.write(first + second if mode == "twice" else second)
                else:
                    answer = await self._exchange(request)
                    if mode == "slow":
                        for i in range(0, len(answer), 256):
                            writer.write(answer[i : i + 256])
                            await writer.drain()
                            await asyncio.sleep(0.02)
                    else:
                        writer.write(answer)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        if self.mode != "hang":
            writer.close()


@contextlib.asynccontextmanager
async def faulty_proxy(upstream_url: str) -> AsyncIterator[FaultyProxy]:
    target = urlsplit(upstream_url)
    assert target.hostname is not None and target.port is not None
    proxy = FaultyProxy((target.hostname, target.port))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy.url = f"http://127.0.0.1:{port}{target.path}"
    try:
        yield proxy
    finally:
        for w in proxy._hung:
            w.close()
        server.close()
        await server.wait_closed()


def _outbox(local: Local) -> list[tuple[bytes, str, bytes | None, int]]:
    rows = local.journal.call(
        lambda: local.journal.conn.execute(
            "SELECT transaction_id, state, request_der, attempts FROM outbox ORDER BY id"
        ).fetchall()
    )
    return [(bytes(t), s, None if d is None else bytes(d), a) for t, s, d, a in rows]


@pytest.mark.parametrize(
    ("mode", "forwarding"),
    [("hang", "single"), ("reset", "single"), ("slow", "single"), ("garbage", "single"), ("twice", "single"),
     ("twice", "batched"), ("twice-second", "single"), ("twice-second", "batched")],
)  # fmt: skip
async def test_upstream_misbehaving_on_the_wire_loses_nothing_and_sends_nothing_twice(
    local: Local, upstream: Upstream, mode: str, forwarding: str
) -> None:
    for serial in DEVICES:
        await local.service.issue(IssueRequest(serial, device_csr(serial)[1], "fixture-1"))
    alarms = Alarms()
    async with faulty_proxy(upstream.url) as proxy:
        proxy.mode = mode
        fwd = Forwarder(
            local.journal, settings(proxy.url, mode=forwarding, request_timeout_s=1, max_queue_size=0,
                                    poll_s=0.05, backoff_base_s=0.05, backoff_cap_s=0.1), local.ra,
            server_certs=(upstream.ra.certificate,), alarms=alarms,
        )  # fmt: skip
        async with fwd:
            if mode in ("slow", "twice", "twice-second"):
                # Not a fault the forwarder can see: the records go, once each. (Twice: the upstream answers the
                # repeated p10cr with the stored certificate, and takes the certConf echoing either answer.
                # Twice-second: the first answer is lost, so the forwarder hears the answer to the copy; the
                # copy of its certConf is answered pkiConf again, not "no transaction awaits a certConf".)
                await until(lambda: {r[1] for r in _outbox(local)} == {"done"}, "drained through the proxy")
                await until(lambda: alarms.get("upstream.queue") is None, "the queue alarm clears")
                confirmed = upstream.journal.call(lambda: upstream.journal.conn.execute(
                    "SELECT COUNT(*) FROM issuance WHERE confirmed_at IS NOT NULL").fetchone()[0])  # fmt: skip
                assert confirmed == len(DEVICES), "each certificate is confirmed upstream"
                repeated = upstream.responder.stats["repeated_confirmations"]
                if mode == "twice-second":
                    assert repeated >= len(DEVICES), repeated
                elif mode == "slow":
                    assert repeated == 0, repeated
            else:
                await until(lambda: proxy.requests >= 3 * len(DEVICES), "several attempts per record")
                rows = _outbox(local)
                assert len(rows) == len(DEVICES), "the queue grew with the attempts"
                assert {r[1] for r in rows} == {"sent"} and all(r[3] >= 2 for r in rows), rows
                alarm = alarms.get("upstream.queue")
                assert alarm is not None and f"{len(DEVICES)} record(s)" in alarm.message
                assert upstream.issued() == [], "the proxy passed nothing on"
                first = rows
                proxy.mode = "pass"
                await until(
                    lambda: {r[1] for r in _outbox(local)} == {"done"}, "drained once the link is good"
                )
                await until(lambda: alarms.get("upstream.queue") is None, "the queue alarm clears")
                after = _outbox(local)
                # The same transactions, the same bytes: a retry, never a new request.
                assert [(r[0], r[2]) for r in after] == [(r[0], r[2]) for r in first]
    issued = upstream.issued()
    assert sorted(d for _, d in issued) == sorted(DEVICES), issued  # each device issued upstream exactly once
    sent = _outbox(local)
    # Each stored request went on the wire as it is (batched: inside a nested message).
    assert all(r[2] is not None and any(r[2] in body for body in proxy.to_upstream) for r in sent)


@pytest.mark.parametrize("forwarding", ["single", "batched"])
async def test_an_upstream_refusing_every_certconf_copy_parks_the_records_instead_of_retrying_for_ever(
    local: Local, upstream: Upstream, forwarding: str, mocker: MockerFixture
) -> None:
    """twice-second against an upstream that refuses the copy of a certConf it has just accepted (as this server
    did before it answered the copy pkiConf again; other CAs may): the pkiConf never reaches the forwarder. Each
    record is retried from the start CONF_REFUSALS_MAX times, then parked with its reason and the alarm
    upstream.unconfirmed; nothing is sent for it after that, and the upstream issued each device once."""
    # The fault: this server's answer to a repeated certConf, switched off (no other CA to run here does it).
    mocker.patch.object(upstream.responder, "_repeated_conf", return_value=None)
    for serial in DEVICES:
        await local.service.issue(IssueRequest(serial, device_csr(serial)[1], "fixture-1"))
    alarms = Alarms()
    async with faulty_proxy(upstream.url) as proxy:
        proxy.mode = "twice-second"
        fwd = Forwarder(
            local.journal, settings(proxy.url, mode=forwarding, request_timeout_s=60, backoff_base_s=0.01,
                                    backoff_cap_s=0.02), local.ra,
            server_certs=(upstream.ra.certificate,), alarms=alarms,
        )  # fmt: skip
        try:  # drained here, without the polling task
            assert await fwd.drain(timeout_s=120) is False  # parked records are not a success
            rows = _outbox(local)
            assert {r[1] for r in rows} == {"parked"}, rows
            assert all(r[3] == Forwarder.CONF_REFUSALS_MAX for r in rows), rows
            reasons = local.journal.call(lambda: [
                str(r[0]) for r in local.journal.conn.execute("SELECT last_error FROM outbox").fetchall()])  # fmt: skip
            assert all("refused its certConf 3 times in a row" in r for r in reasons), reasons
            alarm = alarms.get("upstream.unconfirmed")
            assert alarm is not None and "parked" in alarm.message
            took = proxy.requests
            # Each attempt: a request and its certConf, for one record or (batched) several.
            assert took <= Forwarder.CONF_REFUSALS_MAX * 2 * len(DEVICES), took
            assert await fwd.drain(timeout_s=5) is True  # nothing open, nothing sent
            assert proxy.requests == took
        finally:
            await fwd.close()
    issued = upstream.issued()
    assert sorted(d for _, d in issued) == sorted(DEVICES), issued  # each device issued upstream exactly once
