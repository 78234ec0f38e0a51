"""The SCEP server of a real daemon over loopback HTTP, driven by the project's small client
(appliance/scep/client.py) where a test needs to send what the real clients never would: every operation, every
refusal and its answer, and the HTTP bounds."""

from __future__ import annotations

import base64
import dataclasses
import os
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from appliance.audit.log import AuditLog
from appliance.config import ScepLabelSection
from appliance.production import store
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.scep import challenges, client, cms
from appliance.scep.algorithms import AES128, DES, SHA1, SHA256
from appliance.scep.errors import FailInfo
from appliance.scep.oids import MessageType, PkiStatus
from hsm.softhsm import SoftHsmToken
from tests.appliance.scep.support import SUPERVISOR, Served, served

LABELS = {
    "line1": ScepLabelSection(station="fixture-1"),
    "bycn": ScepLabelSection(station="fixture-1", device_serial_from="commonName"),
    "legacy": ScepLabelSection(station="fixture-1", legacy_algorithms=("des", "sha1")),
    "norenew": ScepLabelSection(station="fixture-1", renewal=False),
}


@dataclasses.dataclass
class Device:
    key: rsa.RSAPrivateKey
    signer: x509.Certificate

    @classmethod
    def new(cls) -> Device:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key, client.self_signed(key, "device"))


def make_csr(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, challenge: str | None = None,
             serial: str | None = None, cn: str | None = None) -> bytes:  # fmt: skip
    attrs = []
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def post(s: Served, data: bytes, label: str = "line1") -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{s.port}/scep/{label}?operation=PKIOperation", data=data,
        headers={"Content-Type": "application/x-pki-message"},
    ) as r:  # fmt: skip
        return r.status, await r.read(), r.content_type


async def enrol(
    s: Served, dev: Device, csr: bytes, *, label: str = "line1", tid: str | None = None, signer: x509.Certificate
    | None = None, key: rsa.RSAPrivateKey | None = None, message_type: int = MessageType.PKCS_REQ, **kw: object,
) -> client.Reply:  # fmt: skip
    tid = tid or os.urandom(8).hex()
    nonce = os.urandom(16)
    signer, key = signer or dev.signer, key or dev.key
    data = client.request(message_type, csr, signer=signer, key=key, ra=s.ra_cert, transaction_id=tid,
                          sender_nonce=nonce, **kw)  # type: ignore[arg-type]  # fmt: skip
    status, body, _ = await post(s, data, label)
    assert status == 200, body
    return client.read_reply(
        body, ra=s.ra_cert, signer=signer, key=key, transaction_id=tid, sender_nonce=nonce
    )


@pytest.fixture
async def scep(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with served(softhsm_token, production_journal_template, tmp_path, LABELS) as s:
        yield s


async def test_get_operations(scep: Served) -> None:
    base = f"http://127.0.0.1:{scep.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/scep/line1?operation=GetCACaps") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            assert (await r.text()).split() == ["AES", "POSTPKIOperation", "SCEPStandard", "SHA-256", "SHA-512",
                                                "Renewal"]  # fmt: skip
        async with http.get(f"{base}/scep/legacy?operation=GetCACaps") as r:
            assert "SHA-1" in (await r.text()).split()
        async with http.get(f"{base}/scep/line1/pkiclient.exe?operation=GetCACert&message=0") as r:
            assert r.status == 200 and r.content_type == "application/x-x509-ca-ra-cert"
            certs = pkcs7.load_der_pkcs7_certificates(await r.read())
        assert scep.ra_cert in certs and len(certs) == 2
        management = next(c for c in certs if c != scep.ra_cert)
        scep.ra_cert.verify_directly_issued_by(management)
        usage = scep.ra_cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_encipherment and usage.digital_signature
        for path, status in (("/scep/nope?operation=GetCACaps", 404), ("/scep?operation=GetCACaps", 404),
                             ("/scep/line1?operation=GetNextCACert", 400), ("/scep/line1", 400),
                             ("/scep/line1?operation=PKIOperation&message=%%%", 400),
                             ("/scep/line1?operation=PKIOperation&message=AAAA", 400)):  # fmt: skip
            async with http.get(base + path) as r:
                assert r.status == status, path


