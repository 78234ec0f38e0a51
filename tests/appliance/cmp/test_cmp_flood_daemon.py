"""A real `birthline run` under a flood of CMP requests from peers without credentials (docs/cmp.md
"Unauthenticated peers"): p10cr with the label's kid, PasswordBasedMac at the highest iteration count accepted
and a random MAC, as the security review sent them.

- one address, 8 connections: the requests that got as far as their checks (HTTP 200 with an error answer) are
  at most the peer's burst plus its rate over the flood's length; the rest were answered 503 with Retry-After,
  read and checked for nothing; a LAN station issues throughout, and a client with the secret gets its
  certificate; the daemon logs the refusal cause once, not once per request; metrics and the status document
  count them;
- 32 addresses with 2 connections each, more than the listener takes: the shared budget bounds them all
  together, and a client that authenticated before the flood is still served during it (a request held to its
  budget has not shown it is a client: its connection makes room for a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.cmp import (
    AlgorithmIdentifier,
    BodyType,
    CertRepBody,
    MacProtector,
    P10crBody,
    PKIHeader,
    build_message,
    oids,
    parse_message,
    request_header,
)
from appliance.cmp.protection import pbm_parameters
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from tests.appliance.cmp.upstream_support import birthline, child_env, write_config
from tests.appliance.conftest import put_on_line
from tests.http_flood import Conn, flood

pytestmark = [pytest.mark.slow]  # a subprocess daemon

SECRET = b"flood test secret"
FLOOD_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class RandomMac:
    """PBM parameters (10,000 iterations, the most accepted by default) and random bytes as the MAC."""

    iterations: int = 10_000
    extra_certs: tuple[x509.Certificate, ...] = ()

    def prepare(self, header: PKIHeader) -> PKIHeader:
        alg = AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(os.urandom(16), self.iterations))
        return dataclasses.replace(header, protection_alg=alg, sender_kid=b"line1")

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        return os.urandom(32)


def _p10cr(serial: str, protection: MacProtector | RandomMac) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    header = request_header(sender=x509.DirectoryName(subject), recipient=x509.DirectoryName(subject),
                            implicit_confirm=True)  # fmt: skip
    return build_message(header, BodyType.P10CR, P10crBody(csr), protection=protection).der  # type: ignore[arg-type]


async def _good(port: int, serial: str) -> bool:
    """A client with the label's secret (openssl cmp's 500 iterations) asks for one certificate."""
    conn = Conn(port, "127.0.0.1", "/.well-known/cmp/p/line1", "application/pkixcmp")
    try:
        status, _, data = await conn.post(_p10cr(serial, MacProtector(SECRET, b"line1", iterations=500)))
    finally:
        conn.close()
    body = parse_message(data).body if status == 200 else None
    return isinstance(body, CertRepBody) and body.responses[0].certificate is not None


async def _flood(
    port: int, sources: list[str], per_source: int, bodies: list[bytes]
) -> tuple[Counter[str], float]:
    return await flood(
        port, "/.well-known/cmp/p/line1", "application/pkixcmp", sources, per_source, bodies, FLOOD_S
    )


@dataclasses.dataclass
class Running:
    cmp_port: int
    lan_port: int
    metrics_port: int
    log: Path
    state: Path
    bundle: Path


@contextlib.asynccontextmanager
async def _appliance(softhsm_token: SoftHsmToken, hsm_token: Token, template: Path, tmp: Path,
                     cmp_extra: str = "") -> AsyncIterator[Running]:  # fmt: skip
    state = tmp / "state"
    state.mkdir(mode=0o700)
    journal_path = state / "journal.sqlite"
    shutil.copy(template, journal_path)
    with Journal(journal_path) as journal:
        creds = reg.add_station(journal, hsm_token, "st1", "lan", audit=AuditLog(journal), actor="alice")
        put_on_line(journal, "st1")
        reg.write_bundle(creds, tmp / "st1")
    secret = tmp / "line1.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, SECRET + b"\n")
    os.close(fd)
    lan, cmp_port, metrics = _free_port(), _free_port(), _free_port()
    extra = (f'[stations]\nlan_listen = "127.0.0.1:{lan}"\ntls_dir = "{state / "tls"}"\n'
             f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
             f'[cmp]\nlisten = "127.0.0.1:{cmp_port}"\n{cmp_extra}'
             f'[cmp.labels.line1]\nstation = "fixture-1"\nsecret_file = "{secret}"\n')  # fmt: skip
    config = write_config(tmp / "birthline.toml", softhsm_token, state=state, journal=journal_path, upstream={},
                          extra=extra)  # fmt: skip
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        daemon = await asyncio.create_subprocess_exec(*birthline("run", "--config", str(config)), env=child_env(),
                                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for port in (lan, cmp_port, metrics):
            deadline = time.monotonic() + 60
            while True:
                assert daemon.returncode is None, log.read_text()
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                break
        yield Running(cmp_port, lan, metrics, log, state, tmp / "st1")
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon.wait(), 30)
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert daemon.returncode == 0, log.read_text()


async def _station_enrols(run: Running, prefix: str, stop: asyncio.Event) -> int:
    """A LAN station enrols devices until `stop` (at most 20: the work order has 50 units for the whole test);
    returns how many got their certificate."""
    client = await StationClient.connect_tcp(
        "127.0.0.1", run.lan_port, station_id="st1", key=read_station_key(run.bundle / "station.key"),
        ssl_context=client_ssl_context(run.bundle / "tls-client.crt", run.bundle / "tls-client.key",
                                       run.bundle / "ca.crt"),
        server_hostname="localhost",
    )  # fmt: skip
    done = 0
    try:
        while not stop.is_set() and done < 20:
            serial = f"SN-{prefix}{done:04d}"
            await client.enroll(serial, make_csr(generate_device_key(), serial))
            done += 1
    finally:
        await client.close()
    return done


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_a_flood_from_one_address_is_bounded_by_its_budget_and_logged_once(
    softhsm_token: SoftHsmToken, hsm_token: Token, production_journal_template: Path, tmp_path: Path
) -> None:
    async with _appliance(softhsm_token, hsm_token, production_journal_template, tmp_path) as run:
        bodies = [_p10cr(f"SN-F{i:03d}", RandomMac()) for i in range(8)]
        stop = asyncio.Event()
        station = asyncio.create_task(_station_enrols(run, "A", stop))
        flood = asyncio.create_task(_flood(run.cmp_port, ["127.0.0.2"], 8, bodies))
        await asyncio.sleep(FLOOD_S / 2)
        good = await _good(run.cmp_port, "SN-G0001")  # another address, with the secret, during the flood
        counts, elapsed = await flood
        stop.set()
        issued = await station
        # Defaults: 5 requests/s per client that do not authenticate, bursts of 32.
        assert counts["200"] <= 32 + 5 * elapsed + 2, (counts, elapsed)
        assert counts["503"] > 0 and set(counts) <= {"200", "503"}, counts
        assert good and issued > 0, (good, issued)

        log = run.log.read_text()
        refused = [line for line in log.splitlines() if "refused" in line and "CMP" in line]
        assert len(refused) == 1 and "BAD_MESSAGE_CHECK" in refused[0], refused
        busy = [line for line in log.splitlines() if "exceed its budget" in line]
        assert len(busy) == 1 and "127.0.0.2" in busy[0], busy

        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{run.metrics_port}/metrics") as r:
            metrics = _metrics(await r.text())
        key = (
            "birthline_cmp_refused_total",
            (("body", "p10cr"), ("fail_info", "BAD_MESSAGE_CHECK"), ("label", "line1")),
        )
        assert metrics[key] == counts["200"], (metrics, counts)
        assert metrics[("birthline_cmp_admission_total", (("outcome", "busy_client"),))] == counts["503"]
        authenticated = metrics[("birthline_cmp_admission_total", (("outcome", "authenticated"),))]
        assert authenticated >= 1  # the good client
        documented = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text()
        for name in {n.removesuffix("_total") for n, _ in metrics if n.startswith("birthline_cmp_")}:
            assert f"`{name}_total`" in documented, name

        connector = aiohttp.UnixConnector(path=str(run.state / "control.sock"))
        async with aiohttp.ClientSession(connector=connector) as s, s.get("http://birthline/v1/status") as r:
            status = (await r.json())["cmp"]
        assert status["enabled"] and status["admission"]["busy_client"] == counts["503"], status
        assert status["refused"] == [{"label": "line1", "body": "p10cr", "fail_info": "BAD_MESSAGE_CHECK",
                                      "count": counts["200"]}]  # fmt: skip


async def test_a_flood_from_many_addresses_is_bounded_in_total_and_known_clients_are_still_served(
    softhsm_token: SoftHsmToken, hsm_token: Token, production_journal_template: Path, tmp_path: Path
) -> None:
    extra = "check_rate_total = 4\ncheck_burst_total = 8\nmax_connections = 48\n"
    async with _appliance(softhsm_token, hsm_token, production_journal_template, tmp_path, extra) as run:
        assert await _good(run.cmp_port, "SN-K0001")  # authenticates: a known client from now on
        bodies = [_p10cr(f"SN-F{i:03d}", RandomMac()) for i in range(8)]
        sources = [f"127.0.0.{10 + i}" for i in range(32)]
        flood = asyncio.create_task(_flood(run.cmp_port, sources, 2, bodies))
        await asyncio.sleep(FLOOD_S / 2)
        served = [await _good(run.cmp_port, f"SN-K{n:04d}") for n in (2, 3)]
        counts, elapsed = await flood
        assert counts["200"] <= 8 + 4 * elapsed + 2, (counts, elapsed)
        assert counts["503"] > 0, counts
        assert served == [True, True]
        # the listener was full, and they got in all the same
        assert "listener.cmp.full" in run.log.read_text()
        busy = [line for line in run.log.read_text().splitlines() if "shared budget" in line]
        assert len(busy) == 1, busy
