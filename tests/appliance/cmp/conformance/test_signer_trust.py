"""RFC 9483 3.3 and 3.5: the CMP protection certificate is first in extraCerts, followed by its chain, and is
validated - path to a trust anchor of the label, validity, and revocation: of this appliance's certificates
from the journal, of other CAs' from their CRLs (configured, or fetched from the certificate's distribution
point on 127.0.0.1 here), failing closed when the status is unknown (appliance/cmp/trust.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from appliance.cmp import BodyType, FailInfo, SignatureProtector
from appliance.cmp.server import CmpLabel
from appliance.va.http import VaServer
from tests.appliance.cmp.conformance.peer import (
    Peer,
    SoftCa,
    build,
    cert_request,
    header,
    issued,
    new_key,
    refused,
    resign,
    twice_ski,
)

DER = serialization.Encoding.DER


@dataclasses.dataclass
class CrlServer:
    url: str
    crl: bytes = b""
    status: int = 200
    delay_s: float = 0.0
    hits: int = 0


@pytest.fixture
async def crl_server() -> AsyncIterator[CrlServer]:
    server = CrlServer("")

    async def get(request: web.Request) -> web.Response:
        server.hits += 1
        if server.delay_s:
            await asyncio.sleep(server.delay_s)
        return web.Response(status=server.status, body=server.crl, content_type="application/pkix-crl")

    app = web.Application()
    app.router.add_get("/vendor.crl", get)
    async with VaServer(app, "127.0.0.1", 0) as http:
        server.url = f"{http.url}/vendor.crl"
        yield server


def _signer(ca: SoftCa, *, crl_url: str | None = None, days: float = 30, chain: tuple[x509.Certificate, ...] = (),
            not_before: dt.datetime | None = None) -> SignatureProtector:  # fmt: skip
    key = new_key()
    cert = ca.issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "station of a vendor")]), key.public_key(),
                    crl_url=crl_url, days=days, not_before=not_before)  # fmt: skip
    return SignatureProtector(key, cert, chain or (ca.cert,))


def _label(peer: Peer, anchors: tuple[x509.Certificate, ...], **kw: object) -> str:
    peer.responder.labels["vendor"] = CmpLabel("vendor", "fixture-1", trusted_cas=anchors, **kw)  # type: ignore[arg-type]
    return "vendor"


def _ir(signer: SignatureProtector, serial: str) -> object:
    return build(header(signer.certificate.subject), BodyType.IR, cert_request(serial, new_key()), signer)


async def test_signer_of_another_ca_or_out_of_its_validity_is_not_trusted(peer: Peer) -> None:
    vendor = SoftCa("Vendor CA")
    label = _label(peer, (vendor.cert,), signer_revocation="none")
    stranger = _signer(SoftCa("Stranger CA"))
    assert refused(await peer.post(_ir(stranger, "SN-0701"), label)) == {FailInfo.SIGNER_NOT_TRUSTED}  # type: ignore[arg-type]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = _signer(vendor, days=-1, not_before=past)
    assert refused(await peer.post(_ir(expired, "SN-0701"), label)) == {FailInfo.SIGNER_NOT_TRUSTED}  # type: ignore[arg-type]
    assert issued(await peer.post(_ir(_signer(vendor), "SN-0701"), label))  # type: ignore[arg-type]


async def test_protection_certificate_first_in_extra_certs(peer: Peer) -> None:
    """3.3: the protection certificate is the first of extraCerts; without it nothing verifies (badMessageCheck)."""
    vendor = SoftCa("Vendor CA")
    label = _label(peer, (vendor.cert,), signer_revocation="none")
    signer = _signer(vendor)
    swapped = SignatureProtector(signer.key, vendor.cert, (signer.certificate,))  # the chain first
    msg = build(header(signer.certificate.subject), BodyType.IR, cert_request("SN-0702", new_key()), swapped)
    assert refused(await peer.post(msg, label)) == {FailInfo.BAD_MESSAGE_CHECK}


async def test_configured_crl_decides(peer: Peer) -> None:
    vendor = SoftCa("Vendor CA")
    signer = _signer(vendor)
    revoked = _label(peer, (vendor.cert,), crls=(vendor.crl([signer.certificate.serial_number]),))
    assert refused(await peer.post(_ir(signer, "SN-0703"), revoked)) == {FailInfo.CERT_REVOKED}  # type: ignore[arg-type]
    good = _label(peer, (vendor.cert,), crls=(vendor.crl([12345]),))
    assert issued(await peer.post(_ir(signer, "SN-0703"), good))  # type: ignore[arg-type]
    # a CRL that is not current, or not signed by the issuer, says nothing: the status is unknown
    stale = vendor.crl([], days=-1)
    forged = SoftCa("Vendor CA").crl([])  # same name, another key
    for crls in ((stale,), (forged,), ()):
        label = _label(peer, (vendor.cert,), crls=crls, crl_fetch=False)
        answer = await peer.post(_ir(_signer(vendor), "SN-0704"), label)  # type: ignore[arg-type]
        assert refused(answer) == {FailInfo.SIGNER_NOT_TRUSTED}


async def test_crl_fetched_from_the_distribution_point_and_cached(peer: Peer, crl_server: CrlServer) -> None:
    vendor = SoftCa("Vendor CA")
    good = _signer(vendor, crl_url=crl_server.url)
    bad = _signer(vendor, crl_url=crl_server.url)
    crl_server.crl = vendor.crl([bad.certificate.serial_number]).public_bytes(DER)
    label = _label(peer, (vendor.cert,))
    assert issued(await peer.post(_ir(good, "SN-0705"), label))  # type: ignore[arg-type]
    assert refused(await peer.post(_ir(bad, "SN-0706"), label)) == {FailInfo.CERT_REVOKED}  # type: ignore[arg-type]
    assert crl_server.hits == 1  # fetched once, then from the cache until it is due


@pytest.mark.parametrize("fault", ["404", "oversize", "garbage", "slow"])
async def test_an_unreachable_or_bad_crl_fails_closed(peer: Peer, crl_server: CrlServer, fault: str) -> None:
    vendor = SoftCa("Vendor CA")
    crl_server.crl = vendor.crl([]).public_bytes(DER)
    if fault == "404":
        crl_server.status = 404
    elif fault == "oversize":
        crl_server.crl = b"\x30" * (peer.responder.trust.crls.max_bytes + 10)
    elif fault == "garbage":
        crl_server.crl = b"not a CRL"
    else:
        peer.responder.trust.crls.timeout_s = 0.2
        crl_server.delay_s = 3.0  # the fetch gives up after its timeout; the request is refused, not stuck
    label = _label(peer, (vendor.cert,))
    answer = await peer.post(_ir(_signer(vendor, crl_url=crl_server.url), "SN-0707"), label)  # type: ignore[arg-type]
    assert refused(answer) == {FailInfo.SIGNER_NOT_TRUSTED}
    assert "unknown" in answer.body.status.status_string[0]  # type: ignore[union-attr]


async def test_every_certificate_of_the_chain_is_checked(peer: Peer) -> None:
    root = SoftCa("Vendor Root")
    intermediate = SoftCa("Vendor Issuing", parent=root)
    signer = _signer(intermediate, chain=(intermediate.cert,))
    revoked_intermediate = root.crl([intermediate.cert.serial_number])
    label = _label(peer, (root.cert,), crls=(revoked_intermediate, intermediate.crl([])), crl_fetch=False)
    assert refused(await peer.post(_ir(signer, "SN-0708"), label)) == {FailInfo.CERT_REVOKED}  # type: ignore[arg-type]
    label = _label(peer, (root.cert,), crls=(root.crl([]), intermediate.crl([])), crl_fetch=False)
    assert issued(await peer.post(_ir(signer, "SN-0708"), label))  # type: ignore[arg-type]
    # without the intermediate in extraCerts there is no path to the root
    alone = SignatureProtector(signer.key, signer.certificate)
    assert refused(await peer.post(_ir(alone, "SN-0709"), label)) == {FailInfo.SIGNER_NOT_TRUSTED}  # type: ignore[arg-type]


async def test_cr_signed_by_a_revoked_certificate_of_this_appliance_is_refused(peer: Peer) -> None:
    """The finding of issue 11: a label trusting this appliance's issuing CA (a station credential issued by it)
    accepted a cr signed by a certificate a supervisor had revoked. The journal says so at once."""
    import time

    from appliance.va.revocation import Reason, Source, revoke_in_transaction

    label = _label(peer, (peer.responder.chain[0],))
    key, cert = await peer.enrol("SN-0710")
    signer = peer.device_signer(key, cert)
    cr = build(header(cert.subject), BodyType.CR, cert_request("SN-0711", new_key()), signer)
    assert issued(await peer.post(cr, label))

    def revoke(conn: object) -> None:
        revoke_in_transaction(conn, peer.responder.audit, "sam", [(format(cert.serial_number, "x"), "issuing",  # type: ignore[arg-type]
                              "SN-0710")], Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    peer.journal.call(peer.journal.transaction, revoke, "test revoke")
    cr = build(header(cert.subject), BodyType.CR, cert_request("SN-0712", new_key()), signer)
    assert refused(await peer.post(cr, label)) == {FailInfo.CERT_REVOKED}
    assert peer.journal.rows("device_serial='SN-0712'") == []


async def test_a_signer_certificate_whose_extensions_do_not_decode_is_refused(peer: Peer) -> None:
    """A protection certificate that loads but whose extensions do not decode (two subjectKeyIdentifiers: the
    certificate signed by the trusted CA, the message by its key) is the peer's malformed data: badDataFormat,
    never a systemFailure of ours; refused with the message's parsing (HTTP 400, an unprotected error), as every
    certificate in extraCerts must decode whole. The same for such a certificate further down extraCerts."""
    vendor = SoftCa("Vendor CA")
    label = _label(peer, (vendor.cert,), signer_revocation="none")
    key = new_key()
    builder = twice_ski(
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(vendor.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=30)),
        key.public_key(),
    )  # fmt: skip
    draft = builder.sign(vendor.key, hashes.SHA256())  # type: ignore[union-attr]
    odd = x509.load_der_x509_certificate(
        resign(draft.public_bytes(DER), draft.tbs_certificate_bytes, vendor.key)
    )
    assert odd.verify_directly_issued_by(vendor.cert) is None
    with pytest.raises(x509.DuplicateExtension):
        _ = odd.extensions
    signer = SignatureProtector(key, odd, (vendor.cert,))
    hdr = header(odd.subject, sender_kid=b"odd")  # the client's own code would not find one in it either
    odd_ir = build(hdr, BodyType.IR, cert_request("SN-0710", new_key()), signer)
    assert await peer.unparsed(odd_ir, label) == {FailInfo.BAD_DATA_FORMAT}
    good = _signer(vendor)
    behind = SignatureProtector(good.key, good.certificate, (vendor.cert, odd))
    assert await peer.unparsed(_ir(behind, "SN-0710"), label) == {FailInfo.BAD_DATA_FORMAT}  # type: ignore[arg-type]
    assert issued(await peer.post(_ir(good, "SN-0710"), label))  # type: ignore[arg-type]


async def test_a_refused_signer_is_told_what_is_wrong(peer: Peer) -> None:
    """Review finding 1: a signer is judged by what the message is. An ir on a greenfield label (idevid_roots:
    this appliance's root) signed by a birth certificate of this appliance that leaves out its issuing CA has no
    path to the anchor, and the answer says so (not "a certificate of this appliance signs its own kur and
    rr"); with its chain it enrols. On a label that trusts no signer for an ir, a certificate of this appliance
    is told what it may sign instead."""
    root = peer.responder.chain[-1]
    peer.responder.labels["field"] = CmpLabel("field", "fixture-1", idevid_roots=(root,))
    key, cert = await peer.enrol("SN-0720")
    alone = SignatureProtector(key, cert)
    answer = await peer.post(_ir(alone, "SN-0720"), "field")  # type: ignore[arg-type]
    assert refused(answer) == {FailInfo.SIGNER_NOT_TRUSTED}
    text = answer.body.status.status_string[0]  # type: ignore[union-attr]
    assert "extraCerts" in text and "idevid_roots" in text and "kur and rr" not in text, text
    peer.responder.labels["mac2"] = CmpLabel("mac2", "fixture-1", secret=b"x")
    answer = await peer.post(_ir(peer.device_signer(key, cert), "SN-0720"), "mac2")  # type: ignore[arg-type]
    assert refused(answer) == {FailInfo.SIGNER_NOT_TRUSTED}
    text = answer.body.status.status_string[0]  # type: ignore[union-attr]
    assert "trusts no signer for an ir" in text and "its own kur and rr" in text, text
