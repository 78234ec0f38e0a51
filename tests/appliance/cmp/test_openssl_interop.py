"""Interop with the real `openssl cmp` (OpenSSL 3.0) client.

1. openssl's client talks to a test-only HTTP harness on 127.0.0.1 whose every answer comes from this package:
   we parse and verify openssl's ir / cr / p10cr / certConf / pollReq (MAC and signature), and openssl accepts
   our ip / cp / pollRep / pkiConf / error (it exits 0 and writes the certificate we issued).
2. openssl's built-in mock server (-use_mock_srv, no network) produces ip, pollRep, pkiConf and error
   messages, captured with -rspout, which we parse and verify.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertResponse,
    CmpError,
    ErrorBody,
    FailInfo,
    MacPolicy,
    MacProtector,
    P10crBody,
    PkiConfBody,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    PollRepBody,
    PollRepEntry,
    PollReqBody,
    PopKind,
    ProtectionKind,
    Protector,
    SignatureProtector,
    TransactionState,
    build_message,
    check_request,
    parse_message,
    response_header,
    verify_mac,
    verify_protection,
)
from hsm.algorithms import KeyAlgorithm
from hsm.token import Token
from tests.appliance.cmp.support import KID, SECRET, MiniCa, name

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")

PEM = serialization.Encoding.PEM


@dataclass
class Harness:
    """A CMP responder built from this package, for tests only (the real server is a later item)."""

    ca: MiniCa
    signer: SignatureProtector | None = None
    polls: int = 0
    refuse_serial: str = "REFUSED"
    received: list[PKIMessage] = field(default_factory=list)
    errors: list[CmpError] = field(default_factory=list)
    issued: dict[bytes, x509.Certificate] = field(default_factory=dict)
    states: dict[bytes, TransactionState] = field(default_factory=dict)
    pending: dict[bytes, tuple[BodyType, CertRepBody, int]] = field(default_factory=dict)

    def handle(self, data: bytes) -> bytes:
        msg = parse_message(data)
        self.received.append(msg)
        protector: Protector = MacProtector(SECRET, b"ca", iterations=500)
        try:
            verified = verify_protection(msg, secret_for={KID: SECRET}.get)
            if verified.kind is ProtectionKind.SIGNATURE:
                assert verified.signer is not None
                verified.signer.verify_directly_issued_by(self.ca.cert)
                assert self.signer is not None
                protector = self.signer
            tid = msg.header.transaction_id or b""
            check_request(
                msg, self.states.get(tid) if msg.body_type in (BodyType.CERTCONF, BodyType.POLLREQ) else None
            )
            body_type, body, implicit = self._answer(msg)
        except CmpError as exc:
            self.errors.append(exc)
            body_type, body, implicit = BodyType.ERROR, ErrorBody(PKIStatusInfo.from_error(exc)), False
        sender = x509.DirectoryName(self.signer.certificate.subject if self.signer else self.ca.name)
        header = response_header(msg.header, sender=sender, implicit_confirm=implicit)
        answer = build_message(header, body_type, body, protection=protector)
        assert header.transaction_id is not None and answer.header.sender_nonce is not None
        self.states[header.transaction_id] = TransactionState(
            header.transaction_id, answer.header.sender_nonce
        )
        return answer.der

    def _answer(self, msg: PKIMessage) -> tuple[BodyType, CertRepBody | PkiConfBody | PollRepBody, bool]:
        tid = msg.header.transaction_id or b""
        if isinstance(msg.body, CertReqBody | P10crBody):
            if isinstance(msg.body, P10crBody):
                assert msg.body.csr.is_signature_valid
                subject, key, req_id = msg.body.csr.subject, msg.body.csr.public_key(), 0
            else:
                (req,) = msg.body.requests
                req.verify_pop()
                assert req.template.subject is not None
                subject, key, req_id = req.template.subject, req.template.public_key(), req.cert_req_id
            serials = subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
            if serials and serials[0].value == self.refuse_serial:
                raise CmpError("serial outside the work order", fail_info=FailInfo.NOT_AUTHORIZED)
            cert = self.ca.issue(subject, key)
            self.issued[tid] = cert
            rep_type = BodyType.IP if msg.body_type is BodyType.IR else BodyType.CP
            body = CertRepBody((CertResponse(req_id, PKIStatusInfo.accepted(), cert),),
                               (self.ca.cert,) if rep_type is BodyType.IP else ())  # fmt: skip
            if self.polls:
                self.pending[tid] = (rep_type, body, self.polls)
                waiting = CertRepBody((CertResponse(req_id, PKIStatusInfo.waiting("signing")),))
                return rep_type, waiting, False
            return rep_type, body, msg.header.implicit_confirm
        if isinstance(msg.body, PollReqBody):
            rep_type, body, left = self.pending[tid]
            if left > 1:
                self.pending[tid] = (rep_type, body, left - 1)
                return BodyType.POLLREP, PollRepBody((PollRepEntry(msg.body.cert_req_ids[0], 0),)), False
            del self.pending[tid]
            return rep_type, body, False
        if isinstance(msg.body, CertConfBody):
            (status,) = msg.body.statuses
            if not status.matches(self.issued[tid]):
                raise CmpError("certHash does not match", fail_info=FailInfo.BAD_CERT_ID)
            return BodyType.PKICONF, PkiConfBody(), False
        raise CmpError(f"{msg.body_type.asn1_name} not handled", fail_info=FailInfo.BAD_REQUEST)


@pytest.fixture
def harness() -> Iterator[tuple[Harness, int]]:
    h = Harness(MiniCa())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            answer = h.handle(data)
            self.send_response(200)
            self.send_header("Content-Type", "application/pkixcmp")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield h, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(PEM))
    return path


def _openssl_cmp(port: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{port}", "-path", "pkix/",
           "-msg_timeout", "10", "-total_timeout", "30", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _mac_args(
    tmp_path: Path, subject: str = "/serialNumber=SN-1", secret: bytes = SECRET
) -> list[str | Path]:
    dev = _write_key(tmp_path / "dev.key", ec.generate_private_key(ec.SECP256R1()))
    return ["-ref", KID.decode(), "-secret", f"pass:{secret.decode()}", "-mac", "hmacWithSHA256",
            "-recipient", "/CN=CMP Test CA", "-newkey", dev, "-subject", subject,
            "-certout", tmp_path / "out.pem"]  # fmt: skip


def _out(tmp_path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((tmp_path / "out.pem").read_bytes())


def test_ir_with_mac_then_cert_conf(harness: tuple[Harness, int], tmp_path: Path) -> None:
    h, port = harness
    req = tmp_path / "ir.der"
    result = _openssl_cmp(port, "-cmd", "ir", *_mac_args(tmp_path), "-reqout", f"{req},{tmp_path / 'cc.der'}")
    assert result.returncode == 0, result.stderr
    assert [m.body_type for m in h.received] == [BodyType.IR, BodyType.CERTCONF]
    ir, conf = h.received
    assert ir.der == req.read_bytes() and conf.der == (tmp_path / "cc.der").read_bytes()
    assert ir.header.protection_alg is not None and ir.header.sender_kid == KID
    assert ir.body.requests[0].pop is PopKind.SIGNATURE  # type: ignore[union-attr]
    verify_mac(ir, SECRET)
    verify_mac(conf, SECRET)
    assert _out(tmp_path) == h.issued[ir.header.transaction_id or b""]
    assert not h.errors


def test_ir_with_implicit_confirm(harness: tuple[Harness, int], tmp_path: Path) -> None:
    h, port = harness
    result = _openssl_cmp(port, "-cmd", "ir", *_mac_args(tmp_path), "-implicit_confirm")
    assert result.returncode == 0, result.stderr
    assert [m.body_type for m in h.received] == [BodyType.IR]
    assert h.received[0].header.implicit_confirm


def test_p10cr_with_mac(harness: tuple[Harness, int], tmp_path: Path) -> None:
    h, port = harness
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(name("p10 device")).sign(key, hashes.SHA256())
    (tmp_path / "dev.csr").write_bytes(csr.public_bytes(PEM))
    args = [a for a in _mac_args(tmp_path) if a not in ("-newkey", "-subject")]
    args = [*args[: args.index("-recipient") + 2], "-certout", tmp_path / "out.pem"]
    result = _openssl_cmp(port, "-cmd", "p10cr", "-csr", tmp_path / "dev.csr", *args)
    assert result.returncode == 0, result.stderr
    p10 = h.received[0]
    assert isinstance(p10.body, P10crBody) and p10.body.csr == csr
    assert _out(tmp_path).public_key() == key.public_key()


@pytest.fixture
def hsm_signer(hsm_token: Token) -> Iterator[CertificateIssuerPrivateKeyTypes]:
    label = "cmp-interop-server"
    yield (
        hsm_token.get_key(label)
        if hsm_token.has_key(label)
        else hsm_token.generate_key(label, KeyAlgorithm.EC_P256)
    )


@pytest.mark.parametrize("command", ["ir", "cr"])
def test_signature_protected_both_ways_with_an_hsm_server_key(
    harness: tuple[Harness, int], tmp_path: Path, hsm_signer: CertificateIssuerPrivateKeyTypes, command: str
) -> None:
    h, port = harness
    server_cert = h.ca.issue(name("Birthline RA"), hsm_signer.public_key())
    h.signer = SignatureProtector(hsm_signer, server_cert, (h.ca.cert,))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = h.ca.issue(name("station-7"), client_key.public_key())
    dev = _write_key(tmp_path / "dev.key", ec.generate_private_key(ec.SECP256R1()))
    result = _openssl_cmp(
        port, "-cmd", command, "-cert", _write_cert(tmp_path / "cli.pem", client_cert),
        "-key", _write_key(tmp_path / "cli.key", client_key), "-srvcert", _write_cert(tmp_path / "srv.pem", server_cert),
        "-newkey", dev, "-subject", "/serialNumber=SN-2", "-certout", tmp_path / "out.pem",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = h.received[0]
    assert first.body_type is BodyType(0 if command == "ir" else 2)
    assert first.extra_certs[0] == client_cert
    assert [m.body_type for m in h.received][1:] == [BodyType.CERTCONF]
    assert _out(tmp_path).subject.rfc4514_string() == "2.5.4.5=SN-2"


def test_polling_with_waiting_and_poll_rep(harness: tuple[Harness, int], tmp_path: Path) -> None:
    h, port = harness
    h.polls = 2
    result = _openssl_cmp(port, "-cmd", "ir", *_mac_args(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [m.body_type for m in h.received] == [
        BodyType.IR,
        BodyType.POLLREQ,
        BodyType.POLLREQ,
        BodyType.CERTCONF,
    ]


def test_rejections_reach_openssl_as_cmp_errors(harness: tuple[Harness, int], tmp_path: Path) -> None:
    h, port = harness
    refused = _openssl_cmp(port, "-cmd", "ir", *_mac_args(tmp_path, "/serialNumber=REFUSED"))
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "PKIFailureInfo: notAuthorized" in said and "serial outside the work order" in said, said
    wrong = _openssl_cmp(port, "-cmd", "ir", *_mac_args(tmp_path, secret=b"not the secret"))
    assert wrong.returncode != 0
    assert [e.fail_info for e in h.errors] == [FailInfo.NOT_AUTHORIZED, FailInfo.BAD_MESSAGE_CHECK]


def test_messages_from_the_openssl_mock_server(tmp_path: Path) -> None:
    """openssl's own mock server (in-process, no socket) answers; we parse and verify what both sides sent."""
    ca = MiniCa()
    dev_key = ec.generate_private_key(ec.SECP256R1())
    dev = _write_key(tmp_path / "dev.key", dev_key)
    rsp_cert = _write_cert(tmp_path / "rsp.pem", ca.issue(name("mock device"), dev_key.public_key()))
    base = ["openssl", "cmp", "-config", "", "-use_mock_srv", "-srv_ref", "srv", "-srv_secret", f"pass:{SECRET.decode()}",
            "-rsp_cert", str(rsp_cert), "-ref", KID.decode(), "-secret", f"pass:{SECRET.decode()}",
            "-mac", "hmacWithSHA256", "-recipient", "/CN=x", "-newkey", str(dev), "-subject", "/serialNumber=1",
            "-certout", str(tmp_path / "out.pem")]  # fmt: skip
    legacy = MacPolicy(allow_sha1=True)  # the mock server MACs with its default, HMAC-SHA1

    def run(*extra: str, n_req: int, n_rsp: int) -> tuple[list[PKIMessage], list[PKIMessage]]:
        reqs = [tmp_path / f"req{i}.der" for i in range(n_req)]
        rsps = [tmp_path / f"rsp{i}.der" for i in range(n_rsp)]
        subprocess.run([*base, *extra, "-reqout", ",".join(map(str, reqs)), "-rspout", ",".join(map(str, rsps))],
                       capture_output=True, timeout=60, check=False)  # fmt: skip
        return [parse_message(p.read_bytes()) for p in reqs], [parse_message(p.read_bytes()) for p in rsps]

    reqs, rsps = run("-cmd", "ir", "-poll_count", "1", "-check_after", "0", n_req=3, n_rsp=3)
    assert [m.body_type for m in reqs] == [BodyType.IR, BodyType.POLLREQ, BodyType.CERTCONF]
    assert [m.body_type for m in rsps] == [
        BodyType.IP,
        BodyType.IP,
        BodyType.PKICONF,
    ]  # waiting, then the cert
    for m in reqs:
        verify_mac(m, SECRET)
    for m in rsps:
        verify_mac(m, SECRET, policy=legacy)
        with pytest.raises(CmpError):
            verify_mac(m, SECRET)  # HMAC-SHA1 is refused by the default policy
    waiting = rsps[0].body
    assert isinstance(waiting, CertRepBody) and waiting.responses[0].status.status is PKIStatus.WAITING

    _reqs, rsps = run("-cmd", "cr", "-send_error", n_req=1, n_rsp=1)
    err = rsps[0].body
    assert isinstance(err, ErrorBody) and err.status.status is PKIStatus.REJECTION
