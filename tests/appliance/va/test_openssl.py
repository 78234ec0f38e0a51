"""Interop with the real openssl CLI against the VA served on 127.0.0.1 (certificates issued by IssueService)."""

from __future__ import annotations

import base64
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from appliance import der
from appliance.va import revocation as rv
from appliance.va.http import VaServer, make_app
from appliance.va.service import ValidationAuthority, VaSettings
from tests.appliance.va.conftest import Va
from tests.appliance.va.test_ocsp import _foreign_request

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
PEM = serialization.Encoding.PEM


async def openssl(*args: str) -> tuple[int, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        "openssl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@dataclass
class Files:
    root: Path
    issuing: Path
    tmp: Path

    def cert(self, name: str, cert: x509.Certificate) -> Path:
        path = self.tmp / f"{name}.pem"
        path.write_bytes(cert.public_bytes(PEM))
        return path


@pytest.fixture
async def server(va: Va, tmp_path: Path) -> AsyncIterator[tuple[ValidationAuthority, str, Files]]:
    root = tmp_path / "root.pem"
    root.write_bytes(va.root.certificate.public_bytes(PEM))
    issuing = tmp_path / "issuing.pem"
    issuing.write_bytes(va.issuing.certificate.public_bytes(PEM))
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0002", reason="keyCompromise")
    authority = ValidationAuthority(va.journal, va.token, va.audit, VaSettings(poll_s=0.05))
    async with authority, VaServer(make_app(authority), "127.0.0.1", 0) as srv:
        yield authority, srv.url, Files(root, issuing, tmp_path)


async def ocsp_query(url: str, files: Files, cert: Path, *extra: str, digest: str = "") -> tuple[int, str]:
    return await openssl(
        "ocsp", "-issuer", str(files.issuing), *([digest] if digest else []), "-cert", str(cert),
        "-url", url + "/ocsp", "-CAfile", str(files.root), *extra,
    )  # fmt: skip


@pytest.mark.parametrize("nonce", ["-nonce", "-no_nonce"])
async def test_openssl_ocsp_good_revoked_unknown(
    va: Va, server: tuple[ValidationAuthority, str, Files], nonce: str
) -> None:
    _, url, files = server
    good = files.cert("good", va.cert("SN-0001"))
    revoked = files.cert("revoked", va.cert("SN-0002"))
    unknown = files.cert("unknown", va.rogue_cert(0x5EED5EED5EED5EED5EED))
    rc, out = await ocsp_query(url, files, good, nonce)
    assert rc == 0 and "Response verify OK" in out and f"{good}: good" in out, out
    rc, out = await ocsp_query(url, files, revoked, nonce)
    assert rc == 0 and "Response verify OK" in out and f"{revoked}: revoked" in out, out
    assert "Reason: keyCompromise" in out and "Revocation Time:" in out
    rc, out = await ocsp_query(url, files, unknown, nonce)
    assert rc == 0 and "Response verify OK" in out and f"{unknown}: unknown" in out, out
    assert ("WARNING: no nonce in response" in out) is False


async def test_openssl_ocsp_sha256_certid_and_get(
    va: Va, server: tuple[ValidationAuthority, str, Files]
) -> None:
    _, url, files = server
    good = files.cert("good", va.cert("SN-0001"))
    rc, out = await ocsp_query(url, files, good, "-no_nonce", digest="-sha256")
    assert rc == 0 and f"{good}: good" in out, out
    # GET (RFC 6960 A.1) with a request openssl built, and openssl verifies what came back
    req, resp = files.tmp / "req.der", files.tmp / "resp.der"
    rc, out = await openssl(
        "ocsp", "-issuer", str(files.issuing), "-cert", str(good), "-no_nonce", "-reqout", str(req)
    )
    assert rc == 0, out
    async with (
        aiohttp.ClientSession() as s,
        s.get(url + "/ocsp/" + base64.b64encode(req.read_bytes()).decode()) as r,
    ):
        resp.write_bytes(await r.read())
    rc, out = await openssl(
        "ocsp",
        "-respin",
        str(resp),
        "-issuer",
        str(files.issuing),
        "-cert",
        str(good),
        "-CAfile",
        str(files.root),
    )
    assert rc == 0 and "Response verify OK" in out and f"{good}: good" in out, out


async def test_openssl_crl_verify_and_verify_crl_check(
    va: Va, server: tuple[ValidationAuthority, str, Files]
) -> None:
    _, url, files = server
    async with aiohttp.ClientSession() as s, s.get(url + "/crl/issuing.crl") as r:
        crl_der = await r.read()
    der_path = files.tmp / "issuing.crl"
    der_path.write_bytes(crl_der)
    rc, out = await openssl(
        "crl", "-in", str(der_path), "-inform", "DER", "-CAfile", str(files.issuing), "-noout"
    )
    assert rc == 0 and "verify OK" in out, out
    pem_path = files.tmp / "issuing.crl.pem"
    pem_path.write_bytes(x509.load_der_x509_crl(crl_der).public_bytes(PEM))
    good = files.cert("good", va.cert("SN-0001"))
    revoked = files.cert("revoked", va.cert("SN-0002"))
    check = (
        "verify",
        "-crl_check",
        "-CRLfile",
        str(pem_path),
        "-CAfile",
        str(files.root),
        "-untrusted",
        str(files.issuing),
    )
    rc, out = await openssl(*check, str(good))
    assert rc == 0 and f"{good}: OK" in out, out
    rc, out = await openssl(*check, str(revoked))
    assert rc != 0 and "certificate revoked" in out, out


async def test_bad_inputs_then_openssl_still_gets_good(
    va: Va, server: tuple[ValidationAuthority, str, Files]
) -> None:
    _, url, files = server
    good = files.cert("good", va.cert("SN-0001"))
    bad_bodies = [b"\x00garbage", b"x" * 100_000, _foreign_request()]
    expected = [ocsp.OCSPResponseStatus.MALFORMED_REQUEST, ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                ocsp.OCSPResponseStatus.UNAUTHORIZED]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for body, status in zip(bad_bodies, expected, strict=True):
            async with s.post(
                url + "/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}
            ) as r:
                assert ocsp.load_der_ocsp_response(await r.read()).response_status == status
            rc, out = await ocsp_query(url, files, good)
            assert rc == 0 and f"{good}: good" in out, out


def _repeated_nonce_request(va: Va, cert: x509.Certificate) -> bytes:
    """openssl cannot be told to repeat the nonce: the same request it would send, with the nonce extension
    twice, built field by field."""
    one = ocsp.OCSPRequestBuilder().add_certificate(cert, va.issuing.certificate, hashes.SHA1())  # noqa: S303
    single = der.read_tlv(one.build().public_bytes(serialization.Encoding.DER))
    body = one.build().public_bytes(serialization.Encoding.DER)
    tbs = der.read_children(body, single)[0]
    request_list = der.read_children(body, tbs)[0]
    nonce = der.sequence(der.oid("1.3.6.1.5.5.7.48.1.2"), der.octet_string(der.octet_string(b"\x5a" * 16)))
    extensions = der.tlv(0xA2, der.sequence(nonce, nonce))
    return der.sequence(der.sequence(body[request_list.start : request_list.end], extensions))


async def test_openssl_several_certificates_and_a_repeated_nonce_get_malformed_request(
    va: Va, server: tuple[ValidationAuthority, str, Files], caplog: pytest.LogCaptureFixture
) -> None:
    authority, url, files = server
    good = files.cert("good", va.cert("SN-0001"))
    other = files.cert("other", va.cert("SN-0003"))
    repeated = files.tmp / "repeated-nonce.der"
    repeated.write_bytes(_repeated_nonce_request(va, va.cert("SN-0001")))
    caplog.set_level(logging.INFO, logger="appliance.va.ocsp")
    for _ in range(5):
        rc, out = await ocsp_query(url, files, good, "-cert", str(other))
        assert rc != 0 and "Responder Error: malformedrequest (1)" in out, out
        rc, out = await openssl(
            "ocsp", "-reqin", str(repeated), "-url", url + "/ocsp", "-issuer", str(files.issuing),
            "-CAfile", str(files.root),
        )  # fmt: skip
        assert rc != 0 and "Responder Error: malformedrequest (1)" in out, out
    responder = authority.responder
    assert responder.refused.get("several-requests") == 5 and responder.refused.get("repeated-extension") == 5
    assert responder.errors == 0
    # A stranger's bad requests are logged once per reason, never at ERROR, never once per request.
    ours = [r for r in caplog.records if r.name == "appliance.va.ocsp"]
    assert not [r for r in ours if r.levelno >= logging.ERROR]
    assert sorted(r.getMessage().split(": ")[1].split()[0] for r in ours) == [
        "repeated-extension",
        "several-requests",
    ]
    rc, out = await ocsp_query(url, files, good)
    assert rc == 0 and f"{good}: good" in out, out
