"""What the CMP server keeps between the messages of a transaction, and the shape of its answers.

RFC 9483 splits refusals in two (3.5, 3.6): a message that fails its checks (syntax, header, protection, signer,
transaction) is answered with an error message; a request that passed them but is refused (its template, proof
of possession, the work order, the core) is answered with the response of its type - ip, cp, kup, rp - carrying
status rejection and the failInfo. `error_answer` and `rejection` build the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance.cmp.errors import fail_info_for_error
from appliance.cmp.header import TransactionState
from appliance.cmp.model import (
    Body,
    BodyType,
    CertRepBody,
    CertResponse,
    ErrorBody,
    PKIMessage,
    PKIStatusInfo,
    RpBody,
)
from appliance.cmp.protection import ProtectionKind, VerifiedProtection, protection_kind
from appliance.cmp.trust import Signer
from appliance.errors import BirthlineError
from appliance.issuance.policy import IssueRequest


@dataclass(frozen=True)
class Credential:
    """How a request was protected. A transaction's later messages (certConf, pollReq) must be protected the same
    way: the same MAC algorithm and senderKID, or a signature by the same certificate (RFC 9483 3.2, 4.1.1: the
    certConf is protected like the request, never by the certificate it confirms)."""

    kind: ProtectionKind
    algorithm: str
    kid: bytes | None
    signer: bytes | None  # SHA-256 fingerprint of the signing certificate

    @classmethod
    def of(cls, msg: PKIMessage, verified: VerifiedProtection) -> Credential:
        alg = msg.header.protection_alg
        signer = verified.signer
        return cls(
            protection_kind(msg.header),
            "" if signer is not None or alg is None else alg.oid,
            msg.header.sender_kid if signer is None else None,
            None if signer is None else signer.fingerprint(hashes.SHA256()),
        )

    def describe(self) -> str:
        if self.signer is not None:
            return "a signature by the request's signer"
        return f"{self.kind.value} with senderKID {self.kid!r}"


@dataclass(frozen=True)
class Auth:
    """A message whose protection verified: how, and (signature) who signed it and how they are trusted."""

    verified: VerifiedProtection
    credential: Credential
    signer: Signer | None = None


@dataclass(frozen=True)
class Requested:
    """What a certificate request asked for, to tell accepted from grantedWithMods: the profile builds the
    certificate, and where it differs from the request the answer says so (RFC 9810 5.2.3)."""

    subject: x509.Name | None = None
    extensions: tuple[tuple[str, bool, bytes], ...] = ()  # (OID, critical, extnValue)

    def modifications(self, cert: x509.Certificate) -> list[str]:
        changed: list[str] = []
        if self.subject is not None and _attributes(self.subject) != _attributes(cert.subject):
            changed.append(f"subject {cert.subject.rfc4514_string()}")
        granted = {ext.oid.dotted_string: ext for ext in cert.extensions}
        for oid, critical, value in self.extensions:
            ext = granted.get(oid)
            if ext is None:
                changed.append(f"extension {oid} left out")
            elif ext.critical != critical or ext.value.public_bytes() != value:
                changed.append(f"extension {oid} as the profile sets it")
        return changed


def _attributes(name: x509.Name) -> list[tuple[str, object]]:
    # The same names whatever string type carried them (a template's UTF8String serialNumber is what the profile
    # writes as PrintableString).
    return [(a.oid.dotted_string, a.value) for a in name]


@dataclass
class Transaction:
    """An open transaction: awaiting certConf for `certificate`, or (RA mode, certificate None) awaiting the
    upstream CA, re-asked with `issue` at each pollReq."""

    label: str
    state: TransactionState
    cert_req_id: int
    certificate: x509.Certificate | None
    cert_serial: str
    expires: float
    request_sha256: bytes
    credential: Credential
    ca: str
    """The issuing CA (its issuance service) the request went to."""
    nonces: set[bytes] = field(default_factory=set)
    """Every senderNonce of the transaction so far, both sides: a later message must bring a fresh one."""
    answered: set[bytes] = field(default_factory=set)
    """Our senderNonces the peer's next message may echo as recipNonce: the last response that kept the
    transaction open, and the error messages since that answered the peer's own (authenticated) follow-ups."""
    busy: bool = False
    """A follow-up of this transaction is being answered: another one waits for that answer."""
    issue: IssueRequest | None = None
    rep_type: BodyType = BodyType.CP
    ra_request: int | None = None
    mac: bool = False
    implicit: bool = False  # implicitConfirm asked in the request and allowed by the label
    requested: Requested = field(default_factory=Requested)


@dataclass
class Answer:
    body_type: BodyType
    body: Body
    implicit: bool = False
    extra_certs: tuple[x509.Certificate, ...] = ()
    pending: Transaction | None = None


def _text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, BirthlineError) else "internal error"


def error_answer(exc: BaseException) -> Answer:
    """A message-level refusal: an error message."""
    return Answer(BodyType.ERROR, ErrorBody(PKIStatusInfo.rejection(fail_info_for_error(exc), _text(exc))))


def rejection(body_type: BodyType, cert_req_id: int, exc: BaseException) -> Answer:
    """A request-level refusal of a certificate request: ip / cp / kup with status rejection."""
    status = PKIStatusInfo.rejection(fail_info_for_error(exc), _text(exc))
    return Answer(body_type, CertRepBody((CertResponse(cert_req_id, status),)))


def revocation_rejection(exc: BaseException) -> Answer:
    """A request-level refusal of a revocation request: rp with status rejection."""
    return Answer(BodyType.RP, RpBody((PKIStatusInfo.rejection(fail_info_for_error(exc), _text(exc)),)))
