"""RFC 9483 4.1.1 (certConf), 3.1 (nonces) and 3.2 (one kind of protection per transaction): a certConf is
protected as its request was, never by the certificate it confirms; it brings a fresh senderNonce; its status is
consistent. A refused certConf is a message-level error and leaves the transaction open for a correct one."""

from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.cmp import (
    BodyType,
    CertConfBody,
    CertStatus,
    FailInfo,
    PKIStatus,
    PKIStatusInfo,
    ProtectionKind,
    SignatureProtector,
)
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


def _station(peer: Peer) -> SignatureProtector:
    assert peer.station.tls_key_pem is not None and peer.station.tls_cert_pem is not None
    key = serialization.load_pem_private_key(peer.station.tls_key_pem, None)
    return SignatureProtector(key, x509.load_pem_x509_certificate(peer.station.tls_cert_pem))  # type: ignore[arg-type]


async def test_cert_conf_rules(peer: Peer) -> None:
    station = _station(peer)
    key = new_key()
    request = build(header(station.certificate.subject), BodyType.IR, cert_request("SN-0301", key), station)
    ip = await peer.post(request, "signed")
    cert = issued(ip)
    good = CertConfBody((CertStatus.for_certificate(cert, 0),))

    # signed with the newly issued certificate instead of the request's credential
    by_new = SignatureProtector(key, cert)
    conf = peer.follow(ip, BodyType.CERTCONF, good, by_new, sender=x509.DirectoryName(cert.subject))
    assert refused(await peer.post(conf, "signed")) == {FailInfo.BAD_MESSAGE_CHECK}
    # the protection switched from signature to MAC (the label has no secret: verified or not, it is refused)
    peer.responder.labels["signed"] = dataclasses.replace(peer.responder.labels["signed"], secret=b"a secret")
    conf = peer.follow(ip, BodyType.CERTCONF, good, mac(b"signed", b"a secret"))
    assert refused(await peer.post(conf, "signed")) == {FailInfo.BAD_MESSAGE_CHECK}
    # the request's senderNonce again
    conf = peer.follow(ip, BodyType.CERTCONF, good, station, sender_nonce=request.header.sender_nonce)
    assert refused(await peer.post(conf, "signed")) == {FailInfo.BAD_SENDER_NONCE}
    # status accepted with a failInfo
    mixed = PKIStatusInfo(PKIStatus.ACCEPTED, (), frozenset({FailInfo.BAD_REQUEST}))
    conf = peer.follow(
        ip, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0, mixed),)), station
    )
    assert refused(await peer.post(conf, "signed")) == {FailInfo.BAD_REQUEST}
    assert peer.state(cert)[0] == "issued"
    # after the refusals that a stranger could send, a new transaction confirms it
    ip = await peer.post(build(header(station.certificate.subject), BodyType.IR, cert_request("SN-0301", key), station),
                         "signed")  # fmt: skip
    conf = peer.follow(
        ip, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(issued(ip), 0),)), station
    )
    assert (await peer.post(conf, "signed")).body_type is BodyType.PKICONF
    assert peer.state(cert)[0] == "confirmed"


async def test_cert_conf_keeps_the_mac_algorithm(peer: Peer) -> None:
    """3.2: PasswordBasedMac for the request, PBMAC1 for its certConf: refused."""
    ip = await peer.post(build(header(), BodyType.IR, cert_request("SN-0302", new_key()), mac()))
    cert = issued(ip)
    good = CertConfBody((CertStatus.for_certificate(cert, 0),))
    pbmac1 = dataclasses.replace(mac(), kind=ProtectionKind.PBMAC1)
    assert refused(await peer.post(peer.follow(ip, BodyType.CERTCONF, good, pbmac1))) == {
        FailInfo.BAD_MESSAGE_CHECK
    }
    assert (await peer.post(peer.follow(ip, BodyType.CERTCONF, good, mac()))).body_type is BodyType.PKICONF
    assert peer.state(cert)[0] == "confirmed"


async def test_a_wrong_cert_conf_leaves_the_transaction_open(peer: Peer) -> None:
    """Review finding 4: an authenticated, well-formed certConf that is wrong (another certReqId, a certHash of
    another certificate, accepted with a failInfo, two CertStatus) is answered with an error and the
    transaction stays open for the client's corrected certConf, which may echo either our last answer's
    senderNonce (the error's, as RFC 9810 recipNonce says) or the ip's; each retry brings a fresh senderNonce."""
    key = new_key()
    ip = await peer.post(build(header(), BodyType.IR, cert_request("SN-0303", key), mac()))
    cert = issued(ip)
    good = CertStatus.for_certificate(cert, 0)
    other = CertStatus.for_certificate(issued(await peer.post(build(header(implicit_confirm=True), BodyType.IR,
                                                                    cert_request("SN-0304", new_key()), mac()))), 0)  # fmt: skip
    mixed = CertStatus.for_certificate(
        cert, 0, PKIStatusInfo(PKIStatus.ACCEPTED, (), frozenset({FailInfo.BAD_REQUEST}))
    )
    last = ip
    for body, fail in (
        (CertConfBody((CertStatus.for_certificate(cert, 5),)), FailInfo.BAD_CERT_ID),
        (CertConfBody((dataclasses.replace(other, cert_req_id=0),)), FailInfo.BAD_CERT_ID),
        (CertConfBody((mixed,)), FailInfo.BAD_REQUEST),
        (CertConfBody((good, good)), FailInfo.BAD_REQUEST),
    ):
        wrong = await peer.post(peer.follow(ip, BodyType.CERTCONF, body, mac()))
        assert refused(wrong) == {fail}
        last = wrong
    assert peer.state(cert)[0] == "issued"
    # the failed certConf's senderNonce is used up
    used = peer.follow(
        ip, BodyType.CERTCONF, CertConfBody((good,)), mac(), sender_nonce=wrong.header.recip_nonce
    )
    assert refused(await peer.post(used)) == {FailInfo.BAD_SENDER_NONCE}
    done = await peer.post(peer.follow(last, BodyType.CERTCONF, CertConfBody((good,)), mac()))
    assert done.body_type is BodyType.PKICONF
    assert peer.state(cert)[0] == "confirmed"
    # the transaction ended with the pkiConf
    after = await peer.post(peer.follow(ip, BodyType.CERTCONF, CertConfBody((good,)), mac()))
    assert refused(after) == {FailInfo.BAD_REQUEST}
    # a client that echoes the ip's senderNonce after an error is answered too
    ip2 = await peer.post(build(header(), BodyType.IR, cert_request("SN-0305", new_key()), mac()))
    cert2 = issued(ip2)
    wrong = await peer.post(peer.follow(ip2, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert2, 3),)),
                                        mac()))  # fmt: skip
    assert refused(wrong) == {FailInfo.BAD_CERT_ID}
    done = await peer.post(peer.follow(ip2, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert2, 0),)),
                                       mac()))  # fmt: skip
    assert done.body_type is BodyType.PKICONF and peer.state(cert2)[0] == "confirmed"
