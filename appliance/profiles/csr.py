"""CSR intake: size, structure, key policy, proof of possession, in that order.

Cheap checks come first so a hostile station spends our CPU on as little as possible: the size before any
parsing, the DER skeleton and the key policy before the signature check. Messages never echo the input.

Every call into cryptography on bytes a device sent refuses with a reason code on ANY exception it raises, not
on a list of types: what it raises for a malformed input is not a stable contract (cryptography 50 raises
x509.InvalidVersion, which is not a ValueError, for a CSR of version 2), and such a failure is a property of
the input whatever its type. One that escaped once broke the worker pool for every station.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from appliance import der
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles.model import Profile

_PEM_LABELS: Final = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
_ID_EC_PUBLIC_KEY: Final = der.oid_content("1.2.840.10045.2.1")
_RSA_ENCRYPTION: Final = der.oid_content("1.2.840.113549.1.1.1")
_EC_CURVES: Final = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
# SHA-1 and MD5 signatures do not prove possession: a second preimage or collision could be reused.
_POP_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
RSA_EXPONENT: Final = 65537
_CERTIFICATE_KEY_TYPES: Final = typing.get_args(CertificatePublicKeyTypes)


@dataclass(frozen=True)
class ValidatedCsr:
    csr: x509.CertificateSigningRequest
    public_key: CertificatePublicKeyTypes
    key_algorithm: str
    # Of the canonical re-encoding, so the same key gives the same hash however the CSR spelled it; the
    # "key already certified for another device" check relies on this.
    public_key_sha256: bytes
    der_sha256: bytes
    der: bytes = (
        b""  # the DER that was checked (a PEM input decoded): what later stages must read, not the input
    )
    spki_der: bytes = (
        b""  # the canonical re-encoding of the key (SubjectPublicKeyInfo), as a certificate holds it
    )


def _refuse(code: ReasonCode, message: str, **details: Any) -> NoReturn:
    raise IssuanceRefused(message, code, details)


def _pem_to_der(data: bytes) -> bytes:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        _refuse(ReasonCode.BAD_CSR, "PEM CSR contains non-ASCII bytes")
    lines = [line.strip() for line in text.strip().splitlines()]
    for label in _PEM_LABELS:
        if (
            len(lines) >= 3
            and lines[0] == f"-----BEGIN {label}-----"
            and lines[-1] == f"-----END {label}-----"
        ):
            break
    else:
        _refuse(ReasonCode.BAD_CSR, "PEM input is not exactly one CERTIFICATE REQUEST block")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        _refuse(ReasonCode.BAD_CSR, "PEM CSR body is not valid base64")


def _spki_algorithm(data: bytes) -> tuple[bytes, der.Tlv | None, bytes]:
    """(algorithm OID content, parameters element or None, SPKI bytes) from the CSR's DER skeleton.

    Also proves the outer structure is one definite-length DER SEQUENCE with nothing after it.
    """
    outer = der.read_tlv(data)
    if outer.tag != der.TAG_SEQUENCE or outer.end != len(data):
        raise ValueError("not a single DER SEQUENCE")
    parts = der.read_children(data, outer)
    if len(parts) != 3 or parts[0].tag != der.TAG_SEQUENCE:
        raise ValueError("not a CertificationRequest")
    info = der.read_children(data, parts[0])
    if len(info) < 3 or info[2].tag != der.TAG_SEQUENCE:
        raise ValueError("no SubjectPublicKeyInfo")
    spki = info[2]
    alg_oid, params = _spki_parts(data, spki)
    return alg_oid, params, data[spki.start : spki.end]


def _classify(key: CertificatePublicKeyTypes, profile: Profile) -> str:
    allowed = sorted(profile.key_algorithms)
    if isinstance(key, ec.EllipticCurvePublicKey):  # first: the usual device key, and a cheap check
        curve = key.curve.name
        name = _EC_CURVES.get(curve, f"ec-{curve}")
    elif isinstance(key, rsa.RSAPublicKey):
        size = key.key_size
        exponent = key.public_numbers().e
        if exponent != RSA_EXPONENT:
            # e=1 makes the "signature" the padded hash; small or even exponents break RSA outright.
            _refuse(
                ReasonCode.KEY_POLICY,
                f"RSA public exponent {exponent if exponent < 2**32 else '(huge)'} not allowed; only 65537",
                key_algorithm=f"rsa-{size}",
                allowed=allowed,
            )
        name = f"rsa-{size}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        name = "ed25519"
    else:
        name = type(key).__name__.removesuffix("PublicKey").lower() or "unknown"
    if name not in profile.key_algorithms:
        _refuse(
            ReasonCode.KEY_POLICY,
            f"key algorithm {name} not allowed by profile {profile.name}; allowed: {', '.join(allowed)}",
            key_algorithm=name,
            allowed=allowed,
        )
    return name


def _key_encoding_ok(alg_oid: bytes, params: der.Tlv | None) -> bool:
    if alg_oid == _ID_EC_PUBLIC_KEY and (params is None or params.tag != der.TAG_OID):
        # cryptography 50 silently maps explicit parameters that equal a named curve to that curve; a profile
        # names curves, and RFC 5480 2.1.1 requires namedCurve in PKIX.
        _refuse(
            ReasonCode.KEY_POLICY,
            "EC public key with explicit or implicit curve parameters; only named curves are accepted",
            key_algorithm="ec-explicit",
        )
    return True


def _checked_key(
    alg_oid: bytes,
    params: der.Tlv | None,
    load: Callable[[], CertificatePublicKeyTypes],
    profile: Profile,
    what: str,
) -> tuple[CertificatePublicKeyTypes, str]:
    """The key policy shared by CSRs and bare public keys (CMP ir/cr): named curves only, loadable, RSA
    exponent 65537, an algorithm of the profile. Returns (key, profile-style algorithm name)."""
    _key_encoding_ok(alg_oid, params)
    try:
        key = load()
    except UnsupportedAlgorithm:
        _refuse(ReasonCode.KEY_POLICY, f"{what} public key type is not supported")
    except Exception:  # noqa: BLE001 - see the module docstring: any failure to load the device's key
        # cryptography refuses RSA exponents below 3 and even ones here, before our own exponent check.
        if alg_oid == _RSA_ENCRYPTION:
            _refuse(
                ReasonCode.KEY_POLICY, "RSA public key is invalid; only public exponent 65537 is accepted"
            )
        _refuse(ReasonCode.KEY_POLICY, f"{what} public key is invalid")
    return key, _classify(key, profile)


@dataclass(frozen=True)
class ValidatedKey:
    """A bare public key (SubjectPublicKeyInfo) whose proof of possession a front end has already verified."""

    public_key: CertificatePublicKeyTypes
    key_algorithm: str
    public_key_sha256: bytes
    der_sha256: bytes  # of the SPKI as received
    spki_der: bytes = (
        b""  # the canonical re-encoding of the key (SubjectPublicKeyInfo), as a certificate holds it
    )


def _spki_parts(data: bytes, spki: der.Tlv) -> tuple[bytes, der.Tlv | None]:
    spki_parts = der.read_children(data, spki)
    if len(spki_parts) != 2 or spki_parts[0].tag != der.TAG_SEQUENCE:
        raise ValueError("bad SubjectPublicKeyInfo")
    alg = der.read_children(data, spki_parts[0])
    if not alg or alg[0].tag != der.TAG_OID or len(alg) > 2:
        raise ValueError("bad AlgorithmIdentifier")
    params = alg[1] if len(alg) == 2 else None
    return data[alg[0].content : alg[0].end], params


def _load_spki(spki_der: bytes) -> CertificatePublicKeyTypes:
    key = serialization.load_der_public_key(spki_der)
    if not isinstance(key, _CERTIFICATE_KEY_TYPES):
        raise UnsupportedAlgorithm("not a certificate public key type")
    return typing.cast(CertificatePublicKeyTypes, key)


def validate_public_key(spki_der: bytes, profile: Profile, *, max_bytes: int = 8192) -> ValidatedKey:
    """Apply the key policy of validate_csr to a SubjectPublicKeyInfo (DER). The caller has verified proof of
    possession (CMP: the CRMF POP signature). Raises IssuanceRefused (BAD_CSR, KEY_POLICY)."""
    if not spki_der or len(spki_der) > max_bytes:
        _refuse(
            ReasonCode.BAD_CSR, f"public key of {len(spki_der)} bytes is not accepted", size=len(spki_der)
        )
    try:
        top = der.read_tlv(spki_der)
        if top.tag != der.TAG_SEQUENCE or top.end != len(spki_der):
            raise ValueError("not a single DER SEQUENCE")
        alg_oid, params = _spki_parts(spki_der, top)
    except ValueError as exc:
        _refuse(ReasonCode.BAD_CSR, f"public key is not valid DER: {exc}", size=len(spki_der))
    key, key_algorithm = _checked_key(alg_oid, params, lambda: _load_spki(spki_der), profile, "requested")
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ValidatedKey(
        key, key_algorithm, hashlib.sha256(spki).digest(), hashlib.sha256(spki_der).digest(), spki_der=spki
    )


_ECDSA_POP: Final = frozenset({
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512,
})  # fmt: skip


def _pop_valid(
    csr: x509.CertificateSigningRequest, key: CertificatePublicKeyTypes, sig_hash: hashes.HashAlgorithm | None
) -> bool:
    """The CSR's signature verifies with its own key. ECDSA with the key already loaded: is_signature_valid
    would load it from the CSR a second time (~20 us, a tenth of a certificate's CPU); anything else through
    cryptography's own check."""
    if (
        isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(sig_hash, _POP_HASHES)
        and csr.signature_algorithm_oid in _ECDSA_POP
    ):
        try:
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(sig_hash))
        except InvalidSignature:
            return False
        return True
    return bool(csr.is_signature_valid)


