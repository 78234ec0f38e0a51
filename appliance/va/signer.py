"""The OCSP responder's delegated signers: per issuing CA, a key generated in the token and a certificate the CA
issues for it (id-kp-OCSPSigning, id-pkix-ocsp-nocheck), renewed with a new key before it expires."""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.ca import load_ca
from appliance.ca.hierarchy import SIGNING_ONLY
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.profiles import new_serial_number
from appliance.va.revocation import iso
from hsm.algorithms import default_hash
from hsm.token import Token


@dataclass(frozen=True)
class OcspSigner:
    ca: str
    key_label: str
    cert_der: bytes
    not_before: float
    not_after: float

    @functools.cached_property
    def cert(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.cert_der)

    @property
    def cert_serial(self) -> str:
        return format(self.cert.serial_number, "x")


_SIGNER_COLS = "ca, key_label, cert_der, not_before, not_after"


def current_signer(journal: Journal, ca: str) -> OcspSigner | None:
    row = journal.call(
        lambda: journal.conn.execute(
            f"SELECT {_SIGNER_COLS} FROM ocsp_signer WHERE ca=? ORDER BY not_after DESC LIMIT 1", (ca,)
        ).fetchone()
    )
    if row is None:
        return None
    return OcspSigner(str(row[0]), str(row[1]), bytes(row[2]), float(row[3]), float(row[4]))


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _signer_subject(ca_cert: x509.Certificate) -> x509.Name:
    cns = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = str(cns[0].value) if cns else "Birthline CA"
    keep = [a for a in ca_cert.subject if a.oid != NameOID.COMMON_NAME]
    return x509.Name([*keep, x509.NameAttribute(NameOID.COMMON_NAME, (base + " OCSP Responder")[:64])])


def issue_signer(
    journal: Journal,
    token: Token,
    audit: AuditSink,
    ca_name: str,
    *,
    validity_days: int = 30,
    actor: str = "appliance",
    clock: Callable[[], float] = time.time,
) -> OcspSigner:
    """Generate a new responder key in the token and have the CA certify it for OCSP signing only."""
    ca = load_ca(journal, ca_name)
    ca_cert = ca.certificate
    serial = new_serial_number()
    label = f"ocsp:{ca_name}:{serial:x}"[:120]
    key = token.generate_key(label, ca.key_algorithm)
    now = int(clock())
    not_before, not_after = now - 300, now + validity_days * 86400
    cert = (
        x509.CertificateBuilder()
        .subject_name(_signer_subject(ca_cert))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            SIGNING_ONLY,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca_cert)), critical=False
        )
        .sign(token.get_key(ca.key_label), default_hash(ca.key_algorithm))
    )
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    signer = OcspSigner(ca_name, label, cert_der, float(not_before), float(not_after))

    def store(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO ocsp_signer (cert_serial, ca, key_label, cert_der, not_before, not_after, created_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (format(serial, "x"), ca_name, label, cert_der, signer.not_before, signer.not_after, clock()),
        )
        audit.append(conn, actor, "ocsp.signer-issued", {
            "ca": ca_name, "cert_serial": format(serial, "x"), "key_label": label,
            "not_after": iso(signer.not_after),
        })  # fmt: skip

    journal.call(journal.transaction, store, f"storing the OCSP signer of {ca_name}")
    return signer


def ensure_signer(
    journal: Journal,
    token: Token,
    audit: AuditSink,
    ca_name: str,
    *,
    validity_days: int = 30,
    renew_before_days: int = 10,
    actor: str = "appliance",
    clock: Callable[[], float] = time.time,
) -> OcspSigner:
    """The CA's current signer, issuing a new one when there is none or it expires within renew_before_days."""
    found = current_signer(journal, ca_name)
    if (
        found is not None
        and found.not_after - clock() > renew_before_days * 86400
        and token.has_key(found.key_label)
    ):
        return found
    return issue_signer(journal, token, audit, ca_name, validity_days=validity_days, actor=actor, clock=clock)
