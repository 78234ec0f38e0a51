"""CMP message protection: MAC (PasswordBasedMac, PBMAC1) and signatures (software or HSM keys).

Verification is always over `PKIMessage.protected_part`, built from the header and body bytes exactly as
received; nothing is re-encoded. What a hostile message can make verification cost is bounded before any of it
is spent: MAC parameters (iteration counts, salt and key lengths) are checked against a policy before any key
derivation runs, so a message costs at most `MacPolicy.max_iterations` hash rounds, computed by libcrypto outside
the GIL (appliance/cmp/_pbm.py; PBKDF2 by hashlib, also outside it); and a signer's key must be one the
appliance's key policy knows (`check_signer_key`: RSA 2048/3072/4096 with exponent 65537, EC P-256/P-384/P-521,
Ed25519, Ed448) before a signature is verified with it (an RSA key with a 3,070-bit public exponent made one
verification cost 100 times more).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_alt_modules import rfc8018, rfc9480

from appliance import pyasn1_repr  # noqa: F401 - installs pyasn1's cheap schema repr (see there)
from appliance.cmp import _der, _pbm, oids
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.model import (
    SIGNATURE_ALGORITHMS,
    AlgorithmIdentifier,
    PKIHeader,
    PKIMessage,
    verify_signature_with,
)
from appliance.signerkeys import SIGNER_KEYS_TEXT, signer_key_accepted


class ProtectionKind(enum.Enum):
    NONE = "none"
    PBM = "PasswordBasedMac"
    PBMAC1 = "PBMAC1"
    SIGNATURE = "signature"


@dataclass(frozen=True)
class MacPolicy:
    """What MAC parameters a received message may use. The same policy bounds what we send."""

    min_iterations: int = 100
    max_iterations: int = 10_000
    """What one message may make us derive. openssl cmp sends 500 by default; this appliance sends 10,000
    (MacProtector); openssl itself accepts at most 100,000. The server's is `[cmp] max_mac_iterations`."""
    min_salt_length: int = 8
    max_salt_length: int = 128
    min_key_length: int = 16
    max_key_length: int = 64
    allow_sha1: bool = False
    """SHA-1 as PBM OWF and HMAC-SHA1 as MAC (openssl cmp's default -mac is hmac-sha1): refused unless set,
    for legacy devices that cannot be reconfigured."""


DEFAULT_MAC_POLICY = MacPolicy()

_SHA2 = {oids.SHA256: "sha256", oids.SHA384: "sha384", oids.SHA512: "sha512"}
_HMAC_SHA2 = {
    oids.HMAC_WITH_SHA256: "sha256",
    oids.HMAC_WITH_SHA384: "sha384",
    oids.HMAC_WITH_SHA512: "sha512",
}
_SHA1 = {oids.SHA1: "sha1"}
_HMAC_SHA1 = {oids.HMAC_SHA1: "sha1", oids.HMAC_WITH_SHA1: "sha1"}
_NULL = _der.null()


def _bad_alg(text: str) -> CmpError:
    return CmpError(text, fail_info=FailInfo.BAD_ALG)


def protection_kind(header: PKIHeader) -> ProtectionKind:
    """Which protection header.protectionAlg names; CmpError(badAlg) for anything not supported."""
    alg = header.protection_alg
    if alg is None:
        return ProtectionKind.NONE
    if alg.oid == oids.PASSWORD_BASED_MAC:
        return ProtectionKind.PBM
    if alg.oid == oids.PBMAC1:
        return ProtectionKind.PBMAC1
    if alg.oid in SIGNATURE_ALGORITHMS:
        return ProtectionKind.SIGNATURE
    raise _bad_alg(f"protection algorithm {alg.oid} is not supported")


_SHAPE = {
    "PBMParameter": "PBMParameter (RFC 4211 4.4: salt, owf, iterationCount, mac)",
    "PBMAC1_params": "PBMAC1-params (RFC 8018 A.5: keyDerivationFunc PBKDF2, messageAuthScheme)",
    "PBKDF2_params": "PBKDF2-params (RFC 8018 A.2: salt, iterationCount, keyLength, prf)",
}


