"""Create, import and list the CAs. Keys are generated in the HSM and never leave it.

Three shapes, after the seed document's "Create Root CA and Sub CA":
  (a) root and issuing CA on this appliance;
  (b) issuing CA under an external or air-gapped root: key in the HSM, a PKCS#10 request goes out, the signed
      certificate and its chain come back and are checked before the CA becomes active;
  (c) a management CA, a separate hierarchy for the appliance's own TLS and station credentials, so a leaked
      station credential can never chain to the birth-certificate root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from appliance import names
from appliance.ca.identity import check_subject
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal, now
from hsm.algorithms import KeyAlgorithm, default_hash, from_public_key

if TYPE_CHECKING:
    # Types only: `ca list` and `ca chain` read the journal without loading issuance or the HSM session layer.
    from appliance.issuance.policy import AuditSink
    from hsm.token import Token

# RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration". A birth certificate lives as long as
# the device, so the CAs above it must not expire first.
NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
ROLES = ("root", "issuing", "management")
# keyUsage of the appliance's own signing end-entity certificates (TLS, OCSP responder): digitalSignature only.
SIGNING_ONLY = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


class CaError(BirthlineError):
    """A CA operation was refused: unknown CA, wrong state, chain does not verify, key mismatch."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.UNKNOWN_PROFILE)


@dataclass(frozen=True)
class CaRecord:
    name: str
    role: str
    key_label: str
    key_algorithm: KeyAlgorithm
    parent: str | None
    state: str
    subject: str
    csr_der: bytes | None
    cert_der: bytes | None
    chain_der: tuple[bytes, ...]  # the certificates above this CA, nearest first

    @property
    def certificate(self) -> x509.Certificate:
        if self.cert_der is None:
            raise CaError(f"CA {self.name!r} has no certificate yet (state {self.state})")
        return x509.load_der_x509_certificate(self.cert_der)

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA's certificate followed by the ones above it, up to the root."""
        return [self.certificate, *(x509.load_der_x509_certificate(d) for d in self.chain_der)]


def key_label_for(name: str) -> str:
    return f"ca:{name}"


def parse_subject(text: str) -> x509.Name:
    """Accept the OpenSSL one-line form "/CN=Root/O=Acme" or RFC 4514 "CN=Root,O=Acme"."""
    text = text.strip()
    try:
        if text.startswith("/"):
            parts = [p for p in text.split("/") if p]
            return x509.Name.from_rfc4514_string(",".join(reversed(parts)))
        return x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise CaError(f"cannot parse subject {text!r}: {exc}") from exc


def _ca_extensions(
    builder: x509.CertificateBuilder,
    public_key: object,
    issuer_ski: x509.SubjectKeyIdentifier,
    path_len: int | None,
) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
    )


def _sign_ca_cert(
    subject: x509.Name,
    public_key: object,
    issuer: x509.Name,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    issuer_ski: x509.SubjectKeyIdentifier,
    path_len: int | None,
    not_after: dt.datetime,
) -> x509.Certificate:
    from appliance.profiles import new_serial_number

    today = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(new_serial_number())
        .not_valid_before(today - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
    )
    builder = _ca_extensions(builder, public_key, issuer_ski, path_len)
    return builder.sign(issuer_key, default_hash(from_public_key(issuer_key.public_key())))


def _ski_of(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _not_after(validity_days: int | None) -> dt.datetime:
    if validity_days is None:
        return NO_EXPIRY
    return dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=validity_days)


# -- storage -------------------------------------------------------------------------------------------------------
_COLS = "name, role, key_label, key_algorithm, parent, state, subject, csr_der, cert_der, chain_pem"


def _record(row: tuple[object, ...]) -> CaRecord:
    name, role, label, alg, parent, state, subject, csr, cert, chain = row
    return CaRecord(
        name=str(name),
        role=str(role),
        key_label=str(label),
        key_algorithm=KeyAlgorithm(str(alg)),
        parent=parent if isinstance(parent, str) else None,
        state=str(state),
        subject=str(subject),
        csr_der=csr if isinstance(csr, bytes) else None,
        cert_der=cert if isinstance(cert, bytes) else None,
        chain_der=_chain_from_pem(chain),
    )


