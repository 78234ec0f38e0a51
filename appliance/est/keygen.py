"""serverkeygen's key (RFC 7030 4.4): generated in software by the appliance, of a type the label's profile
allows. The key leaves in the answer and is kept nowhere (never in the journal, the HSM or a log)."""

from __future__ import annotations

from collections.abc import Set
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

# The key types generated, in the order preferred when the CSR's own key type is not one the profile allows.
PREFERENCE: Final = ("ec-p256", "ec-p384", "ed25519", "rsa-3072", "rsa-2048", "rsa-4096")


def keygen_algorithm(allowed: Set[str], requested: str | None) -> str | None:
    """The CSR's key type if the profile allows it (RFC 7030 4.4.1: the CSR's key says what the client wants),
    else the first of PREFERENCE the profile allows; None when it allows none of them."""
    if requested in allowed and requested in PREFERENCE:
        return requested
    return next((a for a in PREFERENCE if a in allowed), None)


def generate_key(algorithm: str) -> CertificateIssuerPrivateKeyTypes:
    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(algorithm[4:]))
    raise ValueError(f"no generator for {algorithm!r}")