def _decode_params(der: bytes | None, spec: Any, what: str, policy: MacPolicy = DEFAULT_MAC_POLICY) -> Any:
    if der is None:
        raise _bad_alg(f"{what} parameters are missing")
    try:
        value, rest = der_decoder.decode(der, asn1Spec=spec)
    except (PyAsn1Error, ValueError, TypeError):
        # Our own words, never pyasn1's (its texts repr schema objects): what was expected, and the bounds.
        raise _bad_alg(
            f"{what} parameters are not a DER {_SHAPE.get(type(spec).__name__, type(spec).__name__)} within the"
            f" bounds accepted here: a salt of {policy.min_salt_length} to {policy.max_salt_length} bytes,"
            f" {policy.min_iterations} to {policy.max_iterations} iterations"
        ) from None
    if rest:
        raise _bad_alg(f"{what} parameters have trailing bytes")
    return value


def _hash_name(value: Any, table: dict[str, str], weak: dict[str, str], policy: MacPolicy, what: str) -> str:
    oid = str(value["algorithm"])
    params = value["parameters"]
    if params.isValue and bytes(params) != _NULL:
        raise _bad_alg(f"{what} {oid} with unexpected parameters")
    if oid in table:
        return table[oid]
    if oid in weak:
        if policy.allow_sha1:
            return weak[oid]
        raise _bad_alg(f"{what} {oid} (SHA-1) is refused by policy")
    raise _bad_alg(f"{what} {oid} is not supported")


def _check_counts(salt: bytes, iterations: int, policy: MacPolicy, what: str) -> None:
    if not policy.min_salt_length <= len(salt) <= policy.max_salt_length:
        raise _bad_alg(f"{what} salt of {len(salt)} bytes: {policy.min_salt_length} to "
                       f"{policy.max_salt_length} required")  # fmt: skip
    if not policy.min_iterations <= iterations <= policy.max_iterations:
        raise _bad_alg(f"{what} iteration count {iterations}: {policy.min_iterations} to "
                       f"{policy.max_iterations} accepted")  # fmt: skip


def derive_mac_key(
    alg: AlgorithmIdentifier, secret: bytes, policy: MacPolicy = DEFAULT_MAC_POLICY
) -> tuple[bytes, str]:
    """(MAC key, HMAC hash name) for a PBM or PBMAC1 protectionAlg, after checking its parameters."""
    if alg.oid == oids.PASSWORD_BASED_MAC:
        p = _decode_params(alg.parameters, rfc9480.PBMParameter(), "PasswordBasedMac", policy)
        salt = bytes(p["salt"])
        iterations = int(p["iterationCount"])
        owf = _hash_name(p["owf"], _SHA2, _SHA1, policy, "PBM one-way function")
        mac = _hash_name(p["mac"], _HMAC_SHA2, _HMAC_SHA1, policy, "PBM MAC")
        _check_counts(salt, iterations, policy, "PBM")
        # RFC 4211 4.4: key = OWF^iterationCount(secret || salt)
        return _pbm.python_pbm_key(owf, secret, salt, iterations), mac
    if alg.oid == oids.PBMAC1:
        p = _decode_params(alg.parameters, rfc8018.PBMAC1_params(), "PBMAC1", policy)
        kdf = p["keyDerivationFunc"]
        if str(kdf["algorithm"]) != oids.PBKDF2:
            raise _bad_alg(f"PBMAC1 key derivation {kdf['algorithm']} is not PBKDF2")
        kdf_params = kdf["parameters"]
        k = _decode_params(
            bytes(kdf_params) if kdf_params.isValue else None, rfc8018.PBKDF2_params(), "PBKDF2", policy
        )
        if k["salt"].getName() != "specified":
            raise _bad_alg("PBKDF2 salt must be specified")
        salt = bytes(k["salt"]["specified"])
        iterations = int(k["iterationCount"])
        prf = _hash_name(k["prf"], _HMAC_SHA2, _HMAC_SHA1, policy, "PBKDF2 PRF")
        mac = _hash_name(p["messageAuthScheme"], _HMAC_SHA2, _HMAC_SHA1, policy, "PBMAC1 MAC")
        _check_counts(salt, iterations, policy, "PBMAC1")
        length = int(k["keyLength"]) if k["keyLength"].isValue else hashlib.new(mac).digest_size
        if not policy.min_key_length <= length <= policy.max_key_length:
            raise _bad_alg(f"PBKDF2 key length {length}: {policy.min_key_length} to {policy.max_key_length} bytes"
                           " accepted")  # fmt: skip
        return hashlib.pbkdf2_hmac(prf, secret, salt, iterations, length), mac
    raise _bad_alg(f"{alg.oid} is not a MAC algorithm")


