"""The CMP server's memory of confirmed transactions (docs/cmp.md "The server": a byte-identical repeated
certConf is answered pkiConf again), over the real issuance core (SoftHSM token, journal, work order WO-1) and
real HTTP on 127.0.0.1: what it does NOT answer pkiConf, and how `confirm_wait_s` and `max_pending` bound it.
The responder's clock is injected (a real clock plus an offset the test moves), so expiry needs no waiting."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.cmp import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertStatus,
    CertTemplate,
    ErrorBody,
    FailInfo,
    MacProtector,
    PKIMessage,
    PKIStatusInfo,
    build_message,
    follow_up_header,
    make_cert_request,
    parse_message,
    request_header,
)
from appliance.cmp.model import CertReqBody
from appliance.cmp.server import CONTENT_TYPE, CmpLabel, CmpResponder, CmpSettings, make_cmp_app
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from hsm.token import Token
from tests.appliance.cmp.support import issuance_state

SECRET = b"line one shared secret"
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
CONFIRM_WAIT_S = 60.0
MAX_PENDING = 2


@dataclass
class Srv:
    responder: CmpResponder
    journal: Journal
    port: int
    offset: list[float]  # seconds added to the real clock: the responder's time, moved by the test

    def state(self, cert: x509.Certificate) -> str:
        return issuance_state(self.journal, cert)


@pytest.fixture
async def srv(production_journal_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Srv]:
    shutil.copy(production_journal_template, tmp_path / "journal.sqlite")
    offset = [0.0]
    with Journal(tmp_path / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        issuing = ca_mod.load_ca(journal, "issuing")
        labels = {
            "line1": CmpLabel("line1", "fixture-1", secret=SECRET),
            # Same station, same secret and senderKID: a certConf of line1 authenticates here too, so only the
            # label can tell the two apart.
            "line1b": CmpLabel("line1b", "fixture-1", secret=SECRET, kid=b"line1"),
        }
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        settings = CmpSettings(
            max_message_bytes=16384, confirm_wait_s=CONFIRM_WAIT_S, max_pending=MAX_PENDING
        )
        async with service:
            responder = CmpResponder(service, journal, audit, labels, settings=settings,
                                     clock=lambda: time.time() + offset[0])  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                yield Srv(responder, journal, http.address[1], offset)


async def _post(srv: Srv, msg: PKIMessage, label: str = "line1") -> PKIMessage:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{srv.port}/.well-known/cmp/p/{label}", data=msg.der,
               headers={"Content-Type": CONTENT_TYPE}) as r,
    ):  # fmt: skip
        assert r.status == 200, r.status
        return parse_message(await r.read())


def _protection() -> MacProtector:
    return MacProtector(SECRET, b"line1", iterations=1000)


async def _issued(srv: Srv, serial: str) -> tuple[PKIMessage, PKIMessage, x509.Certificate]:
    """An ir answered by an ip with a certificate: (the ir, the ip, the certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    template = CertTemplate(subject=subject, public_key_der=key.public_key().public_bytes(*SPKI))
    header = request_header(sender=x509.DirectoryName(subject), recipient=x509.DirectoryName(subject))
    ir = build_message(header, BodyType.IR, CertReqBody((make_cert_request(template, pop_key=key),)),
                       protection=_protection())  # fmt: skip
    ip = await _post(srv, ir)
    assert isinstance(ip.body, CertRepBody), ip.body
    cert = ip.body.responses[0].certificate
    assert cert is not None
    return ir, ip, cert


def _cert_conf(ir: PKIMessage, ip: PKIMessage, cert: x509.Certificate) -> PKIMessage:
    """A certConf accepting `cert`; each call has a fresh senderNonce, so two calls never give the same bytes."""
    header = follow_up_header(ip.header, sender=ir.header.sender)
    body = CertConfBody((CertStatus.for_certificate(cert, 0, PKIStatusInfo.accepted()),))
    return build_message(header, BodyType.CERTCONF, body, protection=_protection())


async def _confirmed(srv: Srv, serial: str) -> tuple[PKIMessage, PKIMessage, PKIMessage, x509.Certificate]:
    """A transaction through to its pkiConf: (the ir, the ip, the certConf, the certificate)."""
    ir, ip, cert = await _issued(srv, serial)
    conf = _cert_conf(ir, ip, cert)
    assert (await _post(srv, conf)).body_type is BodyType.PKICONF
    assert srv.state(cert) == "confirmed"
    return ir, ip, conf, cert


def _refused(answer: PKIMessage) -> set[FailInfo]:
    assert isinstance(answer.body, ErrorBody), answer.body_type
    return set(answer.body.status.fail_info)


async def test_a_different_cert_conf_for_a_confirmed_transaction_is_refused(srv: Srv) -> None:
    """Only the very bytes of the certConf that confirmed are answered pkiConf again: another certConf of the
    closed transaction (the same content under a new senderNonce, or another certHash) gets badRequest."""
    ir, ip, conf, cert = await _confirmed(srv, "SN-0050")
    assert (await _post(srv, conf)).body_type is BodyType.PKICONF  # the copy, byte for byte
    assert srv.responder.stats["repeated_confirmations"] == 1

    again = _cert_conf(ir, ip, cert)
    assert again.der != conf.der
    assert _refused(await _post(srv, again)) == {FailInfo.BAD_REQUEST}
    header = follow_up_header(ip.header, sender=ir.header.sender)
    wrong = build_message(header, BodyType.CERTCONF, CertConfBody((CertStatus(b"\x00" * 32, 0),)),
                          protection=_protection())  # fmt: skip
    assert _refused(await _post(srv, wrong)) == {FailInfo.BAD_REQUEST}
    assert srv.responder.stats["repeated_confirmations"] == 1
    assert srv.state(cert) == "confirmed"


async def test_the_memory_of_a_confirmation_lasts_confirm_wait_s(srv: Srv) -> None:
    """The copy is answered pkiConf while confirm_wait_s has not passed since the pkiConf, and refused
    (badRequest, as any certConf of a closed transaction) after it."""
    _, _, conf, cert = await _confirmed(srv, "SN-0051")
    srv.offset[0] = CONFIRM_WAIT_S / 2
    assert (await _post(srv, conf)).body_type is BodyType.PKICONF
    srv.offset[0] = CONFIRM_WAIT_S + 1
    assert _refused(await _post(srv, conf)) == {FailInfo.BAD_REQUEST}
    assert srv.responder.stats["repeated_confirmations"] == 1
    assert srv.state(cert) == "confirmed"


async def test_at_most_max_pending_confirmations_are_remembered(srv: Srv) -> None:
    """With max_pending confirmed transactions remembered, the next confirmation makes it forget the oldest:
    the oldest one's copy is refused, the newest ones' copies are still answered pkiConf."""
    confs = [(await _confirmed(srv, f"SN-006{i}"))[2] for i in range(MAX_PENDING + 1)]
    assert _refused(await _post(srv, confs[0])) == {FailInfo.BAD_REQUEST}
    for conf in confs[1:]:
        assert (await _post(srv, conf)).body_type is BodyType.PKICONF
    assert srv.responder.stats["repeated_confirmations"] == MAX_PENDING


async def test_a_copy_under_another_label_is_refused(srv: Srv) -> None:
    """The memory is per label: the same bytes sent to another label (whose secret also verifies them) are not
    answered pkiConf; on its own label the copy still is."""
    _, _, conf, cert = await _confirmed(srv, "SN-0070")
    assert _refused(await _post(srv, conf, label="line1b")) == {FailInfo.BAD_REQUEST}
    assert srv.responder.stats["repeated_confirmations"] == 0
    assert (await _post(srv, conf)).body_type is BodyType.PKICONF
    assert srv.state(cert) == "confirmed"