def _chain_from_pem(blob: object) -> tuple[bytes, ...]:
    if not isinstance(blob, bytes | str) or not blob:
        return ()
    data = blob.encode() if isinstance(blob, str) else blob
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(data))


def _chain_to_pem(chain: tuple[bytes, ...] | list[bytes]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in chain)


def load_ca(journal: Journal, name: str) -> CaRecord:
    row = journal.call(
        lambda: journal.conn.execute(f"SELECT {_COLS} FROM ca WHERE name=?", (name,)).fetchone()
    )
    if row is None:
        raise CaError(
            f"no CA named {name!r}: make it (`birthline ca init-root`, then `birthline ca init-issuing` for the"
            " issuing CA, or `ca request` and `ca import` from your own root), or name one `birthline ca list` shows"
        )
    return _record(row)


def list_cas(journal: Journal) -> list[CaRecord]:
    rows = journal.call(
        lambda: journal.conn.execute(f"SELECT {_COLS} FROM ca ORDER BY created_at").fetchall()
    )
    return [_record(r) for r in rows]


def _insert(journal: Journal, rec: CaRecord, audit: AuditSink | None, actor: str) -> None:
    def ins(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"INSERT INTO ca ({_COLS}, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.name,
                rec.role,
                rec.key_label,
                rec.key_algorithm.value,
                rec.parent,
                rec.state,
                rec.subject,
                rec.csr_der,
                rec.cert_der,
                _chain_to_pem(rec.chain_der),
                now(),
            ),
        )
        if audit is not None:
            audit.append(conn, actor, "ca.created" if rec.cert_der else "ca.requested", {
                "ca": rec.name, "role": rec.role, "parent": rec.parent, "subject": rec.subject,
                "key_label": rec.key_label, "key_algorithm": rec.key_algorithm.value,
                "cert_sha256": hashlib.sha256(rec.cert_der).hexdigest() if rec.cert_der else None,
                "csr_sha256": hashlib.sha256(rec.csr_der).hexdigest() if rec.csr_der else None,
            })  # fmt: skip

    journal.call(journal.transaction, ins, f"recording CA {rec.name}")


def _require_new(journal: Journal, token: Token, name: str) -> None:
    names.CA.check(name)
    exists = journal.call(lambda: journal.conn.execute("SELECT 1 FROM ca WHERE name=?", (name,)).fetchone())
    if exists:
        raise CaError(f"a CA named {name!r} already exists")
    if token.has_key(key_label_for(name)):
        raise CaError(f"the HSM already holds a key labelled {key_label_for(name)!r}; choose another CA name")


# -- operations ----------------------------------------------------------------------------------------------------
def create_root(
    journal: Journal,
    token: Token,
    name: str,
    subject: str,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    *,
    path_len: int | None = 1,
    validity_days: int | None = None,
    role: str = "root",
    audit: AuditSink | None = None,
    actor: str = "appliance",
    demo: bool = False,
) -> CaRecord:
    _require_new(journal, token, name)
    subj = parse_subject(subject)
    check_subject(subj, demo=demo)
    key = token.generate_key(key_label_for(name), algorithm)
    pub = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    cert = _sign_ca_cert(subj, pub, subj, key, ski, path_len, _not_after(validity_days))
    rec = CaRecord(
        name, role, key.label, algorithm, None, "active", subj.rfc4514_string(), None,
        cert.public_bytes(serialization.Encoding.DER), (),
    )  # fmt: skip
    _insert(journal, rec, audit, actor)
    return rec


