"""Every body type: build, parse back, compare; and the built bytes decode with pyasn1's rfc9480 schema."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pyasn1.codec.der import decoder
from pyasn1_alt_modules import rfc9480

from appliance.cmp import (
    NULL_DN,
    PVNO_CMP2021,
    Body,
    BodyType,
    CertConfBody,
    CertRepBody,
    CertResponse,
    CertStatus,
    CmpError,
    ErrorBody,
    FailInfo,
    GenBody,
    InfoTypeAndValue,
    MacProtector,
    NestedBody,
    P10crBody,
    PkiConfBody,
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
    build_message,
    check_header,
    oids,
    parse_message,
    required_pvno,
    response_header,
    verify_mac,
)
from appliance.cmp.model import OtherBody
from tests.appliance.cmp.support import KID, SECRET, MiniCa, dn, ip_body, ir_body, ir_header, name

MAC = MacProtector(SECRET, KID, iterations=1000)


@pytest.fixture(scope="module")
def ca() -> MiniCa:
    return MiniCa()


def _csr() -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return x509.CertificateSigningRequestBuilder().subject_name(name("p10")).sign(key, hashes.SHA256())


def _bodies(ca: MiniCa) -> list[tuple[BodyType, Body]]:
    cert = ca.issue(name("device"), ec.generate_private_key(ec.SECP256R1()).public_key())
    waiting = PKIStatusInfo(PKIStatus.WAITING, ("come back later",))
    rejected = PKIStatusInfo.rejection(FailInfo.NOT_AUTHORIZED, "serial outside the work order")
    return [
        (BodyType.IR, ir_body()),
        (BodyType.CR, ir_body()),
        (BodyType.P10CR, P10crBody(_csr())),
        (BodyType.IP, ip_body(cert, ca.cert)),
        (BodyType.CP, ip_body(cert)),
        (BodyType.IP, CertRepBody((CertResponse(0, waiting),))),
        (BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),))),
        (BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0, rejected),))),
        (BodyType.PKICONF, PkiConfBody()),
        (BodyType.POLLREQ, PollReqBody((0, 1))),
        (BodyType.POLLREP, PollRepBody((PollRepEntry(0, 5, ("busy",)), PollRepEntry(1, 0)))),
        (BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),))),
        (BodyType.GENP, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS, _ca_certs_value(ca.cert)),))),
        (BodyType.ERROR, ErrorBody(rejected, 42, ("details",))),
        (
            BodyType.ERROR,
            ErrorBody(
                PKIStatusInfo(
                    PKIStatus.REJECTION, (), frozenset({FailInfo.BAD_ALG, FailInfo.DUPLICATE_CERT_REQ})
                )
            ),
        ),
        (
            BodyType.RR,
            RrBody((RevDetails(ca.name, 123456789, x509.ReasonFlags.key_compromise), RevDetails(ca.name, 7))),
        ),
        (
            BodyType.RP,
            RpBody((PKIStatusInfo.accepted(),), (RevokedCertId(x509.DirectoryName(ca.name), 123456789),)),
        ),
        (BodyType.POPDECR, OtherBody(b"\x30\x03\x02\x01\x05")),
    ]


def _ca_certs_value(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    from appliance.cmp import _der

    return _der.sequence(cert.public_bytes(Encoding.DER))


def test_every_body_round_trips_and_matches_the_rfc9480_schema(ca: MiniCa) -> None:
    for body_type, body in _bodies(ca):
        header = ir_header(implicit_confirm=True, cert_profile=("idevid",))
        sent = build_message(header, body_type, body, protection=MAC, extra_certs=(ca.cert,))
        got = parse_message(sent.der)
        assert got.body_type is body_type
        assert got.body == body, body_type
        assert got.header == sent.header
        assert got.extra_certs == (ca.cert,)
        assert got.der == sent.der and got.protected_part == sent.protected_part
        verify_mac(got, SECRET)
        check_header(got)
        decoded, rest = decoder.decode(sent.der, asn1Spec=rfc9480.PKIMessage())
        assert rest == b"" and decoded["body"].getName() == body_type.asn1_name


def test_header_fields_survive(ca: MiniCa) -> None:
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    header = ir_header(implicit_confirm=True, cert_profile=("idevid", "x"))
    header = response_header(header, sender=NULL_DN, confirm_wait_time=when, now=when)
    header = type(header)(**{**header.__dict__, "free_text": ("hello", "wörld"), "recip_kid": b"r",
                             "general_info": (InfoTypeAndValue("1.2.3.4", b"\x05\x00"),)})  # fmt: skip
    got = parse_message(build_message(header, BodyType.PKICONF, PkiConfBody()).der).header
    assert got == header
    assert got.sender == NULL_DN and got.recipient == dn("device")
    assert got.message_time == when and got.confirm_wait_time == when
    assert got.implicit_confirm is False  # granted only when asked for AND passed in by the server


def test_parsed_request_exposes_what_the_server_needs(ca: MiniCa) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    msg = parse_message(build_message(ir_header(), BodyType.IR, ir_body(key), protection=MAC).der)
    (req,) = msg.body.requests  # type: ignore[union-attr]
    assert req.pop is PopKind.SIGNATURE and req.template.subject == name("device")
    assert req.template.public_key() == key.public_key()
    req.verify_pop()


def test_bad_pop_is_bad_pop() -> None:
    body = ir_body()
    (req,) = body.requests
    forged = type(req)(**{**req.__dict__, "pop_signature": req.pop_signature[:-2] + b"\x00\x00"})  # type: ignore[index]
    msg = parse_message(build_message(ir_header(), BodyType.IR, type(body)((forged,))).der)
    with pytest.raises(CmpError) as err:
        msg.body.requests[0].verify_pop()  # type: ignore[union-attr]
    assert err.value.fail_info is FailInfo.BAD_POP


def test_cert_conf_hash_and_ed25519_needs_cmp2021(ca: MiniCa) -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_cert = ca.issue(name("ed"), ed_key.public_key())
    from tests.appliance.cmp.support import make_cert

    self_signed_ed = make_cert(name("ed"), ed_key.public_key(), ed_key)
    status = CertStatus.for_certificate(self_signed_ed)
    assert status.hash_alg is not None and status.matches(self_signed_ed) and not status.matches(ed_cert)
    body = CertConfBody((status,))
    assert required_pvno(BodyType.CERTCONF, body) == PVNO_CMP2021
    wrong = build_message(ir_header(), BodyType.CERTCONF, body)
    with pytest.raises(CmpError) as err:
        check_header(parse_message(wrong.der))
    assert err.value.fail_info is FailInfo.UNSUPPORTED_VERSION
    right = build_message(ir_header(pvno=PVNO_CMP2021), BodyType.CERTCONF, body)
    check_header(parse_message(right.der))
    assert CertStatus.for_certificate(ed_cert).hash_alg is None


def test_ca_certs_genm_genp(ca: MiniCa) -> None:
    genm = parse_message(
        build_message(ir_header(), BodyType.GENM, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS),))).der
    )
    assert genm.body.ca_certs() == ()  # type: ignore[union-attr]
    genp_body = GenBody((InfoTypeAndValue(oids.IT_CA_CERTS, _ca_certs_value(ca.cert)),))
    genp = parse_message(build_message(ir_header(), BodyType.GENP, genp_body).der)
    assert genp.body.ca_certs() == (ca.cert,)  # type: ignore[union-attr]
    assert GenBody(()).ca_certs() is None


def test_nested_keeps_inner_bytes_and_parses_each(ca: MiniCa) -> None:
    inner = [build_message(ir_header(), BodyType.IR, ir_body(), protection=MAC) for _ in range(3)]
    outer = build_message(ir_header(), BodyType.NESTED, NestedBody.of(*inner), protection=MAC)
    got = parse_message(outer.der)
    assert isinstance(got.body, NestedBody)
    assert [i.der for i in got.body.items] == [m.der for m in inner]
    for item in got.body.messages:
        verify_mac(item, SECRET)


def test_body_class_must_fit_the_type() -> None:
    with pytest.raises(TypeError):
        build_message(ir_header(), BodyType.IP, ir_body())
