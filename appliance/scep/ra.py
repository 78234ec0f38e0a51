"""The SCEP RA credential: an RSA-2048 key in the HSM (label "scep-ra") that decrypts what devices send and signs
the answers, and its certificate from the management CA (RFC 8894 2.2: a CA may have an RA receive and answer
for it).

RSA because SCEP encrypts to the RA by key transport, which every SCEP client does with RSA; the CA keys stay EC
or whatever they are. The certificate says so in its key usage (digitalSignature, keyEncipherment) and is
written next to the TLS credentials (`[scep] ra_cert`), reused while it certifies the HSM key, comes from the
current management CA and has more than a tenth of its life left; otherwise a new one is signed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from appliance.ca import CaRecord
from appliance.ca.hierarchy import key_label_for
from appliance.files import write_public
from appliance.profiles import new_serial_number
from hsm.algorithms import KeyAlgorithm, default_hash, from_public_key
from hsm.keys import HsmRsaPrivateKey
from hsm.token import Token

log = logging.getLogger(__name__)

RA_KEY_LABEL = "scep-ra"
RA_COMMON_NAME = "Birthline SCEP RA"
RA_CERT_DAYS = 825
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
_RA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class ScepRa:
    key: HsmRsaPrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    """The RA certificate's issuers: the management CA."""


def _sign(token: Token, management: CaRecord, public: rsa.RSAPublicKey) -> x509.Certificate:
    ca_cert = management.certificate
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    ca_key = token.get_key(key_label_for(management.name))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RA_COMMON_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(new_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=RA_CERT_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_RA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, default_hash(from_public_key(ca_key.public_key())))
    )


def ensure_scep_ra(token: Token, management: CaRecord, cert_path: Path) -> ScepRa:
    key = (
        token.get_key(RA_KEY_LABEL)
        if token.has_key(RA_KEY_LABEL)
        else token.generate_key(RA_KEY_LABEL, KeyAlgorithm.RSA_2048, decrypt=True)
    )
    if not isinstance(key, HsmRsaPrivateKey):
        raise TypeError(f"the HSM key {RA_KEY_LABEL!r} is not an RSA key: SCEP needs one (key transport)")
    public = key.public_key()
    cert: x509.Certificate | None = None
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            cert = None
    now = dt.datetime.now(dt.UTC)
    if cert is not None:
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if (
            cert.public_key().public_bytes(*_SPKI) != public.public_bytes(*_SPKI)
            or cert.issuer != management.certificate.subject
            or cert.not_valid_after_utc - now < life / 10
        ):
            cert = None
    if cert is None:
        cert = _sign(token, management, public)
        cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))  # never through a link
        log.info("SCEP RA certificate written to %s", cert_path)
    return ScepRa(key, cert, (management.certificate,))
