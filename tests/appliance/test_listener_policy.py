"""Floods a security review ran against a served demo, replayed against the real daemon (`birthline run`, its own
process, embedded default bounds), each flood from its own process (tests/appliance/flood_client.py) on loopback
addresses 127.0.10.1 and up, the good clients from 127.0.0.1:

- TLS ClientHello floods on the station port: from 10 addresses (more connections than the cap, fewer addresses
  than it) a station that never authenticated before enrols, and from 250 addresses one whose address is known
  (a station authenticated there) does, each on its first connection: not refused, not displaced;
- slow request bodies (a byte a second) from 5 addresses on the VA and CMP ports: a CRL fetch and a CMP POST are
  each answered on their first connection;
- 200 KB bodies without a Content-Type (CMP's 415 path), reconnecting: the daemon's RSS stays within
  RSS_PEAK_MIB of where it started and comes back within RSS_AFTER_MIB (it rose by 128 MiB and stayed 86 MiB up);
- with RLIMIT_NOFILE exactly the budget the daemon computes, floods on all five listeners (station, VA, CMP,
  metrics, control socket) never make accept() fail.

Waits are for conditions, with a generous guard against a hang, never claims about durations."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.stream import StreamChannel
from tests.appliance.conftest import put_on_line
from tests.daemon_config import daemon_config
from tests.ports import free_ports

pytestmark = pytest.mark.slow

GUARD_S = 90.0  # a hang guard only
RSS_PEAK_MIB = 64
RSS_AFTER_MIB = 16

SECTIONS = """\
[stations]
lan_listen = "127.0.0.1:{lan}"
tls_dir = "{state}/tls"
[va]
listen = "127.0.0.1:{va}"
[cmp]
listen = "127.0.0.1:{cmp}"
[cmp.labels.flood]
station = "flood-st"
secret_file = "{secret}"
[metrics]
listen = "127.0.0.1:{metrics}"
"""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def _own_fd_limit(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"this process may open only {hard} descriptors; the floods need {wanted}")
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


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Appliance:
    config: Path
    state: Path
    ports: dict[str, int]
    bundle: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @contextlib.asynccontextmanager
    async def running(self, nofile: int | None = None) -> AsyncIterator[Appliance]:
        """`birthline run`, with RLIMIT_NOFILE soft and hard `nofile` if given (util-linux prlimit); its log in
        self.log."""
        limit = [] if nofile is None else ["prlimit", f"--nofile={nofile}:{nofile}"]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [*limit, sys.executable, "-m", "appliance.cli.main", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        try:
            proc = self.proc
            await _until(
                lambda: proc.poll() is not None or all(_listening(p) for p in self.ports.values()),
                "the daemon listens",
            )
            assert proc.poll() is None, f"birthline run exited with {proc.returncode}: {self.log.read_text()}"
            yield self
        finally:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def enrol(self, serial: str) -> int:
        """A station enrols one device over a new connection; returns how many connections that took."""
        b = self.bundle
        ctx = client_ssl_context(b / "tls-client.crt", b / "tls-client.key", b / "ca.crt")
        attempts = 0

        async def connector() -> FrameChannel:
            nonlocal attempts
            attempts += 1
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.ports["lan"], ssl=ctx, server_hostname="localhost"
                )
            except OSError as exc:
                raise ChannelClosed(f"lan: {exc}") from exc
            return StreamChannel(reader, writer, peer="lan")

        client = StationClient(
            connector, station_id="flood-st", key=read_station_key(b / "station.key"), give_up_after=GUARD_S
        )
        try:
            chain = await client.enroll(serial, make_csr(generate_device_key(), serial))
        finally:
            await client.close()
        assert len(chain) == 3
        return attempts


@pytest.fixture
def appliance(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path, hsm_token: Token
) -> Appliance:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    secret = tmp_path / "cmp.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_hex(16).encode())
    os.close(fd)
    # One call for all four: separate calls may each be handed the same just-released port (seen once in a full run).
    first = free_ports(4)
    ports = {name: first + i for i, name in enumerate(("lan", "va", "cmp", "metrics"))}
    config = tmp_path / "birthline.toml"
    config.write_text(
        daemon_config(state, softhsm_token, SECTIONS.format(state=state, secret=secret, **ports))
    )
    with Journal(state / "journal.sqlite") as journal:
        creds = reg.add_station(journal, hsm_token, "flood-st", "lan", audit=AuditLog(journal), actor="alice")
        put_on_line(journal, "flood-st")
        bundle = reg.write_bundle(creds, tmp_path / "flood-st")
    return Appliance(config, state, ports, bundle, tmp_path / "daemon.log")


@contextlib.asynccontextmanager
async def flood(
    mode: str, target: int | str, connections: int, addresses: int, base: int = 10, **env: str
) -> AsyncIterator[None]:
    """The flood client (tests/appliance/flood_client.py) against a port or a Unix socket, until the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.appliance.flood_client", mode, str(target), str(connections), str(addresses),
        str(base), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **{f"FLOOD_{k.upper()}": v for k, v in env.items()}},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(GUARD_S):
                out = await proc.stdout.read()
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0 and b"connections" in out, out


