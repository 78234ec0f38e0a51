"""The hand-written DER reader of parse.py (PKIHeader and the hot bodies) against pyasn1's rfc9480 schema.

Differential: every message the builders make (every body type, minimal and full headers, no/MAC/signature
protection, nested) parses to the same values pyasn1 reports for the same bytes. Negative: DER and schema
violations in the header and the hand-read bodies are badDataFormat. Fuzz: single-byte mutations only ever
give CmpError, and whatever the parser still accepts, pyasn1 accepts too and reads the same way (the hand
reader is never looser than the schema).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import useful
from pyasn1_alt_modules import rfc9480

from appliance.cmp import (
    PVNO_CMP2021,
    Body,
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertResponse,
    CertStatus,
    CmpError,
    ErrorBody,
    FailInfo,
    GenBody,
    InfoTypeAndValue,
    MacProtector,
    NestedBody,
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
    ProtectionKind,
    RevDetails,
    RevokedCertId,
    RpBody,
    RrBody,
    SignatureProtector,
    _der,
    build_message,
    oids,
    parse_message,
    verify_mac,
    verify_signature,
)
from appliance.cmp import parse as parse_module
from appliance.cmp._names import general_name_to_der
from appliance.cmp.build import assemble
from tests.appliance.cmp.support import KID, SECRET, MiniCa, dn, ir_body, ir_header, make_cert, name

PBM = MacProtector(SECRET, KID, iterations=100)
PBMAC1 = MacProtector(SECRET, KID, kind=ProtectionKind.PBMAC1, iterations=100)
WHEN = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


# ---------------------------------------------------------------------------------------------------------
# What pyasn1 reports for a message, and the same view of a parsed PKIMessage.


def _decode(der: bytes, spec: Any) -> Any:
    value, rest = decoder.decode(der, asn1Spec=spec)
    assert rest == b""
    return value


def _unwrap(der: bytes) -> bytes:
    """The content of one TLV (pyasn1 encodes an explicitly tagged component with its tag)."""
    t = _der.read_frame(der, 0, len(der))
    return der[t.content : t.end]


def _opt(value: Any, read: Callable[[Any], Any]) -> Any:
    return read(value) if value.isValue else None


def _ref_texts(value: Any) -> tuple[str, ...]:
    return tuple(str(s) for s in value) if value.isValue else ()


def _ref_alg(value: Any) -> tuple[str, bytes | None]:
    return str(value["algorithm"]), _opt(value["parameters"], bytes)


def _ref_status(value: Any) -> tuple[int, tuple[str, ...], frozenset[int]]:
    bits: frozenset[int] = frozenset()
    if value["failInfo"].isValue:
        bits = frozenset(i for i, bit in enumerate(value["failInfo"]) if bit and i <= max(FailInfo))
    return int(value["status"]), _ref_texts(value["statusString"]), bits


def _ref_header(h: Any) -> dict[str, Any]:
    items = h["generalInfo"] if h["generalInfo"].isValue else []
    info = [(str(i["infoType"]), _opt(i["infoValue"], bytes)) for i in items]
    confirm_wait = None
    profile: tuple[str, ...] = ()
    others = []
    for oid, value in info:
        if oid == oids.IT_IMPLICIT_CONFIRM:
            continue
        if oid == oids.IT_CONFIRM_WAIT_TIME and value is not None:
            confirm_wait = _decode(value, useful.GeneralizedTime()).asDateTime
        elif oid == oids.IT_CERT_PROFILE and value is not None:
            profile = tuple(str(s) for s in _decode(value, rfc9480.CertProfileValue()))
        else:
            others.append((oid, value))
    return {
        "pvno": int(h["pvno"]),
        "sender": encoder.encode(h["sender"]),
        "recipient": encoder.encode(h["recipient"]),
        "message_time": _opt(h["messageTime"], lambda v: v.asDateTime),
        "protection_alg": _opt(h["protectionAlg"], _ref_alg),
        **{key: _opt(h[name_], bytes) for key, name_ in _OCTET_FIELDS},
        "free_text": _ref_texts(h["freeText"]),
        "implicit_confirm": any(oid == oids.IT_IMPLICIT_CONFIRM for oid, _ in info),
        "confirm_wait_time": confirm_wait,
        "cert_profile": profile,
        "general_info": others,
    }


_OCTET_FIELDS = (("sender_kid", "senderKID"), ("recip_kid", "recipKID"), ("transaction_id", "transactionID"),
                 ("sender_nonce", "senderNonce"), ("recip_nonce", "recipNonce"))  # fmt: skip


def _ref_body(kind: str, b: Any) -> Any:
    if kind in ("ip", "cp", "kup", "ccp"):
        responses = []
        for r in b["response"]:
            cert = None
            if r["certifiedKeyPair"].isValue:
                cert = _unwrap(encoder.encode(r["certifiedKeyPair"]["certOrEncCert"]["certificate"]))
            responses.append((int(r["certReqId"]), _ref_status(r["status"]), cert, _opt(r["rspInfo"], bytes)))
        ca_pubs = [encoder.encode(c) for c in b["caPubs"]] if b["caPubs"].isValue else []
        return ca_pubs, responses
    if kind == "p10cr":
        return _unwrap(encoder.encode(b))
    if kind == "certConf":
        return [(bytes(s["certHash"]), int(s["certReqId"]), _opt(s["statusInfo"], _ref_status),
                 _opt(s["hashAlg"], _ref_alg)) for s in b]  # fmt: skip
    if kind == "pkiconf":
        return None
    if kind == "pollReq":
        return [int(e["certReqId"]) for e in b]
    if kind == "pollRep":
        return [(int(e["certReqId"]), int(e["checkAfter"]), _ref_texts(e["reason"])) for e in b]
    if kind == "error":
        return _ref_status(b["pKIStatusInfo"]), _opt(b["errorCode"], int), _ref_texts(b["errorDetails"])
    if kind in ("ir", "cr", "kur", "ccr", "krr"):
        return [
            (int(m["certReq"]["certReqId"]), m["popo"].getName() if m["popo"].isValue else "none") for m in b
        ]
    if kind in ("genm", "genp"):
        return [(str(i["infoType"]), _opt(i["infoValue"], bytes)) for i in b]
    if kind == "rr":
        return len(b)
    if kind == "rp":
        return [_ref_status(s) for s in b["status"]]
    return _unwrap(encoder.encode(b))


def _reference(der: bytes, nested: tuple[bool, ...] | None = None) -> dict[str, Any]:
    """pyasn1's reading of a PKIMessage. `nested`: which inner messages to read (those the parser kept)."""
    m = _decode(der, rfc9480.PKIMessage())
    kind = m["body"].getName()
    body = m["body"].getComponent()
    if kind == "nested":
        items = [bytes(i) for i in body]
        keep = nested or (True,) * len(items)
        content: Any = [_reference(i) if k else None for i, k in zip(items, keep, strict=True)]
    else:
        content = _ref_body(kind, body)
    return {
        "header": _ref_header(m["header"]),
        "body": (kind, content),
        "protection": _opt(m["protection"], lambda v: v.asOctets()),
        "extra_certs": [encoder.encode(c) for c in m["extraCerts"]] if m["extraCerts"].isValue else [],
    }