def create_management(
    journal: Journal,
    token: Token,
    name: str,
    subject: str,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    *,
    validity_days: int | None = 3650,
    audit: AuditSink | None = None,
    actor: str = "appliance",
    demo: bool = False,
) -> CaRecord:
    # pathLen 0: the management CA signs TLS and station certificates only, never another CA.
    return create_root(
        journal, token, name, subject, algorithm, path_len=0, validity_days=validity_days, role="management",
        audit=audit, actor=actor, demo=demo,
    )  # fmt: skip


def create_issuing(
    journal: Journal,
    token: Token,
    name: str,
    subject: str,
    parent: str,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    *,
    path_len: int | None = 0,
    validity_days: int | None = None,
    audit: AuditSink | None = None,
    actor: str = "appliance",
    demo: bool = False,
) -> CaRecord:
    try:
        parent_rec = load_ca(journal, parent)
    except CaError:
        raise CaError(
            f"no CA named {parent!r} to sign issuing CA {name!r}: create it with `birthline ca init-root"
            f" --name {parent}`, name another signing CA with --parent (`birthline ca list`), or, under an"
            " external root, use `birthline ca request` and `birthline ca import` instead"
        ) from None
    if parent_rec.state != "active" or parent_rec.role not in ("root", "issuing"):
        raise CaError(
            f"CA {parent!r} ({parent_rec.role}, {parent_rec.state}) cannot sign an issuing CA: give --parent a"
            " root or issuing CA that is active (`birthline ca list`)"
        )
    parent_cert = parent_rec.certificate
    bc = parent_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if bc.path_length is not None and bc.path_length < 1:
        raise CaError(f"CA {parent!r} has pathLen {bc.path_length}: it may not sign another CA")
    _require_new(journal, token, name)
    subj = parse_subject(subject)
    check_subject(subj, demo=demo)
    key = token.generate_key(key_label_for(name), algorithm)
    parent_key = token.get_key(parent_rec.key_label)
    cert = _sign_ca_cert(
        subj, key.public_key(), parent_cert.subject, parent_key, _ski_of(parent_cert), path_len,
        _not_after(validity_days),
    )  # fmt: skip
    chain = (parent_rec.cert_der or b"", *parent_rec.chain_der)
    rec = CaRecord(
        name, "issuing", key.label, algorithm, parent, "active", subj.rfc4514_string(), None,
        cert.public_bytes(serialization.Encoding.DER), chain,
    )  # fmt: skip
    _insert(journal, rec, audit, actor)
    return rec


def create_csr_for_external_root(
    journal: Journal,
    token: Token,
    name: str,
    subject: str,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    *,
    role: str = "issuing",
    audit: AuditSink | None = None,
    actor: str = "appliance",
) -> tuple[CaRecord, bytes]:
    """Generate the CA's key in the HSM and return a PEM PKCS#10 request for the external root to sign: an
    issuing CA, or the management CA (role "management"), which then signs the appliance's TLS and station
    certificates under the organisation's own root."""
    if role not in ("issuing", "management"):
        raise CaError(f"an external root signs an issuing or a management CA, not a {role} CA")
    try:
        existing = load_ca(journal, name)
    except CaError:
        existing = None
    if existing is not None:
        then = (
            f" set [stations] management_ca to it and run `birthline init` again, which makes the TLS server"
            f" certificate from it (the {existing.state} {name!r} is then unused; docs/commissioning.md)"
            if role == "management"
            else " and give that name wherever the issuing CA is named"
        )
        raise CaError(
            f"a CA named {name!r} already exists ({existing.role}, {existing.state}): request this one under a"
            f" new name (--name NEW), import its certificate (`birthline ca import --name NEW ...`),{then}"
        )
    _require_new(journal, token, name)
    subj = parse_subject(subject)
    check_subject(subj, given_by="--subject")
    key = token.generate_key(key_label_for(name), algorithm)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subj)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, default_hash(algorithm))
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    rec = CaRecord(
        name,
        role,
        key.label,
        algorithm,
        None,
        "awaiting-certificate",
        subj.rfc4514_string(),
        der,
        None,
        (),
    )
    _insert(journal, rec, audit, actor)
    return rec, csr.public_bytes(serialization.Encoding.PEM)