def validate_csr(data: bytes, profile: Profile, *, max_bytes: int = 8192) -> ValidatedCsr:
    """Check a PKCS#10 CSR (DER, or PEM starting with -----BEGIN) against `profile`.

    Raises IssuanceRefused with BAD_CSR, KEY_POLICY or BAD_POP. Only the public key of the result may be used
    for issuance; everything else the CSR asks for is ignored by the builder.
    """
    if len(data) > max_bytes:
        _refuse(ReasonCode.BAD_CSR, f"CSR is {len(data)} bytes; at most {max_bytes} accepted", size=len(data))
    if not data:
        _refuse(ReasonCode.BAD_CSR, "CSR is empty", size=0)
    if data.startswith(b"-----BEGIN"):
        data = _pem_to_der(data)

    try:
        alg_oid, params, _spki = _spki_algorithm(data)
    except ValueError as exc:
        # Our own messages: fixed texts that never contain the input.
        _refuse(ReasonCode.BAD_CSR, f"CSR is not valid DER: {exc}", size=len(data))
    _key_encoding_ok(alg_oid, params)  # before parsing it whole: cheap refusals first (module docstring)
    try:
        csr = x509.load_der_x509_csr(data)
    except x509.InvalidVersion:
        _refuse(ReasonCode.BAD_CSR, "CSR version is not v1 (0)", size=len(data))
    except Exception:  # noqa: BLE001 - see the module docstring
        _refuse(ReasonCode.BAD_CSR, "CSR does not parse as PKCS#10", size=len(data))
    key, key_algorithm = _checked_key(alg_oid, params, csr.public_key, profile, "CSR")

    try:
        sig_hash = csr.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - UnsupportedAlgorithm, or whatever an odd AlgorithmIdentifier raises
        _refuse(ReasonCode.BAD_POP, "CSR signature algorithm is not supported")
    hash_ok = sig_hash is None if key_algorithm == "ed25519" else isinstance(sig_hash, _POP_HASHES)
    if not hash_ok:
        name = sig_hash.name if sig_hash is not None else "none"
        _refuse(ReasonCode.BAD_POP, f"CSR signature hash {name} is not accepted; use SHA-256 or stronger")
    try:
        valid = _pop_valid(csr, key, sig_hash)
    except Exception:  # noqa: BLE001 - see the module docstring: no proof either way is no proof
        valid = False
    if not valid:
        _refuse(ReasonCode.BAD_POP, "CSR signature does not verify (no proof of possession)")

    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ValidatedCsr(
        csr=csr,
        public_key=key,
        key_algorithm=key_algorithm,
        public_key_sha256=hashlib.sha256(spki).digest(),
        der_sha256=hashlib.sha256(data).digest(),
        der=data,
        spki_der=spki,
    )