def _status(s: PKIStatusInfo) -> tuple[int, tuple[str, ...], frozenset[int]]:
    return int(s.status), s.status_string, frozenset(int(b) for b in s.fail_info)


def _alg(a: Any) -> tuple[str, bytes | None] | None:
    return None if a is None else (a.oid, a.parameters)


def _view_header(h: PKIHeader) -> dict[str, Any]:
    return {
        "pvno": h.pvno,
        "sender": general_name_to_der(h.sender),
        "recipient": general_name_to_der(h.recipient),
        "message_time": h.message_time,
        "protection_alg": _alg(h.protection_alg),
        **{key: getattr(h, key) for key, _ in _OCTET_FIELDS},
        "free_text": h.free_text,
        "implicit_confirm": h.implicit_confirm,
        "confirm_wait_time": h.confirm_wait_time,
        "cert_profile": h.cert_profile,
        "general_info": [(i.oid, i.value) for i in h.general_info],
    }


def _der_of(cert: x509.Certificate | None) -> bytes | None:
    return None if cert is None else cert.public_bytes(Encoding.DER)


def _view_body(b: Body) -> Any:
    match b:
        case CertRepBody(responses, ca_pubs):
            return [_der_of(c) for c in ca_pubs], [
                (r.cert_req_id, _status(r.status), _der_of(r.certificate), r.rsp_info) for r in responses
            ]
        case P10crBody(csr):
            return csr.public_bytes(Encoding.DER)
        case CertConfBody(statuses):
            return [(s.cert_hash, s.cert_req_id, s.status_info and _status(s.status_info), _alg(s.hash_alg))
                    for s in statuses]  # fmt: skip
        case PkiConfBody():
            return None
        case PollReqBody(ids):
            return list(ids)
        case PollRepBody(entries):
            return [(e.cert_req_id, e.check_after, e.reason) for e in entries]
        case ErrorBody(status, code, details):
            return _status(status), code, details
        case CertReqBody(requests):
            return [(r.cert_req_id, r.pop.value) for r in requests]
        case GenBody(items):
            return [(i.oid, i.value) for i in items]
        case RrBody(requests):
            return len(requests)
        case RpBody(statuses):
            return [_status(s) for s in statuses]
        case NestedBody(items):
            return [None if i.message is None else _view(i.message) for i in items]
        case OtherBody(content):
            return content
    raise AssertionError(type(b))


