"""Helpers for the CMP tests: a throw-away software CA and message makers."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    CertRepBody,
    CertResponse,
    CertTemplate,
    PKIHeader,
    PKIStatusInfo,
    make_cert_request,
    request_header,
)
from appliance.cmp.model import CertReqBody
from appliance.issuance.journal import Journal

SECRET = b"correct horse battery staple"
KID = b"line-1"


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def dn(cn: str) -> x509.DirectoryName:
    return x509.DirectoryName(name(cn))


def make_cert(
    subject: x509.Name,
    public_key: PublicKeyTypes,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    issuer: x509.Name | None = None,
    *,
    ca: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    algorithm = None if not isinstance(issuer_key, ec.EllipticCurvePrivateKey) else hashes.SHA256()
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.key_size == 384:
        algorithm = hashes.SHA384()
    return builder.sign(issuer_key, algorithm)


class MiniCa:
    """A software CA that certifies whatever key it is given."""

    def __init__(self, cn: str = "CMP Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = name(cn)
        self.cert = make_cert(self.name, self.key.public_key(), self.key, ca=True)

    def issue(self, subject: x509.Name, public_key: PublicKeyTypes) -> x509.Certificate:
        return make_cert(subject, public_key, self.key, self.name)


def ir_header(**kw: object) -> PKIHeader:
    return request_header(sender=dn("device"), recipient=dn("CMP Test CA"), **kw)  # type: ignore[arg-type]


def ir_body(key: ec.EllipticCurvePrivateKey | None = None, cn: str = "device") -> CertReqBody:
    key = key or ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CertReqBody((make_cert_request(CertTemplate(subject=name(cn), public_key_der=spki), pop_key=key),))


def ip_body(cert: x509.Certificate, ca: x509.Certificate | None = None) -> CertRepBody:
    return CertRepBody((CertResponse(0, PKIStatusInfo.accepted(), cert),), (ca,) if ca else ())


def issuance_state(journal: Journal, cert: x509.Certificate) -> str:
    """The journal state (issued, confirmed, ...) of the issuance row of `cert`."""
    row = journal.call(lambda: journal.conn.execute(
        "SELECT state FROM issuance WHERE cert_serial=?", (format(cert.serial_number, "x"),)).fetchone())  # fmt: skip
    return str(row[0])