def compute_mac(
    alg: AlgorithmIdentifier, secret: bytes, data: bytes, policy: MacPolicy = DEFAULT_MAC_POLICY
) -> bytes:
    """The MAC of `data` under a PBM or PBMAC1 protectionAlg, after checking its parameters against `policy`.
    PBM is computed by libcrypto outside the GIL when it is usable here (appliance/cmp/_pbm.py), else in
    Python; PBMAC1's PBKDF2 by hashlib, which releases the GIL too."""
    if alg.oid == oids.PASSWORD_BASED_MAC and alg.parameters is not None:
        _pbm_parameters_checked(alg.parameters, policy)
        native = _pbm.native()
        if native is not None:
            value = native(alg.parameters, secret, data)
            if value is not None:
                return value
    key, mac = derive_mac_key(alg, secret, policy)
    return hmac.new(key, data, mac).digest()


def _pbm_parameters_checked(der: bytes, policy: MacPolicy) -> None:
    """Everything derive_mac_key checks of a PBMParameter, without deriving anything."""
    p = _decode_params(der, rfc9480.PBMParameter(), "PasswordBasedMac")
    _hash_name(p["owf"], _SHA2, _SHA1, policy, "PBM one-way function")
    _hash_name(p["mac"], _HMAC_SHA2, _HMAC_SHA1, policy, "PBM MAC")
    _check_counts(bytes(p["salt"]), int(p["iterationCount"]), policy, "PBM")


