"""Channel binding (RFC 7030 3.5): the CSR's challengePassword carries the TLS connection's tls-unique (TLS 1.2)
or tls-exporter (TLS 1.3, RFC 9266) value; a label with channel_binding = "required" refuses a CSR without it,
and a value from another connection is refused on any label. The client is Python's ssl module over real TLS."""

from __future__ import annotations

import asyncio
import base64
import http.client
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from appliance.daemon import Daemon
from appliance.est.binding import exporter
from hsm.softhsm import SoftHsmToken
from tests.appliance.est.support import PASSWORD, USER, Curl, est_config, openssl_csr
from tests.appliance.test_daemon import _config


@pytest.fixture
async def est(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    cfg = est_config(_config(tmp_path / "state", softhsm_token, production_journal_template), tmp_path)
    async with Daemon(cfg) as d:
        yield d


def _csr(serial: str, password: bytes | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    )
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
    return base64.encodebytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


class _Client:
    """One TLS connection to the EST listener; `binding` is its channel-binding value, read on the client."""

    def __init__(self, d: Daemon, version: ssl.TLSVersion) -> None:
        assert d.est_server is not None
        ctx = ssl.create_default_context(cafile=str(d.config.stations.tls_dir / "management-ca.crt"))
        ctx.minimum_version = ctx.maximum_version = version
        host, port = d.est_server.address
        self.conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
        self.conn.connect()
        sock = self.conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        value = (
            sock.get_channel_binding("tls-unique") if version is ssl.TLSVersion.TLSv1_2 else exporter(sock)
        )
        assert value is not None
        self.binding = base64.b64encode(value)

    def enrol(self, label: str, body: bytes) -> tuple[int, bytes]:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.conn.request("POST", f"/.well-known/est/{label}/simpleenroll", body=body,
                          headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {auth}"})  # fmt: skip
        answer = self.conn.getresponse()
        return answer.status, answer.read()

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_channel_binding_is_checked(est: Daemon, tmp_path: Path, version: ssl.TLSVersion) -> None:
    first = await asyncio.to_thread(_Client, est, version)
    second = await asyncio.to_thread(_Client, est, version)
    try:
        status, body = await asyncio.to_thread(first.enrol, "cb", _csr("SN-0010", first.binding))
        assert status == 200, body
        # A CSR made for another connection (the value of `first`) is refused on `second`, on any label.
        for label in ("cb", "line1"):
            status, body = await asyncio.to_thread(second.enrol, label, _csr("SN-0011", first.binding))
            assert status == 400 and body.startswith(b"BAD_POP"), body
        status, body = await asyncio.to_thread(second.enrol, "line1", _csr("SN-0011", second.binding))
        assert status == 200, body
    finally:
        first.close()
        second.close()
    assert [r.state for r in est.journal.rows("device_serial=?", ("SN-0010",))] == ["confirmed"]


async def test_a_label_that_requires_binding_refuses_a_csr_without_it(est: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    curl = Curl(est, work)
    _, csr = openssl_csr(work, "d", "/serialNumber=SN-0012")
    refused = await curl("cb/simpleenroll", *curl.basic(), body=csr)
    assert refused.status == 400 and "requires channel binding" in refused.text
    attrs = await curl("cb/csrattrs")
    parsed = subprocess.run(["openssl", "asn1parse", "-inform", "DER"], input=base64.b64decode(attrs.body),
                            capture_output=True, check=True).stdout  # fmt: skip
    assert b":challengePassword" in parsed
    assert (await curl("line1/simpleenroll", *curl.basic(), body=csr)).status == 200


def _handshake(d: Daemon, ciphers: str) -> str:
    """A TLS 1.2 handshake with the EST listener offering only `ciphers`: the suite it got, or the error."""
    assert d.est_server is not None
    ctx = ssl.create_default_context(cafile=str(d.config.stations.tls_dir / "management-ca.crt"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    host, port = d.est_server.address
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
    try:
        conn.connect()
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return cipher[0] if cipher else "none"
    except ssl.SSLError as exc:
        return f"refused: {exc.reason}"
    finally:
        conn.close()


async def test_the_listener_keeps_the_station_links_tls_policy(est: Daemon) -> None:
    """The daemon hands the EST listener the station link's TLS policy (stations/tls.py): under TLS 1.2 only
    ECDHE with an AEAD suite. A CBC suite that OpenSSL's own defaults would take is refused."""
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256"
    assert (await asyncio.to_thread(_handshake, est, cbc)).startswith("refused")
    aead = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    assert "GCM" in await asyncio.to_thread(_handshake, est, aead)
