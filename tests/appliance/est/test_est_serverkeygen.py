"""serverkeygen (RFC 7030 4.4) with curl and openssl: the appliance generates the key, certifies it through the
core and returns both in a multipart answer over the TLS connection; the key is kept nowhere."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from pytest_mock import MockerFixture

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from tests.appliance.est.support import Curl, est_config, openssl_csr
from tests.appliance.test_daemon import _config

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("curl") is None, reason="openssl and curl needed"
)
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
async def est(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    cfg = est_config(_config(tmp_path / "state", softhsm_token, production_journal_template), tmp_path)
    async with Daemon(cfg) as d:
        yield d


@pytest.fixture
def curl(est: Daemon, tmp_path: Path) -> Curl:
    work = tmp_path / "curl"
    work.mkdir()
    return Curl(est, work)


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    boundary = content_type.split("boundary=", 1)[1].strip().encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        parts.append((head.decode().split(":", 1)[1].strip(), base64.b64decode(b"".join(payload.split()))))
    return parts


async def test_serverkeygen_returns_a_key_and_its_certificate(
    est: Daemon, curl: Curl, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    own_key, csr = openssl_csr(tmp_path, "kg", "/serialNumber=SN-0040")
    answer = await curl("kg/serverkeygen", *curl.basic(), body=csr)
    assert answer.status == 200, answer.text
    content_type = next(line.split(":", 1)[1].strip() for line in answer.headers.splitlines()
                        if line.lower().startswith("content-type:"))  # fmt: skip
    assert content_type.startswith("multipart/mixed; boundary=")
    (key_type, key_der), (cert_type, p7) = _parts(content_type, answer.body)
    assert key_type == "application/pkcs8" and cert_type == "application/pkcs7-mime; smime-type=certs-only"
    # openssl reads both parts; the certificate certifies the generated key, not the CSR's.
    pub = subprocess.run(["openssl", "pkey", "-inform", "DER", "-pubout", "-outform", "DER"], input=key_der,
                         capture_output=True, check=True).stdout  # fmt: skip
    (cert,) = pkcs7.load_der_pkcs7_certificates(p7)
    assert cert.public_key().public_bytes(*SPKI) == pub
    csr_key = serialization.load_pem_private_key(own_key.read_bytes(), None)
    assert csr_key.public_key().public_bytes(*SPKI) != pub
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0040"
    (row,) = est.journal.rows("device_serial=?", ("SN-0040",))
    assert row.state == "confirmed" and row.station == "fixture-1"
    # The key is kept nowhere: not in the journal's files, not in the log.
    generated = serialization.load_der_private_key(key_der, None)
    assert isinstance(generated, ec.EllipticCurvePrivateKey)
    secret = generated.private_numbers().private_value.to_bytes(32, "big")  # the private scalar itself
    for f in est.journal.path.parent.glob("journal.sqlite*"):
        assert secret not in f.read_bytes() and base64.b64encode(key_der) not in f.read_bytes()
    assert base64.b64encode(key_der)[:40].decode() not in caplog.text


async def test_serverkeygen_refusals(est: Daemon, curl: Curl, tmp_path: Path) -> None:
    _, csr = openssl_csr(tmp_path, "kg1", "/serialNumber=SN-0041")
    off = await curl("line1/serverkeygen", *curl.basic(), body=csr)
    assert off.status == 404 and "does not serve serverkeygen" in off.text
    assert (await curl("kg/serverkeygen", body=csr)).status == 401
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0041")])
    wants_encrypted = (x509.CertificateSigningRequestBuilder().subject_name(subject)
                       .add_attribute(x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.37"), b"kid")
                       .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))  # fmt: skip
    encrypted = await curl("kg/serverkeygen", *curl.basic(), body=base64.encodebytes(wants_encrypted))
    assert encrypted.status == 501 and "encrypted" in encrypted.text
    good = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    forged = await curl("kg/serverkeygen", *curl.basic(), body=base64.encodebytes(bytes(der)))
    assert forged.status == 400, forged.text
    assert est.journal.rows("device_serial=?", ("SN-0041",)) == []


async def test_key_generations_at_once_are_bounded(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path, mocker: MockerFixture
) -> None:
    """keygen_in_flight: a key generation that does not finish (injected: a generator held on an event) holds
    its place; the next request is answered 503 with Retry-After instead of queueing behind it."""
    from appliance.est import keygen

    release = threading.Event()

    def held(algorithm: str) -> object:
        release.wait(60)
        return keygen.generate_key(algorithm)

    mocker.patch("appliance.est.responder.generate_key", side_effect=held)
    cfg = est_config(_config(tmp_path / "state", softhsm_token, production_journal_template), tmp_path,
                     keygen_in_flight=1)  # fmt: skip
    work = tmp_path / "w"
    work.mkdir()
    _, first = openssl_csr(work, "a", "/serialNumber=SN-0042")
    _, second = openssl_csr(work, "b", "/serialNumber=SN-0043")
    async with Daemon(cfg) as d:
        curl = Curl(d, work)
        waiting = asyncio.ensure_future(curl("kg/serverkeygen", *curl.basic(), body=first))
        assert d.est is not None
        while d.est._keygen_free > 0:  # the first request has taken the only place
            await asyncio.sleep(0.01)
        busy = await curl("kg/serverkeygen", *curl.basic(), body=second)
        assert busy.status == 503 and "Retry-After: 5" in busy.headers and busy.text.startswith("BUSY")
        release.set()
        assert (await asyncio.wait_for(waiting, 60)).status == 200
        assert (await curl("kg/serverkeygen", *curl.basic(), body=second)).status == 200
