"""PKIHeader rules of RFC 9483 section 3.1, as checks and as builders.

- transactionID: 128 random bits in the first message of a transaction, copied into every later one.
- senderNonce: 128 fresh random bits in every message; recipNonce: the peer's last senderNonce.
- senderKID: required with MAC protection (it names the secret), and sender is then a directoryName; with a
  signature, the signer's subjectKeyIdentifier (checked in appliance.cmp.protection), and sender is the signer
  certificate's subject.
- pvno: cmp2000 (2), or cmp2021 (3) where RFC 9480 needs it (certConf with hashAlg); 3 is also accepted.
- messageTime: recommended; required when confirmWaitTime is sent.
The checks are pure: the caller supplies what it remembers of the transaction (TransactionState).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from appliance.cmp.build import required_pvno
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.model import (
    CERT_REQUEST_BODIES,
    PVNO_CMP2000,
    PVNO_CMP2021,
    BodyType,
    PKIHeader,
    PKIMessage,
)
from appliance.cmp.protection import ProtectionKind, protection_kind

NONCE_LENGTH = 16
MAX_ID_LENGTH = 64
SUPPORTED_PVNO = frozenset({PVNO_CMP2000, PVNO_CMP2021})

FIRST_MESSAGE_BODIES = CERT_REQUEST_BODIES | {BodyType.P10CR, BodyType.GENM, BodyType.RR, BodyType.NESTED}
"""Bodies that open a transaction (a client's or a downstream RA's first message)."""
FOLLOW_UP_BODIES = frozenset({BodyType.CERTCONF, BodyType.POLLREQ})
IMPLICIT_CONFIRM_BODIES = CERT_REQUEST_BODIES | {BodyType.P10CR}
"""RFC 9483 3.1: implicitConfirm is asked for in ir/cr/kur/p10cr (and granted in their responses) only."""
"""Request bodies that continue a transaction the server answered before."""


def new_transaction_id() -> bytes:
    return os.urandom(NONCE_LENGTH)


def new_nonce() -> bytes:
    return os.urandom(NONCE_LENGTH)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def request_header(
    *,
    sender: x509.GeneralName,
    recipient: x509.GeneralName,
    sender_kid: bytes | None = None,
    transaction_id: bytes | None = None,
    now: datetime | None = None,
    implicit_confirm: bool = False,
    cert_profile: Sequence[str] = (),
    pvno: int = PVNO_CMP2000,
) -> PKIHeader:
    """The header of the first message of a transaction: new transactionID (unless one is given, e.g. a
    retry that must keep its ID), fresh senderNonce, no recipNonce, messageTime."""
    return PKIHeader(
        sender=sender,
        recipient=recipient,
        pvno=pvno,
        message_time=_now(now),
        sender_kid=sender_kid,
        transaction_id=transaction_id or new_transaction_id(),
        sender_nonce=new_nonce(),
        implicit_confirm=implicit_confirm,
        cert_profile=tuple(cert_profile),
    )


def follow_up_header(
    received: PKIHeader,
    *,
    sender: x509.GeneralName,
    sender_kid: bytes | None = None,
    now: datetime | None = None,
    pvno: int = PVNO_CMP2000,
) -> PKIHeader:
    """A client's next message in a transaction (certConf after ip, pollReq after "waiting"): transactionID
    copied, recipNonce = the response's senderNonce, fresh senderNonce, recipient = the response's sender."""
    return PKIHeader(
        sender=sender,
        recipient=received.sender,
        pvno=pvno,
        message_time=_now(now),
        sender_kid=sender_kid,
        transaction_id=received.transaction_id,
        sender_nonce=new_nonce(),
        recip_nonce=received.sender_nonce,
    )


def response_header(
    request: PKIHeader,
    *,
    sender: x509.GeneralName,
    sender_kid: bytes | None = None,
    now: datetime | None = None,
    implicit_confirm: bool = False,
    confirm_wait_time: datetime | None = None,
) -> PKIHeader:
    """The header of an answer to `request`: transactionID copied, recipNonce = the request's senderNonce,
    fresh senderNonce, recipient = the request's sender, the request's pvno when we support it.
    `implicit_confirm` grants implicit confirmation (only if the request asked for it)."""
    return PKIHeader(
        sender=sender,
        recipient=request.sender,
        pvno=request.pvno if request.pvno in SUPPORTED_PVNO else PVNO_CMP2000,
        message_time=_now(now),
        sender_kid=sender_kid,
        transaction_id=request.transaction_id,
        sender_nonce=new_nonce(),
        recip_nonce=request.sender_nonce,
        implicit_confirm=implicit_confirm and request.implicit_confirm,
        confirm_wait_time=confirm_wait_time,
    )


@dataclass(frozen=True)
class TransactionState:
    """What a party remembers of an open transaction to check the peer's next message."""

    transaction_id: bytes
    last_sent_nonce: bytes
    """The senderNonce of the last message we sent; the peer must echo it as recipNonce."""


def _fail(fail_info: FailInfo, text: str) -> CmpError:
    return CmpError(text, fail_info=fail_info)


def _check_id(value: bytes | None, what: str, fail_info: FailInfo) -> bytes:
    if value is None:
        raise _fail(fail_info, f"{what} is missing")
    if not NONCE_LENGTH <= len(value) <= MAX_ID_LENGTH:
        raise _fail(fail_info, f"{what} of {len(value)} bytes: {NONCE_LENGTH} to {MAX_ID_LENGTH} required")
    return value