def _view(msg: PKIMessage) -> dict[str, Any]:
    return {
        "header": _view_header(msg.header),
        "body": (msg.body_type.asn1_name, _view_body(msg.body)),
        "protection": msg.protection,
        "extra_certs": [_der_of(c) for c in msg.extra_certs],
    }


def _agree(der: bytes) -> PKIMessage:
    got = parse_message(der)
    keep = tuple(i.message is not None for i in got.body.items) if isinstance(got.body, NestedBody) else None
    assert _view(got) == _reference(der, keep)
    return got


# ---------------------------------------------------------------------------------------------------------
# The corpus: every body the builders make, under several headers and protections.


class Corpus:
    def __init__(self) -> None:
        self.ca = MiniCa()
        self.signer_key = ec.generate_private_key(ec.SECP256R1())
        self.signer_cert = self.ca.issue(name("RA"), self.signer_key.public_key())
        self.signer = SignatureProtector(self.signer_key, self.signer_cert, (self.ca.cert,))
        key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self.ca.issue(name("device"), key.public_key())
        self.csr = (
            x509.CertificateSigningRequestBuilder().subject_name(name("p10")).sign(key, hashes.SHA256())
        )
        ed_key = ed25519.Ed25519PrivateKey.generate()
        self.ed_cert = make_cert(name("ed"), ed_key.public_key(), ed_key)

    def bodies(self) -> list[tuple[BodyType, Body]]:
        cert, ca = self.cert, self.ca.cert
        waiting = PKIStatusInfo(PKIStatus.WAITING, ("come back later", "¿mañana?"))
        rejected = PKIStatusInfo.rejection(FailInfo.NOT_AUTHORIZED, "serial outside the work order")
        many_bits = PKIStatusInfo(PKIStatus.REJECTION, (), frozenset(FailInfo))
        return [
            (BodyType.IR, ir_body()),
            (BodyType.CR, ir_body()),
            (BodyType.KUR, ir_body()),
            (BodyType.P10CR, P10crBody(self.csr)),
            (BodyType.IP, CertRepBody((CertResponse(0, PKIStatusInfo.accepted(), cert),), (ca,))),
            (BodyType.CP, CertRepBody((CertResponse(-1, PKIStatusInfo.accepted(), cert, b"info"),))),
            (BodyType.KUP, CertRepBody((CertResponse(7, waiting), CertResponse(8, rejected)), (ca, cert))),
            (BodyType.CCP, CertRepBody(())),
            (BodyType.CP, CertRepBody((CertResponse(2**70, many_bits),))),
            (BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),))),
            (
                BodyType.CERTCONF,
                CertConfBody(
                    (
                        CertStatus.for_certificate(cert, 3, rejected),
                        CertStatus.for_certificate(self.ed_cert, -1),
                    )
                ),
            ),
            (BodyType.CERTCONF, CertConfBody(())),
            (BodyType.PKICONF, PkiConfBody()),
            (BodyType.POLLREQ, PollReqBody((0, 1, -1, 300))),
            (BodyType.POLLREP, PollRepBody((PollRepEntry(0, 5, ("busy",)), PollRepEntry(1, 0)))),
            (BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),))),
            (
                BodyType.GENP,
                GenBody((InfoTypeAndValue(oids.IT_CA_CERTS, _der.sequence(_der_of(ca) or b"")),)),
            ),
            (BodyType.ERROR, ErrorBody(rejected, 42, ("details", "more"))),
            (
                BodyType.ERROR,
                ErrorBody(PKIStatusInfo(PKIStatus.REJECTION, (), frozenset({FailInfo.BAD_ALG}))),
            ),
            (BodyType.ERROR, ErrorBody(PKIStatusInfo.accepted(), None, ("only details",))),
            (BodyType.ERROR, ErrorBody(many_bits, -3)),
            (BodyType.RR, RrBody((RevDetails(self.ca.name, 12345, x509.ReasonFlags.key_compromise),))),
            (BodyType.RP, RpBody((PKIStatusInfo.accepted(),), (RevokedCertId(dn("CA"), 12345),))),
            (BodyType.POPDECR, OtherBody(b"\x30\x03\x02\x01\x05")),
        ]

    def headers(self) -> list[PKIHeader]:
        full = replace(
            ir_header(implicit_confirm=True, cert_profile=("idevid", "ünïcode"), now=WHEN),
            recip_kid=b"recipient kid",
            recip_nonce=bytes(range(16)),
            free_text=("hello", "wörld"),
            confirm_wait_time=WHEN,
            general_info=(InfoTypeAndValue("1.2.3.4", b"\x05\x00"), InfoTypeAndValue("2.999.1")),
        )
        return [PKIHeader(dn("a"), dn("b")), ir_header(pvno=PVNO_CMP2021), full]

    def messages(self) -> list[PKIMessage]:
        protections: list[Any] = [None, PBM, PBMAC1, self.signer]
        out = []
        for i, (body_type, body) in enumerate(self.bodies()):
            for j, header in enumerate(self.headers()):
                protection = protections[(i + j) % len(protections)]
                out.append(build_message(header, body_type, body, protection=protection))
        inner = [m for m in out if m.body_type in (BodyType.P10CR, BodyType.IR, BodyType.CERTCONF)]
        out.append(build_message(ir_header(), BodyType.NESTED, NestedBody.of(*inner), protection=self.signer))
        return out


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


