"""RFC 9483 5.1 (responding to requests) and 3.1/3.3/4.1.1 for what the server sends: the answer copies the
request's sender into recipient, its senderNonce into recipNonce and its transactionID, with a fresh senderNonce
and messageTime; a new request may not reuse an open transactionID; an ip carries the certificate's chain in
extraCerts and, under MAC protection, the root in caPubs; a cp carries no caPubs."""

from __future__ import annotations

import dataclasses

from appliance.cmp import BodyType, CertRepBody, FailInfo
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


async def test_the_answer_header_answers_the_request(peer: Peer) -> None:
    request = build(header(), BodyType.IR, cert_request("SN-0901", new_key()), mac())
    answer = await peer.post(request)
    cert = issued(answer)
    h, r = answer.header, request.header
    assert (h.recipient, h.transaction_id, h.recip_nonce, h.pvno) == (
        r.sender,
        r.transaction_id,
        r.sender_nonce,
        r.pvno,
    )
    assert h.sender_nonce is not None and len(h.sender_nonce) == 16 and h.sender_nonce != r.sender_nonce
    assert h.message_time is not None and h.sender_kid == b"mac"
    # 3.3 / 4.1.1: the chain of the new certificate in extraCerts; the root in caPubs (MAC-protected ir)
    chain = peer.responder.chain
    assert answer.extra_certs[: len(chain)] == chain and chain[0].subject == cert.issuer
    assert isinstance(answer.body, CertRepBody) and answer.body.ca_pubs == (chain[-1],)
    cp = await peer.post(build(header(), BodyType.CR, cert_request("SN-0902", new_key()), mac()))
    assert isinstance(cp.body, CertRepBody) and cp.body.ca_pubs == ()  # 4.1.2: caPubs SHOULD be absent


async def test_a_new_request_may_not_reuse_an_open_transaction_id(peer: Peer) -> None:
    """5.1: a request that starts a new PKI management operation must not use a transactionID in use."""
    first = build(header(), BodyType.IR, cert_request("SN-0903", new_key()), mac())
    issued(await peer.post(first))  # the transaction waits for certConf
    other = build(dataclasses.replace(header(), transaction_id=first.header.transaction_id), BodyType.IR,
                  cert_request("SN-0904", new_key()), mac())  # fmt: skip
    assert refused(await peer.post(other)) == {FailInfo.TRANSACTION_ID_IN_USE}
    assert peer.journal.rows("device_serial='SN-0904'") == []
    # the very same request again is a retry (a lost answer): answered again, with the same certificate
    assert issued(await peer.post(first)) == issued(await peer.post(first))


async def test_no_cert_conf_in_time_is_handled_like_a_rejection(peer: Peer) -> None:
    """4.1.1: without certConf in time the operation ends as if the EE had rejected the certificate: it stays
    unconfirmed, and a late certConf finds no transaction (badRequest)."""
    from appliance.cmp import CertConfBody, CertStatus

    ip = await peer.post(build(header(), BodyType.IR, cert_request("SN-0905", new_key()), mac()))
    cert = issued(ip)
    for transaction in peer.responder.pending.values():
        transaction.expires = 0.0  # confirm_wait_s has passed
    late = peer.follow(ip, BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),)), mac())
    assert refused(await peer.post(late)) == {FailInfo.BAD_REQUEST}
    assert peer.state(cert)[0] == "issued"