async def test_device_challenge_enrols_once_and_a_retry_gets_the_same_certificate(scep: Served) -> None:
    secret = scep.challenge(device_serial="SN-0010")
    dev = Device.new()
    csr = make_csr(dev.key, challenge=secret, cn="anything the client likes")
    first = await enrol(scep, dev, csr, tid="tx-10")
    assert first.status is PkiStatus.SUCCESS and len(first.certificates) == 1
    cert = first.certificates[0]
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0010"
    again = await enrol(scep, dev, csr, tid="tx-10")  # the client lost the answer: the same request again
    assert again.status is PkiStatus.SUCCESS and again.certificates[0] == cert
    (row,) = scep.daemon.journal.rows("device_serial=?", ("SN-0010",))
    assert row.state == "confirmed" and row.cert_der == cert.public_bytes(serialization.Encoding.DER)
    # One-time: another key with the same challenge is refused, and says why.
    other = Device.new()
    refused = await enrol(scep, other, make_csr(other.key, challenge=secret))
    assert refused.status is PkiStatus.FAILURE and refused.fail_info == FailInfo.BAD_REQUEST
    assert refused.fail_info_text is not None and "used already, by another key" in refused.fail_info_text
    # CertPoll for the issued request answers it again; for an unknown transaction, badCertId.
    poll = client.issuer_and_subject(scep.ra_cert.subject, dev.signer.subject)
    assert (await enrol(scep, dev, poll, tid="tx-10", message_type=MessageType.CERT_POLL)).certificates == (
        cert,
    )
    unknown = await enrol(scep, dev, poll, tid="tx-none", message_type=MessageType.CERT_POLL)
    assert unknown.status is PkiStatus.FAILURE and unknown.fail_info == FailInfo.BAD_CERT_ID
    stranger = await enrol(scep, other, poll, tid="tx-10", message_type=MessageType.CERT_POLL)
    assert stranger.status is PkiStatus.FAILURE and stranger.fail_info == FailInfo.BAD_CERT_ID


async def test_every_challenge_refusal_says_why(scep: Served) -> None:
    journal = scep.daemon.journal
    dev = Device.new()

    async def text_of(csr: bytes, label: str = "line1") -> str:
        reply = await enrol(scep, dev, csr, label=label)
        assert reply.status is PkiStatus.FAILURE, reply
        assert reply.fail_info_text is not None
        return reply.fail_info_text

    assert "needs a challengePassword" in await text_of(make_csr(dev.key))
    assert "not one of this SCEP label's" in await text_of(make_csr(dev.key, challenge="0" * 32))
    other_label = scep.challenge("bycn", device_serial="SN-0011")
    assert "not one of this SCEP label's" in await text_of(make_csr(dev.key, challenge=other_label))
    revoked, secret = challenges.add(journal, AuditLog(journal), SUPERVISOR, "line1", device_serial="SN-0012")
    challenges.revoke(journal, AuditLog(journal), SUPERVISOR, revoked.id)
    assert "was revoked" in await text_of(make_csr(dev.key, challenge=secret))
    _, expired = challenges.add(journal, AuditLog(journal), SUPERVISOR, "line1", device_serial="SN-0013", valid_s=60,
                                clock=lambda: 0.0)  # fmt: skip
    assert "has expired" in await text_of(make_csr(dev.key, challenge=expired))
    wrong_device = scep.challenge(device_serial="SN-0014")
    assert "is for device 'SN-0014'" in await text_of(
        make_csr(dev.key, challenge=wrong_device, serial="SN-0015")
    )
    outside = scep.challenge(device_serial="NOT-ON-THE-ORDER")
    assert "allowlist" in await text_of(make_csr(dev.key, challenge=outside))  # the core's refusal, passed on
    order = scep.challenge(work_order="WO-1")
    assert "must name the device" in await text_of(make_csr(dev.key, challenge=order))
    # Refusals of this layer are audited (within the per-label budget); nothing was issued.
    events = journal.call(lambda: journal.conn.execute(
        "SELECT count(*) FROM audit WHERE event = 'scep.refused'").fetchone()[0])  # fmt: skip
    assert events >= 7
    assert not journal.rows("device_serial IN ('SN-0012','SN-0013','SN-0014','SN-0015')")


