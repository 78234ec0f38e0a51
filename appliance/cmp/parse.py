"""Bytes in, PKIMessage out. The only place pyasn1 decodes anything.

Order of work for a received message, cheapest and most bounding first:
1. size limit, before anything else;
2. one linear framing scan (`_der.scan`): definite lengths, depth bound, no trailing bytes;
3. slicing of header, body, protection and extraCerts out of the received bytes;
4. pyasn1 (rfc9480 schemas) decodes header and body to validate their structure and read scalars;
   values whose exact bytes matter (names, public keys, certificates, CertRequest, inner messages) are taken
   from the slices, never re-encoded.
Every failure is one CmpError (badDataFormat unless a more precise bit applies); pyasn1's exceptions never leave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import useful
from pyasn1_alt_modules import rfc9480

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

# Everything pyasn1, cryptography's loaders and our slicing raise on bad input.
_DECODE_ERRORS = (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
                  RecursionError, UnicodeDecodeError)  # fmt: skip

_REASONS = {0: "unspecified", 1: "key_compromise", 2: "ca_compromise", 3: "affiliation_changed",
            4: "superseded", 5: "cessation_of_operation", 6: "certificate_hold", 8: "remove_from_crl",
            9: "privilege_withdrawn", 10: "aa_compromise"}  # fmt: skip


@contextmanager
def _boundary(what: str) -> Iterator[None]:
    try:
        yield
    except CmpError:
        raise
    except _DECODE_ERRORS as exc:
        raise CmpError(
            f"{what}: {type(exc).__name__}: {exc}"[:300], fail_info=FailInfo.BAD_DATA_FORMAT
        ) from None


def _decode(der: bytes, spec: Any) -> Any:
    value, rest = der_decoder.decode(der, asn1Spec=spec)
    if rest:
        raise ValueError("trailing bytes")
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
        raise ValueError("explicit tag must wrap exactly one element")
    return kids[0]


def _retag(data: bytes, t: Tlv, tag: int) -> bytes:
    """An IMPLICIT-tagged element as its universal type (same length octets, same content)."""
    return bytes((tag,)) + data[t.start + 1 : t.end]


def _algorithm(value: Any) -> AlgorithmIdentifier:
    params = value["parameters"]
    return AlgorithmIdentifier(str(value["algorithm"]), bytes(params) if _present(params) else None)


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(s) for s in value) if _present(value) else ()


def _time(value: Any) -> datetime:
    when: datetime = value.asDateTime
    if when.tzinfo is None:
        raise ValueError("GeneralizedTime without time zone")
    return when.astimezone(UTC)


def _status_info(value: Any) -> PKIStatusInfo:
    code = int(value["status"])
    if code not in PKIStatus._value2member_map_:
        raise ValueError(f"unknown PKIStatus {code}")
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
        top = _der.scan(data, limits.max_der_depth)
        if top.tag != 0x30:
            raise ValueError("not a SEQUENCE")
        parts = _der.children(data, top)
        if len(parts) < 2 or parts[0].tag != 0x30 or parts[1].tag & 0xE0 != 0xA0 or parts[1].tag & 0x1F > 26:
            raise ValueError("expected header and body")
        rest = parts[2:]
        protection: bytes | None = None
        extra_certs: tuple[x509.Certificate, ...] = ()
        if rest and rest[0].tag == 0xA0:
            bits = _only_child(data, rest.pop(0))
            if bits.tag != 0x03 or bits.end == bits.content or data[bits.content] != 0:
                raise ValueError("protection must be a BIT STRING of whole octets")
            protection = data[bits.content + 1 : bits.end]
        if rest and rest[0].tag == 0xA1:
            seq = _only_child(data, rest.pop(0))
            certs = _kids(data, seq, limits.max_extra_certs, "extraCerts")
            if not certs:
                raise ValueError("extraCerts must not be empty")
            extra_certs = tuple(x509.load_der_x509_certificate(_raw(data, c)) for c in certs)
        if rest:
            raise ValueError("unexpected element after the body")
        header_tlv, body_tlv = parts[0], parts[1]
        header = _parse_header(data, header_tlv)
        body_type = BodyType(body_tlv.tag & 0x1F)
    body = _parse_body(data, body_tlv, body_type, limits, depth)
    return PKIMessage(header, body_type, body, protection, extra_certs, data, _raw(data, header_tlv),
                      _raw(data, body_tlv))  # fmt: skip


def _parse_header(data: bytes, t: Tlv) -> PKIHeader:
    h = _decode(_raw(data, t), rfc9480.PKIHeader())
    kids = _der.children(data, t)
    sender = general_name_from_der(_raw(data, kids[1]))
    recipient = general_name_from_der(_raw(data, kids[2]))

    def octets(name: str) -> bytes | None:
        value = h[name]
        return bytes(value) if _present(value) else None

    implicit_confirm = False
    confirm_wait_time: datetime | None = None
    cert_profile: tuple[str, ...] = ()
    others: list[InfoTypeAndValue] = []
    if _present(h["generalInfo"]):
        for item in h["generalInfo"]:
            itav = _itav(item)
            if itav.oid == oids.IT_IMPLICIT_CONFIRM:
                if itav.value not in (None, _der.null()):
                    raise ValueError("implicitConfirm value must be NULL")
                implicit_confirm = True
            elif itav.oid == oids.IT_CONFIRM_WAIT_TIME and itav.value is not None:
                confirm_wait_time = _time(_decode(itav.value, useful.GeneralizedTime()))
            elif itav.oid == oids.IT_CERT_PROFILE and itav.value is not None:
                cert_profile = tuple(str(s) for s in _decode(itav.value, rfc9480.CertProfileValue()))
            else:
                others.append(itav)
    return PKIHeader(
        sender=sender,
        recipient=recipient,
        pvno=int(h["pvno"]),
        message_time=_time(h["messageTime"]) if _present(h["messageTime"]) else None,
        protection_alg=_algorithm(h["protectionAlg"]) if _present(h["protectionAlg"]) else None,
        sender_kid=octets("senderKID"),
        recip_kid=octets("recipKID"),
        transaction_id=octets("transactionID"),
        sender_nonce=octets("senderNonce"),
        recip_nonce=octets("recipNonce"),
        free_text=_texts(h["freeText"]),
        implicit_confirm=implicit_confirm,
        confirm_wait_time=confirm_wait_time,
        cert_profile=cert_profile,
        general_info=tuple(others),
    )


def _itav(item: Any) -> InfoTypeAndValue:
    if not _present(item["infoType"]):
        raise ValueError("InfoTypeAndValue without infoType")
    value = item["infoValue"]
    return InfoTypeAndValue(str(item["infoType"]), bytes(value) if _present(value) else None)


def _parse_body(data: bytes, t: Tlv, body_type: BodyType, limits: Limits, depth: int) -> Body:
    if body_type is BodyType.NESTED:
        return _parse_nested(data, t, limits, depth)
    with _boundary(f"malformed {body_type.asn1_name} body"):
        value = _decode(_raw(data, t), rfc9480.PKIBody()).getComponent()
        inner = _only_child(data, t)
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
            raise ValueError("nested content must be a SEQUENCE OF PKIMessage")
        inner = _kids(data, seq, limits.max_batch_size, "nested message batch")
        if not inner:
            raise ValueError("nested message with no inner message")
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
        raise ValueError("CertReqMessages must hold at least one CertReqMsg")
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
                    raise ValueError("POP signature has unused bits")
                pop_sig = bits.asOctets()
                has_input = _present(sk["poposkInput"])
        controls: tuple[InfoTypeAndValue, ...] = ()
        if _present(req["controls"]):
            controls = tuple(InfoTypeAndValue(str(c["type"]), bytes(c["value"])) for c in req["controls"])
        out.append(CertReqMessage(int(req["certReqId"]), _template(data, template_tlv), pop, pop_alg, pop_sig,
                                  has_input, controls, _raw(data, cert_req_tlv)))  # fmt: skip
    return CertReqBody(tuple(out))


def _p10cr(data: bytes, t: Tlv, value: Any, limits: Limits) -> P10crBody:
    return P10crBody(x509.load_der_x509_csr(_raw(data, t)))


def _cert_rep(data: bytes, t: Tlv, value: Any, limits: Limits) -> CertRepBody:
    kids = _der.children(data, t)
    ca_pubs: tuple[x509.Certificate, ...] = ()
    if kids[0].tag == 0xA1:
        certs = _kids(data, _only_child(data, kids.pop(0)), limits.max_extra_certs, "caPubs")
        ca_pubs = tuple(x509.load_der_x509_certificate(_raw(data, c)) for c in certs)
    responses_tlv = _kids(data, kids[0], limits.max_requests, "CertRepMessage")
    out: list[CertResponse] = []
    for tlv, resp in zip(responses_tlv, value["response"], strict=True):
        cert = None
        if _present(resp["certifiedKeyPair"]):
            ckp_tlv = _der.children(data, tlv)[2]
            choice = _der.children(data, ckp_tlv)[0]
            if choice.tag != 0xA0:
                raise CmpError("encrypted certificates are not supported", fail_info=FailInfo.BAD_DATA_FORMAT)
            cert = x509.load_der_x509_certificate(_raw(data, _only_child(data, choice)))
        rsp_info = bytes(resp["rspInfo"]) if _present(resp["rspInfo"]) else None
        out.append(CertResponse(int(resp["certReqId"]), _status_info(resp["status"]), cert, rsp_info))
    return CertRepBody(tuple(out), ca_pubs)


def _cert_conf(data: bytes, t: Tlv, value: Any, limits: Limits) -> CertConfBody:
    if len(value) > limits.max_requests:
        raise CmpError("certConf has too many statuses", fail_info=FailInfo.BAD_REQUEST)
    statuses = tuple(
        CertStatus(
            bytes(s["certHash"]),
            int(s["certReqId"]),
            _status_info(s["statusInfo"]) if _present(s["statusInfo"]) else None,
            _algorithm(s["hashAlg"]) if _present(s["hashAlg"]) else None,
        )
        for s in value
    )
    return CertConfBody(statuses)


def _pkiconf(data: bytes, t: Tlv, value: Any, limits: Limits) -> PkiConfBody:
    return PkiConfBody()


def _poll_req(data: bytes, t: Tlv, value: Any, limits: Limits) -> PollReqBody:
    if len(value) > limits.max_requests or not len(value):
        raise CmpError("pollReq must name 1 to max_requests certReqIds", fail_info=FailInfo.BAD_REQUEST)
    return PollReqBody(tuple(int(e["certReqId"]) for e in value))


def _poll_rep(data: bytes, t: Tlv, value: Any, limits: Limits) -> PollRepBody:
    if len(value) > limits.max_requests or not len(value):
        raise CmpError("pollRep must hold 1 to max_requests entries", fail_info=FailInfo.BAD_REQUEST)
    return PollRepBody(
        tuple(PollRepEntry(int(e["certReqId"]), int(e["checkAfter"]), _texts(e["reason"])) for e in value)
    )


def _gen(data: bytes, t: Tlv, value: Any, limits: Limits) -> GenBody:
    if len(value) > limits.max_requests:
        raise CmpError("general message has too many items", fail_info=FailInfo.BAD_REQUEST)
    return GenBody(tuple(_itav(item) for item in value))


def _error(data: bytes, t: Tlv, value: Any, limits: Limits) -> ErrorBody:
    code = int(value["errorCode"]) if _present(value["errorCode"]) else None
    return ErrorBody(_status_info(value["pKIStatusInfo"]), code, _texts(value["errorDetails"]))


def _rr(data: bytes, t: Tlv, value: Any, limits: Limits) -> RrBody:
    kids = _kids(data, t, limits.max_requests, "rr")
    out: list[RevDetails] = []
    for tlv, details in zip(kids, value, strict=True):
        template = _template(data, _der.children(data, tlv)[0])
        reason = None
        if _present(details["crlEntryDetails"]):
            for ext in details["crlEntryDetails"]:
                if str(ext["extnID"]) == oids.CRL_REASON:
                    enum_der = bytes(ext["extnValue"])
                    if len(enum_der) != 3 or enum_der[:2] != b"\x0a\x01" or enum_der[2] not in _REASONS:
                        raise ValueError("bad CRL reason code")
                    reason = x509.ReasonFlags[_REASONS[enum_der[2]]]
        out.append(RevDetails(template.issuer, template.serial_number, reason))
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


_BODY_PARSERS: dict[BodyType, Callable[[bytes, Tlv, Any, Limits], Body]] = {
    **dict.fromkeys(CERT_REQUEST_BODIES, _cert_req),
    **dict.fromkeys(CERT_RESPONSE_BODIES, _cert_rep),
    BodyType.P10CR: _p10cr,
    BodyType.CERTCONF: _cert_conf,
    BodyType.PKICONF: _pkiconf,
    BodyType.POLLREQ: _poll_req,
    BodyType.POLLREP: _poll_rep,
    BodyType.GENM: _gen,
    BodyType.GENP: _gen,
    BodyType.ERROR: _error,
    BodyType.RR: _rr,
    BodyType.RP: _rp,
}
