"""What the EST layer reads of a device's PKCS#10 before the core sees it: the subject (whose serialNumber names
the device), the challengePassword (where RFC 7030 3.5 puts the channel binding) and its public key. Pure code.

The core validates the CSR in full (size, strict DER, key policy, proof of possession) in its worker process;
this reads only what routing the request needs, after the same size bound, and turns any exception cryptography
raises on the device's bytes into a refusal (what it raises for malformed input is not a stable contract:
architecture.md, "Bad input never stops issuance").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from appliance.errors import ReasonCode
from appliance.est.errors import EstError

# RFC 7030 4.4.1.1 / 4.4.1.2: a serverkeygen client that wants its key encrypted names the key to encrypt it with
# in one of these CSR attributes.
DECRYPT_KEY_IDENTIFIER: Final = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.37")
ASYMMETRIC_DECRYPT_KEY_IDENTIFIER: Final = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.54")
_SPKI: Final = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class EstCsr:
    der: bytes
    subject: x509.Name
    challenge_password: bytes | None
    wants_encrypted_key: bool
    """serverkeygen: the CSR asks for the key encrypted (RFC 7030 4.4.1.1, 4.4.1.2)."""
    signature_valid: bool
    public_key_der: bytes | None
    """The SubjectPublicKeyInfo, or None when cryptography cannot load the key (the core refuses it then)."""
    key_algorithm: str | None
    """ec-p256, ec-p384, rsa-<bits>, ed25519, or None: the key type the device signed its CSR with."""


def _bad(text: str, code: ReasonCode = ReasonCode.BAD_CSR) -> EstError:
    return EstError(text, code, status=400)


def _algorithm(key: object) -> str | None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return None


def read_csr(der: bytes, max_bytes: int) -> EstCsr:
    """The parts of a CSR the EST layer needs; EstError 400 (BAD_CSR) when it cannot be read."""
    if len(der) > max_bytes:
        raise _bad(f"the CSR is {len(der)} bytes, above the limit of {max_bytes}")
    try:
        csr = x509.load_der_x509_csr(der)
        subject = csr.subject
        attributes = list(csr.attributes)
    except Exception:  # noqa: BLE001 - any failure on the device's bytes is the device's (module docstring)
        raise _bad(
            "the CSR is not a PKCS#10 request in DER (or its subject or attributes do not decode)"
        ) from None
    encrypted = any(a.oid in (DECRYPT_KEY_IDENTIFIER, ASYMMETRIC_DECRYPT_KEY_IDENTIFIER) for a in attributes)
    try:
        signature_valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - as above
        signature_valid = False
    passwords = [a.value for a in attributes if a.oid == AttributeOID.CHALLENGE_PASSWORD]
    if len(passwords) > 1:
        raise _bad("the CSR has more than one challengePassword attribute")
    try:
        key = csr.public_key()
        spki: bytes | None = key.public_bytes(*_SPKI)
        algorithm = _algorithm(key)
    except Exception:  # noqa: BLE001 - as above: the core's key policy refuses it with its reason
        spki, algorithm = None, None
    return EstCsr(
        der, subject, passwords[0] if passwords else None, encrypted, signature_valid, spki, algorithm
    )


def device_serial(subject: x509.Name) -> str:
    """The device serial: the subject's serialNumber attribute, exactly one (as a CMP label reads it)."""
    values = subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise _bad("the CSR's subject must carry exactly one serialNumber attribute: the device serial",
                   ReasonCode.BAD_DEVICE_SERIAL)  # fmt: skip
    return values[0].value


def same_name(a: x509.Name, b: x509.Name) -> bool:
    """The same distinguished name attribute by attribute (OID and value), whatever string types encode them:
    `openssl req -subj` writes UTF8String where a certificate may have PrintableString."""

    def parts(name: x509.Name) -> list[list[tuple[str, str | bytes]]]:
        return [sorted(((attr.oid.dotted_string, attr.value) for attr in rdn), key=repr) for rdn in name.rdns]

    return parts(a) == parts(b)
