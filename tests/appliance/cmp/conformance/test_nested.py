"""RFC 9483 5.2.2: a PKI management entity wraps requests in a nested message it signs: one request with added
protection (5.2.2.1: the same transactionID; answered with that request's own answer), or a batch (5.2.2.2:
a fresh transactionID; answered with a nested message). MAC protection does not carry a nested message."""

from __future__ import annotations

import dataclasses
import os

from appliance.cmp import BodyType, CertConfBody, CertStatus, FailInfo, NestedBody, PKIMessage
from appliance.cmp.header import follow_up_header
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


def _nest(peer: Peer, *inner: PKIMessage, tid: bytes | None = None, **kw: object) -> PKIMessage:
    ra = peer.ra_signer()
    hdr = dataclasses.replace(header(ra.certificate.subject, transaction_id=tid), **kw)  # type: ignore[arg-type]
    return build(hdr, BodyType.NESTED, NestedBody.of(*inner), ra)


def _protect(peer: Peer, inner: PKIMessage, **kw: object) -> PKIMessage:
    """5.2.2.1: protection added to one message: the inner message's transactionID and nonces copied."""
    h = inner.header
    return _nest(peer, inner, tid=h.transaction_id, **{"sender_nonce": h.sender_nonce, "recip_nonce": h.recip_nonce,
                                                       **kw})  # fmt: skip


async def test_a_nested_message_must_be_signature_protected(peer: Peer) -> None:
    """Even on a label that takes nested messages and knows the MAC secret."""
    peer.responder.labels["mac"] = dataclasses.replace(peer.responder.labels["mac"], allow_nested=True)
    inner = build(header(), BodyType.IR, cert_request("SN-0501", new_key()), mac())
    outer = build(header(), BodyType.NESTED, NestedBody.of(inner), mac())
    assert refused(await peer.post(outer)) == {FailInfo.BAD_MESSAGE_CHECK}
    assert peer.journal.rows("device_serial='SN-0501'") == []


async def test_added_protection_is_answered_with_the_plain_response(peer: Peer) -> None:
    """5.2.2.1: one inner request with the outer transactionID: the answer is the inner request's (an ip), and
    the certConf comes wrapped the same way and is answered with a plain pkiConf."""
    ra = peer.ra_signer()
    inner = build(header(ra.certificate.subject), BodyType.IR, cert_request("SN-0502", new_key()), ra)
    answer = await peer.post(_protect(peer, inner), "ra")
    assert answer.body_type is BodyType.IP and answer.header.transaction_id == inner.header.transaction_id
    cert = issued(answer)
    conf = build(follow_up_header(answer.header, sender=inner.header.sender), BodyType.CERTCONF,
                 CertConfBody((CertStatus.for_certificate(cert, 0),)), ra)  # fmt: skip
    done = await peer.post(_protect(peer, conf), "ra")
    assert done.body_type is BodyType.PKICONF
    assert peer.state(cert)[0] == "confirmed"


async def test_a_batch_is_answered_with_a_nested_message_each_request_on_its_own(peer: Peer) -> None:
    """5.2.2.2: a fresh outer transactionID; each inner request verified and authorised on its own."""
    ra = peer.ra_signer()
    ra_name = ra.certificate.subject
    good = [
        build(header(ra_name), BodyType.IR, cert_request(s, new_key()), ra) for s in ("SN-0503", "SN-0504")
    ]
    outside = build(header(ra_name), BodyType.IR, cert_request("XX-0503", new_key()), ra)
    forged = build(
        header(), BodyType.IR, cert_request("SN-0505", new_key()), mac()
    )  # no secret on this label
    answer = await peer.post(_nest(peer, *good, outside, forged, tid=os.urandom(16)), "ra")
    assert isinstance(answer.body, NestedBody)
    replies = answer.body.messages
    assert [m.header.transaction_id for m in replies] == [
        m.header.transaction_id for m in (*good, outside, forged)
    ]
    assert [issued(m).subject for m in replies[:2]] == [g.body.requests[0].template.subject for g in good]  # type: ignore[union-attr]
    assert refused(replies[2], BodyType.IP) == {FailInfo.NOT_AUTHORIZED}
    assert refused(replies[3]) == {FailInfo.BAD_MESSAGE_CHECK}


async def test_the_outer_header_of_a_nested_message(peer: Peer) -> None:
    """Review finding 2. 5.2.2.1: protection added to one request copies its transactionID, senderNonce and
    recipNonce; another senderNonce is badSenderNonce, another recipNonce badRecipientNonce. 5.2.2.2: a batch
    has a fresh transactionID and senderNonce of its own (an inner message's: badRequest, badSenderNonce) and,
    as the first message of its exchange, no recipNonce (badRecipientNonce). Each is refused as a whole with an
    error message, before any inner request reaches the core."""
    ra = peer.ra_signer()

    def ir(serial: str) -> PKIMessage:
        return build(header(ra.certificate.subject), BodyType.IR, cert_request(serial, new_key()), ra)

    one = ir("SN-0510")
    assert refused(await peer.post(_protect(peer, one, sender_nonce=os.urandom(16)), "ra")) == {
        FailInfo.BAD_SENDER_NONCE
    }
    assert refused(await peer.post(_protect(peer, one, recip_nonce=os.urandom(16)), "ra")) == {
        FailInfo.BAD_RECIPIENT_NONCE
    }
    two = [ir("SN-0511"), ir("SN-0512")]
    batch = _nest(peer, *two, tid=os.urandom(16), recip_nonce=os.urandom(16))
    assert refused(await peer.post(batch, "ra")) == {FailInfo.BAD_RECIPIENT_NONCE}
    batch = _nest(peer, *two, tid=two[1].header.transaction_id)
    assert refused(await peer.post(batch, "ra")) == {FailInfo.BAD_REQUEST}
    batch = _nest(peer, *two, tid=os.urandom(16), sender_nonce=two[0].header.sender_nonce)
    assert refused(await peer.post(batch, "ra")) == {FailInfo.BAD_SENDER_NONCE}
    for serial in ("SN-0510", "SN-0511", "SN-0512"):
        assert peer.journal.rows(f"device_serial='{serial}'") == []
    # the same messages, properly wrapped, go through
    assert issued(await peer.post(_protect(peer, one), "ra"))
    answer = await peer.post(_nest(peer, *two, tid=os.urandom(16)), "ra")
    assert isinstance(answer.body, NestedBody) and all(issued(m) for m in answer.body.messages)