def test_every_built_message_reads_as_pyasn1_reads_it(corpus: Corpus) -> None:
    messages = corpus.messages()
    assert {m.body_type for m in messages} >= {b for b, _ in corpus.bodies()} | {BodyType.NESTED}
    for sent in messages:
        got = _agree(sent.der)
        assert got.header == sent.header and got.body == sent.body and got.der == sent.der
        if got.header.protection_alg is None:
            continue
        if sent.extra_certs:
            verify_signature(got)
        else:
            verify_mac(got, SECRET)


def _with_header(fields: list[bytes], body: bytes | None = None, pvno: bytes = b"\x02\x01\x02") -> bytes:
    header = _der.sequence(pvno, general_name_to_der(dn("a")), general_name_to_der(dn("b")), *fields)
    return assemble(header, body or _der.context_cons(19, _der.null()), None, ())


def _f(number: int, inner: bytes) -> bytes:
    return _der.context_cons(number, inner)


def _time(text: bytes) -> bytes:
    return _der.tlv(0x18, text)


def _info(*items: bytes) -> bytes:
    return _f(8, _der.sequence(*items))


# fmt: off
ODD = [
    _with_header([_f(0, _time(b"20300102030405.5Z"))]),
    _with_header([_f(0, _time(b"20300102030405.0123456789Z"))]),
    _with_header([_f(0, _time(b"20301231235959Z"))]),
    _with_header([], pvno=b"\x02\x01\xff"),
    _with_header([], pvno=b"\x02\x02\x00\x80"),
    _with_header([], pvno=b"\x02\x82\x00\x01\x02"),  # non-minimal length octets are accepted everywhere
    _with_header([_f(2, b"\x04\x81\x03kid")]),
    _with_header([_f(1, _der.sequence(_der.oid("1.2.3"), _der.tlv(0xA5, b"")))]),
    _with_header([_f(2, _der.octet_string(b"")), _f(4, _der.octet_string(b"t" * 300))]),
    _with_header([_info(_der.sequence(_der.oid(oids.IT_IMPLICIT_CONFIRM)),
                        _der.sequence(_der.oid(oids.IT_CONFIRM_WAIT_TIME)),
                        _der.sequence(_der.oid(oids.IT_CERT_PROFILE)))]),
    _with_header([_info(_der.sequence(_der.oid(oids.IT_CONFIRM_WAIT_TIME), _time(b"20300102030405Z")),
                        _der.sequence(_der.oid(oids.IT_CONFIRM_WAIT_TIME), _time(b"20310102030405Z")))]),
    _with_header([], _der.context_cons(3, _der.sequence(_der.sequence()))),
    _with_header([], _der.context_cons(19, b"\x05\x81\x00")),
    _with_header([], _der.context_cons(26, _der.sequence(
        _der.sequence(_der.integer(1), _der.integer(2), _der.sequence(_der.utf8_string("")))))),
]
# fmt: on


