"""Bytes in, PKIMessage out.

Order of work for a received message, cheapest and most bounding first:
1. size limit, before anything else;
2. one linear framing scan (`_der.scan`): definite lengths, depth bound, no trailing bytes (the inner messages
   of a nested body are framed by the outer message's scan, not scanned again);
3. slicing of header, body, protection and extraCerts out of the received bytes;
4. the header and the hot bodies (p10cr, ip/cp/kup/ccp, certConf, pkiConf, pollReq, pollRep, error) are read
   by hand from those slices with the `_der` readers, strictly: DER (exact universal tags, primitive strings,
   minimal INTEGERs, ...) and the RFC 9810 ASN.1 field by field (order, OPTIONAL fields at most once, nothing
   else, SIZE (1..MAX) lists non-empty). Certificates and CSRs go to cryptography's loaders, which check their
   whole structure. pyasn1 (rfc9480 schemas) still decodes the other bodies (ir/cr/kur/ccr/krr, genm/genp,
   rr/rp, the unmodelled ones, and a CertifiedKeyPair with privateKey or publicationInfo) to validate them and
   read scalars: they are rarer, structurally richer, and not on a throughput path. The hot path is by hand
   because pyasn1 cost ~0.34 ms per PKIHeader and ~1.1 ms for a whole cp message (now ~0.04 ms and ~0.1 ms);
   a nested batch of 50 p10cr took ~41 ms (now ~4.3 ms), and every forwarded record is several messages;
5. values whose exact bytes matter (names, public keys, certificates, CertRequest, inner messages) are taken
   from the slices, never re-encoded.
Every failure is one CmpError (badDataFormat unless a more precise bit applies); pyasn1's exceptions never leave.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_alt_modules import rfc9480

from appliance import pyasn1_repr  # noqa: F401 - installs pyasn1's cheap schema repr (see there)
from appliance.cmp import _der, oids
from appliance.cmp._names import general_name_from_der, name_from_der
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.model import (
    CERT_REQUEST_BODIES,
    CERT_RESPONSE_BODIES,
    DEFAULT_LIMITS,
    AlgorithmIdentifier,
    Body,
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertReqMessage,
    CertResponse,
    CertStatus,
    CertTemplate,
    ErrorBody,
    GenBody,
    InfoTypeAndValue,
    Limits,
    NestedBody,
    NestedItem,
    OtherBody,
    P10crBody,
    PkiConfBody,
    PKIHeader,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    PollRepBody,
    PollRepEntry,
    PollReqBody,
    PopKind,
    RevDetails,
    RevokedCertId,
    RpBody,
    RrBody,
)

T = TypeVar("T")
Tlv = _der.Tlv

# Everything pyasn1, cryptography's loaders and our slicing raise on bad input. (x509.InvalidVersion, for a
# certificate or CSR with an unknown version, is not a ValueError.)
_DECODE_ERRORS = (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
                  RecursionError, UnicodeDecodeError, x509.InvalidVersion)  # fmt: skip

_REASONS = {0: "unspecified", 1: "key_compromise", 2: "ca_compromise", 3: "affiliation_changed",
            4: "superseded", 5: "cessation_of_operation", 6: "certificate_hold", 8: "remove_from_crl",
            9: "privilege_withdrawn", 10: "aa_compromise"}  # fmt: skip


@contextmanager
def _boundary(what: str) -> Iterator[None]:
    """One CmpError (badDataFormat) for whatever decoding raised. Its text goes to the peer in statusString: our
    own words (a Malformed's), never a library's exception text (pyasn1 reprs its schema objects in them)."""
    try:
        yield
    except CmpError:
        raise
    except _DECODE_ERRORS as exc:
        detail = (
            str(exc) if isinstance(exc, _der.Malformed) else "not DER of its ASN.1 type (RFC 9810, RFC 4211)"
        )
        raise CmpError(f"{what}: {detail}"[:300], fail_info=FailInfo.BAD_DATA_FORMAT) from None


@functools.lru_cache(maxsize=64)
def _certificate(der: bytes) -> x509.Certificate:
    """A certificate a peer sent, decoded whole here. cryptography decodes names and extensions only when asked,
    so one that loads may still raise later (two extensions of one type: DuplicateExtension; an undecodable
    name or extension value), deep in the trust or enrolment code: the peer's malformed data, answered as ours
    (systemFailure). What parse_message hands on decodes.

    Cached by its bytes (a certificate object is immutable; a refusal is not cached): a peer's protection
    certificate and its chain come in the extraCerts of every message, twice per record in an upstream drain.
    64 entries: those repeat; a device's certificate, seen once, only passes through."""
    try:
        cert = x509.load_der_x509_certificate(der)
        _ = cert.subject, cert.issuer, cert.extensions
    except Exception:  # noqa: BLE001 - what cryptography raises for a peer's bytes is not a stable contract
        raise _der.Malformed(
            "a certificate does not decode whole as an X.509 certificate (RFC 5280: DER, names of string"
            " attributes, each extension at most once and its value the DER of its type)"
        ) from None
    return cert


def _csr(der: bytes) -> x509.CertificateSigningRequest:
    """A p10cr's PKCS#10 request: its structure here (strict DER). Its subject and extensions are decoded by the
    enroller (appliance/cmp/enrol.py): a CSR whose requested extensions do not decode is the device's request
    content, refused with a protected cp (RFC 9483 3.6, 4.1.4), not a message that does not parse."""
    try:
        return x509.load_der_x509_csr(der)
    except Exception:  # noqa: BLE001 - as in _certificate
        raise _der.Malformed(
            "the CSR does not decode as a PKCS#10 CertificationRequest (RFC 2986, DER)"
        ) from None


def _decode(der: bytes, spec: Any) -> Any:
    value, rest = der_decoder.decode(der, asn1Spec=spec)
    if rest:
        raise _der.Malformed("trailing bytes")
    return value


def _present(value: Any) -> bool:
    return bool(value.isValue)


def _raw(data: bytes, t: Tlv) -> bytes:
    return data[t.start : t.end]


def _kids(data: bytes, t: Tlv, limit: int | None = None, what: str = "list") -> list[Tlv]:
    out = _der.children(data, t)
    if limit is not None and len(out) > limit:
        raise CmpError(f"{what} has {len(out)} entries, more than {limit}", fail_info=FailInfo.BAD_REQUEST)
    return out


def _only_child(data: bytes, t: Tlv) -> Tlv:
    kids = _der.children(data, t)
    if len(kids) != 1:
        raise _der.Malformed("explicit tag must wrap exactly one element")
    return kids[0]


def _retag(data: bytes, t: Tlv, tag: int) -> bytes:
    """An IMPLICIT-tagged element as its universal type (same length octets, same content)."""
    return bytes((tag,)) + data[t.start + 1 : t.end]


def _algorithm(value: Any) -> AlgorithmIdentifier:
    params = value["parameters"]
    return AlgorithmIdentifier(str(value["algorithm"]), bytes(params) if _present(params) else None)


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(s) for s in value) if _present(value) else ()


