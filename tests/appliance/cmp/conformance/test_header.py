"""RFC 9483 section 3.1 (the PKIHeader) and 3.5 (its generic validation), as the server applies them. Each test
sends what a faulty client would and reads the server's answer: a message-level failure is an error message."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.cmp import (
    BodyType,
    CmpError,
    FailInfo,
    GenBody,
    InfoTypeAndValue,
    SignatureProtector,
    check_request,
    oids,
    parse_message,
    verify_protection,
)
from tests.appliance.cmp.conformance.peer import (
    SECRET,
    Peer,
    build,
    cert_request,
    header,
    issued,
    mac,
    new_key,
    refused,
)


def _station_signer(peer: Peer) -> SignatureProtector:
    assert peer.station.tls_key_pem is not None and peer.station.tls_cert_pem is not None
    key = serialization.load_pem_private_key(peer.station.tls_key_pem, None)
    cert = x509.load_pem_x509_certificate(peer.station.tls_cert_pem)
    return SignatureProtector(key, cert)  # type: ignore[arg-type]


async def test_signature_sender_kid_must_be_the_signer_key_identifier(peer: Peer) -> None:
    """3.1: senderKID MUST be the SubjectKeyIdentifier of the CMP protection certificate, if available."""
    signer = _station_signer(peer)
    sender = signer.certificate.subject
    for kid in (os.urandom(20), None):
        hdr = header(sender)
        # build() with the protector would fill in the right senderKID: sign a header prepared by hand instead.
        prepared = dataclasses.replace(signer.prepare(hdr), sender_kid=kid)
        msg = build(prepared, BodyType.IR, cert_request("SN-0101", new_key()), _Fixed(signer, prepared))
        with pytest.raises(CmpError) as err:
            verify_protection(parse_message(msg.der))
        assert err.value.fail_info is FailInfo.BAD_MESSAGE_CHECK
        assert refused(await peer.post(msg, "signed")) == {FailInfo.BAD_MESSAGE_CHECK}
    # the same request with the right senderKID is served
    assert issued(await peer.post(build(header(sender), BodyType.IR, cert_request("SN-0101", new_key()), signer),
                                  "signed"))  # fmt: skip


class _Fixed:
    """A protector that signs a header prepared elsewhere (so a test can send a wrong senderKID)."""

    def __init__(self, signer: SignatureProtector, prepared: object) -> None:
        self.signer, self.prepared = signer, prepared

    def prepare(self, hdr: object) -> object:
        return self.prepared

    def protect(self, hdr: object, part: bytes) -> bytes:
        return self.signer.protect(hdr, part)  # type: ignore[arg-type]

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        return self.signer.extra_certs


async def test_mac_protected_message_needs_a_directory_name_as_sender(peer: Peer) -> None:
    """3.1, 4.1.5: with MAC-based protection the sender is a directoryName (the senderKID names the secret)."""
    hdr = dataclasses.replace(header(), sender=x509.RFC822Name("device@example.com"))
    msg = build(hdr, BodyType.IR, cert_request("SN-0102", new_key()), mac())
    with pytest.raises(CmpError) as err:
        check_request(parse_message(msg.der))
    assert err.value.fail_info is FailInfo.BAD_MESSAGE_CHECK
    assert refused(await peer.post(msg)) == {FailInfo.BAD_MESSAGE_CHECK}
    assert peer.journal.rows("device_serial='SN-0102'") == []


async def test_first_message_must_not_carry_recip_nonce(peer: Peer) -> None:
    """3.1: recipNonce MUST be absent in the first message of a PKI management operation."""
    hdr = dataclasses.replace(header(), recip_nonce=os.urandom(16))
    for body_type, body in ((BodyType.IR, cert_request("SN-0103", new_key())),
                            (BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),)))):  # fmt: skip
        msg = build(hdr, body_type, body, mac())
        with pytest.raises(CmpError) as err:
            check_request(parse_message(msg.der))
        assert err.value.fail_info is FailInfo.BAD_RECIPIENT_NONCE
        assert refused(await peer.post(msg)) == {FailInfo.BAD_RECIPIENT_NONCE}
    assert peer.journal.rows("device_serial='SN-0103'") == []


async def test_general_info_belongs_to_its_messages(peer: Peer) -> None:
    """3.1: implicitConfirm only in ir/cr/kur/p10cr (and their answers), confirmWaitTime only in ip/cp/kup,
    certProfile names one profile; a certProfile the label does not issue is refused (badCertTemplate)."""
    import datetime as dt

    genm = build(
        header(implicit_confirm=True), BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),)), mac()
    )
    assert refused(await peer.post(genm)) == {FailInfo.BAD_REQUEST}
    wait = dataclasses.replace(header(), confirm_wait_time=dt.datetime.now(dt.UTC))
    assert refused(await peer.post(build(wait, BodyType.IR, cert_request("SN-0104", new_key()), mac()))) == {
        FailInfo.BAD_REQUEST
    }
    two = header(cert_profile=("idevid", "other"))
    assert refused(await peer.post(build(two, BodyType.IR, cert_request("SN-0104", new_key()), mac()))) == {
        FailInfo.BAD_REQUEST
    }
    other = header(cert_profile=("matter-dac",))
    answer = await peer.post(build(other, BodyType.IR, cert_request("SN-0104", new_key()), mac()))
    assert refused(answer, BodyType.IP) == {FailInfo.BAD_CERT_TEMPLATE}
    right = header(cert_profile=("idevid",))
    assert issued(await peer.post(build(right, BodyType.IR, cert_request("SN-0104", new_key()), mac())))


async def test_an_error_to_an_unverified_message_reveals_no_kid_and_carries_no_mac(peer: Peer) -> None:
    """Review finding 6: an unknown senderKID and a wrong MAC get the same answer, and neither is protected with
    the label's secret (which the peer has not shown it holds: a MAC'd answer would name the real senderKID and
    hand it material for offline guessing). The answer is signed by the RA key, the same way whatever the KID;
    without an RA key it is unprotected. Once the MAC verified, answers are MAC-protected as before."""
    from appliance.cmp import verify_signature

    answers = []
    for protector in (mac(b"guess-kid"), mac(b"mac", b"not the secret")):
        answer = await peer.post(build(header(), BodyType.IR, cert_request("SN-0120", new_key()), protector))
        assert refused(answer) == {FailInfo.BAD_MESSAGE_CHECK}
        assert verify_signature(answer, peer.ra_cert) == peer.ra_cert  # the RA's signature, no MAC
        assert answer.header.sender == x509.DirectoryName(peer.ra_cert.subject)
        assert answer.header.sender_kid != b"mac" and b"mac" not in answer.der.split(answer.body_der)[0]
        answers.append(answer)
    assert answers[0].body.status == answers[1].body.status  # type: ignore[union-attr]
    assert answers[0].header.sender_kid == answers[1].header.sender_kid
    ra, peer.responder.ra = peer.responder.ra, None
    try:
        bare = await peer.post(
            build(header(), BodyType.IR, cert_request("SN-0120", new_key()), mac(b"guess-kid"))
        )
    finally:
        peer.responder.ra = ra
    assert refused(bare) == {FailInfo.BAD_MESSAGE_CHECK}
    assert bare.protection is None and bare.header.protection_alg is None and bare.header.sender_kid is None
    # the right secret: the error about the header is MAC-protected with it (the peer proved it holds it)
    late = build(
        header(implicit_confirm=True), BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),)), mac()
    )
    answer = await peer.post(late)
    assert refused(answer) == {FailInfo.BAD_REQUEST}
    assert (
        verify_protection(answer, secret_for=lambda kid: SECRET if kid == b"mac" else None).kind.value
        == "PasswordBasedMac"
    )
