"""A CMP peer for the conformance tests: it builds requests the way a conformant client would, and each test
changes the one thing RFC 9483 forbids, then reads the server's answer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    BodyType,
    CertRepBody,
    CertReqBody,
    CertTemplate,
    ErrorBody,
    FailInfo,
    MacProtector,
    PKIHeader,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    Protector,
    RpBody,
    SignatureProtector,
    build_message,
    follow_up_header,
    make_cert_request,
    parse_message,
    request_header,
)
from appliance.cmp.model import Body
from appliance.cmp.server import CONTENT_TYPE, CmpResponder
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.stations_registry import Credentials

SECRET = b"conformance shared secret"
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
PEM = serialization.Encoding.PEM


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spki(key: ec.EllipticCurvePrivateKey | PublicKeyTypes) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(*SPKI)


def serial_name(serial: str, *extra: x509.NameAttribute[str]) -> x509.Name:
    return x509.Name([*extra, x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])


class SoftCa:
    """A software CA outside the appliance (another vendor's, a downstream RA's)."""

    def __init__(self, cn: str, *, parent: SoftCa | None = None) -> None:
        self.key = new_key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        self.parent = parent
        self.cert = (
            (parent or self).issue(self.name, self.key.public_key(), ca=True) if parent else self._self()
        )

    def _self(self) -> x509.Certificate:
        return self._build(self.name, self.key.public_key(), self.name, self.key, ca=True)

    @staticmethod
    def _build(
        subject: x509.Name, public: PublicKeyTypes, issuer: x509.Name, key: CertificateIssuerPrivateKeyTypes, *,
        ca: bool = False, ski: bool = True, crl_url: str | None = None, days: float = 30,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:  # fmt: skip
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if ski:
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
        if crl_url is not None:
            point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
            b = b.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        return b.sign(key, hashes.SHA256())  # type: ignore[arg-type]

    def issue(self, subject: x509.Name, public: PublicKeyTypes, **kw: object) -> x509.Certificate:
        return self._build(subject, public, self.name, self.key, **kw)  # type: ignore[arg-type]

    def crl(self, revoked: Sequence[int] = (), *, days: float = 1) -> x509.CertificateRevocationList:
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateRevocationListBuilder().issuer_name(self.name)
            .last_update(now - dt.timedelta(days=2 if days < 0 else 0, minutes=1))
            .next_update(now + dt.timedelta(days=days))
        )  # fmt: skip
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        return b.sign(self.key, hashes.SHA256())


_STAND_IN = x509.ObjectIdentifier("2.5.29.99")  # encoded 55 1d 63; subjectKeyIdentifier 2.5.29.14 is 55 1d 0e


def twice_ski(builder: x509.CertificateBuilder | x509.CertificateSigningRequestBuilder,
              public: PublicKeyTypes) -> x509.CertificateBuilder | x509.CertificateSigningRequestBuilder:  # fmt: skip
    """The builder with a subjectKeyIdentifier, and a second one, under a stand-in OID that resign() turns into the real one
    (cryptography's builders refuse two extensions of one type; its loaders accept them, and only decoding the
    extensions then raises DuplicateExtension)."""
    ski = x509.SubjectKeyIdentifier.from_public_key(public)  # type: ignore[arg-type]
    builder = builder.add_extension(ski, critical=False)  # type: ignore[assignment]
    return builder.add_extension(x509.UnrecognizedExtension(_STAND_IN, ski.public_bytes()), critical=False)  # type: ignore[return-value]


def resign(der: bytes, tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate or CSR (`der`, whose signed part is `tbs`) with the stand-in OID turned into
    subjectKeyIdentifier and signed again by `key` (ecdsa-with-SHA256): its signature verifies, its extensions
    do not decode."""
    from appliance.cmp import _der

    stand_in, real = bytes.fromhex("0603551d63"), bytes.fromhex("0603551d0e")
    assert tbs.count(stand_in) == 1
    patched = tbs.replace(stand_in, real)
    signature_algorithm = bytes.fromhex("300a06082a8648ce3d040302")
    signature = key.sign(patched, ec.ECDSA(hashes.SHA256()))
    return _der.sequence(patched, signature_algorithm, _der.tlv(0x03, b"\x00" + signature))


def mac(kid: bytes = b"mac", secret: bytes = SECRET) -> MacProtector:
    return MacProtector(secret, kid, iterations=1000)


def header(sender: x509.Name | None = None, **kw: object) -> PKIHeader:
    name = sender if sender is not None else serial_name("device")
    return request_header(sender=x509.DirectoryName(name), recipient=x509.DirectoryName(name), **kw)  # type: ignore[arg-type]


def cert_request(
    serial: str | None, key: ec.EllipticCurvePrivateKey, *, cert_req_id: int = 0,
    pop_key: ec.EllipticCurvePrivateKey | None = None, ra_verified: bool = False, subject: x509.Name | None = None,
    extensions_der: bytes | None = None, controls: Sequence[object] = (),
) -> CertReqBody:  # fmt: skip
    name = subject if subject is not None else (serial_name(serial) if serial is not None else None)
    template = CertTemplate(subject=name, public_key_der=spki(key), extensions_der=extensions_der)
    req = make_cert_request(
        template, cert_req_id=cert_req_id, pop_key=None if ra_verified else (pop_key or key),
        ra_verified=ra_verified, controls=controls,  # type: ignore[arg-type]
    )  # fmt: skip
    return CertReqBody((req,))


def build(hdr: PKIHeader, body_type: BodyType, body: Body, protection: Protector | None) -> PKIMessage:
    return build_message(hdr, body_type, body, protection=protection)