def _open_connections(pid: int, port: int) -> int:
    """Established connections to the daemon's `port` (ss from the daemon's side)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return len(out.splitlines())


async def test_tls_hello_floods_keep_no_station_out(appliance: Appliance) -> None:
    """A flood of ClientHellos that never send a certificate, every connection re-made as soon as the daemon
    ends it, 1,000 at once. From 10 addresses (the cap is 128, 16 per address): the flood only displaces its
    own surplus connections, so a station that has never authenticated gets in and is not displaced before its
    TLS handshake vouches for it. From 250 addresses (about one connection each held): the station's address,
    where it authenticated, is known, so it displaces a flood connection at once and none displaces it.
    Before, the station's connections were displaced before their TLS handshake completed (1 of 2 enrolments
    in 30 s from 10 addresses, after 5 connections; none from 200)."""
    with _own_fd_limit(2048):
        async with appliance.running() as app:
            async with flood("hello", app.ports["lan"], 1000, 10):
                await _until(
                    lambda: _open_connections(app.pid, app.ports["lan"]) >= 120, "the flood fills the cap"
                )
                for i in range(4):
                    assert await app.enrol(f"SN-HELLO-{i}") == 1
            async with flood("hello", app.ports["lan"], 1000, 250, base=20):
                await _until(
                    lambda: _open_connections(app.pid, app.ports["lan"]) >= 120, "the flood fills the cap"
                )
                for i in range(4):
                    assert await app.enrol(f"SN-HELLO-MANY-{i}") == 1
            log = app.log.read_text()
    # One line per kind and minute, not one per refused or displaced connection.
    assert len(re.findall(r"stations listener: (refused|at its cap)", log)) <= 6, log[-3000:]


async def _crl(app: Appliance, http: aiohttp.ClientSession) -> None:
    async with http.get(f"http://127.0.0.1:{app.ports['va']}/crl/issuing.crl") as r:
        assert r.status == 200 and len(await r.read()) > 0


async def _cmp(app: Appliance, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"http://127.0.0.1:{app.ports['cmp']}/.well-known/cmp/p/flood", data=b"\x30\x00",
        headers={"Content-Type": "application/pkixcmp"},
    ) as r:  # fmt: skip
        assert r.status == 400 and r.headers["Content-Type"] == "application/pkixcmp"  # a CMP error answer
        await r.read()


def _session() -> aiohttp.ClientSession:
    # A new connection per request, and no retry: the first connection must be the one answered.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=GUARD_S)
    )


async def test_slow_bodies_from_a_few_addresses_lock_no_client_out(appliance: Appliance) -> None:
    """Slow bodies from 5 addresses (each address at its cap, every connection re-made at the body timeout) held
    the VA and CMP listeners full: a body still arriving counted as a request being served. Now it can be
    displaced, the flood's own surplus first: a CRL fetch and a CMP POST are answered on their first
    connection."""
    with _own_fd_limit(2048):
        async with appliance.running() as app, _session() as http:
            await _crl(app, http)
            await _cmp(app, http)
            async with (
                flood("slowbody", app.ports["va"], 5 * 64, 5, path="/ocsp", content_type="application/ocsp-request"),
                flood("slowbody", app.ports["cmp"], 5 * 32, 5, base=20, path="/.well-known/cmp/p/flood",
                      content_type="application/pkixcmp"),
            ):  # fmt: skip
                await _until(
                    lambda: (
                        _open_connections(app.pid, app.ports["va"]) >= 250
                        and _open_connections(app.pid, app.ports["cmp"]) >= 120
                    ),
                    "the floods fill both caps",
                )
                for _ in range(3):
                    await _crl(app, http)
                    await _cmp(app, http)
            log = app.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


async def test_refused_bodies_do_not_keep_memory(appliance: Appliance) -> None:
    """200 KB CMP bodies without the CMP Content-Type (answered 415 without being read), 160 connections from 5
    addresses re-made at once: each displaced connection's request and body stayed in memory while aiohttp
    waited up to 10 s to read the rest it would discard (RSS 94 to 222 MiB, 180 after). Now RSS stays within
    RSS_PEAK_MIB of where it started and comes back within RSS_AFTER_MIB; a CMP client is served throughout."""
    with _own_fd_limit(2048):
        async with appliance.running() as app, _session() as http:
            await _cmp(app, http)
            before = peak = _rss_mib(app.pid)
            async with flood("body415", app.ports["cmp"], 160, 5, path="/.well-known/cmp/p/flood"):
                await _until(
                    lambda: _open_connections(app.pid, app.ports["cmp"]) >= 120, "the flood fills the cap"
                )
                end = time.monotonic() + 10.0
                while time.monotonic() < end:
                    peak = max(peak, _rss_mib(app.pid))
                    await asyncio.sleep(0.1)
                await _cmp(app, http)
            await _until(
                lambda: _open_connections(app.pid, app.ports["cmp"]) == 0, "the flood's connections end"
            )
            after = _rss_mib(app.pid)
            await _cmp(app, http)
            log = app.log.read_text()
    assert peak - before < RSS_PEAK_MIB and after - before < RSS_AFTER_MIB, (before, peak, after)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


async def test_floods_on_every_listener_stay_within_the_descriptor_budget(appliance: Appliance) -> None:
    """The budget checked at start counts every listener: the station, VA, CMP and metrics ports and the
    control socket, each with its cap and 256 for connections being accepted or refused. With RLIMIT_NOFILE
    set to exactly what the daemon computes, floods past every cap on all of them at once, each connection
    re-made the moment the daemon refuses or displaces it, never make accept() fail (before, the metrics
    listener and the control socket were not counted, and such floods gave EMFILE)."""
    with _own_fd_limit(8192):
        async with appliance.running() as app:
            pass
        needed = int(re.findall(r"file descriptors: limit \d+, needed (\d+):", app.log.read_text())[0])
        assert needed == (128 + 256 + 128 + 64 + 32) + 5 * 256 + 128
        async with appliance.running(nofile=needed) as app:
            base_fds = len(os.listdir(f"/proc/{app.pid}/fd"))
            peak = base_fds

            async def watch() -> None:
                nonlocal peak
                while True:
                    with contextlib.suppress(OSError):
                        peak = max(peak, len(os.listdir(f"/proc/{app.pid}/fd")))
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            async with (
                flood("churn", app.ports["lan"], 400, 40, base=10, data=""),
                flood("churn", app.ports["va"], 600, 20, base=11),
                flood("churn", app.ports["cmp"], 400, 20, base=12),
                flood("churn", app.ports["metrics"], 300, 30, base=13),
                flood("churn", str(app.state / "control.sock"), 300, 1),
            ):
                await asyncio.sleep(
                    10.0
                )  # the floods run this long; the checks below are on what they caused
            watcher.cancel()
            await _until(
                lambda: len(os.listdir(f"/proc/{app.pid}/fd")) <= base_fds + 4, "descriptors released"
            )
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{app.ports['va']}/crl/issuing.crl") as r,
            ):
                assert r.status == 200
            log = app.log.read_text()
    assert peak <= needed
    assert "accept-failing" not in log and "Too many open files" not in log, log[-3000:]