def _check_is_ca(cert: x509.Certificate, what: str) -> x509.BasicConstraints:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise CaError(f"{what} has no basicConstraints: it is not a CA certificate") from exc
    if not bc.ca:
        raise CaError(f"{what} has basicConstraints cA=false: it is not a CA certificate")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CaError(f"{what} has no keyUsage extension") from exc
    if not ku.key_cert_sign:
        raise CaError(f"{what} keyUsage lacks keyCertSign")
    return bc


def import_ca_certificate(
    journal: Journal,
    token: Token,
    name: str,
    cert_pem_or_der: bytes,
    chain_pem: bytes,
    *,
    audit: AuditSink | None = None,
    actor: str = "appliance",
) -> CaRecord:
    """Activate a CA created with create_csr_for_external_root once its certificate comes back.

    Checks: the certificate's public key is the HSM key's; it is a CA; each certificate is signed by the next;
    the chain ends in a self-signed root. Trust anchors change only through this administrator's action.
    """
    rec = load_ca(journal, name)
    if rec.state != "awaiting-certificate":
        raise CaError(f"CA {name!r} is {rec.state}; only a CA awaiting its certificate can be imported")
    cert = _load_one(cert_pem_or_der, "the CA certificate")
    check_subject(cert.subject, given_by="--cert: the name the request carried")
    chain = _load_many(chain_pem, "the chain")
    for i, above in enumerate(chain):  # a clean name under the demo's root is still the demo's chain
        check_subject(
            above.subject, given_by=f"--chain certificate {i + 1}: have your organisation's own root sign it"
        )
    if not chain:
        raise CaError(
            "the chain is empty: give the signing CA's certificate and those above it, up to the root"
        )
    key = token.get_key(rec.key_label)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CaError(f"the certificate's public key is not the HSM key {rec.key_label!r}")
    _check_is_ca(cert, "the CA certificate")
    now_dt = dt.datetime.now(dt.UTC)
    path = [cert, *chain]
    for i, (child, parent) in enumerate(itertools.pairwise(path)):
        bc = _check_is_ca(parent, f"chain certificate {i + 1} ({parent.subject.rfc4514_string()})")
        if bc.path_length is not None and bc.path_length < i:
            raise CaError(f"chain certificate {i + 1} has pathLen {bc.path_length}, too short for this chain")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CaError(
                f"{child.subject.rfc4514_string()} is not signed by {parent.subject.rfc4514_string()}: {exc}"
            ) from exc
    for c in path:
        if not c.not_valid_before_utc <= now_dt <= c.not_valid_after_utc:
            raise CaError(f"{c.subject.rfc4514_string()} is not valid now")
    root = path[-1]
    if root.issuer != root.subject:
        raise CaError("the chain does not end in a self-signed root")
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CaError("the root's self-signature does not verify") from exc

    der = serialization.Encoding.DER

    def upd(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE ca SET state='active', cert_der=?, chain_pem=?, subject=? WHERE name=?",
            (
                cert.public_bytes(der),
                _chain_to_pem([c.public_bytes(der) for c in chain]),
                cert.subject.rfc4514_string(),
                name,
            ),
        )
        if audit is not None:
            audit.append(conn, actor, "ca.imported", {
                "ca": name, "subject": cert.subject.rfc4514_string(),
                "cert_sha256": hashlib.sha256(cert.public_bytes(der)).hexdigest(),
                "chain": [c.subject.rfc4514_string() for c in chain],
            })  # fmt: skip

    journal.call(journal.transaction, upd, f"importing CA {name}")
    return load_ca(journal, name)


def _load_one(data: bytes, what: str) -> x509.Certificate:
    certs = _load_many(data, what)
    if len(certs) != 1:
        raise CaError(f"{what}: expected one certificate, found {len(certs)}")
    return certs[0]


def _load_many(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CaError(f"{what}: not a certificate ({exc})") from exc