@pytest.mark.parametrize("data", ODD)
def test_odd_but_valid_encodings_read_as_pyasn1_reads_them(data: bytes) -> None:
    _agree(data)


def test_fractional_seconds_are_kept_to_the_microsecond() -> None:
    got = parse_message(_with_header([_f(0, _time(b"20300102030405.0123456789Z"))]))
    assert got.header.message_time == dt.datetime(2030, 1, 2, 3, 4, 5, 12345, tzinfo=dt.UTC)


# ---------------------------------------------------------------------------------------------------------
# Violations: each is badDataFormat (many of them pyasn1 let through: the hand reader is the stricter).


def _body(number: int, content: bytes) -> bytes:
    return _with_header([], _der.context_cons(number, content))


def _status_der(*parts: bytes) -> bytes:
    return _der.sequence(*parts)


OK_STATUS = _status_der(_der.integer(0))
TEXTS = _der.sequence(_der.utf8_string("x"))
SHA512_ALG = _f(0, _der.algorithm_identifier(oids.SHA512))
SENDER_NONCE = _f(5, _der.octet_string(bytes(16)))
TX = _f(4, _der.octet_string(bytes(16)))


def _response(*parts: bytes) -> bytes:
    """A cp message with one CertResponse made of `parts`."""
    return _body(3, _der.sequence(_der.sequence(_der.sequence(*parts))))


def _rejected(*parts: bytes) -> bytes:
    """A cp message whose one response has status rejection followed by `parts`."""
    return _response(_der.integer(0), _status_der(_der.integer(2), *parts))


def _item(oid: str, *value: bytes) -> bytes:
    """A header whose generalInfo holds one InfoTypeAndValue."""
    return _with_header([_info(_der.sequence(_der.oid(oid), *value))])


def _poll_rep(*parts: bytes) -> bytes:
    """A pollRep message with one entry made of `parts`."""
    return _body(26, _der.sequence(_der.sequence(*parts)))


def _cert_status(*parts: bytes) -> bytes:
    """A certConf message with one CertStatus made of `parts`."""
    return _body(24, _der.sequence(_der.sequence(*parts)))


