"""Checking a signature the HSM returned, with its public key alone: no PKCS#11 here.

The prepare worker processes (appliance/issuance/prepare.py) verify every HSM signature of a certificate batch;
importing this module, not hsm.keys, keeps python-pkcs11 and asyncio out of their memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsm.algorithms import default_hash, from_public_key
from hsm.errors import SignatureVerificationError

Verify = Callable[[], None]

# RFC 8017 section 9.2 note 1: DER of DigestInfo up to the digest itself.
DIGEST_INFO = {
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def digest_of(
    data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed
) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        inner: hashes.HashAlgorithm = algorithm._algorithm
        if len(data) != inner.digest_size:
            raise ValueError(f"prehashed data must be {inner.digest_size} bytes, got {len(data)}")
        return data, inner
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


def checked(verify: Verify, label: str) -> None:
    try:
        verify()
    except (InvalidSignature, ValueError):
        raise SignatureVerificationError(
            f"the HSM returned a signature with key {label!r} that does not verify; not using it"
        ) from None


def ecdsa_der(raw: bytes) -> bytes:
    """CKM_ECDSA yields r||s; X.509 wants the DER Ecdsa-Sig-Value (raw r||s would be accepted by the builders
    silently). cryptography's encoder: python-pkcs11's (asn1crypto) cost ~10 us a signature."""
    half = len(raw) // 2
    if len(raw) % 2 or not half:
        raise SignatureVerificationError("the HSM returned an ECDSA signature of odd length; not using it")
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


class SignatureCheck:
    """The check every signature of this package passes before use, runnable in any process: turns a raw
    mechanism output (asign_unverified) into the signature X.509 carries and verifies it with the public key.

    Made from the public key alone, so a worker process that holds the signed bytes can do it (the issuance
    prepare workers: appliance/issuance/prepare.py), off the process that drives the HSM."""

    def __init__(self, public_key: Any, label: str) -> None:
        self.label = label
        self._pub = public_key
        self.algorithm = from_public_key(public_key)
        self._hash = default_hash(self.algorithm)
        # Made once: building the signature algorithm objects per signature cost more than the DER encoding.
        self._ecdsa = ec.ECDSA(utils.Prehashed(self._hash)) if self._hash is not None else None

    def digest(self, item: bytes) -> bytes:
        """What the batch mechanism signs for `item` (sign_many): its hash, or for RSA the DigestInfo."""
        if isinstance(self._pub, ec.EllipticCurvePublicKey):
            assert self._hash is not None
            return digest_of(item, self._hash)[0]
        if isinstance(self._pub, rsa.RSAPublicKey):
            return DIGEST_INFO["sha256"] + hashlib.sha256(item).digest()
        return item

    def finish(self, raw: bytes, item: bytes, prepared: bytes | None = None) -> bytes:
        """The verified signature over `item` (`prepared`: digest(item), if the caller has it); raises
        SignatureVerificationError if it does not verify."""
        pub = self._pub
        if isinstance(pub, ec.EllipticCurvePublicKey):
            assert self._hash is not None
            digest = prepared if prepared is not None else digest_of(item, self._hash)[0]
            der = ecdsa_der(raw)
            algorithm = self._ecdsa
            assert algorithm is not None
            checked(lambda: pub.verify(der, digest, algorithm), self.label)
            return der
        if isinstance(pub, rsa.RSAPublicKey):
            checked(lambda: pub.verify(raw, item, padding.PKCS1v15(), hashes.SHA256()), self.label)
            return raw
        checked(lambda: pub.verify(raw, item), self.label)
        return raw
