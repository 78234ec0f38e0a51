"""RFC 9483 4.1.3 (kur): updating a valid certificate. The kur is signed with the certificate being updated, which
must be valid and not revoked; the new certificate is for the same device, with a new key the product's key
policy allows; the journal keeps both (docs/cmp.md "Key update")."""

from __future__ import annotations

import time

from cryptography import x509

from appliance.cmp import BodyType, CertConfBody, CertStatus, FailInfo
from appliance.cmp.build import old_cert_id
from appliance.production import reconcile
from appliance.va.revocation import Reason, Source, revoke_in_transaction
from tests.appliance.cmp.conformance.peer import (
    Peer,
    build,
    cert_request,
    header,
    issued,
    mac,
    new_key,
    refused,
)


async def test_kur_signed_by_the_current_certificate(peer: Peer) -> None:
    key, old = await peer.enrol("SN-0601")
    signer = peer.device_signer(key, old)
    new = new_key()
    control = old_cert_id(old.issuer, old.serial_number)
    kur = build(header(old.subject), BodyType.KUR, cert_request(None, new, controls=(control,)), signer)
    kup = await peer.post(kur)
    assert kup.body_type is BodyType.KUP
    cert = issued(kup)
    assert cert.subject == old.subject and cert.public_key() == new.public_key()
    conf = peer.follow(kup, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),)), signer)
    assert (await peer.post(conf)).body_type is BodyType.PKICONF
    old_state, _, updated_by = peer.state(old)
    new_state, updates, _ = peer.state(cert)
    assert (
        old_state == "confirmed"
        and new_state == "confirmed"
        and updated_by is not None
        and updates is not None
    )
    assert peer.revoked(old) is None  # the product keeps old certificates (its default)
    # The new certificate counts under the work order of the one it replaced (docs/production.md): the export
    # lists both.
    exported = [
        c.cert_serial for c in reconcile.certificates(peer.journal, "WO-1") if c.device_serial == "SN-0601"
    ]
    assert exported == [f"{old.serial_number:x}", f"{cert.serial_number:x}"]


async def test_kur_signed_by_a_revoked_certificate_is_refused(peer: Peer) -> None:
    """3.5, 4.1.3: the protection certificate must not be revoked; a supervisor's revocation counts at once."""
    key, old = await peer.enrol("SN-0602")

    def revoke(conn: object) -> None:
        revoke_in_transaction(conn, peer.responder.audit, "sam", [(format(old.serial_number, "x"), "issuing",  # type: ignore[arg-type]
                              "SN-0602")], Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    peer.journal.call(peer.journal.transaction, revoke, "test revoke")
    kur = build(
        header(old.subject), BodyType.KUR, cert_request(None, new_key()), peer.device_signer(key, old)
    )
    assert refused(await peer.post(kur)) == {FailInfo.CERT_REVOKED}
    assert peer.journal.rows("device_serial='SN-0602'")[-1].cert_serial == format(old.serial_number, "x")


async def test_kur_rules(peer: Peer) -> None:
    key, old = await peer.enrol("SN-0603")
    signer = peer.device_signer(key, old)
    # MAC protection cannot say which certificate is updated
    assert refused(await peer.post(build(header(), BodyType.KUR, cert_request("SN-0603", new_key()), mac())),
                   BodyType.KUP) == {FailInfo.WRONG_INTEGRITY}  # fmt: skip
    # the same key again
    same = build(header(old.subject), BodyType.KUR, cert_request(None, key), signer)
    assert refused(await peer.post(same), BodyType.KUP) == {FailInfo.BAD_CERT_TEMPLATE}
    # another device serial
    other = build(header(old.subject), BodyType.KUR, cert_request("SN-0604", new_key()), signer)
    assert refused(await peer.post(other), BodyType.KUP) == {FailInfo.BAD_CERT_TEMPLATE}
    # oldCertID naming another certificate than the signer
    _, stranger = await peer.enrol("SN-0605")
    wrong = cert_request(None, new_key(), controls=(old_cert_id(stranger.issuer, stranger.serial_number),))
    assert refused(
        await peer.post(build(header(old.subject), BodyType.KUR, wrong, signer)), BodyType.KUP
    ) == {FailInfo.BAD_CERT_ID}
    # certReqId 0 only
    odd = build(header(old.subject), BodyType.KUR, cert_request(None, new_key(), cert_req_id=5), signer)
    assert refused(await peer.post(odd), BodyType.KUP) == {FailInfo.BAD_REQUEST}
    assert peer.state(old)[2] is None  # still the current certificate


async def test_kur_by_a_trusted_ra_names_the_certificate(peer: Peer) -> None:
    """5.2.3: an RA that verified the device's kur forwards it with its own signature and raVerified; the
    certificate being updated is the one oldCertID names."""
    _, old = await peer.enrol("SN-0606")
    ra = peer.ra_signer()
    control = old_cert_id(old.issuer, old.serial_number)
    kur = build(header(ra.certificate.subject, implicit_confirm=True), BodyType.KUR,
                cert_request(None, new_key(), ra_verified=True, controls=(control,)), ra)  # fmt: skip
    cert = issued(await peer.post(kur, "ra"))
    assert cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == "SN-0606"
    assert peer.state(old)[2] is not None
    missing = build(
        header(ra.certificate.subject), BodyType.KUR, cert_request(None, new_key(), ra_verified=True), ra
    )
    assert refused(await peer.post(missing, "ra"), BodyType.KUP) == {FailInfo.BAD_CERT_ID}