# fmt: off
BAD = {
    # PKIHeader
    "header pvno ENUMERATED": _with_header([], pvno=b"\x0a\x01\x02"),
    "header pvno non-minimal": _with_header([], pvno=b"\x02\x02\x00\x02"),
    "header pvno non-minimal negative": _with_header([], pvno=b"\x02\x02\xff\xff"),
    "header pvno empty": _with_header([], pvno=b"\x02\x00"),
    "header without recipient": assemble(_der.sequence(_der.integer(2), general_name_to_der(dn("a"))),
                                         _der.context_cons(19, _der.null()), None, ()),
    "header duplicated senderNonce": _with_header([SENDER_NONCE, SENDER_NONCE]),
    "header out of order": _with_header([SENDER_NONCE, TX]),
    "header unknown field [9]": _with_header([_f(9, _der.null())]),
    "header primitive [5]": _with_header([_der.tlv(0x85, _der.octet_string(bytes(16)))]),
    "header implicit [5]": _with_header([_der.tlv(0x85, bytes(16))]),
    "header trailing NULL": _with_header([TX, _der.null()]),
    "header explicit tag holding two": _with_header([_f(5, _der.octet_string(b"a") * 2)]),
    "header explicit tag empty": _with_header([_f(5, b"")]),
    "header nonce as UTF8String": _with_header([_f(5, _der.utf8_string("nonce"))]),
    "header nonce constructed OCTET STRING": _with_header([_f(5, _der.tlv(0x24, _der.octet_string(b"n")))]),
    "time with offset": _with_header([_f(0, _time(b"20300102030405+0100"))]),
    "time without zone": _with_header([_f(0, _time(b"20300102030405"))]),
    "time without seconds": _with_header([_f(0, _time(b"203001020304Z"))]),
    "time fraction trailing zero": _with_header([_f(0, _time(b"20300102030405.50Z"))]),
    "time empty fraction": _with_header([_f(0, _time(b"20300102030405.Z"))]),
    "time comma": _with_header([_f(0, _time(b"20300102030405,5Z"))]),
    "time month 13": _with_header([_f(0, _time(b"20301302030405Z"))]),
    "time hour 24": _with_header([_f(0, _time(b"20300102240000Z"))]),
    "time leap second": _with_header([_f(0, _time(b"20300102235960Z"))]),
    "time year 0": _with_header([_f(0, _time(b"00000102030405Z"))]),
    "time non-ASCII digit": _with_header([_f(0, _time("2030010203040٥Z".encode()))]),
    "time as UTCTime": _with_header([_f(0, _der.tlv(0x17, b"300102030405Z"))]),
    "protectionAlg empty": _with_header([_f(1, _der.sequence())]),
    "protectionAlg three parts": _with_header([_f(1, _der.algorithm_identifier("1.2.3", _der.null() * 2))]),
    "protectionAlg non-minimal OID": _with_header([_f(1, _der.sequence(_der.tlv(6, b"\x2a\x80\x03")))]),
    "protectionAlg SET": _with_header([_f(1, _der.tlv(0x31, _der.oid("1.2.3")))]),
    "freeText empty": _with_header([_f(7, _der.sequence())]),
    "freeText PrintableString": _with_header([_f(7, _der.sequence(_der.tlv(0x13, b"x")))]),
    "freeText bad UTF-8": _with_header([_f(7, _der.sequence(_der.tlv(0x0C, b"\xc0\xaf")))]),
    "freeText surrogate": _with_header([_f(7, _der.sequence(_der.tlv(0x0C, b"\xed\xa0\x80")))]),
    "generalInfo empty": _with_header([_info()]),
    "generalInfo SET": _with_header([_f(8, _der.tlv(0x31, _der.sequence(_der.oid("1.2.3"))))]),
    "itav three parts": _with_header([_info(_der.sequence(_der.oid("1.2.3"), _der.null(), _der.null()))]),
    "itav without type": _with_header([_info(_der.sequence())]),
    "itav type not an OID": _with_header([_info(_der.sequence(_der.integer(1)))]),
    "implicitConfirm not NULL": _item(oids.IT_IMPLICIT_CONFIRM, _der.integer(0)),
    "confirmWaitTime bad": _item(oids.IT_CONFIRM_WAIT_TIME, _time(b"2030Z")),
    "certProfile empty": _item(oids.IT_CERT_PROFILE, _der.sequence()),
    "certProfile IA5String": _item(oids.IT_CERT_PROFILE, _der.sequence(_der.tlv(0x16, b"x"))),
    # CertRepMessage / CertResponse / PKIStatusInfo
    "cp without response": _body(3, _der.sequence()),
    "cp response SET": _body(3, _der.sequence(_der.tlv(0x31, b""))),
    "cp trailing element": _body(3, _der.sequence(_der.sequence(), _der.null())),
    "cp caPubs empty": _body(3, _der.sequence(_der.context_cons(1, _der.sequence()), _der.sequence())),
    "cp caPubs not a certificate": _body(3, _der.sequence(_f(1, _der.sequence(_der.sequence())),
                                                          _der.sequence())),
    "cp caPubs implicit": _body(3, _der.sequence(_der.context_cons(1, b""), _der.sequence())),
    "response certReqId non-minimal": _response(b"\x02\x02\x00\x01", OK_STATUS),
    "response without status": _response(_der.integer(0)),
    "response rspInfo before certifiedKeyPair": _response(_der.integer(0), OK_STATUS, _der.octet_string(b"i"),
                                                          _der.sequence(_der.context_cons(0, b""))),
    "response trailing garbage": _response(_der.integer(0), OK_STATUS, _der.octet_string(b"i"), _der.null()),
    "response rspInfo UTF8String": _response(_der.integer(0), OK_STATUS, _der.utf8_string("i")),
    "certifiedKeyPair empty": _response(_der.integer(0), OK_STATUS, _der.sequence()),
    "certifiedKeyPair [2]": _response(_der.integer(0), OK_STATUS, _der.sequence(_der.context_cons(2, b""))),
    "certifiedKeyPair encryptedCert": _response(_der.integer(0), OK_STATUS,
                                                _der.sequence(_der.context_cons(1, _der.sequence()))),
    "certificate garbage": _response(_der.integer(0), OK_STATUS,
                                     _der.sequence(_der.context_cons(0, _der.sequence(_der.integer(1))))),
    "certificate [0] empty": _response(_der.integer(0), OK_STATUS, _der.sequence(_der.context_cons(0, b""))),
    "status unknown code": _response(_der.integer(0), _status_der(_der.integer(7))),
    "status ENUMERATED": _response(_der.integer(0), _status_der(_der.tlv(0x0A, b"\x00"))),
    "status empty": _response(_der.integer(0), _status_der()),
    "status failInfo before statusString": _rejected(_der.tlv(3, b"\x00\x04"), TEXTS),
    "status statusString empty": _rejected(_der.sequence()),
    "status trailing": _rejected(_der.tlv(3, b"\x00"), _der.null()),
    "failInfo unused bits set": _rejected(_der.tlv(3, b"\x02\x05")),
    "failInfo unused count 8": _rejected(_der.tlv(3, b"\x08\x00")),
    "failInfo unused bits, no octets": _rejected(_der.tlv(3, b"\x01")),
    "failInfo no octets at all": _rejected(_der.tlv(3, b"")),
    "failInfo constructed": _rejected(_der.tlv(0x23, _der.tlv(3, b"\x00\x04"))),
    "failInfo OCTET STRING": _rejected(_der.octet_string(b"\x04")),
    # certConf
    "certConf SET": _body(24, _der.tlv(0x31, b"")),
    "certStatus certHash UTF8String": _cert_status(_der.utf8_string("h"), _der.integer(0)),
    "certStatus without certReqId": _cert_status(_der.octet_string(b"h")),
    "certStatus hashAlg implicit": _cert_status(_der.octet_string(b"h"), _der.integer(0),
                                                _der.context_cons(0, _der.oid(oids.SHA512))),
    "certStatus hashAlg before statusInfo": _cert_status(_der.octet_string(b"h"), _der.integer(0), SHA512_ALG,
                                                         OK_STATUS),
    "certStatus duplicated statusInfo": _cert_status(_der.octet_string(b"h"), _der.integer(0), OK_STATUS * 2),
    "certStatus trailing": _cert_status(_der.octet_string(b"h"), _der.integer(0), _der.null()),
    # pkiConf, pollReq, pollRep, error, p10cr
    "pkiconf with content": _body(19, b"\x05\x01\x00"),
    "pkiconf INTEGER": _body(19, _der.integer(0)),
    "pkiconf two NULLs": _body(19, _der.null() + _der.null()),
    "pkiconf constructed NULL": _body(19, b"\x25\x00"),
    "pollReq entry of two": _body(25, _der.sequence(_der.sequence(_der.integer(0), _der.integer(1)))),
    "pollReq entry empty": _body(25, _der.sequence(_der.sequence())),
    "pollReq entry not a SEQUENCE": _body(25, _der.sequence(_der.integer(0))),
    "pollRep without checkAfter": _poll_rep(_der.integer(0)),
    "pollRep reason not text": _poll_rep(_der.integer(0), _der.integer(1), _der.null()),
    "pollRep trailing": _poll_rep(_der.integer(0), _der.integer(1), TEXTS, _der.null()),
    "error empty": _body(23, _der.sequence()),
    "error details before code": _body(23, _der.sequence(OK_STATUS, TEXTS, _der.integer(5))),
    "error code non-minimal": _body(23, _der.sequence(OK_STATUS, b"\x02\x02\x00\x05")),
    "error trailing": _body(23, _der.sequence(OK_STATUS, _der.integer(5), _der.null())),
    "p10cr garbage": _body(4, _der.sequence(_der.integer(0))),
    "p10cr two elements": _with_header([], _der.context_cons(4, _der.sequence() + _der.sequence())),
}
# fmt: on


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_violations_are_bad_data_format(data: bytes) -> None:
    top = _der.scan(data, 48)  # each case is a well-framed PKIMessage: the violation is where its name says
    header, body = _der.children(data, top)
    assert header.tag == 0x30 and 0xA0 <= body.tag <= 0xBA
    with pytest.raises(CmpError) as err:
        parse_message(data)
    assert err.value.fail_info is FailInfo.BAD_DATA_FORMAT, err.value