def statuses(answer: PKIMessage) -> list[PKIStatusInfo]:
    body = answer.body
    if isinstance(body, ErrorBody):
        return [body.status]
    if isinstance(body, CertRepBody):
        return [r.status for r in body.responses]
    if isinstance(body, RpBody):
        return list(body.statuses)
    return []


def refused(answer: PKIMessage, body_type: BodyType = BodyType.ERROR) -> frozenset[FailInfo]:
    """The failInfo bits of a refusal answered with `body_type` (error for a message-level failure; ip/cp/kup/rp
    with status rejection for a request-level one); fails the test if the answer is anything else."""
    assert answer.body_type is body_type, (answer.body_type, statuses(answer))
    (status,) = statuses(answer)
    assert status.status is PKIStatus.REJECTION, status
    return status.fail_info


def issued(answer: PKIMessage) -> x509.Certificate:
    assert isinstance(answer.body, CertRepBody), (answer.body_type, statuses(answer))
    (rsp,) = answer.body.responses
    assert rsp.status.status in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS), rsp.status
    assert rsp.certificate is not None
    return rsp.certificate


@dataclass
class Peer:
    responder: CmpResponder
    service: IssueService
    journal: Journal
    port: int
    tmp: Path
    ra_cert: x509.Certificate
    downstream: SoftCa
    station: Credentials

    async def post_bytes(self, data: bytes, label: str = "mac") -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{self.port}/.well-known/cmp/p/{label}", data=data,
                   headers={"Content-Type": CONTENT_TYPE}) as r,
        ):  # fmt: skip
            return r.status, await r.read()

    async def post(self, msg: PKIMessage, label: str = "mac") -> PKIMessage:
        status, body = await self.post_bytes(msg.der, label)
        assert status == 200, status
        return parse_message(body)

    async def unparsed(self, msg: PKIMessage, label: str = "mac") -> frozenset[FailInfo]:
        """The failInfo of the answer to a message refused as malformed: HTTP 400 and an unprotected error."""
        status, body = await self.post_bytes(msg.der, label)
        answer = parse_message(body)
        assert status == 400 and answer.protection is None, (status, statuses(answer))
        return refused(answer)

    def follow(self, answer: PKIMessage, body_type: BodyType, body: Body, protection: Protector | None,
               sender: x509.GeneralName | None = None, **kw: object) -> PKIMessage:  # fmt: skip
        hdr = follow_up_header(answer.header, sender=sender or answer.header.recipient)
        return build(dataclasses.replace(hdr, **kw), body_type, body, protection)  # type: ignore[arg-type]

    async def enrol(self, serial: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[
        ec.EllipticCurvePrivateKey, x509.Certificate]:  # fmt: skip
        """A device certificate from this appliance's issuing CA (MAC ir, implicitConfirm)."""
        key = key or new_key()
        answer = await self.post(
            build(header(implicit_confirm=True), BodyType.IR, cert_request(serial, key), mac())
        )
        return key, issued(answer)

    def device_signer(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> SignatureProtector:
        """Signature protection with a device certificate of this appliance, its issuing CA in extraCerts."""
        return SignatureProtector(key, cert, tuple(c for c in self.responder.chain[:-1]))

    def ra_signer(self, cn: str = "Downstream RA") -> SignatureProtector:
        """A downstream RA's credential from the CA the "ra" label trusts (its CA in extraCerts)."""
        key = new_key()
        cert = self.downstream.issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), key.public_key()
        )
        return SignatureProtector(key, cert, (self.downstream.cert,))

    def state(self, cert: x509.Certificate) -> tuple[str, int | None, int | None]:
        row = self.journal.call(lambda: self.journal.conn.execute(
            "SELECT state, updates, updated_by FROM issuance WHERE cert_serial=?",
            (format(cert.serial_number, "x"),)).fetchone())  # fmt: skip
        return str(row[0]), row[1], row[2]

    def revoked(self, cert: x509.Certificate) -> str | None:
        row = self.journal.call(lambda: self.journal.conn.execute(
            "SELECT reason FROM revocation WHERE cert_serial=?", (format(cert.serial_number, "x"),)).fetchone())  # fmt: skip
        return None if row is None else str(row[0])


def raw_message(
    hdr: PKIHeader, body_type: BodyType, content_der: bytes, protection: Protector | None
) -> bytes:
    """A message whose body content is given as DER, for bodies the builder would not produce (two CRL reasons)."""
    from appliance.cmp import _der
    from appliance.cmp.build import assemble, encode_header

    if protection is not None:
        hdr = protection.prepare(hdr)
    header_der = encode_header(hdr)
    body_der = _der.context_cons(int(body_type), content_der)
    value = protection.protect(hdr, _der.sequence(header_der, body_der)) if protection is not None else None
    return assemble(header_der, body_der, value, protection.extra_certs if protection is not None else ())


def rr_content(cert: x509.Certificate, reasons: Sequence[int] = (1,), *, public_key: bytes | None = None,
               subject: x509.Name | None = None) -> bytes:  # fmt: skip
    """RevReqContent for one certificate, with the given CRL reason codes (each its own extension)."""
    from appliance.cmp import _der, oids
    from appliance.cmp.build import encode_template

    template = encode_template(CertTemplate(subject=subject, public_key_der=public_key, issuer=cert.issuer,
                                            serial_number=cert.serial_number))  # fmt: skip
    exts = [_der.sequence(_der.oid(oids.CRL_REASON), _der.octet_string(_der.tlv(0x0A, bytes((r,)))))
            for r in reasons]  # fmt: skip
    return _der.sequence(_der.sequence(template, _der.sequence(*exts) if exts else b""))
