"""The CMP server's RA credential: an EC P-256 key in the HSM (label "cmp-ra") and a certificate for it from the
management CA, kept in a file next to the TLS credentials so clients can be given it (`openssl cmp -srvcert`).

The certificate is reused while it certifies the HSM key and has more than a tenth of its life left; otherwise a
new one is signed (audited by the caller's log of the daemon start, like the TLS server certificate)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.ca import CaRecord
from appliance.cmp.protection import SignatureProtector
from appliance.files import write_public
from appliance.stations_registry import sign_tls_certificate
from hsm.algorithms import KeyAlgorithm
from hsm.token import Token

log = logging.getLogger(__name__)

RA_KEY_LABEL = "cmp-ra"
RA_COMMON_NAME = "Birthline CMP RA"
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def ensure_ra(token: Token, management_ca: CaRecord, cert_path: Path) -> SignatureProtector:
    key = (
        token.get_key(RA_KEY_LABEL)
        if token.has_key(RA_KEY_LABEL)
        else token.generate_key(RA_KEY_LABEL, KeyAlgorithm.EC_P256)
    )
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
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
            or cert.issuer != management_ca.certificate.subject
            or cert.not_valid_after_utc - now < life / 10
        ):
            cert = None
    if cert is None:
        cert = sign_tls_certificate(token, management_ca, RA_COMMON_NAME, public, server=True)
        cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))  # never through a link
        log.info("CMP RA certificate written to %s", cert_path)
    return SignatureProtector(key, cert, (management_ca.certificate,))
