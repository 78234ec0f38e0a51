"""The key algorithms Birthline signs with, and their default signature hashes."""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm.errors import UnsupportedAlgorithmError


class KeyAlgorithm(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    ED25519 = "ed25519"


EC_CURVES: dict[KeyAlgorithm, ec.EllipticCurve] = {
    KeyAlgorithm.EC_P256: ec.SECP256R1(),
    KeyAlgorithm.EC_P384: ec.SECP384R1(),
}
RSA_BITS: dict[KeyAlgorithm, int] = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072}


# Narrower than HashAlgorithm on purpose: cryptography's builders only accept the SHA-2/3 classes.
def default_hash(alg: KeyAlgorithm) -> hashes.SHA256 | hashes.SHA384 | None:
    if alg is KeyAlgorithm.EC_P384:
        return hashes.SHA384()
    if alg is KeyAlgorithm.ED25519:
        return None
    return hashes.SHA256()


def from_public_key(pub: object) -> KeyAlgorithm:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        for alg, curve in EC_CURVES.items():
            if pub.curve.name == curve.name:
                return alg
        raise UnsupportedAlgorithmError(f"unsupported EC curve {pub.curve.name}")
    if isinstance(pub, rsa.RSAPublicKey):
        for alg, bits in RSA_BITS.items():
            if pub.key_size == bits:
                return alg
        raise UnsupportedAlgorithmError(f"unsupported RSA key size {pub.key_size}")
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    raise UnsupportedAlgorithmError(f"unsupported public key type {type(pub).__name__}")
