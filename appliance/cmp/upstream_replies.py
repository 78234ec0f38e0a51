"""Judging the upstream CA's answers (docs/cmp.md "Replies"): what each answer decides for its outbox record.

An answer is checked before anything is recorded (its protection and header by `check`, the forwarder's); then:
accepted with the requested key -> confirm (or done with implicitConfirm granted); waiting / pollRep -> wait;
systemUnavail -> retry; duplicateCertReq, or an rr answered certRevoked -> done (no-op); a refusal that says the
message itself is wrong (malformed, bad protection or identifiers) -> park: the same bytes will never be taken;
any other refusal -> fail. Anything unexpected -> retry (the same bytes, later).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from appliance.cmp.errors import RETRYABLE_FAIL_INFO, CmpError, FailInfo
from appliance.cmp.model import (
    BodyType,
    CertRepBody,
    CertReqBody,
    ErrorBody,
    P10crBody,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    PollRepBody,
    RpBody,
)
from appliance.cmp.outbox import Outcome, Row
from appliance.cmp.parse import parse_message
from appliance.errors import BirthlineError

_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo

MESSAGE_FAIL_INFO: frozenset[FailInfo] = frozenset({
    FailInfo.BAD_ALG, FailInfo.BAD_MESSAGE_CHECK, FailInfo.BAD_DATA_FORMAT,
    FailInfo.WRONG_INTEGRITY, FailInfo.BAD_RECIPIENT_NONCE, FailInfo.BAD_SENDER_NONCE,
    FailInfo.TRANSACTION_ID_IN_USE, FailInfo.UNSUPPORTED_VERSION,
})  # fmt: skip
"""A refusal with one of these bits is about the message we built, not the request it carries: resending the
same bytes can never succeed, so the record is parked with the reason (and the other records go on). badRequest
is not one: CAs use it for refusals of the request too."""

_RESPONSE_TYPES = {
    "p10cr": (BodyType.CP, BodyType.IP),
    "cr": (BodyType.CP, BodyType.IP),
    "kur": (BodyType.KUP,),
}


def status_text(status: PKIStatusInfo) -> str:
    bits = ",".join(sorted(b.name for b in status.fail_info))
    return f"{'; '.join(status.status_string) or status.status.name}" + (f" [{bits}]" if bits else "")


def status_outcome(status: PKIStatusInfo, what: str) -> Outcome:
    text = f"{what}: {status_text(status)}"[:300]
    if status.fail_info & RETRYABLE_FAIL_INFO:
        return Outcome("retry", text)
    if FailInfo.DUPLICATE_CERT_REQ in status.fail_info:
        return Outcome("done", f"duplicate (no-op): {text}")
    if status.fail_info & MESSAGE_FAIL_INFO:
        return Outcome("park", text)
    return Outcome("fail", text)


def describe(msg: PKIMessage) -> str:
    if isinstance(msg.body, ErrorBody):
        return "upstream error: " + status_text(msg.body.status)
    return f"expected a nested reply, got {msg.body_type.asn1_name}"


def text(exc: BaseException) -> str:
    return (exc.message if isinstance(exc, BirthlineError) else str(exc))[:300]


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def issuer_chain(cert: x509.Certificate, pool: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of `cert` found in `pool` (the reply's extraCerts and caPubs, the configured upstream
    certificates), nearest first, each link's signature verified; it stops at a self-signed CA or a gap."""
    chain: list[x509.Certificate] = []
    current = cert
    while len(chain) < 8:
        if current.issuer == current.subject and issued_by(current, current):
            break
        parent = next((c for c in pool if c.subject == current.issuer and c not in chain
                       and issued_by(current, c)), None)  # fmt: skip
        if parent is None:
            break
        chain.append(parent)
        current = parent
    return tuple(chain)


def anchored_chain(
    cert: x509.Certificate, pool: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...] | None:
    """The issuers of `cert` up to and including the first of `anchors` they reach (from `pool` and the anchors
    themselves, each link verified), or None if they reach none."""
    chain = issuer_chain(cert, (*anchors, *pool))
    for i, ca in enumerate(chain):
        if ca in anchors:
            return chain[: i + 1]
    return None


def waiting_cert_req_id(waiting: PKIMessage) -> int:
    body = waiting.body
    if isinstance(body, CertRepBody) and body.responses:
        return body.responses[0].cert_req_id
    if isinstance(body, PollRepBody) and body.entries:
        return body.entries[0].cert_req_id
    return 0


