"""Translation between pkcs11 objects/templates and cryptography keys; runs on the PKCS#11 thread."""

from __future__ import annotations

import hashlib
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hsm.algorithms import EC_CURVES, RSA_BITS, KeyAlgorithm, from_public_key
from hsm.errors import KeyExistsError, KeyNotFoundError, UnsupportedAlgorithmError

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# SoftHSM 2.6.1 accepts both the RFC 8410 OID and PrintableString "edwards25519"; the OID is what
# PKCS#11 3.0 prefers and what other tokens accept more widely.
ED25519_PARAMS = bytes.fromhex("06032b6570")  # DER OID 1.3.101.112 (id-Ed25519)
_EC_NAMES = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}


def find_private(session: pkcs11.Session, label: str) -> Any:
    try:
        return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    except pkcs11.NoSuchKey:
        raise KeyNotFoundError(f"no private key labelled {label!r} on the token") from None
    except pkcs11.MultipleObjectsReturned:
        raise KeyExistsError(f"more than one private key labelled {label!r}: refusing to guess") from None


def has_private(session: pkcs11.Session, label: str) -> bool:
    found = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
    return any(True for _ in found)


def generate(session: pkcs11.Session, label: str, alg: KeyAlgorithm, *, decrypt: bool = False) -> None:
    """A key pair that signs; with `decrypt` (RSA only) its private key may also decrypt (CKA_DECRYPT): a key
    transport recipient, such as the SCEP RA's."""
    if decrypt and alg not in RSA_BITS:
        raise UnsupportedAlgorithmError(f"only RSA keys decrypt here, not {alg}")
    if has_private(session, label):
        raise KeyExistsError(f"a private key labelled {label!r} already exists")
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }
    capabilities = MechanismFlag.SIGN | MechanismFlag.VERIFY
    if decrypt:
        private_template[Attribute.DECRYPT] = True
        capabilities |= MechanismFlag.DECRYPT | MechanismFlag.ENCRYPT
    common: dict[str, Any] = {
        "label": label,
        "id": hashlib.sha256(label.encode()).digest()[:16],
        "store": True,
        "capabilities": capabilities,
        "private_template": private_template,
    }
    if alg in EC_CURVES:
        params = encode_named_curve_parameters(_EC_NAMES[alg])
        session.generate_keypair(KeyType.EC, public_template={Attribute.EC_PARAMS: params}, **common)
    elif alg in RSA_BITS:
        session.generate_keypair(KeyType.RSA, RSA_BITS[alg], **common)
    elif alg is KeyAlgorithm.ED25519:
        try:
            session.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                public_template={Attribute.EC_PARAMS: ED25519_PARAMS},
                **common,
            )
        except (pkcs11.MechanismInvalid, pkcs11.DomainParamsInvalid, pkcs11.AttributeValueInvalid) as exc:
            raise UnsupportedAlgorithmError(f"the token cannot generate Ed25519 keys ({exc!r})") from None
    else:
        raise UnsupportedAlgorithmError(f"unsupported algorithm {alg!r}")


def _ed25519_point(raw: bytes) -> bytes:
    # The spec says DER OCTET STRING; some tokens hand back the bare 32 bytes.
    if len(raw) == 32:
        return raw
    if len(raw) == 34 and raw[:2] == b"\x04\x20":
        return raw[2:]
    raise UnsupportedAlgorithmError(f"unexpected Ed25519 EC_POINT encoding ({len(raw)} bytes)")


def read_public(session: pkcs11.Session, label: str) -> PublicKey:
    try:
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    except pkcs11.NoSuchKey:
        raise KeyNotFoundError(f"no public key labelled {label!r} next to the private key") from None
    key_type = pub.key_type
    if key_type is KeyType.EC:
        loaded = serialization.load_der_public_key(encode_ec_public_key(pub))  # type: ignore[arg-type]
    elif key_type is KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        loaded = rsa.RSAPublicNumbers(e, n).public_key()
    elif key_type is KeyType.EC_EDWARDS:
        loaded = ed25519.Ed25519PublicKey.from_public_bytes(_ed25519_point(pub[Attribute.EC_POINT]))
    else:
        raise UnsupportedAlgorithmError(f"key {label!r} has unsupported key type {key_type!r}")
    if not isinstance(loaded, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise UnsupportedAlgorithmError(f"key {label!r} has an unsupported public key")
    from_public_key(loaded)
    return loaded


def private_labels(session: pkcs11.Session) -> list[str]:
    labels = [obj[Attribute.LABEL] for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})]
    return sorted(str(label) for label in labels)