def test_inner_violations_spoil_only_their_item(corpus: Corpus) -> None:
    good = build_message(ir_header(), BodyType.PKICONF, PkiConfBody()).der
    nested = build_message(ir_header(), BodyType.NESTED, NestedBody.of(parse_message(good)))
    body = _der.context_cons(20, _der.sequence(good, BAD["header out of order"], good))
    got = parse_message(assemble(nested.header_der, body, None, ()))
    assert isinstance(got.body, NestedBody)
    assert [i.message is not None for i in got.body.items] == [True, False, True]
    error = got.body.items[1].error
    assert error is not None and error.fail_info is FailInfo.BAD_DATA_FORMAT


def test_unknown_certificate_or_csr_version_is_a_cmp_error(corpus: Corpus) -> None:
    """cryptography raises x509.InvalidVersion (not a ValueError) for these."""
    csr = corpus.csr.public_bytes(Encoding.DER)
    at = csr.index(b"\x02\x01\x00")
    bad_csr = _der.context_cons(4, csr[:at] + b"\x02\x01\x05" + csr[at + 3 :])
    cert = _der_of(corpus.cert) or b""
    at = cert.index(b"\xa0\x03\x02\x01\x02")
    bad_cert = cert[:at] + b"\xa0\x03\x02\x01\x07" + cert[at + 5 :]
    bad_pair = _der.sequence(_der.context_cons(0, bad_cert))
    for data in (_with_header([], bad_csr), _response(_der.integer(0), OK_STATUS, bad_pair)):
        with pytest.raises(CmpError) as err:
            parse_message(data)
        assert err.value.fail_info is FailInfo.BAD_DATA_FORMAT


