"""Mutated CSRs through simpleenroll (and simplereenroll without a certificate): every one is refused with a 4xx
and a reason (never a 500), and the listener and the core go on issuing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.est import EstClient, EstRefused
from tests.appliance.est.support import PASSWORD, USER, est_config
from tests.appliance.test_daemon import _config


@pytest.fixture
async def est(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    cfg = est_config(_config(tmp_path / "state", softhsm_token, production_journal_template), tmp_path)
    async with Daemon(cfg) as d:
        yield d


def _mutations(der: bytes, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = bytearray(der)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del data[rng.randrange(1, len(data)) :]
        elif kind == 2:
            i = rng.randrange(len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        else:
            data[rng.randrange(len(data))] = rng.choice((0x00, 0x80, 0xFF, 0x30, 0x31))
        out.append(bytes(data))
    return out


def _run(client: EstClient, operation: str, bodies: list[bytes]) -> dict[int, int]:
    statuses: dict[int, int] = {}
    post = client.simpleenroll if operation == "simpleenroll" else client.simplereenroll
    for body in bodies:
        try:
            post(body)
            statuses[200] = statuses.get(200, 0) + 1
        except EstRefused as exc:
            statuses[exc.status] = statuses.get(exc.status, 0) + 1
            assert exc.reason, exc
    return statuses


async def test_mutated_csrs_are_refused_with_a_reason(est: Daemon) -> None:
    assert est.est_server is not None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0060")])
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    url = f"{est.est_server.url}/.well-known/est"
    ca = est.config.stations.tls_dir / "management-ca.crt"
    with EstClient(url, cafile=ca, username=USER, password=PASSWORD.encode()) as client:
        statuses = await asyncio.to_thread(_run, client, "simpleenroll", _mutations(der, 300, 1))
        # a mutation that still verifies and names an allowed device may be issued; nothing may fail inside
        assert set(statuses) <= {200, 400, 403, 409}, statuses
        assert statuses.get(400, 0) > 200, statuses
        renewals = await asyncio.to_thread(_run, client, "simplereenroll", _mutations(der, 50, 2))
        assert set(renewals) == {403}, (
            renewals
        )  # no certificate being renewed: refused before the CSR is read
        good = await asyncio.to_thread(client.enroll, ec.generate_private_key(ec.SECP256R1()), "SN-0061")
    assert good.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0061"