async def test_work_order_challenges_grant_from_their_own_work_order_only(scep: Served) -> None:
    journal = scep.daemon.journal
    store.add_work_order(journal, AuditLog(journal), SUPERVISOR, WorkOrderSpec(
        "WO-2", "sensor", 5, ("L1",), ranges=(SerialRange("OTHER-", 1, 5, 2),)), activate=True)  # fmt: skip
    order2 = scep.challenge(work_order="WO-2")
    dev = Device.new()
    # SN-0020 is WO-1's: a WO-2 challenge does not reach it, though WO-1 is active on the same line.
    reply = await enrol(scep, dev, make_csr(dev.key, challenge=order2, serial="SN-0020"))
    assert reply.status is PkiStatus.FAILURE and reply.fail_info_text is not None
    assert "allowlist of work order(s) WO-2" in reply.fail_info_text
    reply = await enrol(scep, dev, make_csr(dev.key, challenge=order2, serial="OTHER-01"))
    assert reply.status is PkiStatus.SUCCESS
    (row,) = journal.rows("device_serial=?", ("OTHER-01",))
    unit = journal.call(lambda: journal.conn.execute(
        "SELECT work_order FROM work_order_unit WHERE issuance_id=?", (row.id,)).fetchone()[0])  # fmt: skip
    assert unit == "WO-2"
    # The same challenge serves the next device of the order; on a commonName label the CN names it.
    dev2 = Device.new()
    assert (
        await enrol(scep, dev2, make_csr(dev2.key, challenge=order2, serial="OTHER-02"))
    ).status is PkiStatus.SUCCESS
    cn_challenge = scep.challenge("bycn", work_order="WO-2")
    dev3 = Device.new()
    reply = await enrol(scep, dev3, make_csr(dev3.key, challenge=cn_challenge, cn="OTHER-03"), label="bycn")
    assert reply.status is PkiStatus.SUCCESS
    assert reply.certificates[0].subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "OTHER-03"


async def test_requests_that_fail_their_checks(scep: Served) -> None:
    dev = Device.new()
    secret = scep.challenge(device_serial="SN-0030")
    csr = make_csr(dev.key, challenge=secret)
    # Legacy algorithms on a label that does not accept them: badAlg, saying why.
    for kw in ({"cipher": DES}, {"digest": SHA1}):
        reply = await enrol(scep, dev, csr, **kw)
        assert reply.status is PkiStatus.FAILURE and reply.fail_info == FailInfo.BAD_ALG, kw
        assert reply.fail_info_text is not None and "refused on this label" in reply.fail_info_text
    # ... accepted where configured, with the answer in the request's own cipher.
    legacy_secret = scep.challenge("legacy", device_serial="SN-0031")
    legacy_dev = Device.new()
    reply = await enrol(scep, legacy_dev, make_csr(legacy_dev.key, challenge=legacy_secret), label="legacy",
                        cipher=DES, digest=SHA1)  # fmt: skip
    assert reply.status is PkiStatus.SUCCESS
    # A PKCSReq signed by another key than its CSR's, from a certificate this appliance never issued.
    stranger = Device.new()
    reply = await enrol(scep, dev, csr, signer=stranger.signer, key=stranger.key)
    assert reply.status is PkiStatus.FAILURE and reply.fail_info == FailInfo.BAD_MESSAGE_CHECK
    # An EC signer: the answer could not be encrypted to it.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_signer = client.self_signed(ec_key)
    data = client.request(19, make_csr(ec_key, challenge=secret), signer=ec_signer, key=ec_key, ra=scep.ra_cert,
                          transaction_id="ec")  # fmt: skip
    status, body, _ = await post(scep, data)
    assert status == 200
    reply = client.read_reply(body, ra=scep.ra_cert, signer=ec_signer, key=ec_key, transaction_id="ec")
    assert reply.status is PkiStatus.FAILURE and reply.fail_info == FailInfo.BAD_ALG
    # Messages this server does not answer.
    for kind in (MessageType.GET_CERT, MessageType.GET_CRL, 99):
        reply = await enrol(scep, dev, csr, message_type=kind)
        assert reply.status is PkiStatus.FAILURE and reply.fail_info == FailInfo.BAD_REQUEST
    assert not scep.daemon.journal.rows("device_serial=?", ("SN-0030",))