def test_private_key_and_publication_info_are_still_checked_by_pyasn1(corpus: Corpus) -> None:
    cert = _der.context_cons(0, _der_of(corpus.cert) or b"")
    publication = _der.context_cons(1, _der.sequence(_der.integer(0)))
    got = parse_message(_response(_der.integer(0), OK_STATUS, _der.sequence(cert, publication)))
    assert isinstance(got.body, CertRepBody) and got.body.responses[0].certificate == corpus.cert
    for extra in (
        _der.context_cons(0, _der.null()),
        _der.context_cons(1, _der.sequence(_der.integer(0), _der.null())),
    ):
        with pytest.raises(CmpError) as err:
            parse_message(_response(_der.integer(0), OK_STATUS, _der.sequence(cert, extra)))
        assert err.value.fail_info is FailInfo.BAD_DATA_FORMAT


def test_limits_still_apply_to_the_hand_read_bodies() -> None:
    from appliance.cmp import Limits

    statuses = _der.sequence(*[_der.sequence(_der.octet_string(b"h"), _der.integer(i)) for i in range(3)])
    responses = _der.sequence(_der.sequence(*[_der.sequence(_der.integer(i), OK_STATUS) for i in range(3)]))
    polls = _der.sequence(*[_der.sequence(_der.integer(i)) for i in range(3)])
    for number, content in ((24, statuses), (3, responses), (25, polls)):
        with pytest.raises(CmpError) as err:
            parse_message(_body(number, content), limits=Limits(max_requests=2))
        assert err.value.fail_info is FailInfo.BAD_REQUEST
        parse_message(_body(number, content), limits=Limits(max_requests=3))
    with pytest.raises(CmpError) as err:
        parse_message(_body(25, _der.sequence()))
    assert err.value.fail_info is FailInfo.BAD_REQUEST


def test_hot_bodies_never_reach_pyasn1(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    hot_types = {BodyType.P10CR, BodyType.IP, BodyType.CP, BodyType.KUP, BodyType.CCP, BodyType.CERTCONF,
                 BodyType.PKICONF, BodyType.POLLREQ, BodyType.POLLREP, BodyType.ERROR}  # fmt: skip
    hot = [m for m in corpus.messages() if m.body_type in hot_types]
    expected = [parse_message(m.der) for m in hot]

    def refuse(*_: object) -> None:
        raise AssertionError("pyasn1 used on the hot path")

    monkeypatch.setattr(parse_module, "_decode", refuse)
    assert [parse_message(m.der) for m in hot] == expected


# ---------------------------------------------------------------------------------------------------------
# Fuzz: single-byte mutations.


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_byte_flips_give_cmp_errors_and_never_loosen_the_schema(corpus: Corpus) -> None:
    """Whatever the parser accepts after a mutation, pyasn1 accepts too and reads the same way."""
    seeds = [m.der for m in corpus.messages() if m.body_type is not BodyType.NESTED and len(m.der) < 2500]
    nested = NestedBody.of(*[parse_message(s) for s in seeds[:3]])
    seeds.append(build_message(ir_header(), BodyType.NESTED, nested).der)
    rng = random.Random(20240611)
    accepted = 0
    for _ in range(4000):
        data = bytearray(rng.choice(seeds))
        data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            _agree(bytes(data))
        except CmpError:
            continue
        accepted += 1
    assert 200 < accepted < 3800  # the mutations hit both structure and payload bytes
