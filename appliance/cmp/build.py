"""Message objects in, DER out. Encodes directly (appliance.der style) so the bytes are exactly what we mean;
tests decode every body with the rfc9480 schemas and openssl reads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from appliance.cmp import _der, oids
from appliance.cmp._names import general_name_to_der
from appliance.cmp.model import (
    BODY_CLASS,
    PVNO_CMP2000,
    PVNO_CMP2021,
    AlgorithmIdentifier,
    Body,
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertReqMessage,
    CertResponse,
    CertTemplate,
    ErrorBody,
    GenBody,
    InfoTypeAndValue,
    NestedBody,
    OtherBody,
    P10crBody,
    PkiConfBody,
    PKIHeader,
    PKIMessage,
    PKIStatusInfo,
    PollRepBody,
    PollReqBody,
    PopKind,
    RpBody,
    RrBody,
)

_DER = serialization.Encoding.DER
_REASON_CODES = {"unspecified": 0, "key_compromise": 1, "ca_compromise": 2, "affiliation_changed": 3,
                 "superseded": 4, "cessation_of_operation": 5, "certificate_hold": 6, "remove_from_crl": 8,
                 "privilege_withdrawn": 9, "aa_compromise": 10}  # fmt: skip


class Protector(Protocol):
    """What build_message needs from a protection method (see appliance.cmp.protection)."""

    def prepare(self, header: PKIHeader) -> PKIHeader:
        """The header to send: protectionAlg set (fresh salt for MAC), senderKID filled in if unset."""
        ...

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        """The protection value over `protected_part`, with the algorithm in header.protection_alg."""
        ...

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        """Certificates to put first in extraCerts (the signer's certificate, then its chain)."""
        ...


def required_pvno(body_type: BodyType, body: Body) -> int:
    """cmp2021 (3) where RFC 9480 requires it (a certConf using hashAlg), else cmp2000 (2)."""
    if isinstance(body, CertConfBody) and any(s.hash_alg is not None for s in body.statuses):
        return PVNO_CMP2021
    return PVNO_CMP2000


def _algorithm(alg: AlgorithmIdentifier) -> bytes:
    return _der.algorithm_identifier(alg.oid, alg.parameters)


def _itav(oid: str, value: bytes | None) -> bytes:
    return _der.sequence(_der.oid(oid), value or b"")


def _texts(texts: Sequence[str]) -> bytes:
    return _der.sequence(*(_der.utf8_string(t) for t in texts))


def encode_header(h: PKIHeader) -> bytes:
    parts = [_der.integer(h.pvno), general_name_to_der(h.sender), general_name_to_der(h.recipient)]
    if h.message_time is not None:
        parts.append(_der.context_cons(0, _der.generalized_time(h.message_time)))
    if h.protection_alg is not None:
        parts.append(_der.context_cons(1, _algorithm(h.protection_alg)))
    for number, octets in ((2, h.sender_kid), (3, h.recip_kid), (4, h.transaction_id), (5, h.sender_nonce),
                           (6, h.recip_nonce)):  # fmt: skip
        if octets is not None:
            parts.append(_der.context_cons(number, _der.octet_string(octets)))
    if h.free_text:
        parts.append(_der.context_cons(7, _texts(h.free_text)))
    info: list[bytes] = []
    if h.implicit_confirm:
        info.append(_itav(oids.IT_IMPLICIT_CONFIRM, _der.null()))
    if h.confirm_wait_time is not None:
        info.append(_itav(oids.IT_CONFIRM_WAIT_TIME, _der.generalized_time(h.confirm_wait_time)))
    if h.cert_profile:
        info.append(_itav(oids.IT_CERT_PROFILE, _texts(h.cert_profile)))
    info.extend(_itav(i.oid, i.value) for i in h.general_info)
    if info:
        parts.append(_der.context_cons(8, _der.sequence(*info)))
    return _der.sequence(*parts)


def status_info_der(s: PKIStatusInfo) -> bytes:
    parts = [_der.integer(int(s.status))]
    if s.status_string:
        parts.append(_texts(s.status_string))
    if s.fail_info:
        parts.append(_der.named_bits(frozenset(int(b) for b in s.fail_info)))
    return _der.sequence(*parts)


def encode_template(t: CertTemplate) -> bytes:
    parts: list[bytes] = []
    if t.serial_number is not None:
        parts.append(_der.context_prim(1, _der.integer(t.serial_number)[2:]))
    if t.issuer is not None:
        parts.append(_der.context_cons(3, t.issuer.public_bytes()))
    if t.subject is not None:
        parts.append(_der.context_cons(5, t.subject.public_bytes()))
    if t.public_key_der is not None:
        parts.append(b"\xa6" + t.public_key_der[1:])
    if t.extensions_der is not None:
        parts.append(b"\xa9" + t.extensions_der[1:])
    return _der.sequence(*parts)


def encode_cert_request(cert_req_id: int, template: CertTemplate,
                        controls: Sequence[InfoTypeAndValue] = ()) -> bytes:  # fmt: skip
    """CertRequest DER: what a signature POP signs."""
    parts = [_der.integer(cert_req_id), encode_template(template)]
    if controls:
        parts.append(_der.sequence(*(_itav(c.oid, c.value) for c in controls)))
    return _der.sequence(*parts)


def old_cert_id(issuer: x509.Name, serial_number: int) -> InfoTypeAndValue:
    """The regCtrl oldCertID control of a kur: the certificate being updated (RFC 4211 6.5, RFC 9483 4.1.3)."""
    value = _der.sequence(general_name_to_der(x509.DirectoryName(issuer)), _der.integer(serial_number))
    return InfoTypeAndValue(oids.REG_CTRL_OLD_CERT_ID, value)


def make_cert_request(
    template: CertTemplate,
    *,
    cert_req_id: int = 0,
    pop_key: CertificateIssuerPrivateKeyTypes | None = None,
    ra_verified: bool = False,
    controls: Sequence[InfoTypeAndValue] = (),
) -> CertReqMessage:
    """A CertReqMsg. With `pop_key` (the private key of the template's public key) the POP is a signature
    over the CertRequest; with `ra_verified` it is raVerified (RFC 9483 5.2.3.2); otherwise absent."""
    from appliance.cmp.protection import sign_data

    request_der = encode_cert_request(cert_req_id, template, controls)
    if pop_key is not None:
        alg, signature = sign_data(pop_key, request_der)
        return CertReqMessage(cert_req_id, template, PopKind.SIGNATURE, alg, signature, False, tuple(controls),
                              request_der)  # fmt: skip
    pop = PopKind.RA_VERIFIED if ra_verified else PopKind.NONE
    return CertReqMessage(cert_req_id, template, pop, None, None, False, tuple(controls), request_der)


def _cert_req_msg(r: CertReqMessage) -> bytes:
    request = r.cert_request_der or encode_cert_request(r.cert_req_id, r.template, r.controls)
    if r.pop is PopKind.NONE:
        return _der.sequence(request)
    if r.pop is PopKind.RA_VERIFIED:
        return _der.sequence(request, _der.context_prim(0, b""))
    if r.pop is PopKind.SIGNATURE and r.pop_alg is not None and r.pop_signature is not None:
        return _der.sequence(
            request, _der.context_cons(1, _algorithm(r.pop_alg) + _der.bit_string(r.pop_signature))
        )
    raise ValueError(f"cannot encode proof of possession {r.pop.value}")


def _cert_response(r: CertResponse) -> bytes:
    parts = [_der.integer(r.cert_req_id), status_info_der(r.status)]
    if r.certificate is not None:
        parts.append(_der.sequence(_der.context_cons(0, r.certificate.public_bytes(_DER))))
    if r.rsp_info is not None:
        parts.append(_der.octet_string(r.rsp_info))
    return _der.sequence(*parts)


def _certs(certs: Sequence[x509.Certificate]) -> bytes:
    return _der.sequence(*(c.public_bytes(_DER) for c in certs))


def encode_body_content(body: Body) -> bytes:
    """The element inside the body's explicit tag."""
    match body:
        case CertReqBody(requests):
            return _der.sequence(*(_cert_req_msg(r) for r in requests))
        case P10crBody(csr):
            return csr.public_bytes(_DER)
        case CertRepBody(responses, ca_pubs):
            head = _der.context_cons(1, _certs(ca_pubs)) if ca_pubs else b""
            return _der.sequence(head, _der.sequence(*(_cert_response(r) for r in responses)))
        case CertConfBody(statuses):
            items = []
            for s in statuses:
                parts = [_der.octet_string(s.cert_hash), _der.integer(s.cert_req_id)]
                if s.status_info is not None:
                    parts.append(status_info_der(s.status_info))
                if s.hash_alg is not None:
                    parts.append(_der.context_cons(0, _algorithm(s.hash_alg)))
                items.append(_der.sequence(*parts))
            return _der.sequence(*items)
        case PkiConfBody():
            return _der.null()
        case PollReqBody(ids):
            return _der.sequence(*(_der.sequence(_der.integer(i)) for i in ids))
        case PollRepBody(entries):
            return _der.sequence(*(
                _der.sequence(_der.integer(e.cert_req_id), _der.integer(e.check_after),
                              _texts(e.reason) if e.reason else b"")
                for e in entries
            ))  # fmt: skip
        case GenBody(items):
            return _der.sequence(*(_itav(i.oid, i.value) for i in items))
        case ErrorBody(status, code, details):
            return _der.sequence(
                status_info_der(status),
                _der.integer(code) if code is not None else b"",
                _texts(details) if details else b"",
            )
        case RrBody(requests):
            items = []
            for r in requests:
                template = encode_template(CertTemplate(subject=r.subject, public_key_der=r.public_key_der,
                                                        issuer=r.issuer, serial_number=r.serial_number))  # fmt: skip
                ext = b""
                if r.reason is not None:
                    enumerated = _der.tlv(0x0A, bytes((_REASON_CODES[r.reason.name],)))
                    ext = _der.sequence(
                        _der.sequence(_der.oid(oids.CRL_REASON), _der.octet_string(enumerated))
                    )
                items.append(_der.sequence(template, ext))
            return _der.sequence(*items)
        case RpBody(statuses, rev_certs):
            parts = [_der.sequence(*(status_info_der(s) for s in statuses))]
            if rev_certs:
                cert_ids = (
                    _der.sequence(general_name_to_der(c.issuer), _der.integer(c.serial_number))
                    for c in rev_certs
                )
                parts.append(_der.context_cons(0, _der.sequence(*cert_ids)))
            return _der.sequence(*parts)
        case NestedBody(items):
            return _der.sequence(*(i.der for i in items))
        case OtherBody(content):
            return content
    raise TypeError(f"not a CMP body: {type(body).__name__}")


def encode_body(body_type: BodyType, body: Body) -> bytes:
    expected = BODY_CLASS.get(body_type, OtherBody)
    if not isinstance(body, expected):
        raise TypeError(
            f"a {body_type.asn1_name} body must be a {expected.__name__}, not {type(body).__name__}"
        )
    return _der.context_cons(int(body_type), encode_body_content(body))


def assemble(header_der: bytes, body_der: bytes, protection: bytes | None,
             extra_certs: Sequence[x509.Certificate]) -> bytes:  # fmt: skip
    parts = [header_der, body_der]
    if protection is not None:
        parts.append(_der.context_cons(0, _der.bit_string(protection)))
    if extra_certs:
        parts.append(_der.context_cons(1, _certs(extra_certs)))
    return _der.sequence(*parts)


def build_message(
    header: PKIHeader,
    body_type: BodyType,
    body: Body,
    *,
    protection: Protector | None = None,
    extra_certs: Sequence[x509.Certificate] = (),
) -> PKIMessage:
    """Encode and, with `protection`, protect one message. The protector's certificates come first in
    extraCerts (RFC 9483 3.3), then `extra_certs` not already there."""
    if protection is not None:
        header = protection.prepare(header)
    header_der = encode_header(header)
    body_der = encode_body(body_type, body)
    value = None
    certs: list[x509.Certificate] = []
    if protection is not None:
        value = protection.protect(header, _der.sequence(header_der, body_der))
        certs.extend(protection.extra_certs)
    certs.extend(c for c in extra_certs if c not in certs)
    der = assemble(header_der, body_der, value, certs)
    return PKIMessage(header, body_type, body, value, tuple(certs), der, header_der, body_der)


def build_messages(
    specs: Sequence[tuple[PKIHeader, BodyType, Body]], *, protection: Protector | None
) -> list[PKIMessage]:
    """build_message for many messages. A protector with `protect_many` (SignatureProtector over an HSM key:
    one PKCS#11 call, sign_many, for all) protects them together, which is what lets the upstream drain sign
    a batch of inner messages for the price of one HSM round trip; any other protects them one by one."""
    many = getattr(protection, "protect_many", None)
    if protection is None or many is None:
        return [build_message(h, t, b, protection=protection) for h, t, b in specs]
    drafts = [build_message(protection.prepare(h), t, b) for h, t, b in specs]
    values: list[bytes] = many([d.header for d in drafts], [d.protected_part for d in drafts])
    certs = protection.extra_certs
    return [with_protection(d, v, certs) for d, v in zip(drafts, values, strict=True)]


def with_protection(
    message: PKIMessage, protection: bytes, extra_certs: Sequence[x509.Certificate] = ()
) -> PKIMessage:
    """Attach a protection value computed elsewhere (e.g. a batch of HSM signatures over
    `message.protected_part`). The header must already name the protectionAlg."""
    if message.header.protection_alg is None:
        raise ValueError("set header.protection_alg before computing the protection")
    der = assemble(message.header_der, message.body_der, protection, extra_certs)
    return replace(message, protection=protection, extra_certs=tuple(extra_certs), der=der)
