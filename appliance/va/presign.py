"""OCSP answers signed in batches: one HSM call (sign_many) for many answers.

cryptography builds a BasicOCSPResponse's to-be-signed ResponseData only while signing, and signs it with the
key it is given, one call at a time; it also spends ~200 us of CPU per answer doing so. So ResponseData is built
here by hand (ResponseMaker: one SingleResponse, the few fields we answer with), from the responderID,
signatureAlgorithm and certs that cryptography encodes once per signer with a stand-in key (as for
certificates, appliance/issuance/tbs.py). tests/appliance/va/test_presign.py checks the hand-built bytes equal
cryptography's, byte for byte, over many random answers. The HSM signs all of a batch's ResponseData in one
sign_many call (which verifies every signature) and each signature is spliced in.

    OCSPResponse      ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT ResponseBytes }
    ResponseBytes     ::= SEQUENCE { responseType OID (id-pkix-ocsp-basic), response OCTET STRING }
    BasicOCSPResponse ::= SEQUENCE { tbsResponseData, signatureAlgorithm, signature BIT STRING,
                                     certs [0] EXPLICIT SEQUENCE OF Certificate OPTIONAL }

It also builds the one request encoding almost every client sends for a CertID (a single request, no nonce,
no requestorName, unsigned; what openssl, cryptography and RFC 5019 clients send), so that a pre-produced
answer can be found from the request's bytes alone.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from appliance import der
from appliance.issuance.tbs import CaptureKey, capture_key

_BASIC = der.oid("1.3.6.1.5.5.7.48.1.1")  # id-pkix-ocsp-basic
_SUCCESSFUL = b"\x0a\x01\x00"  # ENUMERATED successful (0)
_TAG_CTX0 = 0xA0
_TAG_CTX1 = 0xA1
_GOOD = b"\x80\x00"  # [0] IMPLICIT NULL
_UNKNOWN = b"\x82\x00"  # [2] IMPLICIT NULL
_NONCE = der.oid("1.3.6.1.5.5.7.48.1.2")
_EXTENDED_REVOKE = der.oid("1.3.6.1.5.5.7.48.1.9")
_REASON_CODES = {
    x509.ReasonFlags.unspecified: 0, x509.ReasonFlags.key_compromise: 1, x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3, x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5, x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8, x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}  # fmt: skip
_SAMPLE_NOW = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_HASH_OIDS = {
    "sha1": der.oid("1.3.14.3.2.26"),
    "sha256": der.oid("2.16.840.1.101.3.4.2.1"),
    "sha384": der.oid("2.16.840.1.101.3.4.2.2"),
    "sha512": der.oid("2.16.840.1.101.3.4.2.3"),
}


@dataclass(frozen=True)
class Unsigned:
    """One answer waiting for its signature."""

    tbs: bytes  # ResponseData TLV, exactly as the HSM signs it
    signature_algorithm: bytes  # AlgorithmIdentifier TLV
    certs: bytes  # the [0] certs TLV, or b""

    def response(self, signature: bytes) -> bytes:
        basic = der.sequence(self.tbs, self.signature_algorithm, der.bit_string(signature), self.certs)
        return der.sequence(_SUCCESSFUL, der.tlv(_TAG_CTX0, der.sequence(_BASIC, der.octet_string(basic))))


def split_response(response: bytes) -> Unsigned:
    """The parts of a successful OCSPResponse around its signature (ValueError if it is not one)."""
    outer = der.read_tlv(response)
    if outer.tag != der.TAG_SEQUENCE or outer.end != len(response):
        raise ValueError("OCSPResponse is not one SEQUENCE")
    status, wrapped = der.read_children(response, outer)
    if response[status.start : status.end] != _SUCCESSFUL or wrapped.tag != _TAG_CTX0:
        raise ValueError("not a successful OCSPResponse")
    (rb,) = der.read_children(response, wrapped)
    rtype, octets = der.read_children(response, rb)
    if response[rtype.start : rtype.end] != _BASIC or octets.tag != der.TAG_OCTET_STRING:
        raise ValueError("not a BasicOCSPResponse")
    basic = der.read_tlv(response, octets.content, octets.end)
    parts = der.read_children(response, basic)
    if len(parts) not in (3, 4) or parts[2].tag != der.TAG_BIT_STRING:
        raise ValueError("BasicOCSPResponse has an unexpected shape")
    certs = response[parts[3].start : parts[3].end] if len(parts) == 4 else b""
    return Unsigned(response[parts[0].start : parts[0].end], response[parts[1].start : parts[1].end], certs)


class Presigner:
    """Turns OCSPResponseBuilders for one responder key into Unsigned answers, without the HSM."""

    def __init__(self, public_key: Any, hash_algorithm: hashes.HashAlgorithm | None) -> None:
        self._key: CaptureKey = capture_key(public_key)
        self.hash = hash_algorithm

    def unsigned(self, builder: ocsp.OCSPResponseBuilder) -> Unsigned:
        placeholder = builder.sign(self._key, self.hash)
        return split_response(placeholder.public_bytes(Encoding.DER))


# Three a signed answer (thisUpdate, nextUpdate, producedAt), the same few seconds for every answer of a batch.
@functools.lru_cache(maxsize=64)
def generalized_time(t: int) -> bytes:
    return der.tlv(der.TAG_GENERALIZED_TIME, time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t)).encode())


class ResponseMaker:
    """Hand-built ResponseData for one responder certificate: the bytes cryptography's OCSPResponseBuilder
    makes with responder_id(HASH, cert), certificates([cert]) and one response, producedAt = thisUpdate."""

    def __init__(self, responder_cert: x509.Certificate, hash_algorithm: hashes.HashAlgorithm | None) -> None:
        now = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        sample = Presigner(responder_cert.public_key(), hash_algorithm).unsigned(
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                b"\0" * 20,
                b"\0" * 20,
                1,
                hashes.SHA1(),  # noqa: S303 - a placeholder CertID; nothing is hashed
                ocsp.OCSPCertStatus.GOOD,
                now,
                now,
                None,
                None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
            .certificates([responder_cert])
        )
        tbs = der.read_tlv(sample.tbs)
        self.responder_id = sample.tbs[tbs.content : der.read_tlv(sample.tbs, tbs.content).end]
        self.signature_algorithm = sample.signature_algorithm
        self.certs = sample.certs

    def make(
        self,
        hash_name: str,
        name_hash: bytes,
        key_hash: bytes,
        serial: int,
        status: ocsp.OCSPCertStatus,
        this_update: int,
        next_update: int,
        revoked_at: int | None = None,
        reason: x509.ReasonFlags | None = None,
        *,
        extended_revoke: bool = False,
        nonce: bytes | None = None,
        produced_at: int | None = None,
    ) -> Unsigned:
        cert_id = der.sequence(
            der.sequence(_HASH_OIDS[hash_name], b"\x05\x00"),
            der.octet_string(name_hash),
            der.octet_string(key_hash),
            _integer(serial),
        )
        if status == ocsp.OCSPCertStatus.GOOD:
            cert_status = _GOOD
        elif status == ocsp.OCSPCertStatus.UNKNOWN:
            cert_status = _UNKNOWN
        else:
            info = generalized_time(revoked_at or 0)
            if reason is not None:
                info += der.tlv(_TAG_CTX0, b"\x0a\x01" + bytes((_REASON_CODES[reason],)))
            cert_status = der.tlv(_TAG_CTX1, info)
        this = generalized_time(this_update)
        single = cert_id + cert_status + this + der.tlv(_TAG_CTX0, generalized_time(next_update))
        produced = this if produced_at is None else generalized_time(produced_at)
        data = self.responder_id + produced + der.sequence(der.sequence(single))
        # responseExtensions, in the order the responder's builder adds them (RFC 6960 4.4.8, RFC 8954)
        extensions = b""
        if extended_revoke:
            extensions += der.sequence(_EXTENDED_REVOKE, der.octet_string(b"\x05\x00"))
        if nonce is not None:
            extensions += der.sequence(_NONCE, der.octet_string(der.octet_string(nonce)))
        if extensions:
            data += der.tlv(_TAG_CTX1, der.sequence(extensions))
        return Unsigned(der.sequence(data), self.signature_algorithm, self.certs)


def _integer(value: int) -> bytes:
    return der.tlv(der.TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def plain_request(hash_name: str, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    """The DER of the OCSPRequest most clients send for this CertID: one request, nothing else."""
    cert_id = der.sequence(
        der.sequence(_HASH_OIDS[hash_name], b"\x05\x00"),
        der.octet_string(name_hash),
        der.octet_string(key_hash),
        _integer(serial),
    )
    return der.sequence(der.sequence(der.sequence(der.sequence(cert_id))))
