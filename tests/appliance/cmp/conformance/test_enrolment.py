"""RFC 9483 4.1.1 - 4.1.4 (ir, cr, p10cr) and 3.6 (how refusals are answered): a request refused after its message
passed the checks gets ip / cp with status rejection, never an error message; p10cr uses certReqId -1; a profile
that changes what was asked answers grantedWithMods."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertStatus,
    FailInfo,
    P10crBody,
    PKIStatus,
    make_cert_request,
)
from appliance.cmp.model import CertTemplate
from tests.appliance.cmp.conformance.peer import (
    Peer,
    build,
    cert_request,
    header,
    issued,
    mac,
    new_key,
    refused,
    resign,
    serial_name,
    spki,
    twice_ski,
)

DER = serialization.Encoding.DER


async def test_ir_cert_req_id_must_be_0(peer: Peer) -> None:
    """4.1.1: certReqId MUST be 0 in an ir (and cr, kur)."""
    for body_type, rep in ((BodyType.IR, BodyType.IP), (BodyType.CR, BodyType.CP)):
        msg = build(header(), body_type, cert_request("SN-0201", new_key(), cert_req_id=1), mac())
        assert refused(await peer.post(msg), rep) == {FailInfo.BAD_REQUEST}
    assert peer.journal.rows("device_serial='SN-0201'") == []


async def test_one_cert_req_msg_per_request(peer: Peer) -> None:
    """4.1.1: exactly one CertReqMsg."""
    two = CertReqBody(
        cert_request("SN-0202", new_key()).requests + cert_request("SN-0203", new_key()).requests
    )
    assert refused(await peer.post(build(header(), BodyType.IR, two, mac())), BodyType.IP) == {
        FailInfo.BAD_REQUEST
    }


async def test_refused_requests_are_answered_with_ip_rejection_not_error(peer: Peer) -> None:
    """3.6 / 5.1.1: a refused certificate request gets the response of its type with status rejection; the error
    message is for messages that fail their checks."""
    key = new_key()
    bad_pop = cert_request("SN-0204", key, pop_key=new_key())
    assert refused(await peer.post(build(header(), BodyType.IR, bad_pop, mac())), BodyType.IP) == {
        FailInfo.BAD_POP
    }
    no_pop = CertReqBody((make_cert_request(CertTemplate(serial_name("SN-0204"), spki(key))),))
    assert refused(await peer.post(build(header(), BodyType.IR, no_pop, mac())), BodyType.IP) == {
        FailInfo.BAD_POP
    }
    outside = cert_request("XX-0001", new_key())  # not in the work order's allowlist
    assert refused(await peer.post(build(header(), BodyType.CR, outside, mac())), BodyType.CP) == {
        FailInfo.NOT_AUTHORIZED
    }
    no_serial = cert_request(
        None, new_key(), subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])
    )
    assert refused(await peer.post(build(header(), BodyType.IR, no_serial, mac())), BodyType.IP) == {
        FailInfo.BAD_CERT_TEMPLATE
    }
    # the same message with a wrong MAC fails its checks: an error message
    assert refused(await peer.post(build(header(), BodyType.IR, outside, mac(secret=b"wrong secret")))) == {
        FailInfo.BAD_MESSAGE_CHECK
    }
    assert peer.responder.stats["errors"] == 1


async def test_ra_verified_from_an_end_entity_is_not_authorised(peer: Peer) -> None:
    """4.1.1, 5.2.3.2: raVerified is for a PKI management entity that verified the POP, not for an EE."""
    body = cert_request("SN-0205", new_key(), ra_verified=True)
    assert refused(await peer.post(build(header(), BodyType.IR, body, mac())), BodyType.IP) == {
        FailInfo.NOT_AUTHORIZED
    }


async def test_p10cr_is_answered_and_confirmed_with_cert_req_id_minus_1(peer: Peer) -> None:
    """4.1.4: for p10cr the certReqId of the CertResponse and of the certConf MUST be -1."""
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(serial_name("SN-0206"))
        .sign(key, hashes.SHA256())
    )
    ir = build(header(), BodyType.P10CR, P10crBody(csr), mac())
    cp = await peer.post(ir)
    cert = issued(cp)
    assert isinstance(cp.body, CertRepBody) and cp.body.responses[0].cert_req_id == -1
    zero = peer.follow(cp, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),)), mac())
    assert refused(await peer.post(zero)) == {FailInfo.BAD_CERT_ID}
    # a refused certConf ends the transaction: the client starts again, and is answered from the journal
    cp = await peer.post(build(header(), BodyType.P10CR, P10crBody(csr), mac()))
    assert issued(cp) == cert
    conf = peer.follow(cp, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, -1),)), mac())
    assert (await peer.post(conf)).body_type is BodyType.PKICONF
    assert peer.state(cert)[0] == "confirmed"


async def test_a_profile_that_overrides_the_request_answers_granted_with_mods(peer: Peer) -> None:
    """RFC 9810 5.2.3 / 9483 4.1.1: grantedWithMods when the certificate is not what was asked; accepted when it
    is. The certificate is built from the profile only (subject, extensions)."""
    exact = build(header(), BodyType.IR, cert_request("SN-0207", new_key()), mac())
    answer = await peer.post(exact)
    assert (
        isinstance(answer.body, CertRepBody) and answer.body.responses[0].status.status is PKIStatus.ACCEPTED
    )
    ext = x509.Extensions(
        [x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(True, None))]
    )
    ext_der = _extensions_der(ext)
    asks_ca = cert_request("SN-0208", new_key(), extensions_der=ext_der)
    answer = await peer.post(build(header(), BodyType.IR, asks_ca, mac()))
    assert isinstance(answer.body, CertRepBody)
    (rsp,) = answer.body.responses
    assert rsp.status.status is PKIStatus.GRANTED_WITH_MODS and "2.5.29.19" in rsp.status.status_string[0]
    bc = issued(answer).extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    named = cert_request(
        "SN-0209", new_key(), subject=serial_name("SN-0209", x509.NameAttribute(NameOID.COMMON_NAME, "x"))
    )
    answer = await peer.post(build(header(), BodyType.IR, named, mac()))
    assert isinstance(answer.body, CertRepBody)
    assert answer.body.responses[0].status.status is PKIStatus.GRANTED_WITH_MODS
    assert "subject" in answer.body.responses[0].status.status_string[0]


def _extensions_der(exts: x509.Extensions) -> bytes:
    from appliance.cmp import _der

    return _der.sequence(*(
        _der.sequence(_der.oid(e.oid.dotted_string), b"\x01\x01\xff" if e.critical else b"",
                      _der.octet_string(e.value.public_bytes()))
        for e in exts
    ))  # fmt: skip


async def test_a_p10cr_whose_csr_extensions_do_not_decode_is_refused(peer: Peer) -> None:
    """A CSR that loads and whose signature verifies, but whose requested extensions do not decode (two
    subjectKeyIdentifiers): the device's malformed data, never a systemFailure of ours. Review finding 8: the
    message parses, its MAC verifies and its header is sound, so this is a request-level refusal (RFC 9483 3.6,
    4.1.4): a cp with status rejection, badDataFormat, protected and with the request's transactionID and
    nonce so the client can verify and match it; our own text, not the library's. HTTP 400 and an unprotected
    error are for bytes that are no PKIMessage."""
    key = new_key()
    builder = twice_ski(
        x509.CertificateSigningRequestBuilder().subject_name(serial_name("SN-0230")), key.public_key()
    )
    draft = builder.sign(key, hashes.SHA256())  # type: ignore[union-attr]
    csr = x509.load_der_x509_csr(resign(draft.public_bytes(DER), draft.tbs_certrequest_bytes, key))
    assert csr.is_signature_valid
    with pytest.raises(x509.DuplicateExtension):
        _ = csr.extensions
    p10cr = build(header(), BodyType.P10CR, P10crBody(csr), mac())
    answer = await peer.post(p10cr)
    assert refused(answer, BodyType.CP) == {FailInfo.BAD_DATA_FORMAT}
    assert answer.body.responses[0].cert_req_id == -1  # type: ignore[union-attr]
    assert answer.protection is not None and answer.header.transaction_id == p10cr.header.transaction_id
    assert answer.header.recip_nonce == p10cr.header.sender_nonce
    text = answer.body.responses[0].status.status_string[0]  # type: ignore[union-attr]
    assert "Duplicate" not in text and "extensions" in text, text
    assert peer.journal.rows("device_serial='SN-0230'") == []
