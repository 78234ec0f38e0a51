"""The fixture library's EST client (stations/est.py) against the daemon's EST server: the operations, channel
binding, renewal with its own certificate, and refusals as EstRefused with the server's reason code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.codes import Code
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


def _client(d: Daemon, label: str = "", **kw: object) -> EstClient:
    assert d.est_server is not None
    url = f"{d.est_server.url}/.well-known/est" + (f"/{label}" if label else "")
    return EstClient(url, cafile=d.config.stations.tls_dir / "management-ca.crt", **kw)  # type: ignore[arg-type]


async def test_the_fixture_client_enrols_renews_and_binds(est: Daemon, tmp_path: Path) -> None:
    assert est.core is not None
    with _client(est, username=USER, password=PASSWORD.encode()) as client:
        chain = await asyncio.to_thread(client.cacerts)
        assert {c.subject for c in chain} == {c.subject for c in est.core.issuing_ca().chain}
        assert (await asyncio.to_thread(client.csrattrs)).startswith(b"\x30")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = await asyncio.to_thread(client.enroll, key, "SN-0020")
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0020"
        with pytest.raises(EstRefused) as refused:
            await asyncio.to_thread(client.enroll, ec.generate_private_key(ec.SECP256R1()), "OTHER-1")
        assert refused.value.status == 403 and refused.value.code is Code.NOT_AUTHORISED
    # Renewal: the certificate and its key are the TLS identity.
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
    with _client(est, cert=tmp_path / "c.pem", key=tmp_path / "c.key") as client:
        new = await asyncio.to_thread(client.reenroll, ec.generate_private_key(ec.SECP256R1()), cert)
    assert new.subject == cert.subject and new.serial_number != cert.serial_number
    # Channel binding on the label that requires it (TLS 1.2: tls-unique).
    with _client(est, "cb", username=USER, password=PASSWORD.encode(), max_tls12=True) as client:
        bound = await asyncio.to_thread(
            client.enroll, ec.generate_private_key(ec.SECP256R1()), "SN-0021", bind=True
        )
        assert bound.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0021"
        with pytest.raises(EstRefused) as unbound:
            await asyncio.to_thread(client.enroll, ec.generate_private_key(ec.SECP256R1()), "SN-0022")
        assert unbound.value.status == 400 and unbound.value.code is Code.BAD_POP
