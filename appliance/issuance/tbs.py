"""Get the exact to-be-signed bytes of a certificate before any HSM is involved.

The journal records the hash of the exact TBSCertificate in the intent row, and commits it, before the HSM
signs; the HSM then signs those bytes and nothing else. cryptography builds a TBS only while signing, so we
let it sign with a stand-in key that captures the bytes and returns a placeholder, then keep the TBS and the
signatureAlgorithm it encoded. The placeholder never leaves this module.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import Buffer

from appliance.der import assemble_certificate, split_certificate
from hsm.algorithms import KeyAlgorithm, default_hash


@dataclass(frozen=True)
class Tbs:
    tbs: bytes  # the TBSCertificate TLV, exactly as the HSM will sign it
    signature_algorithm: bytes  # the AlgorithmIdentifier TLV that goes beside it

    @functools.cached_property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.tbs).digest()

    def __reduce__(self) -> tuple[type[Tbs], tuple[bytes, bytes]]:
        # Two bytes objects, not the dataclass state: every batch crosses the worker pipe twice (prepare and
        # finish), and the default pickling of a dataclass costs several times as much (bench/issue.py).
        return (Tbs, (self.tbs, self.signature_algorithm))

    def certificate(self, signature: bytes) -> bytes:
        return assemble_certificate(self.tbs, self.signature_algorithm, signature)


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise TypeError("a TBS capture key cannot do this")


class _CaptureEc(ec.EllipticCurvePrivateKey):
    def __init__(self, public: ec.EllipticCurvePublicKey) -> None:
        self._public = public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        return b"\x30\x06\x02\x01\x01\x02\x01\x01"  # a well-formed ECDSA-Sig-Value placeholder

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    exchange = private_numbers = private_bytes = __copy__ = __deepcopy__ = _refuse


class _CaptureRsa(rsa.RSAPrivateKey):
    def __init__(self, public: rsa.RSAPublicKey) -> None:
        self._public = public

    def sign(self, data: Buffer, padding: Any, algorithm: Any) -> bytes:
        return b"\x00" * ((self._public.key_size + 7) // 8)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    decrypt = private_numbers = private_bytes = __copy__ = __deepcopy__ = _refuse


class _CaptureEd25519(ed25519.Ed25519PrivateKey):
    def __init__(self, public: ed25519.Ed25519PublicKey) -> None:
        self._public = public

    def sign(self, data: Buffer) -> bytes:
        return b"\x00" * 64

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    private_bytes = private_bytes_raw = __copy__ = __deepcopy__ = _refuse


CaptureKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def capture_key(public_key: Any) -> CaptureKey:
    """A stand-in private key for `public_key` whose signatures are placeholders (also used for OCSP answers,
    appliance/va/presign.py, whose to-be-signed bytes cryptography likewise only builds while signing)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CaptureEc(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        return _CaptureRsa(public_key)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return _CaptureEd25519(public_key)
    raise TypeError(f"unsupported CA key type {type(public_key).__name__}")


class TbsMaker:
    """Makes TBS bytes for one issuing CA key (its public half and algorithm are all it needs)."""

    def __init__(self, ca_public_key: Any, algorithm: KeyAlgorithm) -> None:
        self.algorithm = algorithm
        self.hash: hashes.HashAlgorithm | None = default_hash(algorithm)
        self._key: CaptureKey = capture_key(ca_public_key)

    def make(self, builder: x509.CertificateBuilder) -> Tbs:
        placeholder = builder.sign(self._key, self.hash)  # type: ignore[arg-type]
        tbs, sigalg, _ = split_certificate(placeholder.public_bytes(Encoding.DER))
        return Tbs(tbs, sigalg)
