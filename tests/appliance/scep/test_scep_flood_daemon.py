"""A real `birthline run` serving SCEP under a flood of PKCSReq from peers without a challenge password (docs/scep.md
"Unauthenticated peers"): each would cost a signature verification with a key the peer chose, an RSA decryption
in the HSM with the RA key and an HSM signature on the FAILURE CertRep, before the challenge is even looked at.

- one address, 8 connections: the requests that got as far as their checks (HTTP 200, a FAILURE CertRep) are at
  most the peer's burst plus its rate over the flood's length; the rest were answered 503 with Retry-After, read
  and checked for nothing; a client with a valid challenge enrols during the flood; the daemon logs the refusal
  cause and the budget once, not once per request; the metrics count exactly the 200s and 503s;
- 32 addresses with 2 connections each, more than the listener takes: the shared budget bounds them all
  together, and a client that enrolled before the flood enrols again during it.

The counts are of answers, never of time: the bounds are the budgets' (burst + rate x elapsed).
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.scep import challenges, client
from appliance.scep.oids import MessageType, PkiStatus
from hsm.softhsm import SoftHsmToken
from tests.appliance.cmp.upstream_support import birthline, child_env, write_config
from tests.appliance.scep.support import SUPERVISOR
from tests.http_flood import Conn, flood

pytestmark = [pytest.mark.slow]  # a subprocess daemon

FLOOD_S = 3.0
PATH = "/scep/line1?operation=PKIOperation"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _csr(key: rsa.RSAPrivateKey, serial: str, challenge: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    )
    builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@dataclasses.dataclass
class Pkcs:
    key: rsa.RSAPrivateKey
    signer: x509.Certificate
    tid: str
    nonce: bytes
    body: bytes


def _pkcs_req(ra: x509.Certificate, serial: str, challenge: str) -> Pkcs:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = client.self_signed(key, "device")
    tid, nonce = os.urandom(8).hex(), os.urandom(16)
    body = client.request(MessageType.PKCS_REQ, _csr(key, serial, challenge), signer=signer, key=key, ra=ra,
                          transaction_id=tid, sender_nonce=nonce)  # fmt: skip
    return Pkcs(key, signer, tid, nonce, body)


async def _flood(
    port: int, sources: list[str], per_source: int, bodies: list[bytes]
) -> tuple[Counter[str], float]:
    return await flood(port, PATH, "application/x-pki-message", sources, per_source, bodies, FLOOD_S)


@dataclasses.dataclass
class Running:
    port: int
    metrics_port: int
    log: Path
    ra: x509.Certificate
    challenges: list[str]  # one per good client, each for device SN-G<index>


async def _enrols(run: Running, n: int) -> bool:
    """A client with the n-th valid challenge asks for its certificate (from 127.0.0.1, as it likes)."""
    req = _pkcs_req(run.ra, f"SN-G{n:04d}", run.challenges[n])
    conn = Conn(run.port, "127.0.0.1", PATH, "application/x-pki-message")
    try:
        for _ in range(30):  # a 503 (busy) is retried, as a SCEP client does after Retry-After
            status, headers, data = await conn.post(req.body)
            if status != 503:
                break
            await asyncio.sleep(int(headers.get("retry-after", "1")))
    finally:
        conn.close()
    assert status == 200, (status, data)
    reply = client.read_reply(data, ra=run.ra, signer=req.signer, key=req.key, transaction_id=req.tid,
                              sender_nonce=req.nonce)  # fmt: skip
    return reply.status is PkiStatus.SUCCESS


@contextlib.asynccontextmanager
async def _appliance(softhsm_token: SoftHsmToken, template: Path, tmp: Path, scep_extra: str = "",
                     good: int = 3) -> AsyncIterator[Running]:  # fmt: skip
    state = tmp / "state"
    state.mkdir(mode=0o700)
    journal_path = state / "journal.sqlite"
    shutil.copy(template, journal_path)
    with Journal(journal_path) as journal:
        secrets = [
            challenges.add(journal, AuditLog(journal), SUPERVISOR, "line1", device_serial=f"SN-G{n:04d}")[1]
            for n in range(good)
        ]
    port, metrics = _free_port(), _free_port()
    extra = (f'[stations]\ntls_dir = "{state / "tls"}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
             f'[scep]\nlisten = "127.0.0.1:{port}"\n{scep_extra}'
             f'[scep.labels.line1]\nstation = "fixture-1"\n')  # fmt: skip
    config = write_config(tmp / "birthline.toml", softhsm_token, state=state, journal=journal_path, upstream={},
                          extra=extra)  # fmt: skip
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        daemon = await asyncio.create_subprocess_exec(*birthline("run", "--config", str(config)), env=child_env(),
                                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for p in (port, metrics):
            deadline = time.monotonic() + 60
            while True:
                assert daemon.returncode is None, log.read_text()
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", p)
                except OSError:
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                break
        ra = x509.load_pem_x509_certificate((state / "tls" / "scep-ra.pem").read_bytes())
        yield Running(port, metrics, log, ra, secrets)
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon.wait(), 30)
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert daemon.returncode == 0, log.read_text()


def _flood_bodies(ra: x509.Certificate) -> list[bytes]:
    return [_pkcs_req(ra, f"SN-F{i:03d}", "not the challenge").body for i in range(8)]


async def test_a_pkcsreq_flood_from_one_address_is_bounded_by_its_budget_and_logged_once(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    async with _appliance(softhsm_token, production_journal_template, tmp_path) as run:
        flood = asyncio.create_task(_flood(run.port, ["127.0.0.2"], 8, _flood_bodies(run.ra)))
        await asyncio.sleep(FLOOD_S / 2)
        good = await _enrols(run, 0)  # another address, with a valid challenge, during the flood
        counts, elapsed = await flood
        # Defaults: 5 requests/s per client that do not authenticate, bursts of 32. Each 200 is one signature
        # verified, one HSM decryption and one HSM signature; a 503 cost none of them.
        assert counts["200"] <= 32 + 5 * elapsed + 2, (counts, elapsed)
        assert counts["503"] > 0 and set(counts) <= {"200", "503"}, counts
        assert good
        log = run.log.read_text()
        busy = [line for line in log.splitlines() if "exceed its budget" in line]
        assert len(busy) == 1 and "127.0.0.2" in busy[0] and "[scep]" in busy[0], busy
        refused = [line for line in log.splitlines() if "SCEP" in line and "refused" in line]
        assert len(refused) == 1, refused

        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{run.metrics_port}/metrics") as r:
            metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                       for family in text_string_to_metric_families(await r.text())
                       for sample in family.samples}  # fmt: skip
        assert metrics[("birthline_scep_admission_total", (("outcome", "busy_client"),))] == counts["503"]
        assert (
            metrics[("birthline_scep_admission_total", (("outcome", "authenticated"),))] == 1
        )  # the good one
        assert metrics[("birthline_scep_pki_operations_total", (("outcome", "refused"),))] == counts["200"]
        assert metrics[("birthline_scep_pki_operations_total", (("outcome", "issued"),))] == 1
        documented = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text()
        for name in {n.removesuffix("_total") for n, _ in metrics if n.startswith("birthline_scep_")}:
            assert f"`{name}_total`" in documented, name


async def test_a_pkcsreq_flood_from_many_addresses_is_bounded_in_total_and_known_clients_still_enrol(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    extra = "check_rate_total = 4\ncheck_burst_total = 8\nmax_connections = 48\n"
    async with _appliance(softhsm_token, production_journal_template, tmp_path, extra) as run:
        assert await _enrols(run, 0)  # its challenge verified: a known client from now on
        flood = asyncio.create_task(_flood(run.port, [f"127.0.0.{10 + i}" for i in range(32)], 2,
                                           _flood_bodies(run.ra)))  # fmt: skip
        await asyncio.sleep(FLOOD_S / 2)
        served = [await _enrols(run, n) for n in (1, 2)]
        counts, elapsed = await flood
        assert counts["200"] <= 8 + 4 * elapsed + 2, (counts, elapsed)
        assert counts["503"] > 0, counts
        assert served == [True, True]
        busy = [line for line in run.log.read_text().splitlines() if "shared budget" in line]
        assert len(busy) == 1 and "[scep]" in busy[0], busy