def check_header(
    message: PKIMessage,
    *,
    now: datetime | None = None,
    max_clock_skew: timedelta | None = None,
) -> None:
    """The rules every message must follow, whoever sent it and whatever state we hold. CmpError otherwise."""
    h = message.header
    if h.pvno not in SUPPORTED_PVNO:
        raise _fail(FailInfo.UNSUPPORTED_VERSION, f"pvno {h.pvno} is not supported (2 or 3)")
    if required_pvno(message.body_type, message.body) > h.pvno:
        raise _fail(FailInfo.UNSUPPORTED_VERSION, "certConf with hashAlg requires pvno cmp2021 (3)")
    _check_id(h.transaction_id, "transactionID", FailInfo.BAD_REQUEST)
    _check_id(h.sender_nonce, "senderNonce", FailInfo.BAD_SENDER_NONCE)
    if h.recip_nonce is not None:
        _check_id(h.recip_nonce, "recipNonce", FailInfo.BAD_RECIPIENT_NONCE)
    kind = protection_kind(h)
    if kind in (ProtectionKind.PBM, ProtectionKind.PBMAC1):
        if not h.sender_kid:
            raise _fail(FailInfo.BAD_MESSAGE_CHECK, "MAC-protected message without senderKID")
        # RFC 9483 3.1 / 4.1.5: with a shared secret the sender is named by a directoryName (the senderKID
        # names the secret); another GeneralName form cannot be matched to the secret's owner.
        if not isinstance(h.sender, x509.DirectoryName):
            raise _fail(
                FailInfo.BAD_MESSAGE_CHECK, "MAC-protected message whose sender is not a directoryName"
            )
    if kind is ProtectionKind.SIGNATURE and message.extra_certs:
        signer = message.extra_certs[0]
        if not isinstance(h.sender, x509.DirectoryName) or h.sender.value != signer.subject:
            raise _fail(FailInfo.BAD_MESSAGE_CHECK, "sender is not the subject of the protection certificate")
    if h.confirm_wait_time is not None and h.message_time is None:
        raise _fail(FailInfo.MISSING_TIME_STAMP, "confirmWaitTime requires messageTime")
    if max_clock_skew is not None and h.message_time is not None:
        skew = abs(h.message_time - (now or datetime.now(UTC)))
        if skew > max_clock_skew:
            raise _fail(FailInfo.BAD_TIME, f"messageTime is {int(skew.total_seconds())} s off our clock")


def check_request(
    message: PKIMessage,
    expect: TransactionState | None = None,
    *,
    now: datetime | None = None,
    max_clock_skew: timedelta | None = None,
) -> None:
    """Server side. `expect` is None for the first message of a transaction (which must be a body that opens
    one), else the state of the transaction this message continues (certConf, pollReq)."""
    check_header(message, now=now, max_clock_skew=max_clock_skew)
    h = message.header
    if h.confirm_wait_time is not None:
        # RFC 9483 3.1: confirmWaitTime belongs in ip/cp/kup (the server's promise), never in a request.
        raise _fail(FailInfo.BAD_REQUEST, "confirmWaitTime is for responses, not requests")
    if h.implicit_confirm and message.body_type not in IMPLICIT_CONFIRM_BODIES:
        raise _fail(
            FailInfo.BAD_REQUEST, f"implicitConfirm has no meaning in a {message.body_type.asn1_name}"
        )
    if len(h.cert_profile) > 1:
        raise _fail(FailInfo.BAD_REQUEST, "certProfile must name one profile (RFC 9483 3.1)")
    if expect is None:
        if message.body_type not in FIRST_MESSAGE_BODIES:
            raise _fail(FailInfo.BAD_REQUEST, f"{message.body_type.asn1_name} cannot start a transaction")
        # RFC 9483 3.1: recipNonce MUST be absent in the first message of a transaction (there is nothing to
        # echo yet); one that carries it answers a message we never sent.
        if h.recip_nonce is not None:
            raise _fail(
                FailInfo.BAD_RECIPIENT_NONCE, "the first message of a transaction must not carry recipNonce"
            )
        return
    if message.body_type not in FOLLOW_UP_BODIES:
        raise _fail(
            FailInfo.BAD_REQUEST, f"{message.body_type.asn1_name} is not expected in this transaction"
        )
    if h.transaction_id != expect.transaction_id:
        raise _fail(FailInfo.BAD_REQUEST, "transactionID does not belong to this transaction")
    if h.recip_nonce != expect.last_sent_nonce:
        raise _fail(FailInfo.BAD_RECIPIENT_NONCE, "recipNonce is not our last senderNonce")


def check_response(
    response: PKIMessage,
    request: PKIHeader,
    *,
    now: datetime | None = None,
    max_clock_skew: timedelta | None = None,
) -> None:
    """Client side (the forwarder): the response answers `request` (the header we sent)."""
    check_header(response, now=now, max_clock_skew=max_clock_skew)
    h = response.header
    if h.transaction_id != request.transaction_id:
        raise _fail(FailInfo.BAD_REQUEST, "transactionID of the response does not match the request")
    if h.recip_nonce != request.sender_nonce:
        raise _fail(FailInfo.BAD_RECIPIENT_NONCE, "recipNonce of the response is not our senderNonce")
    if h.sender_nonce == request.sender_nonce:
        raise _fail(FailInfo.BAD_SENDER_NONCE, "the response reuses our senderNonce (reflected message?)")
    if response.body_type in FIRST_MESSAGE_BODIES | FOLLOW_UP_BODIES:
        raise _fail(FailInfo.BAD_REQUEST, f"{response.body_type.asn1_name} is not a response")