def _checked(message: PKIMessage, kinds: tuple[ProtectionKind, ...]) -> tuple[AlgorithmIdentifier, bytes]:
    kind = protection_kind(message.header)
    alg = message.header.protection_alg
    if kind is ProtectionKind.NONE or alg is None:
        raise CmpError("message is not protected", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    if kind not in kinds:
        raise CmpError(f"{kind.value} protection is not accepted here", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    if message.protection is None:
        raise CmpError(
            "protectionAlg is set but the protection is missing", fail_info=FailInfo.BAD_MESSAGE_CHECK
        )
    return alg, message.protection


def verify_mac(message: PKIMessage, secret: bytes, *, policy: MacPolicy = DEFAULT_MAC_POLICY) -> None:
    """Check a PBM or PBMAC1 protection with `secret` over the bytes received. CmpError otherwise."""
    alg, value = _checked(message, (ProtectionKind.PBM, ProtectionKind.PBMAC1))
    if not hmac.compare_digest(compute_mac(alg, secret, message.protected_part, policy), value):
        raise CmpError("MAC protection does not verify", fail_info=FailInfo.BAD_MESSAGE_CHECK)


def verify_signature(message: PKIMessage, signer: x509.Certificate | None = None) -> x509.Certificate:
    """Check a signature protection with `signer`, or else the first certificate of extraCerts
    (RFC 9483 3.3), and that senderKID names that certificate's key: it MUST be its subjectKeyIdentifier when
    the certificate has one (RFC 9483 3.1). Returns the certificate used. Whether that certificate is TRUSTED
    (chain, revocation, whose it is) is the caller's decision."""
    alg, value = _checked(message, (ProtectionKind.SIGNATURE,))
    if signer is None:
        if not message.extra_certs:
            raise CmpError("signature protection without the signer's certificate in extraCerts",
                           fail_info=FailInfo.BAD_MESSAGE_CHECK)  # fmt: skip
        signer = message.extra_certs[0]
    try:
        key = signer.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise _bad_alg("the signer certificate's public key is not one this appliance can use") from None
    check_signer_key(key)
    verify_signature_with(key, alg, value, message.protected_part)
    ski = subject_key_id(signer)
    if ski is not None and message.header.sender_kid != ski:
        what = (
            "missing" if message.header.sender_kid is None else "not the subjectKeyIdentifier of the signer"
        )
        raise CmpError(f"senderKID is {what} (RFC 9483 3.1)", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    return signer


def check_signer_key(key: object) -> None:
    """Refuse (badAlg), before anything is verified with it, a key this appliance would not accept from a peer
    (appliance/signerkeys.py: the cost of a verification is the key's, and the key comes from a certificate
    anyone can make)."""
    if not signer_key_accepted(key):
        raise _bad_alg(f"the signer's key is not accepted: {SIGNER_KEYS_TEXT}")


@dataclass(frozen=True)
class VerifiedProtection:
    kind: ProtectionKind
    sender_kid: bytes | None
    signer: x509.Certificate | None = None


def verify_protection(
    message: PKIMessage,
    *,
    secret_for: Callable[[bytes], bytes | None] | None = None,
    allow_signature: bool = True,
    allow_unprotected: bool = False,
    policy: MacPolicy = DEFAULT_MAC_POLICY,
) -> VerifiedProtection:
    """Verify whichever protection the message carries, as the receiving side configured it.

    MAC: the secret is looked up by senderKID with `secret_for`; an unknown senderKID gets the same answer as
    a wrong MAC (badMessageCheck) so a peer cannot probe which KIDs exist."""
    kind = protection_kind(message.header)
    if kind is ProtectionKind.NONE:
        if allow_unprotected and message.protection is None:
            return VerifiedProtection(kind, message.header.sender_kid)
        raise CmpError("protection is required", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    if kind is ProtectionKind.SIGNATURE:
        if not allow_signature:
            raise CmpError("signature protection is not accepted here", fail_info=FailInfo.BAD_MESSAGE_CHECK)
        return VerifiedProtection(kind, message.header.sender_kid, verify_signature(message))
    kid = message.header.sender_kid
    if secret_for is None:
        raise CmpError("MAC protection is not accepted here", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    if kid is None:
        raise CmpError("MAC protection requires senderKID", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    secret = secret_for(kid)
    if secret is None:
        raise CmpError("MAC protection does not verify", fail_info=FailInfo.BAD_MESSAGE_CHECK)
    verify_mac(message, secret, policy=policy)
    return VerifiedProtection(kind, kid)


# --- sending ---------------------------------------------------------------------------------------------


def pbm_parameters(
    salt: bytes, iterations: int, owf: str = oids.SHA256, mac: str = oids.HMAC_WITH_SHA256
) -> bytes:
    """PBMParameter DER (OWF and MAC identifiers without parameters, as openssl writes them)."""
    return _der.sequence(_der.octet_string(salt), _der.algorithm_identifier(owf), _der.integer(iterations),
                         _der.algorithm_identifier(mac))  # fmt: skip


def pbmac1_parameters(salt: bytes, iterations: int, key_length: int = 32) -> bytes:
    """PBMAC1-params DER: PBKDF2 with HMAC-SHA256 as PRF, HMAC-SHA256 as MAC (RFC 9481 6.1.3)."""
    hmac_sha256 = _der.algorithm_identifier(oids.HMAC_WITH_SHA256, _NULL)
    kdf = _der.sequence(
        _der.octet_string(salt), _der.integer(iterations), _der.integer(key_length), hmac_sha256
    )
    return _der.sequence(_der.algorithm_identifier(oids.PBKDF2, kdf), hmac_sha256)


@dataclass(frozen=True)
class MacProtector:
    """MAC protection with a shared secret: PasswordBasedMac (SHA-256 / HMAC-SHA256) or PBMAC1 (PBKDF2-SHA256,
    HMAC-SHA256). A fresh random salt for every message."""

    secret: bytes = field(repr=False)
    sender_kid: bytes
    kind: ProtectionKind = ProtectionKind.PBM
    iterations: int = 10_000
    salt_length: int = 16

    def __post_init__(self) -> None:
        if self.kind not in (ProtectionKind.PBM, ProtectionKind.PBMAC1):
            raise ValueError("MacProtector kind must be PBM or PBMAC1")
        if not self.secret or not self.sender_kid:
            raise ValueError("MAC protection needs a secret and a senderKID")

    def __repr__(self) -> str:
        return f"MacProtector(kind={self.kind.value}, sender_kid={self.sender_kid!r}, iterations={self.iterations})"

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        return ()

    def algorithm(self) -> AlgorithmIdentifier:
        salt = os.urandom(self.salt_length)
        if self.kind is ProtectionKind.PBM:
            return AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(salt, self.iterations))
        return AlgorithmIdentifier(oids.PBMAC1, pbmac1_parameters(salt, self.iterations))

    def prepare(self, header: PKIHeader) -> PKIHeader:
        return replace(
            header, protection_alg=self.algorithm(), sender_kid=header.sender_kid or self.sender_kid
        )

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        if header.protection_alg is None:
            raise ValueError("prepare() the header first")
        policy = replace(
            DEFAULT_MAC_POLICY, max_iterations=max(self.iterations, DEFAULT_MAC_POLICY.max_iterations)
        )
        return compute_mac(header.protection_alg, self.secret, protected_part, policy)


def signature_algorithm(key: CertificateIssuerPrivateKeyTypes) -> AlgorithmIdentifier:
    """The signature algorithm used with `key`: ECDSA with the curve's hash, RSA PKCS#1 v1.5 SHA-256, EdDSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        oid = {384: oids.ECDSA_WITH_SHA384, 521: oids.ECDSA_WITH_SHA512}.get(
            key.curve.key_size, oids.ECDSA_WITH_SHA256
        )
        return AlgorithmIdentifier(oid)
    if isinstance(key, rsa.RSAPrivateKey):
        return AlgorithmIdentifier(oids.SHA256_WITH_RSA, _NULL)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return AlgorithmIdentifier(oids.ED25519)
    if isinstance(key, ed448.Ed448PrivateKey):
        return AlgorithmIdentifier(oids.ED448)
    raise ValueError(f"cannot sign CMP messages with a {type(key).__name__}")


_ECDSA_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    oids.ECDSA_WITH_SHA256: hashes.SHA256,
    oids.ECDSA_WITH_SHA384: hashes.SHA384,
    oids.ECDSA_WITH_SHA512: hashes.SHA512,
}


def sign_data(key: CertificateIssuerPrivateKeyTypes, data: bytes) -> tuple[AlgorithmIdentifier, bytes]:
    """Sign with a cryptography key (an HSM key from hsm.keys is one). HSM keys verify their own signatures."""
    alg = signature_algorithm(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return alg, key.sign(data, ec.ECDSA(_ECDSA_HASH[alg.oid]()))
    if isinstance(key, rsa.RSAPrivateKey):
        return alg, key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return alg, key.sign(data)
    raise ValueError(f"cannot sign CMP messages with a {type(key).__name__}")


def subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class SignatureProtector:
    """Signature protection with `key` and its `certificate` (sent first in extraCerts, then `chain`).
    senderKID defaults to the certificate's subjectKeyIdentifier (RFC 9483 3.1)."""

    key: CertificateIssuerPrivateKeyTypes
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        return (self.certificate, *self.chain)

    def prepare(self, header: PKIHeader) -> PKIHeader:
        kid = header.sender_kid if header.sender_kid is not None else subject_key_id(self.certificate)
        return replace(header, protection_alg=signature_algorithm(self.key), sender_kid=kid)

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        alg, signature = sign_data(self.key, protected_part)
        if header.protection_alg != alg:
            raise ValueError("header.protection_alg does not match the key")
        return signature

    def protect_many(self, headers: Sequence[PKIHeader], parts: Sequence[bytes]) -> list[bytes]:
        """protect() for many messages: an HSM key signs them all in one PKCS#11 call (sign_many, which hashes
        as signature_algorithm says: SHA-256, or SHA-384 on P-384, PKCS#1 v1.5 SHA-256, pure EdDSA); a
        software key one by one."""
        alg = signature_algorithm(self.key)
        if any(h.protection_alg != alg for h in headers):
            raise ValueError("header.protection_alg does not match the key")
        sign_many = getattr(self.key, "sign_many", None)
        if sign_many is None or (
            isinstance(self.key, ec.EllipticCurvePrivateKey) and self.key.curve.key_size > 384
        ):
            return [sign_data(self.key, p)[1] for p in parts]
        signatures: list[bytes] = sign_many(list(parts))
        return signatures