async def test_no_padding_oracle(scep: Served) -> None:
    """A key transport whose PKCS #1 padding is wrong and one whose padding is right but whose content key is not
    the envelope's get the same answer: failInfo and text."""
    dev = Device.new()
    csr = make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0040"))
    public = scep.ra_cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    n = public.public_numbers().n
    good = client.request(19, csr, signer=dev.signer, key=dev.key, ra=scep.ra_cert, transaction_id="o",
                          cipher=AES128)  # fmt: skip
    message = cms.read_signed(good, cms.AlgorithmPolicy())
    assert message.content is not None
    envelope = cms.read_envelope(message.content, scep.ra_cert, cms.AlgorithmPolicy())
    texts = set()
    for encrypted_key in (
        (int.from_bytes(os.urandom(256), "big") % n).to_bytes(256, "big"),  # bad padding (almost surely)
        public.encrypt(os.urandom(16), padding.PKCS1v15()),  # good padding, wrong key
        public.encrypt(os.urandom(24), padding.PKCS1v15()),  # good padding, wrong key length
    ):
        content = message.content.replace(envelope.encrypted_key, encrypted_key)
        attrs = cms.attribute_values(19, "o", content=content, digest=SHA256, sender_nonce=b"n" * 16)
        data = cms.signed_data(content, attrs, dev.key.sign(attrs, padding.PKCS1v15(), hashes.SHA256()), dev.signer,
                               SHA256, [dev.signer])  # fmt: skip
        status, body, _ = await post(scep, data)
        reply = client.read_reply(body, ra=scep.ra_cert, signer=dev.signer, key=dev.key, transaction_id="o")
        assert (
            status == 200
            and reply.status is PkiStatus.FAILURE
            and reply.fail_info == FailInfo.BAD_MESSAGE_CHECK
        )
        texts.add(reply.fail_info_text)
    # Content that decrypts (its padding right) but is not the message's: the same answer as one that does not
    # decrypt. The content is CBC without integrity: a different answer here would tell a peer that alters a
    # recorded request's ciphertext whether its padding came out right, and so decrypt the request (its
    # challenge password) byte by byte.
    for kind, payload in ((MessageType.PKCS_REQ, b"not a CSR"), (MessageType.CERT_POLL, b"\x30\x00")):
        data = client.request(kind, payload, signer=dev.signer, key=dev.key, ra=scep.ra_cert, transaction_id="o",
                              cipher=AES128)  # fmt: skip
        status, body, _ = await post(scep, data)
        reply = client.read_reply(body, ra=scep.ra_cert, signer=dev.signer, key=dev.key, transaction_id="o")
        assert status == 200 and reply.status is PkiStatus.FAILURE
        assert reply.fail_info == FailInfo.BAD_MESSAGE_CHECK, kind
        texts.add(reply.fail_info_text)
    assert len(texts) == 1, texts


