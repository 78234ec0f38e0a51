"""The OCSP request parser (RFC 6960 4.1): bytes in, one CertID and its nonce out, or a refusal with a reason.

Pure: no I/O, no state. Every input ends as an `OcspRequest` or a `Refusal`; the parser raises nothing a peer
can provoke, so nothing a client sends reaches the responder's internalError (which is for our own failures).
The refusal's `reason` is a stable short code, counted by the responder and used as its log cause.

    OCSPRequest ::= SEQUENCE { tbsRequest TBSRequest, optionalSignature [0] EXPLICIT Signature OPTIONAL }
    TBSRequest  ::= SEQUENCE { version [0] EXPLICIT Version DEFAULT v1, requestorName [1] EXPLICIT GeneralName
                               OPTIONAL, requestList SEQUENCE OF Request, requestExtensions [2] EXPLICIT
                               Extensions OPTIONAL }
    Request     ::= SEQUENCE { reqCert CertID, singleRequestExtensions [0] EXPLICIT Extensions OPTIONAL }
    CertID      ::= SEQUENCE { hashAlgorithm AlgorithmIdentifier, issuerNameHash OCTET STRING,
                               issuerKeyHash OCTET STRING, serialNumber CertificateSerialNumber }

What is refused, and why (malformedRequest unless said otherwise):
* not strict DER (appliance.der: definite minimal lengths, nothing past an element's end), trailing bytes,
  a field out of place, a version other than v1;
* no request, or more than one: RFC 5019 2.1.1 requires exactly one, every common client sends one, and one
  answer per request keeps a request's cost at one signature;
* Extensions that hold an extension twice (RFC 5280 4.2: "MUST NOT include more than one instance of
  a particular extension"; a repeated nonce is the case seen), or a critical extension we do not understand;
* a nonce (RFC 8954) that is not an OCTET STRING of 1..32 octets (8954: "MUST reject ... with the
  malformedRequest OCSPResponseStatus");
* a negative serial number or one longer than 20 octets (RFC 5280 4.1.2.2);
* a CertID hash other than SHA-1, SHA-256, SHA-384, SHA-512: unauthorized (we cannot name that issuer).

Not checked: the signature of a signed request (RFC 5019 2.1.2 lets responders ignore it), requestorName
(any one well-formed element), singleRequestExtensions that are not critical.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from appliance import der

MAX_NONCE_BYTES = 32  # RFC 8954
MAX_SERIAL_OCTETS = 20  # RFC 5280 4.1.2.2

# DER content octets of the OIDs we act on.
_NONCE_OID = bytes.fromhex("2b0601050507300102")  # 1.3.6.1.5.5.7.48.1.2 id-pkix-ocsp-nonce
_HASHES: dict[bytes, hashes.HashAlgorithm] = {
    bytes.fromhex("2b0e03021a"): hashes.SHA1(),  # noqa: S303 - CertID identifies the issuer; it signs nothing
    bytes.fromhex("608648016503040201"): hashes.SHA256(),
    bytes.fromhex("608648016503040202"): hashes.SHA384(),
    bytes.fromhex("608648016503040203"): hashes.SHA512(),
}
_NULL = b"\x05\x00"
_TAG_BOOLEAN = 0x01
_CTX0, _CTX1, _CTX2 = 0xA0, 0xA1, 0xA2

MALFORMED = ocsp.OCSPResponseStatus.MALFORMED_REQUEST
UNAUTHORIZED = ocsp.OCSPResponseStatus.UNAUTHORIZED


@dataclass(frozen=True)
class OcspRequest:
    hash_algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int
    nonce: bytes | None


@dataclass(frozen=True)
class Refusal:
    status: ocsp.OCSPResponseStatus
    reason: str  # stable short code, e.g. "several-requests", "repeated-extension", "nonce-length"


class _Refused(ValueError):
    def __init__(self, reason: str, status: ocsp.OCSPResponseStatus = MALFORMED) -> None:
        super().__init__(reason)
        self.refusal = Refusal(status, reason)


def _expect(cond: bool, reason: str) -> None:
    if not cond:
        raise _Refused(reason)


def _children(data: bytes, parent: der.Tlv) -> list[der.Tlv]:
    try:
        return der.read_children(data, parent)
    except ValueError:
        raise _Refused("not-der") from None


def _only_child(data: bytes, parent: der.Tlv, reason: str) -> der.Tlv:
    inner = _children(data, parent)
    _expect(len(inner) == 1, reason)
    return inner[0]


def _valid_oid(content: bytes) -> bool:
    # Base-128 arcs: the last octet ends an arc; no arc starts with a padding 0x80 octet.
    if not content or content[-1] & 0x80:
        return False
    return all(not (b == 0x80 and (i == 0 or not content[i - 1] & 0x80)) for i, b in enumerate(content))


def _extensions(data: bytes, wrapper: der.Tlv, understood: frozenset[bytes]) -> dict[bytes, bytes]:
    """[n] EXPLICIT Extensions -> {extnID content: extnValue content}, refusing what we cannot honour."""
    seq = _only_child(data, wrapper, "bad-extensions")
    _expect(seq.tag == der.TAG_SEQUENCE, "bad-extensions")
    found: dict[bytes, bytes] = {}
    # Extensions is SIZE (1..MAX), but an empty one asks for nothing: taken as absent, as cryptography does.
    for item in _children(data, seq):
        _expect(item.tag == der.TAG_SEQUENCE, "bad-extension")
        fields = _children(data, item)
        _expect(len(fields) in (2, 3), "bad-extension")
        oid, value = fields[0], fields[-1]
        _expect(oid.tag == der.TAG_OID and value.tag == der.TAG_OCTET_STRING, "bad-extension")
        oid_bytes = data[oid.content : oid.end]
        _expect(_valid_oid(oid_bytes), "bad-extension")
        critical = False
        if len(fields) == 3:
            flag = fields[1]
            # DER: BOOLEAN TRUE is 0xFF, and FALSE, being the DEFAULT, is never encoded.
            _expect(flag.tag == _TAG_BOOLEAN and data[flag.content : flag.end] == b"\xff", "not-der")
            critical = True
        _expect(oid_bytes not in found, "repeated-extension")
        if critical and oid_bytes not in understood:
            raise _Refused("unsupported-critical-extension")
        found[oid_bytes] = data[value.content : value.end]
    return found


def _nonce(value: bytes) -> bytes:
    # RFC 8954 2.1: extnValue holds the DER of Nonce ::= OCTET STRING (SIZE(1..32)).
    try:
        inner = der.read_tlv(value)
    except ValueError:
        raise _Refused("bad-nonce") from None
    _expect(inner.tag == der.TAG_OCTET_STRING and inner.end == len(value), "bad-nonce")
    nonce = value[inner.content : inner.end]
    _expect(1 <= len(nonce) <= MAX_NONCE_BYTES, "nonce-length")
    return nonce


def _serial(data: bytes, tlv: der.Tlv) -> int:
    _expect(tlv.tag == der.TAG_INTEGER, "bad-serial")
    content = data[tlv.content : tlv.end]
    _expect(bool(content), "bad-serial")
    if len(content) > 1:
        # DER INTEGERs are minimal: no redundant leading 0x00 or 0xFF octet.
        _expect(not (content[0] == 0 and content[1] < 0x80), "not-der")
        _expect(not (content[0] == 0xFF and content[1] >= 0x80), "not-der")
    _expect(content[0] < 0x80, "bad-serial")  # negative
    value = int.from_bytes(content, "big")
    _expect(value.bit_length() <= 8 * MAX_SERIAL_OCTETS, "bad-serial")
    return value


def _cert_id(data: bytes, cert_id: der.Tlv) -> tuple[bytes, bytes, bytes, int]:
    _expect(cert_id.tag == der.TAG_SEQUENCE, "bad-certid")
    fields = _children(data, cert_id)
    _expect(len(fields) == 4, "bad-certid")
    alg, name_hash, key_hash, serial = fields
    _expect(alg.tag == der.TAG_SEQUENCE, "bad-certid")
    alg_fields = _children(data, alg)
    _expect(len(alg_fields) in (1, 2) and alg_fields[0].tag == der.TAG_OID, "bad-certid")
    if len(alg_fields) == 2:
        params = alg_fields[1]
        _expect(data[params.start : params.end] == _NULL, "bad-certid")  # the SHA-2 and SHA-1 parameters
    _expect(name_hash.tag == der.TAG_OCTET_STRING and key_hash.tag == der.TAG_OCTET_STRING, "bad-certid")
    return (
        data[alg_fields[0].content : alg_fields[0].end],
        data[name_hash.content : name_hash.end],
        data[key_hash.content : key_hash.end],
        _serial(data, serial),
    )


def _parse(data: bytes) -> OcspRequest:
    try:
        outer = der.read_tlv(data)
    except ValueError:
        raise _Refused("not-der") from None
    _expect(outer.tag == der.TAG_SEQUENCE, "not-an-ocsp-request")
    _expect(outer.end == len(data), "trailing-bytes")
    top = _children(data, outer)
    _expect(len(top) in (1, 2) and top[0].tag == der.TAG_SEQUENCE, "not-an-ocsp-request")
    if len(top) == 2:  # optionalSignature: not checked (RFC 5019 2.1.2), but it must be what it claims to be
        _expect(top[1].tag == _CTX0, "unexpected-field")
        _expect(_only_child(data, top[1], "bad-signature").tag == der.TAG_SEQUENCE, "bad-signature")

    fields = _children(data, top[0])
    pos = 0
    if pos < len(fields) and fields[pos].tag == _CTX0:  # version, DEFAULT v1: tolerated when spelled out
        version = _only_child(data, fields[pos], "unsupported-version")
        _expect(data[version.start : version.end] == b"\x02\x01\x00", "unsupported-version")
        pos += 1
    if pos < len(fields) and fields[pos].tag == _CTX1:  # requestorName: one GeneralName, not used
        _only_child(data, fields[pos], "bad-requestor-name")
        pos += 1
    _expect(pos < len(fields) and fields[pos].tag == der.TAG_SEQUENCE, "not-an-ocsp-request")
    requests = _children(data, fields[pos])
    pos += 1
    nonce: bytes | None = None
    if pos < len(fields) and fields[pos].tag == _CTX2:
        exts = _extensions(data, fields[pos], frozenset({_NONCE_OID}))
        if _NONCE_OID in exts:
            nonce = _nonce(exts[_NONCE_OID])
        pos += 1
    _expect(pos == len(fields), "unexpected-field")

    _expect(len(requests) > 0, "no-request")
    _expect(len(requests) == 1, "several-requests")
    request = requests[0]
    _expect(request.tag == der.TAG_SEQUENCE, "bad-request")
    parts = _children(data, request)
    _expect(len(parts) in (1, 2), "bad-request")
    if len(parts) == 2:
        _expect(parts[1].tag == _CTX0, "bad-request")
        _extensions(data, parts[1], frozenset())  # none understood: a critical one is refused
    alg_oid, name_hash, key_hash, serial = _cert_id(data, parts[0])

    algorithm = _HASHES.get(alg_oid)
    if algorithm is None:
        raise _Refused("unsupported-hash", UNAUTHORIZED)
    return OcspRequest(algorithm, name_hash, key_hash, serial, nonce)


def parse_request(data: bytes, max_bytes: int) -> OcspRequest | Refusal:
    """One OCSP request, or why it is refused. `max_bytes` is checked before anything is parsed."""
    if not data:
        return Refusal(MALFORMED, "empty")
    if len(data) > max_bytes:
        return Refusal(MALFORMED, "too-large")
    try:
        return _parse(bytes(data))
    except _Refused as refused:
        return refused.refusal
