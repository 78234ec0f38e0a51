"""The LAN station listener's bounds (caps, displacement of unauthenticated connections, the TLS handshake and
authentication deadlines) and its TLS policy, against the real daemon in-process: real SoftHSM token, journal,
TLS on loopback, and the real `openssl s_client` / `openssl s_server` as peers. Waits are for conditions (the
daemon closing a socket, an answer) with a generous guard against a hang, never claims about durations."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from stations.errors import StationError
from stations.messages import Cert
from stations.session import Authenticated, HandshakeFailed
from stations.tls import TLS12_CIPHERS
from stations.transports.base import ChannelClosed
from stations.transports.stream import StreamChannel
from tests.appliance.test_daemon import _addr, _config, _enroll, add_lan
from tests.stations.station_link import Link, tls_client_context

GUARD_S = 30.0  # a hang guard only


@contextlib.asynccontextmanager
async def running(
    softhsm_token: SoftHsmToken, template: Path, tmp_path: Path, **stations: object
) -> AsyncIterator[Daemon]:
    base = _config(tmp_path / "state", softhsm_token, template)
    config: Config = dataclasses.replace(base, stations=dataclasses.replace(base.stations, **stations))
    async with Daemon(config) as d:
        yield d


@pytest.fixture
def daemon_with(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[Daemon]]:
    def make(**stations: object) -> contextlib.AbstractAsyncContextManager[Daemon]:
        return running(softhsm_token, production_journal_template, tmp_path, **stations)

    return make


async def raw(d: Daemon, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the TLS port that never sends a ClientHello."""
    return await asyncio.open_connection(*_addr(d), local_addr=(source, 0))


async def closed_by_daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Everything the daemon sends until it closes the connection (then closed here too)."""
    async with asyncio.timeout(GUARD_S):
        try:
            return await reader.read()
        except ConnectionError:
            return b""
        finally:
            writer.close()


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD_S):
        while not cond():
            await asyncio.sleep(0.01)


async def enrol_once(bundle: Path, addr: tuple[str, int], serial: str) -> list[bytes]:
    ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
    client = await StationClient.connect_tcp(
        *addr, station_id=bundle.name, key=read_station_key(bundle / "station.key"), ssl_context=ctx,
        server_hostname="localhost", give_up_after=GUARD_S,
    )  # fmt: skip
    try:
        return await client.enroll(serial, make_csr(generate_device_key(), serial))
    finally:
        await client.close()


async def test_tcp_that_never_starts_tls_is_closed_after_the_handshake_timeout(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=0.5, auth_timeout_s=60.0) as d:
        reader, writer = await raw(d)
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 1)
        assert await closed_by_daemon(reader, writer) == b""
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 0)
        writer.close()


async def test_shutdown_closes_connections_still_in_tls(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=60.0) as d:
        reader, writer = await raw(d)
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 1)
    assert d.lan_gate is not None and d.lan_gate.open == 0  # ended by the shutdown itself
    assert await closed_by_daemon(reader, writer) == b""


async def test_a_peer_that_ignores_the_tls_close_is_cut_off_after_the_handshake_timeout(
    daemon_with, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """asyncio waits 30 s for a peer's close_notify by default, the connection counted against the caps all the
    while; the listener waits handshake_timeout_s."""
    async with daemon_with(handshake_timeout_s=0.5, auth_timeout_s=60.0) as d:
        bundle = await add_lan(d, "lan-close", tmp_path)
        link = await Link.tls(_addr(d), bundle)
        assert isinstance(await link.handshake(), Authenticated)
        link.channel.writer.transport.pause_reading()  # the BYE and the close_notify stay unread
        assert d.server is not None and d.server.drop("lan-close") == 1
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 0)
        link.channel.writer.transport.abort()


async def test_failed_handshakes_cannot_keep_a_connection_past_the_auth_timeout(
    daemon_with, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A peer with a station's TLS certificate but not its key starts handshake after handshake; each resets
    the station handshake timer, but the connection has auth_timeout_s to authenticate, in all. (The failure
    limit, which would end it after failure_limit failures, is set out of reach: this is the other bound.)"""
    async with daemon_with(handshake_timeout_s=5.0, auth_timeout_s=0.5, failure_limit=100_000) as d:
        bundle = await add_lan(d, "lan-wrongkey", tmp_path)
        reader, writer = await asyncio.open_connection(*_addr(d), ssl=tls_client_context(bundle))
        link = Link(StreamChannel(reader, writer), bundle.name, os.urandom(32))  # not the station's key
        failures = 0
        with pytest.raises((ChannelClosed, ConnectionError, TimeoutError, StationError)):
            async with asyncio.timeout(GUARD_S):
                while True:
                    event = await link.handshake()
                    assert isinstance(event, HandshakeFailed)
                    failures += 1
        await link.close()
        assert failures >= 1
        assert d.lan_gate is not None and d.lan_gate.counters["timeout_unauthenticated"] == 1


async def test_an_authenticated_station_outlives_the_auth_timeout(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=5.0, auth_timeout_s=0.3, idle_timeout_s=30.0) as d:
        bundle = await add_lan(d, "lan-ok", tmp_path)
        link = await Link.tls(_addr(d), bundle)
        assert isinstance(await link.handshake(), Authenticated)
        await asyncio.sleep(1.0)  # beyond the auth timeout: only an unauthenticated connection is cut there
        assert isinstance(await _enroll(link, "SN-AUTH-1"), Cert)
        assert d.lan_gate is not None and "timeout_unauthenticated" not in d.lan_gate.counters
        await link.close()


