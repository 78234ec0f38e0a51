"""The CMP server against the real `openssl cmp` client, on 127.0.0.1, over the real issuance core (SoftHSM
token, journal, work-order policy: line L1, WO-1 for SN-0000..SN-0099 and SN-[A-Z0-9-]+)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.cmp import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertStatus,
    CertTemplate,
    ErrorBody,
    FailInfo,
    GenBody,
    InfoTypeAndValue,
    MacProtector,
    NestedBody,
    PKIMessage,
    PollReqBody,
    RevDetails,
    RpBody,
    RrBody,
    build_message,
    follow_up_header,
    make_cert_request,
    oids,
    parse_message,
    request_header,
    verify_mac,
)
from appliance.cmp.model import CertReqBody
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CONTENT_TYPE, CmpLabel, CmpResponder, CmpSettings, make_cmp_app
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from hsm.token import Token
from tests.appliance.cmp.support import issuance_state
from tests.appliance.conftest import put_on_line

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")

SECRET = b"line one shared secret"
PEM = serialization.Encoding.PEM
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


@dataclass
class Srv:
    responder: CmpResponder
    journal: Journal
    port: int
    tmp: Path
    ra_pem: Path
    station_cert: Path
    station_key: Path
    revoked: list[int]

    def state(self, cert: x509.Certificate) -> str:
        return issuance_state(self.journal, cert)


@pytest.fixture
async def srv(production_journal_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Srv]:
    shutil.copy(production_journal_template, tmp_path / "journal.sqlite")
    with Journal(tmp_path / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        creds = reg.add_station(journal, hsm_token, "cmp-signer", "lan", audit=audit, actor="alice")
        put_on_line(journal, "cmp-signer")
        assert creds.tls_cert_pem is not None and creds.tls_key_pem is not None
        (tmp_path / "st.pem").write_bytes(creds.tls_cert_pem)
        (tmp_path / "st.key").write_bytes(creds.tls_key_pem)
        issuing = ca_mod.load_ca(journal, "issuing")
        management = ca_mod.load_ca(journal, "management")
        ra = ensure_ra(hsm_token, management, tmp_path / "ra.pem")
        revoked: list[int] = []
        labels = {
            "line1": CmpLabel("line1", "fixture-1", secret=SECRET),
            "signed": CmpLabel("signed", "cmp-signer", station_signature=True),
            "upstream": CmpLabel("upstream", "fixture-1", secret=SECRET, allow_rr=True, allow_nested=True),
        }
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        async with service:
            responder = CmpResponder(service, journal, audit, labels, management_ca=management.certificate, ra=ra,
                                     settings=CmpSettings(max_message_bytes=16384),
                                     on_revoked=lambda: revoked.append(1))  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                yield Srv(responder, journal, http.address[1], tmp_path, tmp_path / "ra.pem",
                          tmp_path / "st.pem", tmp_path / "st.key", revoked)  # fmt: skip


def _key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


async def _openssl(srv: Srv, label: str, *args: str | Path) -> tuple[int, str]:
    cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{srv.port}", "-path",
           f".well-known/cmp/p/{label}", "-msg_timeout", "10", "-total_timeout", "30", *map(str, args)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _mac(srv: Srv, serial: str = "SN-0001", secret: bytes = SECRET, cmd: str = "ir") -> list[str | Path]:
    return ["-cmd", cmd, "-ref", "line1", "-secret", f"pass:{secret.decode()}", "-mac", "hmacWithSHA256",
            "-recipient", "/CN=Birthline", "-newkey", _key(srv.tmp / "dev.key"), "-subject", f"/serialNumber={serial}",
            "-certout", srv.tmp / "out.pem"]  # fmt: skip


def _out(srv: Srv) -> x509.Certificate:
    return x509.load_pem_x509_certificate((srv.tmp / "out.pem").read_bytes())


async def _still_up(srv: Srv) -> None:
    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0099"), "-implicit_confirm")
    assert rc == 0, said


async def test_ir_with_mac_then_cert_conf(srv: Srv) -> None:
    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0001"))
    assert rc == 0, said
    cert = _out(srv)
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0001"
    assert srv.state(cert) == "confirmed"
    assert cert.public_key().public_bytes(*SPKI) == x509.load_pem_x509_certificate(
        cert.public_bytes(PEM)).public_key().public_bytes(*SPKI)  # fmt: skip
    assert not srv.responder.pending


async def test_implicit_confirm_is_granted_and_confirms(srv: Srv) -> None:
    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0002"), "-implicit_confirm")
    assert rc == 0, said
    assert srv.state(_out(srv)) == "confirmed"
    assert srv.responder.stats["confirmed"] == 1 and not srv.responder.pending


async def test_cr_and_p10cr_with_mac(srv: Srv) -> None:
    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0003", cmd="cr"))
    assert rc == 0, said
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0004")])).sign(key, hashes.SHA256())  # fmt: skip
    (srv.tmp / "dev.csr").write_bytes(csr.public_bytes(PEM))
    rc, said = await _openssl(srv, "line1", "-cmd", "p10cr", "-csr", srv.tmp / "dev.csr", "-ref", "line1",
                              "-secret", f"pass:{SECRET.decode()}", "-mac", "hmacWithSHA256", "-recipient", "/CN=x",
                              "-certout", srv.tmp / "out.pem")  # fmt: skip
    assert rc == 0, said
    assert _out(srv).public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
    assert srv.state(_out(srv)) == "confirmed"


async def test_ir_with_signature_by_a_station_certificate(srv: Srv) -> None:
    rc, said = await _openssl(srv, "signed", "-cmd", "ir", "-cert", srv.station_cert, "-key", srv.station_key,
                              "-srvcert", srv.ra_pem, "-newkey", _key(srv.tmp / "dev.key"),
                              "-subject", "/serialNumber=SN-0005", "-certout", srv.tmp / "out.pem")  # fmt: skip
    assert rc == 0, said
    assert srv.state(_out(srv)) == "confirmed"
    # the same credential on a label that acts as another station is not trusted
    rc, said = await _openssl(srv, "line1", "-cmd", "ir", "-cert", srv.station_cert, "-key", srv.station_key,
                              "-srvcert", srv.ra_pem, "-newkey", _key(srv.tmp / "dev.key"),
                              "-subject", "/serialNumber=SN-0006", "-certout", srv.tmp / "out.pem")  # fmt: skip
    assert rc != 0


async def test_rejections(srv: Srv) -> None:
    rc, said = await _openssl(srv, "line1", *_mac(srv, "XX-1"))
    assert rc != 0 and "notAuthorized" in said, said
    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0010", secret=b"not the secret"))
    assert rc != 0
    rc, said = await _openssl(srv, "line1", "-cmd", "ir", "-ref", "line1", "-secret", f"pass:{SECRET.decode()}",
                              "-mac", "hmacWithSHA256", "-recipient", "/CN=x", "-newkey", _key(srv.tmp / "d.key"),
                              "-subject", "/CN=no serial", "-certout", srv.tmp / "out.pem")  # fmt: skip
    assert rc != 0 and "badCertTemplate" in said, said
    # Only the wrong MAC is a message-level refusal (an error message); the two refused requests were answered
    # with an ip carrying status rejection (RFC 9483 3.6).
    assert srv.responder.stats["errors"] == 1
    await _still_up(srv)


def _ir(serial: str, *, kid: bytes = b"line1", secret: bytes = SECRET, bad_pop: bool = False) -> PKIMessage:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    template = CertTemplate(subject=subject, public_key_der=key.public_key().public_bytes(*SPKI))
    pop_key = ec.generate_private_key(ec.SECP256R1()) if bad_pop else key
    header = request_header(sender=x509.DirectoryName(subject), recipient=x509.DirectoryName(subject))
    body = CertReqBody((make_cert_request(template, pop_key=pop_key),))
    return build_message(header, BodyType.IR, body, protection=MacProtector(secret, kid, iterations=1000))


async def _post(srv: Srv, data: bytes, label: str = "line1", ctype: str = CONTENT_TYPE) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{srv.port}/.well-known/cmp/p/{label}",
            data=data,
            headers={"Content-Type": ctype},
        ) as r,
    ):
        return r.status, await r.read()


async def test_bad_pop_wrong_content_type_oversize_and_garbage(srv: Srv) -> None:
    status, body = await _post(srv, _ir("SN-0020", bad_pop=True).der)
    answer = parse_message(body)
    assert status == 200 and isinstance(answer.body, CertRepBody) and answer.body_type is BodyType.IP
    assert answer.body.responses[0].status.fail_info == {FailInfo.BAD_POP}
    verify_mac(answer, SECRET)
    assert (await _post(srv, _ir("SN-0021").der, ctype="application/octet-stream"))[0] == 415
    assert (await _post(srv, b"\x30" + b"\x00" * 20000))[0] == 413
    status, body = await _post(srv, b"\x30\x03\x02\x01")
    assert status == 400 and isinstance(parse_message(body).body, ErrorBody)
    assert (await _post(srv, _ir("SN-0021").der, label="nope"))[0] == 404
    await _still_up(srv)


async def test_cert_conf_with_a_wrong_hash_is_refused(srv: Srv) -> None:
    ir = _ir("SN-0030")
    _, body = await _post(srv, ir.der)
    ip = parse_message(body)
    assert isinstance(ip.body, CertRepBody) and ip.body.responses[0].certificate is not None
    cert = ip.body.responses[0].certificate
    header = follow_up_header(ip.header, sender=ir.header.sender)
    bad = CertConfBody((CertStatus(b"\x00" * 32, 0),))
    _, body = await _post(
        srv, build_message(header, BodyType.CERTCONF, bad, protection=MacProtector(SECRET, b"line1")).der
    )
    err = parse_message(body)
    assert isinstance(err.body, ErrorBody) and err.body.status.fail_info == {FailInfo.BAD_CERT_ID}
    assert srv.state(cert) == "issued"


async def test_nested_and_rr_need_signatures(srv: Srv) -> None:
    """MAC protection does not carry a nested message (RFC 9483 5.2.2) or a revocation (4.2), even on a label
    that allows both; the signed forms are tested in tests/appliance/cmp/conformance/."""
    inner = _ir("SN-0040", kid=b"upstream")
    header = request_header(sender=x509.DirectoryName(x509.Name([])), recipient=x509.DirectoryName(x509.Name([])),
                            sender_kid=b"upstream")  # fmt: skip
    nested = build_message(header, BodyType.NESTED, NestedBody.of(inner),
                           protection=MacProtector(SECRET, b"upstream", iterations=1000))  # fmt: skip
    refused = parse_message((await _post(srv, nested.der, label="upstream"))[1])
    assert isinstance(refused.body, ErrorBody) and refused.body.status.fail_info == {
        FailInfo.BAD_MESSAGE_CHECK
    }
    assert srv.journal.rows("device_serial='SN-0040'") == []

    rc, said = await _openssl(srv, "line1", *_mac(srv, "SN-0050"), "-implicit_confirm")
    assert rc == 0, said
    cert = _out(srv)
    header = request_header(
        sender=x509.DirectoryName(x509.Name([])), recipient=x509.DirectoryName(cert.issuer)
    )
    body = RrBody((RevDetails(cert.issuer, cert.serial_number, x509.ReasonFlags.key_compromise),))
    rr = build_message(header, BodyType.RR, body, protection=MacProtector(SECRET, b"upstream"))
    rp = parse_message((await _post(srv, rr.der, label="upstream"))[1])
    assert isinstance(rp.body, RpBody) and rp.body.statuses[0].fail_info == {FailInfo.WRONG_INTEGRITY}
    assert srv.revoked == []
    # openssl cmp revokes the certificate with its own key (RFC 9483 4.2)
    rc, said = await _openssl(srv, "line1", "-cmd", "rr", "-oldcert", srv.tmp / "out.pem", "-cert",
                              srv.tmp / "out.pem", "-key", srv.tmp / "dev.key", "-srvcert", srv.ra_pem,
                              "-revreason", "1")  # fmt: skip
    assert rc == 0, said
    assert srv.revoked == [1]
    row = srv.journal.call(lambda: srv.journal.conn.execute(
        "SELECT reason, actor, source FROM revocation WHERE cert_serial=?", (format(cert.serial_number, "x"),)
    ).fetchone())  # fmt: skip
    assert tuple(row) == ("keyCompromise", "cmp:line1", "cmp")


async def test_genm_ca_certs_is_answered_with_the_issuing_chain(srv: Srv) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    header = request_header(sender=x509.DirectoryName(subject), recipient=x509.DirectoryName(subject))
    genm = build_message(header, BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),)),
                         protection=MacProtector(SECRET, b"line1", iterations=1000))  # fmt: skip
    status, body = await _post(srv, genm.der)
    genp = parse_message(body)
    verify_mac(genp, SECRET)
    assert status == 200 and genp.body_type is BodyType.GENP and isinstance(genp.body, GenBody)
    assert genp.body.ca_certs() == srv.responder.chain
    # Another info type is not served.
    other = build_message(header, BodyType.GENM, GenBody((InfoTypeAndValue("1.3.6.1.5.5.7.4.4"),)),
                          protection=MacProtector(SECRET, b"line1", iterations=1000))  # fmt: skip
    refused = parse_message((await _post(srv, other.der))[1])
    assert isinstance(refused.body, ErrorBody) and refused.body.status.fail_info == {FailInfo.BAD_REQUEST}
    # openssl cmp sends the same genm and accepts the genp.
    rc, said = await _openssl(srv, "line1", "-cmd", "genm", "-infotype", "caCerts", "-ref", "line1",
                              "-secret", f"pass:{SECRET.decode()}", "-mac", "hmacWithSHA256",
                              "-recipient", "/CN=Birthline")  # fmt: skip
    assert rc == 0, said


async def test_poll_req_outside_a_waiting_transaction_is_refused(srv: Srv) -> None:
    ir = _ir("SN-0040")
    ip = parse_message((await _post(srv, ir.der))[1])
    assert isinstance(ip.body, CertRepBody) and ip.body.responses[0].certificate is not None
    # The transaction awaits certConf, not pollReq (locally issued certificates never wait).
    poll = build_message(follow_up_header(ip.header, sender=ir.header.sender), BodyType.POLLREQ,
                         PollReqBody((0,)), protection=MacProtector(SECRET, b"line1", iterations=1000))  # fmt: skip
    answer = parse_message((await _post(srv, poll.der))[1])
    assert isinstance(answer.body, ErrorBody) and answer.body.status.fail_info == {FailInfo.BAD_REQUEST}
    assert "does not await a pollReq" in " ".join(answer.body.status.status_string)
    # A pollReq for no transaction at all.
    stranger = build_message(request_header(sender=ir.header.sender, recipient=ir.header.recipient),
                             BodyType.POLLREQ, PollReqBody((0,)),
                             protection=MacProtector(SECRET, b"line1", iterations=1000))  # fmt: skip
    answer = parse_message((await _post(srv, stranger.der))[1])
    assert isinstance(answer.body, ErrorBody) and answer.body.status.fail_info == {FailInfo.BAD_REQUEST}
