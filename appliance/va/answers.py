"""What the OCSP responder (ocsp.py) answers with, and how an answer is built: pure, no journal, no HSM.

OcspAnswer is one OCSPResponse and what HTTP caching needs to know about it; the unsuccessful answers are made
once. A request, once parsed and its issuer found, is a Parsed. response_builder() builds its response with
cryptography's builder (the blocking path, one signature a call), unsigned_response() by hand for sign_many
(presign.py); each turns the status the journal gave (status.py) into RFC 6960's form, the non-issued revoked
form (2.2, 4.4.8) included.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ObjectIdentifier

from appliance import der
from appliance.va.presign import ResponseMaker, Unsigned
from appliance.va.revocation import Reason
from appliance.va.signer import OcspSigner
from appliance.va.status import CertStatus

EXTENDED_REVOKE_OID = ObjectIdentifier("1.3.6.1.5.5.7.48.1.9")  # RFC 6960 4.4.8, value NULL
NON_ISSUED_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# SHA-1 only identifies the issuer in a CertID (openssl sends it by default); it signs nothing.
CERTID_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),  # noqa: S303
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)


# -- answers -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OcspAnswer:
    """One OCSPResponse and what HTTP caching needs to know about it."""

    der: bytes
    status: ocsp.OCSPResponseStatus
    produced_at: float | None = None
    next_update: float | None = None
    cacheable: bool = False  # a successful answer without a nonce: HTTP caches may keep it
    cert_status: str | None = None  # good / revoked / unknown

    @functools.cached_property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.der).hexdigest()[:32] + '"'


def unsuccessful(status: ocsp.OCSPResponseStatus) -> OcspAnswer:
    return OcspAnswer(
        ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER), status
    )


MALFORMED = unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
INTERNAL_ERROR = unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER = unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
UNAUTHORIZED = unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
REFUSALS = {a.status: a for a in (MALFORMED, UNAUTHORIZED)}


def key_hash_input(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits octet), as CertID's issuerKeyHash hashes."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    outer = der.read_tlv(spki)
    _alg, bits = der.read_children(spki, outer)
    return spki[bits.content + 1 : bits.end]


def digest(alg: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(alg)
    h.update(data)
    return h.finalize()


@dataclass(frozen=True)
class Parsed:
    ca: str
    algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int
    nonce: bytes | None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.ca, self.serial, self.algorithm.name)


@dataclass
class Entry:
    answer: OcspAnswer
    fresh_until: float
    dead: bool = False  # dropped from the cache (changed, evicted, expired): never served again


@dataclass
class Signing:
    signer: OcspSigner
    key: Any  # the HSM private key
    hash: hashes.HashAlgorithm | None  # None for Ed25519

    @functools.cached_property
    def maker(self) -> ResponseMaker:
        return ResponseMaker(self.signer.cert, self.hash)


# A request waiting for its status and its answer's signature: what it asked, when, and where the answer (with the
# status it states) goes.
Waiting = tuple[Parsed, float, "asyncio.Future[tuple[OcspAnswer, CertStatus]]"]
# ... and once its status is read.
Looked = tuple[Parsed, CertStatus, float, "asyncio.Future[tuple[OcspAnswer, CertStatus]]"]


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.UTC)


def answer_of(
    response: bytes, p: Parsed, status: CertStatus, this_update: int, next_update: int
) -> OcspAnswer:
    return OcspAnswer(
        response, ocsp.OCSPResponseStatus.SUCCESSFUL,
        float(this_update), float(next_update), p.nonce is None, status.kind,
    )  # fmt: skip


def unsigned_response(
    signing: Signing, p: Parsed, status: CertStatus, now: float, validity_s: float
) -> tuple[Unsigned, int, int]:
    """What response_builder()'s builder would sign, built by hand (presign.py) for sign_many."""
    this_update = int(now)
    next_update = this_update + int(validity_s)
    revoked_at, reason = None, None
    if status.kind == "good":
        cert_status = ocsp.OCSPCertStatus.GOOD
    elif status.kind == "unknown":
        cert_status = ocsp.OCSPCertStatus.UNKNOWN
    elif status.non_issued:
        cert_status, revoked_at, reason = (
            ocsp.OCSPCertStatus.REVOKED,
            0,
            x509.ReasonFlags.certificate_hold,
        )
    else:
        why = status.reason or Reason.UNSPECIFIED
        cert_status, revoked_at = ocsp.OCSPCertStatus.REVOKED, int(status.revoked_at or 0.0)
        reason = None if why == Reason.UNSPECIFIED else why.flag
    unsigned = signing.maker.make(
        p.algorithm.name, p.name_hash, p.key_hash, p.serial, cert_status, this_update, next_update,
        revoked_at, reason, extended_revoke=status.non_issued, nonce=p.nonce,
    )  # fmt: skip
    return unsigned, this_update, next_update


def response_builder(
    signing: Signing, p: Parsed, status: CertStatus, now: float, validity_s: float
) -> tuple[ocsp.OCSPResponseBuilder, int, int]:
    this_update = int(now)
    next_update = this_update + int(validity_s)
    if status.kind == "good":
        cert_status, rev_time, rev_reason = ocsp.OCSPCertStatus.GOOD, None, None
    elif status.kind == "unknown":
        cert_status, rev_time, rev_reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
    elif status.non_issued:
        cert_status, rev_time, rev_reason = (
            ocsp.OCSPCertStatus.REVOKED,
            NON_ISSUED_TIME,
            x509.ReasonFlags.certificate_hold,
        )
    else:
        reason = status.reason or Reason.UNSPECIFIED
        cert_status, rev_time = ocsp.OCSPCertStatus.REVOKED, utc(status.revoked_at or 0.0)
        rev_reason = None if reason == Reason.UNSPECIFIED else reason.flag
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            p.name_hash,
            p.key_hash,
            p.serial,
            p.algorithm,
            cert_status,
            utc(this_update),
            utc(next_update),
            rev_time,
            rev_reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, signing.signer.cert)
        .certificates([signing.signer.cert])
    )
    if status.non_issued:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(EXTENDED_REVOKE_OID, b"\x05\x00"), critical=False
        )
    if p.nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(p.nonce), critical=False)
    return builder, this_update, next_update