async def test_renewal(scep: Served) -> None:
    journal = scep.daemon.journal
    dev = Device.new()
    first = await enrol(scep, dev, make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0050")))
    old = first.certificates[0]
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = make_csr(new_key)
    for kind in (MessageType.RENEWAL_REQ, MessageType.PKCS_REQ):  # RFC 8894 RenewalReq; certmonger's PKCSReq
        reply = await enrol(scep, dev, csr, signer=old, key=dev.key, message_type=kind, tid="renew")
        assert reply.status is PkiStatus.SUCCESS, reply.fail_info_text
        new = reply.certificates[0]
        assert new.subject == old.subject and new.serial_number != old.serial_number
    rows = {r.cert_serial: r for r in journal.rows("device_serial=?", ("SN-0050",))}
    assert len(rows) == 2
    old_row, new_row = rows[format(old.serial_number, "x")], rows[format(new.serial_number, "x")]
    linked = journal.call(lambda: journal.conn.execute(
        "SELECT updates FROM issuance WHERE id=?", (new_row.id,)).fetchone()[0])  # fmt: skip
    assert linked == old_row.id and new_row.state == "confirmed"
    # The same key again: refused, this appliance certifies a key once.
    reply = await enrol(scep, Device(new_key, new), make_csr(new_key), signer=new, key=new_key,
                        message_type=MessageType.RENEWAL_REQ)  # fmt: skip
    assert reply.status is PkiStatus.FAILURE and "new key pair" in (reply.fail_info_text or "")
    # The old certificate no longer renews (it is not the device's current one).
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    reply = await enrol(
        scep, dev, make_csr(other), signer=old, key=dev.key, message_type=MessageType.RENEWAL_REQ
    )
    assert reply.status is PkiStatus.FAILURE and "current certificate" in (reply.fail_info_text or "")
    # A label without renewal refuses it.
    reply = await enrol(scep, Device(new_key, new), make_csr(other), signer=new, key=new_key, label="norenew",
                        message_type=MessageType.RENEWAL_REQ)  # fmt: skip
    assert reply.status is PkiStatus.FAILURE and "renewal is not offered" in (reply.fail_info_text or "")


async def test_a_revoked_certificate_does_not_renew(scep: Served) -> None:
    from appliance.va.revocation import Reason, Source, revoke_in_transaction

    journal = scep.daemon.journal
    dev = Device.new()
    cert = (
        await enrol(scep, dev, make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0051")))
    ).certificates[0]
    (row,) = journal.rows("device_serial=?", ("SN-0051",))
    journal.call(journal.transaction, lambda conn: revoke_in_transaction(
        conn, AuditLog(journal), "alice", [(row.cert_serial, "issuing", "SN-0051")], Reason.KEY_COMPROMISE, Source.CLI,
        now=1.0e9), "revoke")  # fmt: skip
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    reply = await enrol(
        scep, dev, make_csr(new_key), signer=cert, key=dev.key, message_type=MessageType.RENEWAL_REQ
    )
    assert reply.status is PkiStatus.FAILURE and "revoked (keyCompromise)" in (reply.fail_info_text or "")


async def test_http_bounds_and_garbage(scep: Served) -> None:
    base = f"http://127.0.0.1:{scep.port}/scep/line1?operation=PKIOperation"
    async with aiohttp.ClientSession() as http:
        async with http.post(base, data=b"\x00" * 70_000) as r:  # above max_message_bytes
            assert r.status == 413
        async with http.post(base, data=b"x", headers={"Content-Type": "text/html"}) as r:
            assert r.status == 415
        for body in (b"garbage", b"\x30\x80\x00\x00", b"\x30" * 3000):
            async with http.post(base, data=body) as r:
                assert r.status == 400 and r.content_type == "text/plain"
        async with http.post(base.replace("PKIOperation", "GetCACert"), data=b"x") as r:
            assert r.status == 400
    # GET with the message in base64: '+' escaped or not, wrapped or not.
    dev = Device.new()
    csr = make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0060"))
    data = client.request(19, csr, signer=dev.signer, key=dev.key, ra=scep.ra_cert, transaction_id="get")
    text = base64.b64encode(data).decode()
    for encoded in (
        urllib.parse.quote(text, safe=""),
        text.replace("/", "%2F"),
        "%0A".join([text[:64], text[64:]]),
    ):
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{scep.port}/scep/line1?operation=PKIOperation&message={encoded}"
        ) as r:  # fmt: skip
            assert r.status == 200 and r.content_type == "application/x-pki-message"
            reply = client.read_reply(await r.read(), ra=scep.ra_cert, signer=dev.signer, key=dev.key,
                                      transaction_id="get")  # fmt: skip
            assert reply.status is PkiStatus.SUCCESS
    assert scep.daemon.scep is not None and scep.daemon.scep.stats["malformed"] >= 3


async def test_issuance_events_name_the_front_end(scep: Served) -> None:
    control = scep.daemon.control
    assert control is not None
    subscriber = control.hub.bus.subscribe()
    assert subscriber is not None
    dev = Device.new()
    await enrol(scep, dev, make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0070")))
    events = []
    while not subscriber.queue.empty():
        event = await subscriber.next_event()
        assert event is not None
        events.append(event)
    issued = [e for e in events if e["type"] == "issued"]
    assert issued and issued[-1]["front_end"] == "scep" and issued[-1]["device_serial"] == "SN-0070"


async def test_a_paused_station_is_answered_503_then_the_same_request_issues(scep: Served) -> None:
    """A refusal that is the appliance's state, not the request's (here the label's station paused), has no SCEP
    status: HTTP 503 with Retry-After, the challenge left unused for the retry, which then issues."""
    daemon = scep.daemon
    assert daemon.scep is not None
    pauses = daemon.scep.service.pauses
    await pauses.pause("fixture-1", "alice", "test", AuditLog(daemon.journal))
    dev = Device.new()
    csr = make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0080"))
    data = client.request(MessageType.PKCS_REQ, csr, signer=dev.signer, key=dev.key, ra=scep.ra_cert,
                          transaction_id="tx-80", sender_nonce=b"n" * 16)  # fmt: skip
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{scep.port}/scep/line1?operation=PKIOperation", data=data
    ) as r:  # fmt: skip
        assert r.status == 503 and r.headers["Retry-After"] == "5" and b"STATION_PAUSED" in await r.read()
    assert not daemon.journal.rows("device_serial=?", ("SN-0080",))
    await pauses.resume("fixture-1", "alice", AuditLog(daemon.journal))
    status, body, _ = await post(scep, data)
    assert status == 200
    reply = client.read_reply(body, ra=scep.ra_cert, signer=dev.signer, key=dev.key, transaction_id="tx-80",
                              sender_nonce=b"n" * 16)  # fmt: skip
    assert reply.status is PkiStatus.SUCCESS


async def test_a_certificate_not_valid_now_does_not_renew(scep: Served) -> None:
    dev = Device.new()
    first = await enrol(scep, dev, make_csr(dev.key, challenge=scep.challenge(device_serial="SN-0090")))
    old = first.certificates[0]
    assert scep.daemon.scep is not None
    # Birth certificates do not expire (99991231235959Z): a clock before the certificate's notBefore.
    scep.daemon.scep.clock = lambda: old.not_valid_before_utc.timestamp() - 86400
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    reply = await enrol(
        scep, dev, make_csr(new_key), signer=old, key=dev.key, message_type=MessageType.RENEWAL_REQ
    )
    assert reply.status is PkiStatus.FAILURE and reply.fail_info == FailInfo.BAD_TIME, reply.fail_info_text
    assert len(scep.daemon.journal.rows("device_serial=?", ("SN-0090",))) == 1


async def test_a_refusal_summary_is_its_own_labels(scep: Served) -> None:
    """scep.refusals-suppressed names the label whose window it summarises (as `label`, like scep.refused), under
    that label's actor, even when another label's refusal is what closed the window."""
    import json
    import time

    from appliance.issuance.refusals import RefusalLimiter

    responder = scep.daemon.scep
    assert responder is not None
    offset = [0.0]
    responder.clock = lambda: time.time() + offset[0]
    responder._refusals = RefusalLimiter(1, 60.0)  # one refusal in full a minute, the rest counted
    dev = Device.new()
    for _ in range(3):
        reply = await enrol(scep, dev, make_csr(dev.key), label="line1")
        assert reply.status is PkiStatus.FAILURE
    offset[0] = 120.0  # line1's window has closed; a refusal on another label writes its summary
    reply = await enrol(scep, dev, make_csr(dev.key), label="bycn")
    assert reply.status is PkiStatus.FAILURE
    journal = scep.daemon.journal
    rows = journal.call(lambda: journal.conn.execute(
        "SELECT actor, data FROM audit WHERE event = 'scep.refusals-suppressed'").fetchall())  # fmt: skip
    assert len(rows) == 1, rows
    actor, data = rows[0][0], json.loads(rows[0][1])
    assert actor == "scep:line1" and data["label"] == "line1" and "station" not in data, (actor, data)
    assert sum(data["suppressed"].values()) == 2


async def test_a_transaction_id_is_one_requests_and_another_key_cannot_take_it(scep: Served) -> None:
    """A PKCSReq that reuses a transactionID another key asked with on this label is refused before it uses its
    challenge, and the transaction stays its owner's: the owner's CertPoll still answers (found by an outside
    test: the second request was issued and the owner's poll refused)."""
    owner, other = Device.new(), Device.new()
    first = await enrol(scep, owner, make_csr(owner.key, challenge=scep.challenge(device_serial="SN-0030")),
                        tid="shared-tx")  # fmt: skip
    assert first.status is PkiStatus.SUCCESS
    theirs = scep.challenge(device_serial="SN-0031")
    taken = await enrol(scep, other, make_csr(other.key, challenge=theirs), tid="shared-tx")
    assert taken.status is PkiStatus.FAILURE and taken.fail_info == FailInfo.BAD_REQUEST
    assert taken.fail_info_text is not None and "transactionID" in taken.fail_info_text
    assert not scep.daemon.journal.rows("device_serial=?", ("SN-0031",))
    poll = client.issuer_and_subject(scep.ra_cert.subject, owner.signer.subject)
    polled = await enrol(scep, owner, poll, tid="shared-tx", message_type=MessageType.CERT_POLL)
    assert polled.status is PkiStatus.SUCCESS and polled.certificates == first.certificates
    # The refused request did not use its challenge: with a transactionID of its own it enrols.
    own = await enrol(scep, other, make_csr(other.key, challenge=theirs), tid="own-tx")
    assert own.status is PkiStatus.SUCCESS


async def test_a_request_the_core_refuses_leaves_its_device_challenge_unused(scep: Served) -> None:
    """The core refused the request (here the profile's key policy: RSA 4096), so nothing was issued for that key:
    the challenge is released (audited) and the device's next request, with a key the profile takes, uses it."""
    secret = scep.challenge(device_serial="SN-0032")
    refused_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    refused_dev = Device(refused_key, client.self_signed(refused_key, "device"))
    refused = await enrol(scep, refused_dev, make_csr(refused_dev.key, challenge=secret))
    assert refused.status is PkiStatus.FAILURE, refused
    journal = scep.daemon.journal
    events = journal.call(lambda: [str(r[0]) for r in journal.conn.execute(
        "SELECT event FROM audit WHERE event LIKE 'scep.challenge-%' ORDER BY seq")])  # fmt: skip
    assert events[-2:] == ["scep.challenge-used", "scep.challenge-released"], events
    dev = Device.new()
    ok = await enrol(scep, dev, make_csr(dev.key, challenge=secret))
    assert ok.status is PkiStatus.SUCCESS, ok
    # Bound now to the key that was issued: one-time as before.
    again = Device.new()
    used = await enrol(scep, again, make_csr(again.key, challenge=secret))
    assert used.status is PkiStatus.FAILURE and used.fail_info_text is not None
    assert "used already" in used.fail_info_text