def requested_key(request: PKIMessage) -> bytes | None:
    body = request.body
    if isinstance(body, P10crBody):
        return body.csr.public_key().public_bytes(*_SPKI)
    if isinstance(body, CertReqBody) and body.requests:
        return body.requests[0].template.public_key_der
    return None


def judge(
    row: Row,
    request: PKIMessage,
    answer: PKIMessage | Exception | None,
    *,
    check: Callable[[PKIMessage, PKIMessage], None],
    ca_certs: Sequence[x509.Certificate],
    backoff_base_s: float,
) -> Outcome:
    """What `answer` (to `request`, the row's request or its pollReq) decides for `row`."""
    if answer is None:
        return Outcome("retry", "no answer")
    if isinstance(answer, Exception):
        return Outcome("retry", text(answer))
    try:
        check(answer, request)
    except CmpError as exc:
        return Outcome("retry", f"reply rejected: {exc}"[:300])
    body = answer.body
    if isinstance(body, ErrorBody):
        return status_outcome(body.status, "upstream error")
    if isinstance(body, PollRepBody):
        after = body.entries[0].check_after if body.entries else backoff_base_s
        return Outcome("wait", "upstream: waiting", response=answer, check_after=float(after))
    if isinstance(body, RpBody) and row.kind == "rr":
        if not body.statuses:
            return Outcome("retry", "reply rejected: rp without status")
        status = body.statuses[0]
        if status.status in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS):
            return Outcome("done")
        if FailInfo.CERT_REVOKED in status.fail_info:
            return Outcome("done", "already revoked upstream")
        return status_outcome(status, "upstream refused the revocation")
    if isinstance(body, CertRepBody) and answer.body_type in _RESPONSE_TYPES.get(row.kind, ()):
        return _certificate(row, request, answer, body, ca_certs, backoff_base_s)
    return Outcome("retry", f"reply rejected: unexpected {answer.body_type.asn1_name}")


def _certificate(
    row: Row, request: PKIMessage, answer: PKIMessage, body: CertRepBody, ca_certs: Sequence[x509.Certificate],
    backoff_base_s: float,
) -> Outcome:  # fmt: skip
    if len(body.responses) != 1:
        return Outcome("retry", "reply rejected: not exactly one CertResponse")
    (rsp,) = body.responses
    if row.kind in ("cr", "kur") and rsp.cert_req_id != 0:
        return Outcome("retry", f"reply rejected: certReqId {rsp.cert_req_id} was not requested")
    if rsp.status.status is PKIStatus.WAITING:
        return Outcome("wait", "upstream: waiting", response=answer, check_after=backoff_base_s)
    if rsp.status.status not in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS):
        return status_outcome(rsp.status, "upstream refused the request")
    if rsp.certificate is None:
        return Outcome("retry", "reply rejected: accepted without a certificate")
    # after polling, `request` is our pollReq: the key and implicitConfirm are those of the stored request
    original = request
    if request.body_type is BodyType.POLLREQ and row.request_der is not None:
        original = parse_message(row.request_der)
    if rsp.certificate.public_key().public_bytes(*_SPKI) != requested_key(original):
        return Outcome("retry", "reply rejected: the certificate's key is not the requested key")
    # RA mode hands the certificate and its chain to a device as its birth certificate: it must chain to a CA the
    # administrator configured. A reply cannot choose the anchor. (A local-mode record only keeps the upstream's
    # certificate.)
    chain: tuple[x509.Certificate, ...] = ()
    if row.ra_request_id is not None:
        if not ca_certs:
            return Outcome("retry", "RA mode needs [upstream] ca_certs: the upstream CA certificates the devices'"
                           " certificates must chain to")  # fmt: skip
        anchored = anchored_chain(rsp.certificate, (*answer.extra_certs, *body.ca_pubs), ca_certs)
        if anchored is None:
            return Outcome(
                "retry", "reply rejected: the certificate does not chain to a CA in [upstream] ca_certs"
            )
        chain = anchored
    if answer.header.implicit_confirm and original.header.implicit_confirm:
        return Outcome("done", cert=rsp.certificate, chain=chain)
    return Outcome("confirm", cert=rsp.certificate, response=answer, cert_req_id=rsp.cert_req_id, chain=chain)
