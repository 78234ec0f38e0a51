"""RFC 9483 4.2 (rr by the certificate's own key), 5.3.2 (rr by a PKI management entity on behalf of others) and
3.6 (a refused rr is answered with rp, status rejection)."""

from __future__ import annotations

import dataclasses

from cryptography import x509

from appliance.cmp import BodyType, FailInfo, PKIStatus, RevDetails, RpBody, RrBody
from appliance.cmp.model import PKIMessage
from appliance.cmp.parse import parse_message
from tests.appliance.cmp.conformance.peer import (
    Peer,
    build,
    cert_request,
    header,
    mac,
    new_key,
    raw_message,
    refused,
    rr_content,
    serial_name,
    spki,
)


def _rr(cert: x509.Certificate, reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise) -> RrBody:
    return RrBody((RevDetails(cert.issuer, cert.serial_number, reason),))


async def _post_raw(peer: Peer, der: bytes, label: str = "mac") -> PKIMessage:
    status, body = await peer.post_bytes(der, label)
    assert status == 200
    return parse_message(body)


def _accepted(answer: PKIMessage) -> None:
    assert isinstance(answer.body, RpBody), answer.body_type
    assert answer.body.statuses[0].status is PKIStatus.ACCEPTED, answer.body.statuses


async def test_rr_must_be_signed_not_mac_protected(peer: Peer) -> None:
    """4.2: the rr is signed with the key of the certificate to be revoked (or, 5.3.2, by an RA); a MAC does not
    do, not even on a label that allows rr."""
    _, cert = await peer.enrol("SN-0401")
    peer.responder.labels["mac"] = dataclasses.replace(peer.responder.labels["mac"], allow_rr=True)
    assert refused(await peer.post(build(header(), BodyType.RR, _rr(cert), mac())), BodyType.RP) == {
        FailInfo.WRONG_INTEGRITY
    }
    assert peer.revoked(cert) is None


async def test_rr_with_the_certificates_own_key_revokes_it(peer: Peer) -> None:
    key, cert = await peer.enrol("SN-0402")
    signer = peer.device_signer(key, cert)
    _accepted(await peer.post(build(header(cert.subject), BodyType.RR, _rr(cert), signer)))
    assert peer.revoked(cert) == "keyCompromise"
    # Review finding 7: asked again, the rr is answered at the request level (RFC 9483 4.2, 5.1.3): an rp with
    # status rejection, certRevoked, as docs/cmp.md's rr row says; not an error about the signer.
    again = await peer.post(build(header(cert.subject), BodyType.RR, _rr(cert), signer))
    assert refused(again, BodyType.RP) == {FailInfo.CERT_REVOKED}
    assert "already revoked" in again.body.statuses[0].status_string[0]  # type: ignore[union-attr]
    # the revoked key still signs nothing else: a kur is refused with an error about the signer (3.5)
    kur = build(header(cert.subject), BodyType.KUR, cert_request(None, new_key()), signer)
    assert refused(await peer.post(kur)) == {FailInfo.CERT_REVOKED}


async def test_one_key_may_not_revoke_another_certificate(peer: Peer) -> None:
    key, cert = await peer.enrol("SN-0403")
    _, other = await peer.enrol("SN-0404")
    answer = await peer.post(
        build(header(cert.subject), BodyType.RR, _rr(other), peer.device_signer(key, cert))
    )
    assert refused(answer, BodyType.RP) == {FailInfo.NOT_AUTHORIZED}
    assert peer.revoked(other) is None


async def test_rr_needs_exactly_one_reason_code(peer: Peer) -> None:
    """4.2: crlEntryDetails MUST contain exactly one reasonCode."""
    key, cert = await peer.enrol("SN-0405")
    two = raw_message(
        header(cert.subject), BodyType.RR, rr_content(cert, (0, 1)), peer.device_signer(key, cert)
    )
    assert refused(await _post_raw(peer, two), BodyType.RP) == {FailInfo.BAD_REQUEST}
    # certificateHold (6) is not offered: a revocation here is final
    hold = raw_message(
        header(cert.subject), BodyType.RR, rr_content(cert, (6,)), peer.device_signer(key, cert)
    )
    assert refused(await _post_raw(peer, hold), BodyType.RP) == {FailInfo.BAD_REQUEST}
    assert peer.revoked(cert) is None
    # none at all is taken as unspecified: what openssl cmp sends unless told -revreason
    none = raw_message(header(cert.subject), BodyType.RR, rr_content(cert, ()), peer.device_signer(key, cert))
    _accepted(await _post_raw(peer, none))
    assert peer.revoked(cert) == "unspecified"


async def test_rr_template_must_describe_the_certificate(peer: Peer) -> None:
    """4.2: what the template says besides issuer and serial (public key, subject) must be the certificate's."""
    key, cert = await peer.enrol("SN-0406")
    signer = peer.device_signer(key, cert)
    wrong_key = raw_message(
        header(cert.subject), BodyType.RR, rr_content(cert, public_key=spki(new_key())), signer
    )
    assert refused(await _post_raw(peer, wrong_key), BodyType.RP) == {FailInfo.BAD_CERT_ID}
    wrong_subject = raw_message(header(cert.subject), BodyType.RR,
                                rr_content(cert, subject=serial_name("SN-9999")), signer)  # fmt: skip
    assert refused(await _post_raw(peer, wrong_subject), BodyType.RP) == {FailInfo.BAD_CERT_ID}
    assert peer.revoked(cert) is None
    right = raw_message(header(cert.subject), BodyType.RR,
                        rr_content(cert, public_key=spki(key), subject=cert.subject), signer)  # fmt: skip
    _accepted(await _post_raw(peer, right))


async def test_rr_by_a_trusted_ra_on_a_label_that_allows_it(peer: Peer) -> None:
    """5.3.2: an RA revokes on behalf of the device, signed with its own key, where the label allows rr."""
    _, cert = await peer.enrol("SN-0407")
    ra = peer.ra_signer()
    ra_cert = ra.certificate

    peer.responder.labels["ra-no-rr"] = dataclasses.replace(peer.responder.labels["ra"], name="ra-no-rr",
                                                            allow_rr=False)  # fmt: skip
    refused_rp = await peer.post(build(header(ra_cert.subject), BodyType.RR, _rr(cert), ra), "ra-no-rr")
    assert refused(refused_rp, BodyType.RP) == {FailInfo.NOT_AUTHORIZED}
    _accepted(await peer.post(build(header(ra_cert.subject), BodyType.RR, _rr(cert), ra), "ra"))
    assert peer.revoked(cert) == "keyCompromise"


async def test_an_expired_certificate_is_not_revoked(peer: Peer) -> None:
    """5.1.3: the referenced certificate must not be expired or revoked (certRevoked)."""

    _, cert = await peer.enrol("SN-0408")
    ra = peer.ra_signer()
    after_it = (
        cert.not_valid_after_utc.timestamp() + 10
    )  # the revoker's clock past the certificate's notAfter
    peer.responder.revoker.clock = lambda: after_it
    answer = await peer.post(build(header(ra.certificate.subject), BodyType.RR, _rr(cert), ra), "ra")
    assert refused(answer, BodyType.RP) == {FailInfo.CERT_REVOKED}
    assert peer.revoked(cert) is None
