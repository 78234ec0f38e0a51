"""A 2,000-connection flood on the LAN station port and on the VA port of the real daemon (`birthline run`, its
own process, embedded default bounds), from eight addresses 127.0.0.2..9: the daemon holds no more descriptors
than its caps allow, a good station on 127.0.0.1 still enrols and a CRL is still served during the flood, and
once the flood ends the daemon's RSS is back within RSS_MARGIN_MIB of where it started (before the bounds, 2,000
idle TLS-port connections added about 570 MiB that never came back: bench/listeners.py)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.config import StationsSection, VaSection
from appliance.connections import ACCEPTS_IN_FLIGHT
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from tests.appliance.conftest import put_on_line
from tests.daemon_config import daemon_config
from tests.ports import free_ports

pytestmark = pytest.mark.slow

FLOOD = 2000
SOURCES = 8
RSS_MARGIN_MIB = 20
GUARD_S = 90.0

SECTIONS = """\
[stations]
lan_listen = "127.0.0.1:{lan}"
tls_dir = "{state}/tls"
[va]
listen = "127.0.0.1:{va}"
"""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@contextlib.contextmanager
def _own_fd_limit(wanted: int) -> Iterator[None]:
    """The flood's sockets are this process's descriptors too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"this process may open only {hard} descriptors; the flood needs {wanted}")
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


async def _flood(port: int, data: bytes) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one(i: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((f"127.0.0.{2 + i % SOURCES}", 0))
        try:
            async with asyncio.timeout(GUARD_S):
                await loop.sock_connect(s, ("127.0.0.1", port))
                if data:
                    await loop.sock_sendall(s, data)
        except (OSError, TimeoutError):
            s.close()  # refused at accept while connecting: that is the cap working
            return
        socks.append(s)

    for start in range(0, FLOOD, 200):  # in waves: the listen backlog is finite
        await asyncio.gather(*(one(i) for i in range(start, min(start + 200, FLOOD))))
    return socks


def test_flood_of_2000_connections_is_bounded_and_the_daemon_keeps_serving(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path, hsm_token: Token
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(production_journal_template, state / "journal.sqlite")
    lan = free_ports(2)  # two consecutive free ports from one call: two calls may return the same port
    va = lan + 1
    config = tmp_path / "birthline.toml"
    config.write_text(daemon_config(state, softhsm_token, SECTIONS.format(state=state, lan=lan, va=va)))
    with Journal(state / "journal.sqlite") as journal:
        creds = reg.add_station(journal, hsm_token, "flood-st", "lan", audit=AuditLog(journal), actor="alice")
        put_on_line(journal, "flood-st")
        bundle = reg.write_bundle(creds, tmp_path / "flood-st")
    stations_cap = StationsSection().max_connections
    va_cap = VaSection().limits.max_connections
    enrolled: list[str] = []

    async def enrol() -> None:
        serial = f"SN-FLOOD-{len(enrolled)}"
        ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
        client = await StationClient.connect_tcp(
            "127.0.0.1", lan, station_id="flood-st", key=read_station_key(bundle / "station.key"),
            ssl_context=ctx, server_hostname="localhost", give_up_after=GUARD_S,
        )  # fmt: skip
        try:
            chain = await client.enroll(serial, make_csr(generate_device_key(), serial))
        finally:
            await client.close()
        assert len(chain) == 3
        enrolled.append(serial)

    async def crl() -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S)) as s,
            s.get(f"http://127.0.0.1:{va}/crl/issuing.crl") as r,
        ):
            assert r.status == 200 and len(await r.read()) > 0

    async def scenario(proc: subprocess.Popen[bytes]) -> None:
        pid = proc.pid
        await _until(
            lambda: proc.poll() is not None or (_listening(lan) and _listening(va)), "the daemon listens"
        )
        assert proc.poll() is None, f"birthline run exited with {proc.returncode}"
        await enrol()
        await crl()  # warm: every path the flood and the good clients touch has run once
        rss0, fd0 = _rss_mib(pid), _fds(pid)

        # Beyond its cap a flooded listener holds at most ACCEPTS_IN_FLIGHT descriptors of connections being
        # accepted or refused; the cap alone once the daemon has caught up with the flood.
        lan_flood = await _flood(lan, b"")  # TCP that never starts TLS
        assert _fds(pid) - fd0 <= stations_cap + ACCEPTS_IN_FLIGHT
        await _until(lambda: _fds(pid) - fd0 <= stations_cap, f"at most {stations_cap} LAN connections held")
        await enrol()  # from 127.0.0.1: a peer of its own, within the caps
        va_flood = await _flood(va, b"GET /crl/issuing.crl HTTP/1.1\r\nHost: x\r\n")  # headers never end
        assert _fds(pid) - fd0 <= stations_cap + va_cap + ACCEPTS_IN_FLIGHT
        await _until(lambda: _fds(pid) - fd0 <= stations_cap + va_cap, "at most the two caps held")
        await crl()
        during = _rss_mib(pid)

        for s in lan_flood + va_flood:
            s.close()
        await _until(lambda: _fds(pid) <= fd0 + 2, "the daemon released the flood's descriptors")
        await enrol()
        await crl()
        after = _rss_mib(pid)
        assert proc.poll() is None
        assert after - rss0 < RSS_MARGIN_MIB, (
            f"RSS {rss0:.1f} MiB before, {during:.1f} during, {after:.1f} after the flood"
        )

    with _own_fd_limit(2 * FLOOD + 256):
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            asyncio.run(scenario(proc))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert len(enrolled) == 3


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
