"""Which public keys a network peer may have this appliance verify a signature with, before it does.

The cost of a verification is the key's (a huge RSA exponent or modulus makes one cost a hundred times more), and
the key comes from a certificate anyone can make: CMP (appliance/cmp/protection.py) and SCEP
(appliance/scep/cms.py) refuse, before verifying anything with it, a key outside the key policy for devices
(profiles: rsa-2048/3072/4096, exponent 65537) and the curves they verify.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

SIGNER_RSA_BITS = frozenset({2048, 3072, 4096})
SIGNER_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
SIGNER_KEYS_TEXT = "RSA 2048, 3072 or 4096 bits with exponent 65537, EC P-256, P-384 or P-521, Ed25519, Ed448"


def signer_key_accepted(key: object, *, edwards: bool = True) -> bool:
    """`key` is one a peer may sign with (`edwards`: Ed25519 and Ed448 too, for a layer that verifies them)."""
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size in SIGNER_RSA_BITS and key.public_numbers().e == 65537
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in SIGNER_CURVES
    return edwards and isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