def _status_info(value: Any) -> PKIStatusInfo:
    code = int(value["status"])
    if code not in PKIStatus._value2member_map_:
        raise _der.Malformed(f"unknown PKIStatus {code}")
    bits: frozenset[FailInfo] = frozenset()
    if _present(value["failInfo"]):
        bits = frozenset(FailInfo(i) for i, bit in enumerate(value["failInfo"]) if bit and i <= max(FailInfo))
    return PKIStatusInfo(PKIStatus(code), _texts(value["statusString"]), bits)


def parse_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> PKIMessage:
    """Parse one PKIMessage exactly as received. Raises CmpError."""
    return _parse(bytes(data), limits, 0)


def _parse(data: bytes, limits: Limits, depth: int) -> PKIMessage:
    if len(data) > limits.max_message_size:
        raise CmpError(f"message of {len(data)} bytes exceeds the limit of {limits.max_message_size}",
                       fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
    with _boundary("malformed PKIMessage"):
        # An inner message of a nested body (depth > 0) lies inside the outer message, whose scan framed every
        # element of it already, with less depth to spare: no second pass.
        top = _der.scan(data, limits.max_der_depth) if depth == 0 else _der.read_frame(data, 0, len(data))
        if top.tag != 0x30:
            raise _der.Malformed("not a SEQUENCE")
        parts = _der.children(data, top)
        if len(parts) < 2 or parts[0].tag != 0x30 or parts[1].tag & 0xE0 != 0xA0 or parts[1].tag & 0x1F > 26:
            raise _der.Malformed("expected header and body")
        rest = parts[2:]
        protection: bytes | None = None
        extra_certs: tuple[x509.Certificate, ...] = ()
        if rest and rest[0].tag == 0xA0:
            bits = _only_child(data, rest.pop(0))
            if bits.tag != 0x03 or bits.end == bits.content or data[bits.content] != 0:
                raise _der.Malformed("protection must be a BIT STRING of whole octets")
            protection = data[bits.content + 1 : bits.end]
        if rest and rest[0].tag == 0xA1:
            seq = _only_child(data, rest.pop(0))
            if seq.tag != 0x30:
                raise _der.Malformed("extraCerts is not a SEQUENCE")
            certs = _kids(data, seq, limits.max_extra_certs, "extraCerts")
            if not certs:
                raise _der.Malformed("extraCerts must not be empty")
            extra_certs = tuple(_certificate(_raw(data, c)) for c in certs)
        if rest:
            raise _der.Malformed("unexpected element after the body")
        header_tlv, body_tlv = parts[0], parts[1]
        header = _parse_header(data, header_tlv)
        body_type = BodyType(body_tlv.tag & 0x1F)
    body = _parse_body(data, body_tlv, body_type, limits, depth)
    return PKIMessage(header, body_type, body, protection, extra_certs, data, _raw(data, header_tlv),
                      _raw(data, body_tlv))  # fmt: skip


def _parse_header(data: bytes, t: Tlv) -> PKIHeader:
    """PKIHeader (RFC 9810 5.1.1): pvno, sender, recipient, then the OPTIONAL fields [0] to [8], all EXPLICIT,
    in increasing tag order and each at most once."""
    kids = _der.children(data, t)
    if len(kids) < 3:
        raise _der.Malformed("PKIHeader needs pvno, sender and recipient")
    pvno = _der.integer_value(data, kids[0])
    sender = general_name_from_der(_raw(data, kids[1]))
    recipient = general_name_from_der(_raw(data, kids[2]))
    fields: dict[int, Tlv] = {}
    previous = -1
    for kid in kids[3:]:
        number = kid.tag - 0xA0
        if not previous < number <= 8:
            raise _der.Malformed(
                f"PKIHeader field with tag 0x{kid.tag:02x} is unknown, repeated or out of order"
            )
        previous = number
        fields[number] = _only_child(data, kid)

    def octets(number: int) -> bytes | None:
        return _der.octet_string_value(data, fields[number]) if number in fields else None

    implicit_confirm = False
    confirm_wait_time: datetime | None = None
    cert_profile: tuple[str, ...] = ()
    others: list[InfoTypeAndValue] = []
    for item in _seq_of_some(data, fields[8], "generalInfo") if 8 in fields else ():
        oid, value = _read_itav(data, item)
        if oid == oids.IT_IMPLICIT_CONFIRM:
            if value is not None and _raw(data, value) != _der.null():
                raise _der.Malformed("implicitConfirm value must be NULL")
            implicit_confirm = True
        elif oid == oids.IT_CONFIRM_WAIT_TIME and value is not None:
            confirm_wait_time = _der.generalized_time_value(data, value)
        elif oid == oids.IT_CERT_PROFILE and value is not None:
            cert_profile = _read_texts(data, value)
        else:
            others.append(InfoTypeAndValue(oid, None if value is None else _raw(data, value)))
    return PKIHeader(
        sender=sender,
        recipient=recipient,
        pvno=pvno,
        message_time=_der.generalized_time_value(data, fields[0]) if 0 in fields else None,
        protection_alg=_read_algorithm(data, fields[1]) if 1 in fields else None,
        sender_kid=octets(2),
        recip_kid=octets(3),
        transaction_id=octets(4),
        sender_nonce=octets(5),
        recip_nonce=octets(6),
        free_text=_read_texts(data, fields[7]) if 7 in fields else (),
        implicit_confirm=implicit_confirm,
        confirm_wait_time=confirm_wait_time,
        cert_profile=cert_profile,
        general_info=tuple(others),
    )


# Reading DER by hand (the header and the hot bodies). Each reader takes the element's Tlv and checks its tag.


def _seq(data: bytes, t: Tlv, what: str) -> list[Tlv]:
    if t.tag != 0x30:
        raise _der.Malformed(f"{what} is not a SEQUENCE")
    return _der.children(data, t)


def _seq_of_some(data: bytes, t: Tlv, what: str) -> list[Tlv]:
    """SEQUENCE SIZE (1..MAX) OF ..."""
    kids = _seq(data, t, what)
    if not kids:
        raise _der.Malformed(f"{what} must not be empty")
    return kids


def _optional(parts: list[Tlv], tag: int) -> Tlv | None:
    """The next element if it has `tag` (an OPTIONAL field, present), else None."""
    return parts.pop(0) if parts and parts[0].tag == tag else None


def _done(parts: list[Tlv], what: str) -> None:
    if parts:
        raise _der.Malformed(f"unexpected element (tag 0x{parts[0].tag:02x}) in {what}")


def _read_texts(data: bytes, t: Tlv) -> tuple[str, ...]:
    """PKIFreeText (and CertProfileValue): SEQUENCE SIZE (1..MAX) OF UTF8String."""
    return tuple(_der.utf8_string_value(data, s) for s in _seq_of_some(data, t, "PKIFreeText"))


def _read_algorithm(data: bytes, t: Tlv) -> AlgorithmIdentifier:
    parts = _seq(data, t, "AlgorithmIdentifier")
    if not 1 <= len(parts) <= 2:
        raise _der.Malformed("AlgorithmIdentifier must hold an algorithm and at most one parameters element")
    return AlgorithmIdentifier(
        _der.oid_value(data, parts[0]), _raw(data, parts[1]) if len(parts) == 2 else None
    )


def _read_itav(data: bytes, t: Tlv) -> tuple[str, Tlv | None]:
    parts = _seq(data, t, "InfoTypeAndValue")
    if not 1 <= len(parts) <= 2:
        raise _der.Malformed("InfoTypeAndValue must hold an infoType and at most one infoValue")
    return _der.oid_value(data, parts[0]), parts[1] if len(parts) == 2 else None


_FAIL_INFO_BITS = max(FailInfo) + 1


def _read_status_info(data: bytes, t: Tlv) -> PKIStatusInfo:
    """PKIStatusInfo ::= SEQUENCE { status INTEGER, statusString PKIFreeText OPTIONAL, failInfo BIT STRING
    OPTIONAL }. failInfo bits beyond the ones RFC 9810 names are ignored."""
    parts = _seq(data, t, "PKIStatusInfo")
    if not parts:
        raise _der.Malformed("PKIStatusInfo without status")
    code = _der.integer_value(data, parts.pop(0))
    if code not in PKIStatus._value2member_map_:
        raise _der.Malformed(f"unknown PKIStatus {code}")
    text = _optional(parts, 0x30)
    fail = _optional(parts, 0x03)
    _done(parts, "PKIStatusInfo")
    bits = (
        frozenset(map(FailInfo, _der.bits_value(data, fail, _FAIL_INFO_BITS)))
        if fail is not None
        else frozenset()
    )
    return PKIStatusInfo(PKIStatus(code), _read_texts(data, text) if text is not None else (), bits)


def _itav(item: Any) -> InfoTypeAndValue:
    if not _present(item["infoType"]):
        raise _der.Malformed("InfoTypeAndValue without infoType")
    value = item["infoValue"]
    return InfoTypeAndValue(str(item["infoType"]), bytes(value) if _present(value) else None)


def _parse_body(data: bytes, t: Tlv, body_type: BodyType, limits: Limits, depth: int) -> Body:
    if body_type is BodyType.NESTED:
        return _parse_nested(data, t, limits, depth)
    with _boundary(f"malformed {body_type.asn1_name} body"):
        inner = _only_child(data, t)
        fast = _FAST_BODY_PARSERS.get(body_type)
        if fast is not None:
            return fast(data, inner, limits)
        value = _decode(_raw(data, t), rfc9480.PKIBody()).getComponent()
        parser = _BODY_PARSERS.get(body_type)
        if parser is None:
            return OtherBody(_raw(data, inner))
        return parser(data, inner, value, limits)


def _parse_nested(data: bytes, t: Tlv, limits: Limits, depth: int) -> NestedBody:
    if depth >= limits.max_nesting_depth:
        raise CmpError(f"nested message inside {depth} nested layer(s): at most {limits.max_nesting_depth}",
                       fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
    with _boundary("malformed nested body"):
        seq = _only_child(data, t)
        if seq.tag != 0x30:
            raise _der.Malformed("nested content must be a SEQUENCE OF PKIMessage")
        inner = _kids(data, seq, limits.max_batch_size, "nested message batch")
        if not inner:
            raise _der.Malformed("nested message with no inner message")
    items: list[NestedItem] = []
    for element in inner:
        raw = _raw(data, element)
        try:
            items.append(NestedItem(raw, _parse(raw, limits, depth + 1)))
        except CmpError as exc:
            items.append(NestedItem(raw, None, exc))
    return NestedBody(tuple(items))


def _template(data: bytes, t: Tlv) -> CertTemplate:
    fields = {k.tag: k for k in _der.children(data, t)}
    subject = issuer = None
    if 0xA5 in fields:
        subject = name_from_der(_raw(data, _only_child(data, fields[0xA5])))
    if 0xA3 in fields:
        issuer = name_from_der(_raw(data, _only_child(data, fields[0xA3])))
    serial = None
    if 0x81 in fields:
        serial = int.from_bytes(data[fields[0x81].content : fields[0x81].end], "big", signed=True)
    return CertTemplate(
        subject=subject,
        public_key_der=_retag(data, fields[0xA6], 0x30) if 0xA6 in fields else None,
        issuer=issuer,
        serial_number=serial,
        extensions_der=_retag(data, fields[0xA9], 0x30) if 0xA9 in fields else None,
    )


def _cert_req(data: bytes, t: Tlv, value: Any, limits: Limits) -> CertReqBody:
    msgs = _kids(data, t, limits.max_requests, "CertReqMessages")
    if len(msgs) != len(value) or not msgs:
        raise _der.Malformed("CertReqMessages must hold at least one CertReqMsg")
    out: list[CertReqMessage] = []
    for tlv, msg in zip(msgs, value, strict=True):
        cert_req_tlv = _der.children(data, tlv)[0]
        template_tlv = _der.children(data, cert_req_tlv)[1]
        req = msg["certReq"]
        pop = PopKind.NONE
        pop_alg = None
        pop_sig = None
        has_input = False
        if _present(msg["popo"]):
            pop = PopKind(msg["popo"].getName())
            if pop is PopKind.SIGNATURE:
                sk = msg["popo"]["signature"]
                pop_alg = _algorithm(sk["algorithmIdentifier"])
                bits = sk["signature"]
                if len(bits) % 8:
                    raise _der.Malformed("POP signature has unused bits")
                pop_sig = bits.asOctets()
                has_input = _present(sk["poposkInput"])
        controls: tuple[InfoTypeAndValue, ...] = ()
        if _present(req["controls"]):
            controls = tuple(InfoTypeAndValue(str(c["type"]), bytes(c["value"])) for c in req["controls"])
        out.append(CertReqMessage(int(req["certReqId"]), _template(data, template_tlv), pop, pop_alg, pop_sig,
                                  has_input, controls, _raw(data, cert_req_tlv)))  # fmt: skip
    return CertReqBody(tuple(out))


def _gen(data: bytes, t: Tlv, value: Any, limits: Limits) -> GenBody:
    if len(value) > limits.max_requests:
        raise CmpError("general message has too many items", fail_info=FailInfo.BAD_REQUEST)
    return GenBody(tuple(_itav(item) for item in value))


def _rr(data: bytes, t: Tlv, value: Any, limits: Limits) -> RrBody:
    kids = _kids(data, t, limits.max_requests, "rr")
    out: list[RevDetails] = []
    for tlv, details in zip(kids, value, strict=True):
        template = _template(data, _der.children(data, tlv)[0])
        reason = None
        count = 0
        if _present(details["crlEntryDetails"]):
            for ext in details["crlEntryDetails"]:
                if str(ext["extnID"]) == oids.CRL_REASON:
                    enum_der = bytes(ext["extnValue"])
                    if len(enum_der) != 3 or enum_der[:2] != b"\x0a\x01" or enum_der[2] not in _REASONS:
                        raise _der.Malformed("bad CRL reason code")
                    reason = x509.ReasonFlags[_REASONS[enum_der[2]]]
                    count += 1
        out.append(RevDetails(template.issuer, template.serial_number, reason, template.subject,
                              template.public_key_der, count))  # fmt: skip
    return RrBody(tuple(out))


def _rp(data: bytes, t: Tlv, value: Any, limits: Limits) -> RpBody:
    kids = _der.children(data, t)
    statuses = tuple(_status_info(s) for s in value["status"])
    rev_certs: list[RevokedCertId] = []
    for kid in kids[1:]:
        if kid.tag == 0xA0:
            for cert_id in _kids(data, _only_child(data, kid), limits.max_requests, "revCerts"):
                issuer_tlv, serial_tlv = _der.children(data, cert_id)
                serial = int.from_bytes(data[serial_tlv.content : serial_tlv.end], "big", signed=True)
                rev_certs.append(RevokedCertId(general_name_from_der(_raw(data, issuer_tlv)), serial))
    return RpBody(statuses, tuple(rev_certs))


# The bodies pyasn1 decodes first (the `value` argument): rare, structurally rich, off the throughput paths.
_BODY_PARSERS: dict[BodyType, Callable[[bytes, Tlv, Any, Limits], Body]] = {
    **dict.fromkeys(CERT_REQUEST_BODIES, _cert_req),
    BodyType.GENM: _gen,
    BodyType.GENP: _gen,
    BodyType.RR: _rr,
    BodyType.RP: _rp,
}


# The hot bodies, read by hand from the DER (no pyasn1).


def _p10cr(data: bytes, t: Tlv, limits: Limits) -> P10crBody:
    """CertificationRequest: cryptography's loader parses and checks the whole structure (strict DER)."""
    return P10crBody(_csr(_raw(data, t)))


def _cert_rep(data: bytes, t: Tlv, limits: Limits) -> CertRepBody:
    """CertRepMessage ::= SEQUENCE { caPubs [1] SEQUENCE SIZE (1..MAX) OF CMPCertificate OPTIONAL,
    response SEQUENCE OF CertResponse }"""
    parts = _seq(data, t, "CertRepMessage")
    ca_pubs: tuple[x509.Certificate, ...] = ()
    wrapped = _optional(parts, 0xA1)
    if wrapped is not None:
        seq = _only_child(data, wrapped)
        if seq.tag != 0x30:
            raise _der.Malformed("caPubs is not a SEQUENCE")
        certs = _kids(data, seq, limits.max_extra_certs, "caPubs")
        if not certs:
            raise _der.Malformed("caPubs must not be empty")
        ca_pubs = tuple(_certificate(_raw(data, c)) for c in certs)
    if len(parts) != 1 or parts[0].tag != 0x30:
        raise _der.Malformed("CertRepMessage must end with its response SEQUENCE")
    responses = _kids(data, parts[0], limits.max_requests, "CertRepMessage")
    return CertRepBody(tuple(_cert_response(data, r) for r in responses), ca_pubs)


def _cert_response(data: bytes, t: Tlv) -> CertResponse:
    """CertResponse ::= SEQUENCE { certReqId INTEGER, status PKIStatusInfo,
    certifiedKeyPair CertifiedKeyPair OPTIONAL, rspInfo OCTET STRING OPTIONAL }"""
    parts = _seq(data, t, "CertResponse")
    if len(parts) < 2:
        raise _der.Malformed("CertResponse needs certReqId and status")
    cert_req_id = _der.integer_value(data, parts.pop(0))
    status = _read_status_info(data, parts.pop(0))
    pair = _optional(parts, 0x30)
    info = _optional(parts, 0x04)
    _done(parts, "CertResponse")
    cert = _certified_key_pair(data, pair) if pair is not None else None
    return CertResponse(
        cert_req_id, status, cert, _der.octet_string_value(data, info) if info is not None else None
    )


def _certified_key_pair(data: bytes, t: Tlv) -> x509.Certificate:
    """CertifiedKeyPair ::= SEQUENCE { certOrEncCert CHOICE { certificate [0] CMPCertificate,
    encryptedCert [1] EncryptedKey }, privateKey [0] OPTIONAL, publicationInfo [1] OPTIONAL }"""
    parts = _seq(data, t, "CertifiedKeyPair")
    if not parts:
        raise _der.Malformed("CertifiedKeyPair without certOrEncCert")
    if len(parts) > 1:
        # privateKey / publicationInfo (central key generation): never seen on our paths; pyasn1 validates them
        # as it did before, and they are ignored.
        _decode(_raw(data, t), rfc9480.CertifiedKeyPair())
    choice = parts[0]
    if choice.tag == 0xA1:
        raise CmpError("encrypted certificates are not supported", fail_info=FailInfo.BAD_DATA_FORMAT)
    if choice.tag != 0xA0:
        raise _der.Malformed("CertOrEncCert must be [0] certificate or [1] encryptedCert")
    return _certificate(_raw(data, _only_child(data, choice)))


def _cert_conf(data: bytes, t: Tlv, limits: Limits) -> CertConfBody:
    """CertConfirmContent ::= SEQUENCE OF CertStatus (may be empty: every certificate rejected)."""
    items = _seq(data, t, "CertConfirmContent")
    if len(items) > limits.max_requests:
        raise CmpError("certConf has too many statuses", fail_info=FailInfo.BAD_REQUEST)
    return CertConfBody(tuple(_cert_status(data, s) for s in items))


def _cert_status(data: bytes, t: Tlv) -> CertStatus:
    """CertStatus ::= SEQUENCE { certHash OCTET STRING, certReqId INTEGER, statusInfo PKIStatusInfo OPTIONAL,
    hashAlg [0] AlgorithmIdentifier OPTIONAL }"""
    parts = _seq(data, t, "CertStatus")
    if len(parts) < 2:
        raise _der.Malformed("CertStatus needs certHash and certReqId")
    cert_hash = _der.octet_string_value(data, parts.pop(0))
    cert_req_id = _der.integer_value(data, parts.pop(0))
    info = _optional(parts, 0x30)
    hash_alg = _optional(parts, 0xA0)
    _done(parts, "CertStatus")
    return CertStatus(
        cert_hash,
        cert_req_id,
        _read_status_info(data, info) if info is not None else None,
        _read_algorithm(data, _only_child(data, hash_alg)) if hash_alg is not None else None,
    )


def _pkiconf(data: bytes, t: Tlv, limits: Limits) -> PkiConfBody:
    _der.null_value(data, t)
    return PkiConfBody()


def _poll_req(data: bytes, t: Tlv, limits: Limits) -> PollReqBody:
    """PollReqContent ::= SEQUENCE OF SEQUENCE { certReqId INTEGER }"""
    items = _seq(data, t, "PollReqContent")
    if len(items) > limits.max_requests or not items:
        raise CmpError("pollReq must name 1 to max_requests certReqIds", fail_info=FailInfo.BAD_REQUEST)
    ids: list[int] = []
    for item in items:
        parts = _seq(data, item, "pollReq entry")
        if len(parts) != 1:
            raise _der.Malformed("a pollReq entry holds exactly one certReqId")
        ids.append(_der.integer_value(data, parts[0]))
    return PollReqBody(tuple(ids))


def _poll_rep(data: bytes, t: Tlv, limits: Limits) -> PollRepBody:
    """PollRepContent ::= SEQUENCE OF SEQUENCE { certReqId INTEGER, checkAfter INTEGER,
    reason PKIFreeText OPTIONAL }"""
    items = _seq(data, t, "PollRepContent")
    if len(items) > limits.max_requests or not items:
        raise CmpError("pollRep must hold 1 to max_requests entries", fail_info=FailInfo.BAD_REQUEST)
    entries: list[PollRepEntry] = []
    for item in items:
        parts = _seq(data, item, "pollRep entry")
        if not 2 <= len(parts) <= 3:
            raise _der.Malformed("a pollRep entry holds certReqId, checkAfter and an optional reason")
        reason = _read_texts(data, parts[2]) if len(parts) == 3 else ()
        entries.append(
            PollRepEntry(_der.integer_value(data, parts[0]), _der.integer_value(data, parts[1]), reason)
        )
    return PollRepBody(tuple(entries))


def _error(data: bytes, t: Tlv, limits: Limits) -> ErrorBody:
    """ErrorMsgContent ::= SEQUENCE { pKIStatusInfo PKIStatusInfo, errorCode INTEGER OPTIONAL,
    errorDetails PKIFreeText OPTIONAL }"""
    parts = _seq(data, t, "ErrorMsgContent")
    if not parts:
        raise _der.Malformed("ErrorMsgContent without pKIStatusInfo")
    status = _read_status_info(data, parts.pop(0))
    code = _optional(parts, 0x02)
    details = _optional(parts, 0x30)
    _done(parts, "ErrorMsgContent")
    return ErrorBody(
        status,
        _der.integer_value(data, code) if code is not None else None,
        _read_texts(data, details) if details is not None else (),
    )


_FAST_BODY_PARSERS: dict[BodyType, Callable[[bytes, Tlv, Limits], Body]] = {
    **dict.fromkeys(CERT_RESPONSE_BODIES, _cert_rep),
    BodyType.P10CR: _p10cr,
    BodyType.CERTCONF: _cert_conf,
    BodyType.PKICONF: _pkiconf,
    BodyType.POLLREQ: _poll_req,
    BodyType.POLLREP: _poll_rep,
    BodyType.ERROR: _error,
}