async def test_cap_per_peer_closes_at_accept_and_other_peers_enrol(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=60.0, max_connections=8, max_connections_per_peer=2) as d:
        bundle = await add_lan(d, "lan-peer", tmp_path)
        held = [await raw(d, "127.0.0.2") for _ in range(2)]
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 2)
        reader, writer = await raw(d, "127.0.0.2")
        assert await closed_by_daemon(reader, writer) == b""  # closed at accept: not a byte of TLS
        assert d.lan_gate is not None and d.lan_gate.counters["refused_peer"] == 1
        chain = await enrol_once(bundle, _addr(d), "SN-PEER-1")
        assert len(chain) == 3
        for _, w in [*held, (reader, writer)]:
            w.close()


async def test_global_cap_displaces_unauthenticated_connections_for_a_station(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=60.0, max_connections=3, max_connections_per_peer=3) as d:
        bundle = await add_lan(d, "lan-disp", tmp_path)
        assert d.core is not None
        alarms: list[tuple[str, str]] = []
        d.core.alarms.subscribe(lambda event, alarm: alarms.append((event, alarm.cause)))
        idle = [await raw(d, f"127.0.0.{10 + i}") for i in range(3)]
        await until(lambda: d.lan_gate is not None and d.lan_gate.open == 3)
        chain = await enrol_once(bundle, _addr(d), "SN-DISP-1")
        assert len(chain) == 3
        assert await closed_by_daemon(*idle[0]) == b""  # the oldest idle connection made room
        assert d.lan_gate is not None and d.lan_gate.counters["displaced"] >= 1
        assert ("raised", "listener.stations.full") in alarms
        for _, w in idle:
            w.close()


async def test_global_cap_refuses_when_every_connection_is_an_authenticated_station(
    daemon_with, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with(handshake_timeout_s=60.0, max_connections=2, max_connections_per_peer=2) as d:
        bundles = [await add_lan(d, f"lan-full{i}", tmp_path) for i in range(2)]
        links = [await Link.tls(_addr(d), b) for b in bundles]
        for link in links:
            assert isinstance(await link.handshake(), Authenticated)
        reader, writer = await raw(d, "127.0.0.5")
        assert await closed_by_daemon(reader, writer) == b""
        assert d.lan_gate is not None and d.lan_gate.counters["refused_full"] == 1
        for i, link in enumerate(links):  # the authenticated sessions were not disturbed
            assert isinstance(await _enroll(link, f"SN-FULL-{i}"), Cert)
            await link.close()


# -- the TLS policy --------------------------------------------------------------------------------------------
def s_client(addr: tuple[str, int], bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-brief", "-servername", "localhost",
         "-CAfile", str(bundle / "ca.crt"), "-cert", str(bundle / "tls-client.crt"),
         "-key", str(bundle / "tls-client.key"), *args],
        input="", capture_output=True, text=True, timeout=GUARD_S, check=False,
    )  # fmt: skip


async def test_station_port_offers_only_ecdhe_aead_under_tls12_and_tls13(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with() as d:
        bundle = await add_lan(d, "lan-tls", tmp_path)
        addr = _addr(d)
        for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA"):
            r = await asyncio.to_thread(s_client, addr, bundle, "-tls1_2", "-cipher", cbc)
            assert r.returncode != 0 and "Ciphersuite" not in r.stdout + r.stderr, cbc
        for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                     "ECDHE-ECDSA-CHACHA20-POLY1305"):  # fmt: skip
            r = await asyncio.to_thread(s_client, addr, bundle, "-tls1_2", "-cipher", aead)
            out = r.stdout + r.stderr
            assert "Protocol version: TLSv1.2" in out and f"Ciphersuite: {aead}" in out, out
        r = await asyncio.to_thread(s_client, addr, bundle, "-tls1_3")
        assert "Protocol version: TLSv1.3" in r.stdout + r.stderr
        r = await asyncio.to_thread(s_client, addr, bundle, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
        assert "Ciphersuite" not in r.stdout + r.stderr  # below TLS 1.2: refused


@contextlib.contextmanager
def s_server(cert: Path, key: Path, *args: str) -> object:
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(cert), "-key", str(key), "-naccept", "1",
         "-no_dhe", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"ACCEPT .*:(\d+)", line)
            if m:
                yield int(m.group(1))
                break
        else:
            raise AssertionError("openssl s_server did not start")
    finally:
        proc.kill()
        proc.communicate(timeout=GUARD_S)


async def test_station_client_refuses_a_server_that_offers_only_cbc(daemon_with, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with daemon_with() as d:
        bundle = await add_lan(d, "lan-client", tmp_path)
        assert d.tls_files is not None
        ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
        assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"} <= {
            "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
        }  # fmt: skip
        assert "ECDHE+AESGCM" in TLS12_CIPHERS
        for suite, ok in (("ECDHE-ECDSA-AES128-SHA256", False), ("ECDHE-ECDSA-AES128-GCM-SHA256", True)):
            with s_server(d.tls_files.cert, d.tls_files.key, "-tls1_2", "-cipher", suite) as port:
                try:
                    _, w = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
                        GUARD_S,
                    )
                except (OSError, asyncio.IncompleteReadError) as exc:
                    assert not ok, f"{suite}: {exc}"
                else:
                    assert ok, f"{suite}: the client accepted it"
                    assert w.get_extra_info("cipher")[0] == suite
                    w.close()
